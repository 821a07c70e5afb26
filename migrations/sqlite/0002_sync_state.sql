-- Cursors of the catch-up paths (the Events API), advanced in the same transaction as the events they cover.
CREATE TABLE sync_state (
    name       TEXT PRIMARY KEY NOT NULL,
    cursor     TEXT,
    updated_at TEXT NOT NULL
);

CREATE INDEX webhook_events_received_at ON webhook_events (received_at);
