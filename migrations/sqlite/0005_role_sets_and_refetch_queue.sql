-- Role sets (WorkOS's multiple roles) and the refetch queue.
--
-- The applied set and the set WorkOS last reported (unknown slugs included), as JSON arrays of
-- slugs, sorted: what the rules compare; the view membership_roles below is what apps read.
ALTER TABLE memberships ADD COLUMN role_slugs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE memberships ADD COLUMN workos_role_slugs TEXT NOT NULL DEFAULT '[]';
-- Audit rows record the set before and after (JSON arrays; NULL where no row was stored, and on
-- rows written before this migration).
ALTER TABLE role_audit ADD COLUMN old_roles TEXT;
ALTER TABLE role_audit ADD COLUMN new_roles TEXT;

-- A stored membership's set is its primary role.
UPDATE memberships SET role_slugs = json_array(role_slug) WHERE role_slug IS NOT NULL;
UPDATE memberships SET workos_role_slugs = json_array(workos_role_slug) WHERE workos_role_slug IS NOT NULL;

-- membership_roles: one row per role a membership holds (its applied set), for an app with multiple
-- roles on; a single-role app keeps reading memberships.role_slug (the primary role). A view over
-- memberships.role_slugs, so it is always in step with its row and costs no write.
CREATE VIEW membership_roles AS
    SELECT m.organization_id, m.user_id, r.value AS role_slug
    FROM memberships m, json_each(m.role_slugs) AS r;

-- Events that change a membership's roles without carrying them (group, role and directory events)
-- queue a refetch from the WorkOS API; the background worker drains the queue. One row per target
-- (`om_...` a membership, `org:<id>` every membership of an organization): two signals make one
-- fetch. `signals` counts the signals, so a fetch that raced a newer signal is not taken for it.
-- Times are Unix milliseconds.
CREATE TABLE refetch_queue (
    target          TEXT PRIMARY KEY NOT NULL,
    organization_id TEXT,
    event_id        TEXT NOT NULL,
    reason          TEXT NOT NULL,
    -- A role the fetched membership must no longer hold (a deleted role, whose fallback WorkOS
    -- applies asynchronously); NULL for none.
    gone_role       TEXT,
    signals         BIGINT NOT NULL DEFAULT 1,
    attempts        BIGINT NOT NULL DEFAULT 0,
    queued_at       BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT
);
CREATE INDEX refetch_queue_due ON refetch_queue (next_attempt_at);
