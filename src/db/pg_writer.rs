//! The PostgreSQL group-commit workers' statements: a native connection whose every statement has
//! one fixed text, its rows bound as arrays (`unnest`), so that each is prepared once per connection.
//!
//! Through sqlx's `Any` driver (which binds no arrays) a batch's statements carried one placeholder
//! per value, so each batch size was a statement of its own text: prepared anew nearly every batch,
//! an extra round trip and a plan each time.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::{PgConnection, Row};

use super::base::{decode_slugs, decode_timestamp, lock_names, slugs_text, DbError, Key};
use super::inbox::InboxRow;
use super::refetch::Enqueue;
use super::store::{BatchStore, QueuedRefetch, Snapshot, TrailPoint, Writes};
use super::{audit, inbox, memberships, refetch};
use crate::domain::{HistoryMark, Membership};
use crate::timestamp::Timestamp;

/// `$1::text[], ..., $n::text[]` from `first`.
fn arrays(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one read statement of a batch: event ids ($1), membership keys ($2, $3).
static READ: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT 'm' AS kind, {} FROM unnest($2::text[], $3::text[]) AS k(org, usr) \
         JOIN memberships m ON m.organization_id = k.org AND m.user_id = k.usr \
         UNION ALL SELECT 'e', event_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
         FROM webhook_events WHERE event_id = ANY($1::text[]) \
         UNION ALL SELECT 'r', slug, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM roles",
        memberships::PREFIXED_COLUMNS
    )
});

/// The one write statement of a batch: memberships ($1-$10), audit rows ($11-$26, inserted in array
/// order so that ids ascend in slice order), deliveries ($27-$30, inserted in array order, which the
/// caller sorts by event id) received at $31, and the role sets that changed: their memberships
/// ($32, $33) and every (organization, user, slug) they now hold ($34-$36). The delete and the insert
/// of `membership_roles` touch disjoint rows (data-modifying CTEs see one snapshot, in no set order).
static WRITE: LazyLock<String> = LazyLock::new(|| {
    let audit_columns = (1..=audit::COLUMN_COUNT)
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH m AS (INSERT INTO memberships ({membership_columns}) SELECT * FROM unnest({m}) {conflict} RETURNING 1), \
         a AS ({audit} SELECT {audit_columns} FROM unnest({a}) WITH ORDINALITY AS r({audit_columns}, n) \
         ORDER BY n RETURNING 1), \
         e AS ({inbox} SELECT r.e, r.t, r.p, r.o, $31 FROM unnest({e}) WITH ORDINALITY AS r(e, t, p, o, n) \
         ORDER BY n ON CONFLICT (event_id) DO NOTHING RETURNING 1), \
         d AS (DELETE FROM membership_roles r USING unnest($32::text[], $33::text[]) AS k(org, usr) \
         WHERE r.organization_id = k.org AND r.user_id = k.usr AND NOT EXISTS (SELECT 1 FROM \
         unnest($34::text[], $35::text[], $36::text[]) AS s(org, usr, slug) \
         WHERE s.org = r.organization_id AND s.usr = r.user_id AND s.slug = r.role_slug) RETURNING 1), \
         i AS (INSERT INTO membership_roles (organization_id, user_id, role_slug) \
         SELECT * FROM unnest($34::text[], $35::text[], $36::text[]) ON CONFLICT DO NOTHING RETURNING 1) \
         SELECT COUNT(*) FROM e",
        membership_columns = memberships::COLUMNS,
        m = arrays(1, memberships::COLUMN_COUNT),
        conflict = memberships::UPSERT_CONFLICT,
        audit = audit::INSERT.trim_end_matches(" VALUES"),
        a = arrays(11, audit::COLUMN_COUNT),
        inbox = inbox::INSERT.trim_end_matches(" VALUES"),
        e = arrays(27, 4),
    )
});

/// [`BatchStore`] on a native PostgreSQL connection inside a transaction.
pub struct PgStore<'a> {
    pub conn: &'a mut PgConnection,
}

