-- Timestamps gain microseconds (YYYY-MM-DDTHH:MM:SS.ffffffZ): versions within one millisecond
-- order as WorkOS sent them. Rows written with milliseconds get three zeros, so text order stays
-- time order across old and new rows.
UPDATE roles SET created_at = substr(created_at, 1, 23) || '000Z' WHERE length(created_at) = 24;
UPDATE memberships SET version = substr(version, 1, 23) || '000Z' WHERE length(version) = 24;
UPDATE memberships SET updated_at = substr(updated_at, 1, 23) || '000Z' WHERE length(updated_at) = 24;
UPDATE role_audit SET recorded_at = substr(recorded_at, 1, 23) || '000Z' WHERE length(recorded_at) = 24;
UPDATE role_audit SET version = substr(version, 1, 23) || '000Z' WHERE length(version) = 24;
UPDATE webhook_events SET received_at = substr(received_at, 1, 23) || '000Z' WHERE length(received_at) = 24;
UPDATE sync_state SET updated_at = substr(updated_at, 1, 23) || '000Z' WHERE length(updated_at) = 24;
