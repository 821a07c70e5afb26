//! The `refetch_queue` table: memberships (or organizations) to fetch again from the WorkOS API
//! after an event that changed roles without carrying them. Deliveries queue rows in their batch's
//! transaction ([`super::store::Writes::refetches`]); the background worker ([`crate::refetch`])
//! claims due rows with a lease, fetches, reconciles and removes them, or retries them with backoff.

use sqlx::{Any, AnyPool, Executor};

use super::base::DbError;
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

/// Queues every stored, not deleted membership holding a role (`membership_roles`, which holds every
/// membership's primary role too): event_id, reason, gone_role, now, organization_id (NULL: any),
/// slug. One row per membership id (two stored rows may share one: PostgreSQL refuses an upsert
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

/// One queued refetch as a statement's arguments.
pub(super) enum Enqueue<'a> {
    /// [`ENQUEUE_TARGET`]'s: target, organization_id, event_id, reason, gone_role.
    Target {
        target: String,
        organization_id: Option<&'a str>,
        event_id: &'a str,
        reason: &'a str,
    },
    /// [`ENQUEUE_ROLE_HOLDERS`]'s.
    RoleHolders {
        event_id: &'a str,
        reason: &'a str,
        gone_role: Option<&'a str>,
        organization_id: Option<&'a str>,
        slug: &'a str,
    },
}

impl<'a> Enqueue<'a> {
    pub(super) fn of(queued: &QueuedRefetch<'a>) -> Self {
        match queued.refetch {
            Refetch::Role {
                slug,
                organization_id,
                gone,
            } => Self::RoleHolders {
                event_id: queued.event_id,
                reason: queued.reason,
                gone_role: gone.then_some(slug.as_str()),
                organization_id: organization_id.as_deref(),
                slug,
            },
            other => Self::Target {
                target: other.target().expect("a membership or an organization"),
                organization_id: match other {
                    Refetch::Organization(id) => Some(id.as_str()),
                    _ => None,
                },
                event_id: queued.event_id,
                reason: queued.reason,
            },
        }
    }
}

/// Queues refetches through sqlx (either backend).
pub async fn enqueue_many(
    conn: &mut sqlx::AnyConnection,
    refetches: &[QueuedRefetch<'_>],
    now_ms: i64,
) -> Result<(), DbError> {
    for queued in refetches {
        match Enqueue::of(queued) {
            Enqueue::Target {
                target,
                organization_id,
                event_id,
                reason,
            } => {
                sqlx::query(ENQUEUE_TARGET)
                    .bind(target)
                    .bind(organization_id)
                    .bind(event_id)
                    .bind(reason)
                    .bind(None::<String>)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
            }
            Enqueue::RoleHolders {
                event_id,
                reason,
                gone_role,
                organization_id,
                slug,
            } => {
                sqlx::query(ENQUEUE_ROLE_HOLDERS)
                    .bind(event_id)
                    .bind(reason)
                    .bind(gone_role)
                    .bind(now_ms)
                    .bind(organization_id)
                    .bind(slug)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    Ok(())
}

/// A queued refetch as the worker reads it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
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

/// Up to `limit` rows due at `now_ms`, oldest due first.
pub async fn due(pool: &AnyPool, now_ms: i64, limit: i64) -> Result<Vec<Queued>, DbError> {
    Ok(sqlx::query_as(
        "SELECT target, organization_id, event_id, reason, gone_role, signals, attempts \
         FROM refetch_queue WHERE next_attempt_at <= $1 ORDER BY next_attempt_at, target LIMIT $2",
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Takes a due row until `lease_until_ms` (so that another worker or replica leaves it alone);
/// false when another took it first.
pub async fn claim(
    pool: &AnyPool,
    target: &str,
    now_ms: i64,
    lease_until_ms: i64,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE refetch_queue SET next_attempt_at = $1 WHERE target = $2 AND next_attempt_at <= $3",
    )
    .bind(lease_until_ms)
    .bind(target)
    .bind(now_ms)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends a refetch that succeeded: removes the row, unless it was signalled again since it was
/// read (`signals` moved on), in which case it is due again at `now_ms` (the fetch may have read
/// the state before that signal's change).
pub async fn finish(pool: &AnyPool, claimed: &Queued, now_ms: i64) -> Result<(), DbError> {
    let removed = sqlx::query("DELETE FROM refetch_queue WHERE target = $1 AND signals = $2")
        .bind(&claimed.target)
        .bind(claimed.signals)
        .execute(pool)
        .await?;
    if removed.rows_affected() == 0 {
        sqlx::query(
            "UPDATE refetch_queue SET next_attempt_at = $1, attempts = 0, last_error = NULL \
             WHERE target = $2",
        )
        .bind(now_ms)
        .bind(&claimed.target)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Schedules another attempt at `next_ms`, recording why this one did not finish.
pub async fn retry_later(
    pool: &AnyPool,
    claimed: &Queued,
    next_ms: i64,
    error: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE refetch_queue SET attempts = $1, next_attempt_at = $2, last_error = $3 WHERE target = $4",
    )
    .bind(claimed.attempts + 1)
    .bind(next_ms)
    .bind(error)
    .bind(&claimed.target)
    .execute(pool)
    .await?;
    Ok(())
}

/// How many rows are queued, and when the oldest was (Unix ms).
pub async fn depth<'c>(
    conn: impl Executor<'c, Database = Any>,
) -> Result<(i64, Option<i64>), DbError> {
    Ok(
        sqlx::query_as("SELECT COUNT(*), MIN(queued_at) FROM refetch_queue")
            .fetch_one(conn)
            .await?,
    )
}
