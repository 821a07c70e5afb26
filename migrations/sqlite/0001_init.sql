-- rolesync schema (SQLite). Timestamps are UTC ISO-8601 text with milliseconds
-- (YYYY-MM-DDTHH:MM:SS.mmmZ), so text order is time order.

CREATE TABLE roles (
    slug        TEXT PRIMARY KEY NOT NULL,
    description TEXT,
    created_at  TEXT NOT NULL
);

INSERT INTO roles (slug, description, created_at) VALUES
    ('admin',  'WorkOS default admin role',  strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ('member', 'WorkOS default member role', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));

CREATE TABLE memberships (
    organization_id  TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership_id    TEXT NOT NULL,
    role_slug        TEXT,
    workos_role_slug TEXT,
    status           TEXT NOT NULL,
    version          TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (organization_id, user_id)
);

CREATE INDEX memberships_membership_id ON memberships (membership_id);

CREATE TABLE role_audit (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at      TEXT NOT NULL,
    organization_id  TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership_id    TEXT NOT NULL,
    source           TEXT NOT NULL,
    event_id         TEXT,
    workos_role_slug TEXT,
    old_role         TEXT,
    new_role         TEXT,
    old_status       TEXT,
    new_status       TEXT,
    outcome          TEXT NOT NULL,
    detail           TEXT NOT NULL,
    version          TEXT NOT NULL
);

CREATE INDEX role_audit_membership ON role_audit (organization_id, user_id, id);

CREATE TABLE webhook_events (
    event_id    TEXT PRIMARY KEY NOT NULL,
    event_type  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload     TEXT,
    outcome     TEXT NOT NULL
);