fn texts<T>(rows: &[T], column: impl Fn(&T) -> Option<String>) -> Vec<Option<String>> {
    rows.iter().map(column).collect()
}

impl PgStore<'_> {
    /// Queues refetches (rare: group, role and directory events), one statement each.
    async fn enqueue(
        &mut self,
        refetches: &[QueuedRefetch<'_>],
        now_ms: i64,
    ) -> Result<(), DbError> {
        for queued in refetches {
            let query = match Enqueue::of(queued) {
                Enqueue::Target {
                    target,
                    organization_id,
                    event_id,
                    reason,
                } => sqlx::query(refetch::ENQUEUE_TARGET)
                    .bind(target)
                    .bind(organization_id)
                    .bind(event_id)
                    .bind(reason)
                    .bind(None::<String>)
                    .bind(now_ms),
                Enqueue::RoleHolders {
                    event_id,
                    reason,
                    gone_role,
                    organization_id,
                    slug,
                } => sqlx::query(refetch::ENQUEUE_ROLE_HOLDERS)
                    .bind(event_id)
                    .bind(reason)
                    .bind(gone_role)
                    .bind(now_ms)
                    .bind(organization_id)
                    .bind(slug),
            };
            query.execute(&mut *self.conn).await?;
        }
        Ok(())
    }
}

