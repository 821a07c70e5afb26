//! The `refetch_queue` table: memberships (or organizations) to fetch again from the WorkOS API
//! after an event that changed roles without carrying them. Deliveries queue rows in their batch's
//! transaction ([`super::store::Writes::refetches`]); the background worker ([`crate::refetch`])
//! claims due rows with a lease, fetches, reconciles and removes them, or retries them with backoff.
//! The statements are the same text on both backends (times are Unix milliseconds, parameters
//! `$N` in number order, which SQLite numbers by first appearance); each backend's module runs them.

use super::base::Value;
use super::store::QueuedRefetch;
use crate::domain::Refetch;

/// What a second signal for a queued target does: counts it and takes the newest event as the
/// cause. It keeps the row's due time, so a fetch under way is not doubled; [`finish`] makes a
/// row signalled again during its fetch due at once.
macro_rules! on_signal {
    () => {
        " ON CONFLICT (target) DO UPDATE SET signals = refetch_queue.signals + 1, \
         event_id = excluded.event_id, reason = excluded.reason, \
         gone_role = COALESCE(excluded.gone_role, refetch_queue.gone_role)"
    };
}

/// Queues one target: target, organization_id, event_id, reason, gone_role, now (Unix ms).
pub(super) const ENQUEUE_TARGET: &str = concat!(
    "INSERT INTO refetch_queue (target, organization_id, event_id, reason, gone_role, queued_at, next_attempt_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $6)",
    on_signal!()
);

/// Queues every stored, not deleted membership holding a role (the view `membership_roles`, which
/// holds every membership's primary role too; a scan of `memberships`, for an event that is rare):
/// event_id, reason, gone_role, now, organization_id (NULL: any), slug. One row per membership id (two stored rows may share one: PostgreSQL refuses an upsert
/// that meets its own row twice). Parameters appear in number order (SQLite numbers `$N` names by
/// first appearance).
pub(super) const ENQUEUE_ROLE_HOLDERS: &str = concat!(
    "INSERT INTO refetch_queue (target, organization_id, event_id, reason, gone_role, queued_at, next_attempt_at) \
     SELECT m.membership_id, MIN(m.organization_id), $1, $2, $3, $4, $4 \
     FROM membership_roles r JOIN memberships m \
     ON m.organization_id = r.organization_id AND m.user_id = r.user_id \
     WHERE m.status <> 'deleted' AND ($5 IS NULL OR r.organization_id = $5) AND r.role_slug = $6 \
     GROUP BY m.membership_id",
    on_signal!()
);

/// The statement that queues a refetch, and its arguments.
pub(super) fn statement(queued: &QueuedRefetch<'_>, now_ms: i64) -> (&'static str, Vec<Value>) {
    match queued.refetch {
        Refetch::Role {
            slug,
            organization_id,
            gone,
        } => (
            ENQUEUE_ROLE_HOLDERS,
            vec![
                queued.event_id.into(),
                queued.reason.into(),
                gone.then_some(slug.as_str()).into(),
                now_ms.into(),
                organization_id.as_deref().into(),
                slug.as_str().into(),
            ],
        ),
        other => (
            ENQUEUE_TARGET,
            vec![
                other.target().into(),
                match other {
                    Refetch::Organization(id) => Some(id.as_str()),
                    _ => None,
                }
                .into(),
                queued.event_id.into(),
                queued.reason.into(),
                Value::Null,
                now_ms.into(),
            ],
        ),
    }
}

/// A queued refetch as the worker reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// `om_...` or `org:<id>`.
    pub target: String,
    pub organization_id: Option<String>,
    /// The newest event that asked for it.
    pub event_id: String,
    pub reason: String,
    /// A role the fetched membership must no longer hold (deleted in WorkOS).
    pub gone_role: Option<String>,
    pub signals: i64,
    pub attempts: i64,
}

/// Up to `$2` rows due at `$1`, oldest due first: [`Queued`]'s columns in order.
pub(super) const DUE: &str =
    "SELECT target, organization_id, event_id, reason, gone_role, signals, attempts \
     FROM refetch_queue WHERE next_attempt_at <= $1 ORDER BY next_attempt_at, target LIMIT $2";

/// Takes a due row (`$2`, due at `$3`) until `$1`, so that another worker or replica leaves it alone.
pub(super) const CLAIM: &str =
    "UPDATE refetch_queue SET next_attempt_at = $1 WHERE target = $2 AND next_attempt_at <= $3";

/// Removes a row (`$1`) that was not signalled again since it was read (`signals` still `$2`).
pub(super) const FINISH: &str = "DELETE FROM refetch_queue WHERE target = $1 AND signals = $2";

/// Makes a row (`$2`) signalled again during its fetch due at `$1`, its attempts counted anew.
pub(super) const AGAIN: &str = "UPDATE refetch_queue SET next_attempt_at = $1, attempts = 0, \
     last_error = NULL WHERE target = $2";

/// Schedules a row's (`$4`) next attempt: attempts `$1`, due at `$2`, why this one failed `$3`.
pub(super) const RETRY: &str = "UPDATE refetch_queue SET attempts = $1, next_attempt_at = $2, \
     last_error = $3 WHERE target = $4";

/// How many rows are queued, and when the oldest was (Unix ms; NULL when none).
pub(super) const DEPTH: &str = "SELECT COUNT(*), MIN(queued_at) FROM refetch_queue";
