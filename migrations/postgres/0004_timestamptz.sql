-- Times become timestamptz: the web app reading these tables gets real timestamps. Every stored
-- text is YYYY-MM-DDTHH:MM:SS.ffffffZ (0003), which PostgreSQL reads exactly, microseconds and the
-- UTC zone included. rolesync renders them as before (its answers, CLI output and logs are unchanged).
ALTER TABLE roles
    ALTER COLUMN created_at TYPE timestamptz USING created_at::timestamptz;
ALTER TABLE memberships
    ALTER COLUMN version TYPE timestamptz USING version::timestamptz,
    ALTER COLUMN updated_at TYPE timestamptz USING updated_at::timestamptz;
ALTER TABLE role_audit
    ALTER COLUMN recorded_at TYPE timestamptz USING recorded_at::timestamptz,
    ALTER COLUMN version TYPE timestamptz USING version::timestamptz;
ALTER TABLE webhook_events
    ALTER COLUMN received_at TYPE timestamptz USING received_at::timestamptz;
ALTER TABLE sync_state
    ALTER COLUMN updated_at TYPE timestamptz USING updated_at::timestamptz;