impl BatchStore for PgStore<'_> {
    async fn lock_memberships(&mut self, keys: &[&Key]) -> Result<(), DbError> {
        if keys.is_empty() {
            return Ok(());
        }
        // The same lock names, in the same order, as `Db::lock_memberships` (logins, other paths).
        sqlx::query(
            "SELECT COUNT(pg_advisory_xact_lock(hashtextextended(k, 0))::text) \
             FROM unnest($1::text[]) AS t(k)",
        )
        .bind(lock_names(keys))
        .fetch_one(&mut *self.conn)
        .await?;
        Ok(())
    }

    /// One statement: the memberships, the known event ids and the roles, as rows of a union told
    /// apart by their first column.
    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        let orgs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let users: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let rows = sqlx::query(&READ)
            .bind(event_ids)
            .bind(orgs)
            .bind(users)
            .fetch_all(&mut *self.conn)
            .await?;
        let mut snapshot = Snapshot::default();
        for row in rows {
            let kind: &str = row.try_get(0)?;
            match kind {
                "e" => {
                    snapshot.known_events.insert(row.try_get(1)?);
                }
                "r" => {
                    snapshot.roles.insert(row.try_get(1)?);
                }
                _ => {
                    let m = Membership {
                        organization_id: row.try_get(1)?,
                        user_id: row.try_get(2)?,
                        membership_id: row.try_get(3)?,
                        role_slug: row.try_get(4)?,
                        workos_role_slug: row.try_get(5)?,
                        status: row.try_get(6)?,
                        version: decode_timestamp(row.try_get(7)?)?,
                        updated_at: decode_timestamp(row.try_get(8)?)?,
                        role_slugs: decode_slugs(row.try_get(9)?)?,
                        workos_role_slugs: decode_slugs(row.try_get(10)?)?,
                    };
                    let key = (m.organization_id.clone(), m.user_id.clone());
                    snapshot.memberships.insert(key, m);
                }
            }
        }
        Ok(snapshot)
    }

    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
        if points.is_empty() {
            return Ok(HashMap::new());
        }
        let orgs: Vec<&str> = points.iter().map(|p| p.0).collect();
        let users: Vec<&str> = points.iter().map(|p| p.1).collect();
        let versions: Vec<String> = points.iter().map(|p| p.2.to_string()).collect();
        let rows = sqlx::query(
            "SELECT k.org, k.usr, k.v, a.version, a.workos_role_slug, a.new_status \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS k(org, usr, v) \
             JOIN LATERAL (SELECT b.version, b.workos_role_slug, b.new_status FROM role_audit b \
             WHERE b.organization_id = k.org AND b.user_id = k.usr AND b.version <= k.v \
             AND (b.outcome <> 'stale' OR b.version = k.v) ORDER BY b.version DESC, b.id DESC LIMIT 1) a \
             ON true",
        )
        .bind(orgs)
        .bind(users)
        .bind(versions)
        .fetch_all(&mut *self.conn)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let point = (
                row.try_get(0)?,
                row.try_get(1)?,
                decode_timestamp(row.try_get(2)?)?,
            );
            let mark = HistoryMark {
                version: decode_timestamp(row.try_get(3)?)?,
                workos_role_slug: row.try_get(4)?,
                new_status: row.try_get(5)?,
            };
            out.insert(point, mark);
        }
        Ok(out)
    }

    /// One statement: the upsert, the audit insert and the inbox insert as data-modifying CTEs
    /// (each runs whether or not its rows are empty), answering how many deliveries were new.
    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        let rows = &writes.memberships;
        let entries = writes.audits;
        let sets = &writes.role_sets;
        let held: Vec<(&str, &str, &str)> = sets
            .iter()
            .flat_map(|r| {
                r.role_slugs
                    .iter()
                    .map(|s| (r.organization_id.as_str(), r.user_id.as_str(), s.as_str()))
            })
            .collect();
        let inserted: i64 = sqlx::query_scalar(&WRITE)
            .bind(texts(rows, |r| Some(r.organization_id.clone())))
            .bind(texts(rows, |r| Some(r.user_id.clone())))
            .bind(texts(rows, |r| Some(r.membership_id.clone())))
            .bind(texts(rows, |r| r.role_slug.clone()))
            .bind(texts(rows, |r| r.workos_role_slug.clone()))
            .bind(texts(rows, |r| Some(r.status.clone())))
            .bind(texts(rows, |r| Some(r.version.to_string())))
            .bind(texts(rows, |r| Some(r.updated_at.to_string())))
            .bind(texts(rows, |r| Some(slugs_text(&r.role_slugs))))
            .bind(texts(rows, |r| Some(slugs_text(&r.workos_role_slugs))))
            .bind(texts(entries, |e| Some(e.recorded_at.to_string())))
            .bind(texts(entries, |e| Some(e.organization_id.clone())))
            .bind(texts(entries, |e| Some(e.user_id.clone())))
            .bind(texts(entries, |e| Some(e.membership_id.clone())))
            .bind(texts(entries, |e| Some(e.source.as_str().to_owned())))
            .bind(texts(entries, |e| e.event_id.clone()))
            .bind(texts(entries, |e| e.workos_role_slug.clone()))
            .bind(texts(entries, |e| e.old_role.clone()))
            .bind(texts(entries, |e| e.new_role.clone()))
            .bind(texts(entries, |e| e.old_status.clone()))
            .bind(texts(entries, |e| e.new_status.clone()))
            .bind(texts(entries, |e| Some(e.outcome.as_str().to_owned())))
            .bind(texts(entries, |e| Some(e.detail.clone())))
            .bind(texts(entries, |e| Some(e.version.to_string())))
            .bind(texts(entries, |e| e.old_roles.as_deref().map(slugs_text)))
            .bind(texts(entries, |e| e.new_roles.as_deref().map(slugs_text)))
            .bind(events.iter().map(|r| r.event_id).collect::<Vec<_>>())
            .bind(events.iter().map(|r| r.event_type).collect::<Vec<_>>())
            .bind(events.iter().map(|r| r.payload).collect::<Vec<_>>())
            .bind(events.iter().map(|r| r.outcome).collect::<Vec<_>>())
            .bind(received_at.to_string())
            .bind(texts(sets, |r| Some(r.organization_id.clone())))
            .bind(texts(sets, |r| Some(r.user_id.clone())))
            .bind(held.iter().map(|h| h.0).collect::<Vec<_>>())
            .bind(held.iter().map(|h| h.1).collect::<Vec<_>>())
            .bind(held.iter().map(|h| h.2).collect::<Vec<_>>())
            .fetch_one(&mut *self.conn)
            .await?;
        self.enqueue(&writes.refetches, received_at.millis())
            .await?;
        Ok(inserted as u64)
    }
}
