//! Every SQL statement rolesync runs on SQLite, grouped by table, over rusqlite connections
//! ([`conn`]); [`Store`] is the batch interface of a write transaction. Timestamps are
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ` text, whose text order is time order.

pub(super) mod conn;

use std::collections::{HashMap, HashSet};

use rusqlite::types::{Type, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row};

use super::base::{decode_slugs, slugs_text, DbError, Key, Value, SQLITE_MIGRATIONS};
use super::refetch::{self, Queued};
use super::store::{
    AuditRow, BatchStore, InboxRow, QueuedRefetch, RoleSet, Snapshot, StoredEvent, StoredFilter,
    TrailPoint, Writes,
};
use crate::domain::{AuditEntry, HistoryMark, Membership};
use crate::timestamp::Timestamp;

fn timestamp(row: &Row<'_>, column: usize) -> rusqlite::Result<Timestamp> {
    let text: String = row.get(column)?;
    Timestamp::try_from(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, e.into()))
}

// ---- write transactions ----

/// Begins a write transaction that takes the write lock up front, so that a read-then-write never
/// fails to upgrade; first rolls back one an interrupted batch may have left open.
pub(super) fn begin(conn: &Connection) -> Result<(), DbError> {
    rollback(conn)?;
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

pub(super) fn commit(conn: &Connection) -> Result<(), DbError> {
    conn.prepare_cached("COMMIT")?.execute([])?;
    Ok(())
}

/// Rolls back the open transaction, if any.
pub(super) fn rollback(conn: &Connection) -> Result<(), DbError> {
    if !conn.is_autocommit() {
        conn.prepare_cached("ROLLBACK")?.execute([])?;
    }
    Ok(())
}

// ---- memberships ----

const MEMBERSHIP_COLUMNS: &str = "organization_id, user_id, membership_id, role_slug, \
     workos_role_slug, status, version, updated_at, role_slugs, workos_role_slugs";

fn slugs(row: &Row<'_>, column: usize) -> rusqlite::Result<Vec<String>> {
    let text: String = row.get(column)?;
    decode_slugs(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, e.into()))
}

/// An audit row's role set (NULL: none recorded).
fn slugs_or_null(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<Vec<String>>> {
    let text: Option<String> = row.get(column)?;
    text.map(|t| {
        decode_slugs(&t)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, e.into()))
    })
    .transpose()
}

fn membership(row: &Row<'_>) -> rusqlite::Result<Membership> {
    Ok(Membership {
        organization_id: row.get(0)?,
        user_id: row.get(1)?,
        membership_id: row.get(2)?,
        role_slug: row.get(3)?,
        workos_role_slug: row.get(4)?,
        status: row.get(5)?,
        version: timestamp(row, 6)?,
        updated_at: timestamp(row, 7)?,
        role_slugs: slugs(row, 8)?,
        workos_role_slugs: slugs(row, 9)?,
    })
}

/// The stored row of one membership, and which slugs of the set WorkOS last reported for it
/// (`workos_role_slugs`, `workos_role_slug`) are known roles.
pub(super) fn membership_with_role(
    conn: &Connection,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<(Membership, HashSet<String>)>, DbError> {
    let sql = format!(
        "SELECT {MEMBERSHIP_COLUMNS}, \
         (SELECT json_group_array(slug) FROM roles WHERE slug = memberships.workos_role_slug \
         OR slug IN (SELECT value FROM json_each(memberships.workos_role_slugs))) \
         FROM memberships WHERE organization_id = ?1 AND user_id = ?2"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([organization_id, user_id], |row| {
            let known: HashSet<String> = slugs(row, 10)?.into_iter().collect();
            Ok((membership(row)?, known))
        })
        .optional()?)
}

/// The stored row holding a WorkOS membership id, if any.
pub(super) fn membership_by_id(
    conn: &Connection,
    membership_id: &str,
) -> Result<Option<Membership>, DbError> {
    let sql =
        format!("SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE membership_id = ?1 LIMIT 1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([membership_id], membership)
        .optional()?)
}

/// The roles `membership_roles` holds for a membership, sorted.
pub(super) fn roles_of(
    conn: &Connection,
    organization_id: &str,
    user_id: &str,
) -> Result<Vec<String>, DbError> {
    let rows = conn
        .prepare_cached(
            "SELECT role_slug FROM membership_roles WHERE organization_id = ?1 AND user_id = ?2 \
             ORDER BY role_slug",
        )?
        .query_map([organization_id, user_id], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Every stored row (of one organization), ordered by organization then user.
pub(super) fn memberships(
    conn: &Connection,
    organization_id: Option<&str>,
) -> Result<Vec<Membership>, DbError> {
    let sql = format!(
        "SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE (?1 IS NULL OR organization_id = ?1) \
         ORDER BY organization_id, user_id"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map([organization_id], membership)?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Every organization with a stored membership, in order.
pub(super) fn organizations(conn: &Connection) -> Result<Vec<String>, DbError> {
    let rows = conn
        .prepare_cached(
            "SELECT DISTINCT organization_id FROM memberships ORDER BY organization_id",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The stored row of each of these memberships.
fn memberships_of(conn: &Connection, keys: &[&Key]) -> Result<HashMap<Key, Membership>, DbError> {
    let sql = format!(
        "SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE organization_id = ?1 AND user_id = ?2"
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let mut rows = HashMap::with_capacity(keys.len());
    for (org, user) in keys {
        if let Some(row) = statement.query_row([org, user], membership).optional()? {
            rows.insert((org.clone(), user.clone()), row);
        }
    }
    Ok(rows)
}

/// Inserts or replaces rows, leaving `membership_id` as stored, then sets the id of rows that
/// `read_ids` does not show stored under the same one. SQLite rewrites the entry of every index
/// whose column an UPDATE assigns, changed or not, so assigning the id that rarely changes would
/// dirty a page of `memberships_membership_id` per row (about 0.9 of the 3.3 WAL frames a delivery
/// writes in batches of 20).
fn upsert_memberships(
    conn: &Connection,
    rows: &[&Membership],
    read_ids: &HashMap<Key, Option<String>>,
) -> Result<(), DbError> {
    let sql = format!(
        "INSERT INTO memberships ({MEMBERSHIP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (organization_id, user_id) DO UPDATE SET role_slug = excluded.role_slug, \
         workos_role_slug = excluded.workos_role_slug, status = excluded.status, \
         version = excluded.version, updated_at = excluded.updated_at, \
         role_slugs = excluded.role_slugs, workos_role_slugs = excluded.workos_role_slugs"
    );
    let mut upsert = conn.prepare_cached(&sql)?;
    for row in rows {
        upsert.execute(rusqlite::params![
            row.organization_id,
            row.user_id,
            row.membership_id,
            row.role_slug,
            row.workos_role_slug,
            row.status,
            row.version.to_string(),
            row.updated_at.to_string(),
            slugs_text(&row.role_slugs),
            slugs_text(&row.workos_role_slugs),
        ])?;
    }
    let mut set_id = conn.prepare_cached(
        "UPDATE memberships SET membership_id = ?3 \
         WHERE organization_id = ?1 AND user_id = ?2 AND membership_id <> ?3",
    )?;
    for row in rows {
        let key = (row.organization_id.clone(), row.user_id.clone());
        // Rows read with the same id, or read as absent (just inserted with theirs), are done.
        match read_ids.get(&key) {
            Some(None) => continue,
            Some(Some(id)) if *id == row.membership_id => continue,
            _ => {}
        }
        set_id.execute(rusqlite::params![
            row.organization_id,
            row.user_id,
            row.membership_id
        ])?;
    }
    Ok(())
}

// ---- role_audit ----

fn insert_audit(conn: &Connection, entries: &[AuditEntry]) -> Result<(), DbError> {
    let mut statement = conn.prepare_cached(
        "INSERT INTO role_audit (recorded_at, organization_id, user_id, membership_id, source, \
         event_id, workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, \
         version, old_roles, new_roles) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for e in entries {
        statement.execute(rusqlite::params![
            e.recorded_at.to_string(),
            e.organization_id,
            e.user_id,
            e.membership_id,
            e.source.as_str(),
            e.event_id,
            e.workos_role_slug,
            e.old_role,
            e.new_role,
            e.old_status,
            e.new_status,
            e.outcome.as_str(),
            e.detail,
            e.version.to_string(),
            e.old_roles.as_deref().map(slugs_text),
            e.new_roles.as_deref().map(slugs_text),
        ])?;
    }
    Ok(())
}

/// The trail of each point as of its version: the latest row at or before it, where a stale row
/// counts only at exactly that version.
fn trails(
    conn: &Connection,
    points: &[TrailPoint<'_>],
) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT version, workos_role_slug, new_status FROM role_audit \
         WHERE organization_id = ?1 AND user_id = ?2 AND version <= ?3 \
         AND (outcome <> 'stale' OR version = ?3) ORDER BY version DESC, id DESC LIMIT 1",
    )?;
    let mut marks = HashMap::with_capacity(points.len());
    for (org, user, version) in points {
        let mark = statement
            .query_row(rusqlite::params![org, user, version.to_string()], |row| {
                Ok(HistoryMark {
                    version: timestamp(row, 0)?,
                    workos_role_slug: row.get(1)?,
                    new_status: row.get(2)?,
                })
            })
            .optional()?;
        if let Some(mark) = mark {
            marks.insert(((*org).to_owned(), (*user).to_owned(), *version), mark);
        }
    }
    Ok(marks)
}

/// Rows filtered by organization and/or user, newest first, at most `limit`.
pub(super) fn audit(
    conn: &Connection,
    organization_id: Option<&str>,
    user_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditRow>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT id, recorded_at, organization_id, user_id, membership_id, source, event_id, \
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version, \
         old_roles, new_roles FROM role_audit WHERE (?1 IS NULL OR organization_id = ?1) AND (?2 IS NULL OR user_id = ?2) \
         ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = statement
        .query_map(rusqlite::params![organization_id, user_id, limit], |row| {
            Ok(AuditRow {
                id: row.get(0)?,
                recorded_at: row.get(1)?,
                organization_id: row.get(2)?,
                user_id: row.get(3)?,
                membership_id: row.get(4)?,
                source: row.get(5)?,
                event_id: row.get(6)?,
                workos_role_slug: row.get(7)?,
                old_role: row.get(8)?,
                new_role: row.get(9)?,
                old_status: row.get(10)?,
                new_status: row.get(11)?,
                outcome: row.get(12)?,
                detail: row.get(13)?,
                version: row.get(14)?,
                old_roles: RoleSet(slugs_or_null(row, 15)?),
                new_roles: RoleSet(slugs_or_null(row, 16)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

// ---- webhook_events ----

fn known_events(conn: &Connection, ids: &[&str]) -> Result<HashSet<String>, DbError> {
    let mut statement = conn.prepare_cached("SELECT 1 FROM webhook_events WHERE event_id = ?1")?;
    let mut known = HashSet::new();
    for id in ids {
        if statement.exists([id])? {
            known.insert((*id).to_owned());
        }
    }
    Ok(known)
}

/// Records deliveries; returns how many were new, the others being duplicates.
fn insert_events(
    conn: &Connection,
    rows: &[InboxRow<'_>],
    received_at: Timestamp,
) -> Result<u64, DbError> {
    let mut statement = conn.prepare_cached(
        "INSERT INTO webhook_events (event_id, event_type, payload, outcome, received_at) \
         VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
    )?;
    let received_at = received_at.to_string();
    let mut inserted = 0;
    for row in rows {
        inserted += statement.execute(rusqlite::params![
            row.event_id,
            row.event_type,
            row.payload,
            row.outcome,
            received_at,
        ])? as u64;
    }
    Ok(inserted)
}

/// Sets the outcome of stored deliveries: `(event_id, outcome)` pairs.
pub(super) fn set_outcomes(conn: &Connection, outcomes: &[(&str, &str)]) -> Result<(), DbError> {
    let mut statement =
        conn.prepare_cached("UPDATE webhook_events SET outcome = ?2 WHERE event_id = ?1")?;
    for (id, outcome) in outcomes {
        statement.execute([id, outcome])?;
    }
    Ok(())
}

pub(super) fn event_count(conn: &Connection) -> Result<i64, DbError> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM webhook_events")?
        .query_row([], |row| row.get(0))?)
}

/// Stored deliveries that still have their payload, oldest first, at most `limit` after `after`.
pub(super) fn stored_events(
    conn: &Connection,
    filter: &StoredFilter,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<StoredEvent>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT event_id, received_at, payload, outcome FROM webhook_events WHERE payload IS NOT NULL \
         AND (?1 IS NULL OR received_at >= ?1) AND (?2 IS NULL OR event_id = ?2) AND (?3 IS NULL OR outcome = ?3) \
         AND (?4 IS NULL OR received_at > ?4 OR (received_at = ?4 AND event_id > ?5)) \
         ORDER BY received_at, event_id LIMIT ?6",
    )?;
    let rows = statement
        .query_map(
            rusqlite::params![
                filter.since.map(|t| t.to_string()),
                filter.event_id,
                filter.outcome,
                after.map(|a| a.0),
                after.map(|a| a.1),
                limit
            ],
            |row| {
                Ok(StoredEvent {
                    event_id: row.get(0)?,
                    received_at: row.get(1)?,
                    payload: row.get(2)?,
                    outcome: row.get(3)?,
                })
            },
        )?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// How many stored deliveries the filter matches whose payload was pruned.
pub(super) fn pruned_events(conn: &Connection, filter: &StoredFilter) -> Result<i64, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FROM webhook_events WHERE payload IS NULL \
             AND (?1 IS NULL OR received_at >= ?1) AND (?2 IS NULL OR event_id = ?2) \
             AND (?3 IS NULL OR outcome = ?3)",
        )?
        .query_row(
            rusqlite::params![
                filter.since.map(|t| t.to_string()),
                filter.event_id,
                filter.outcome
            ],
            |row| row.get(0),
        )?)
}

/// Drops the payloads of deliveries received before `cutoff`; returns how many.
pub(super) fn prune_payloads(conn: &Connection, cutoff: Timestamp) -> Result<u64, DbError> {
    Ok(conn
        .prepare_cached(
            "UPDATE webhook_events SET payload = NULL WHERE received_at < ?1 AND payload IS NOT NULL",
        )?
        .execute([cutoff.to_string()])? as u64)
}

/// Deletes deliveries received before `cutoff`; returns how many.
pub(super) fn prune_ids(conn: &Connection, cutoff: Timestamp) -> Result<u64, DbError> {
    Ok(conn
        .prepare_cached("DELETE FROM webhook_events WHERE received_at < ?1")?
        .execute([cutoff.to_string()])? as u64)
}

// ---- roles ----

pub(super) fn roles(conn: &Connection) -> Result<Vec<String>, DbError> {
    let rows = conn
        .prepare_cached("SELECT slug FROM roles ORDER BY slug")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn add_role(conn: &Connection, slug: &str, now: Timestamp) -> Result<bool, DbError> {
    let done = conn
        .prepare_cached(
            "INSERT INTO roles (slug, created_at) VALUES (?1, ?2) ON CONFLICT (slug) DO NOTHING",
        )?
        .execute(rusqlite::params![slug, now.to_string()])?;
    Ok(done == 1)
}

pub(super) fn remove_role(conn: &Connection, slug: &str) -> Result<bool, DbError> {
    Ok(conn
        .prepare_cached("DELETE FROM roles WHERE slug = ?1")?
        .execute([slug])?
        == 1)
}

// ---- sync_state ----

pub(super) fn cursor(conn: &Connection, name: &str) -> Result<Option<String>, DbError> {
    let row: Option<Option<String>> = conn
        .prepare_cached("SELECT cursor FROM sync_state WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()?;
    Ok(row.flatten())
}

pub(super) fn clear_cursor(
    conn: &Connection,
    name: &str,
    old: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let done = conn
        .prepare_cached(
            "UPDATE sync_state SET cursor = NULL, updated_at = ?3 WHERE name = ?1 AND cursor = ?2",
        )?
        .execute(rusqlite::params![name, old, now.to_string()])?;
    Ok(done == 1)
}

pub(super) fn advance_cursor(
    conn: &Connection,
    name: &str,
    old: Option<&str>,
    new: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let now = now.to_string();
    let done = match old {
        None => conn
            .prepare_cached(
                "INSERT INTO sync_state (name, cursor, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at \
                 WHERE sync_state.cursor IS NULL",
            )?
            .execute(rusqlite::params![name, new, now])?,
        Some(old) => conn
            .prepare_cached(
                "UPDATE sync_state SET cursor = ?2, updated_at = ?3 WHERE name = ?1 AND cursor = ?4",
            )?
            .execute(rusqlite::params![name, new, now, old])?,
    };
    Ok(done == 1)
}

/// The `readyz` row of `sync_state`: a write any healthy database takes.
pub(super) fn probe_write(conn: &Connection, now: Timestamp) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO sync_state (name, cursor, updated_at) VALUES ('readyz', NULL, ?1) \
         ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
    )?
    .execute([now.to_string()])?;
    Ok(())
}

// ---- _sqlx_migrations (the table and columns sqlx writes, so that either build opens the file) ----

/// Version to checksum of each successful migration; empty without a migration table.
pub(super) fn applied_checksums(conn: &Connection) -> Result<HashMap<i64, Vec<u8>>, DbError> {
    let tables: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        [],
        |row| row.get(0),
    )?;
    if tables == 0 {
        return Ok(HashMap::new());
    }
    let rows = conn
        .prepare("SELECT version, checksum FROM _sqlx_migrations WHERE success")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Applies every migration not yet applied, each in its own transaction, as sqlx's migrator does.
pub(super) fn migrate(conn: &Connection) -> Result<(), DbError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, \
         description TEXT NOT NULL, installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
         success BOOLEAN NOT NULL, checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
    )?;
    let dirty: Option<i64> = conn
        .query_row(
            "SELECT version FROM _sqlx_migrations WHERE success = false ORDER BY version LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(version) = dirty {
        return Err(DbError::Unavailable(format!(
            "migration {version} is partially applied; fix and remove it from _sqlx_migrations"
        )));
    }
    let applied = applied_checksums(conn)?;
    for migration in SQLITE_MIGRATIONS.iter() {
        if migration.migration_type.is_down_migration() {
            continue;
        }
        match applied.get(&migration.version) {
            Some(sum) if **sum != *migration.checksum => {
                return Err(DbError::Unavailable(format!(
                    "migration {} was changed after it was applied",
                    migration.version
                )))
            }
            Some(_) => continue,
            None => {}
        }
        let started = std::time::Instant::now();
        begin(conn)?;
        let done = conn.execute_batch(&migration.sql).and_then(|()| {
            conn.execute(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES (?1, ?2, TRUE, ?3, -1)",
                rusqlite::params![
                    migration.version,
                    &*migration.description,
                    &*migration.checksum
                ],
            )
        });
        if let Err(e) = done {
            rollback(conn)?;
            return Err(DbError::Unavailable(format!(
                "migration {} failed: {e}",
                migration.version
            )));
        }
        commit(conn)?;
        let elapsed = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        conn.execute(
            "UPDATE _sqlx_migrations SET execution_time = ?1 WHERE version = ?2",
            rusqlite::params![elapsed, migration.version],
        )?;
    }
    Ok(())
}

// ---- refetch_queue ----

/// Queues refetches, in the batch's transaction.
fn enqueue(conn: &Connection, refetches: &[QueuedRefetch<'_>], now_ms: i64) -> Result<(), DbError> {
    for queued in refetches {
        let (sql, params) = refetch::statement(queued, now_ms);
        let mut statement = conn.prepare_cached(sql)?;
        bind(&mut statement, &params)?;
        statement.raw_execute()?;
    }
    Ok(())
}

pub(super) fn refetch_due(
    conn: &Connection,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<Queued>, DbError> {
    let rows = conn
        .prepare_cached(refetch::DUE)?
        .query_map([now_ms, limit], |row| {
            Ok(Queued {
                target: row.get(0)?,
                organization_id: row.get(1)?,
                event_id: row.get(2)?,
                reason: row.get(3)?,
                gone_role: row.get(4)?,
                signals: row.get(5)?,
                attempts: row.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn refetch_claim(
    conn: &Connection,
    target: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, DbError> {
    let claimed = conn
        .prepare_cached(refetch::CLAIM)?
        .execute(rusqlite::params![until_ms, target, now_ms])?;
    Ok(claimed == 1)
}

pub(super) fn refetch_finish(conn: &Connection, done: &Queued, now_ms: i64) -> Result<(), DbError> {
    let removed = conn
        .prepare_cached(refetch::FINISH)?
        .execute(rusqlite::params![done.target, done.signals])?;
    if removed == 0 {
        conn.prepare_cached(refetch::AGAIN)?
            .execute(rusqlite::params![now_ms, done.target])?;
    }
    Ok(())
}

pub(super) fn refetch_retry(
    conn: &Connection,
    failed: &Queued,
    next_ms: i64,
    error: &str,
) -> Result<(), DbError> {
    conn.prepare_cached(refetch::RETRY)?
        .execute(rusqlite::params![
            failed.attempts + 1,
            next_ms,
            error,
            failed.target
        ])?;
    Ok(())
}

pub(super) fn refetch_depth(conn: &Connection) -> Result<(i64, Option<i64>), DbError> {
    Ok(conn
        .prepare_cached(refetch::DEPTH)?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?)
}

// ---- any statement (operators' tools and tests) ----

/// Binds `$1`, `$2`, ... (or `?`) to `params`.
fn bind(statement: &mut rusqlite::Statement<'_>, params: &[Value]) -> Result<(), DbError> {
    for (i, param) in params.iter().enumerate() {
        let index = statement
            .parameter_index(&format!("${}", i + 1))?
            .unwrap_or(i + 1);
        match param {
            Value::Null => statement.raw_bind_parameter(index, rusqlite::types::Null)?,
            Value::Int(n) => statement.raw_bind_parameter(index, n)?,
            Value::Text(s) => statement.raw_bind_parameter(index, s)?,
        }
    }
    Ok(())
}

/// Runs one statement with `$n` (or `?`) parameters; every row, each column as a [`Value`].
pub(super) fn rows(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Vec<Value>>, DbError> {
    let mut statement = conn.prepare(sql)?;
    bind(&mut statement, params)?;
    let columns = statement.column_count();
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::Int(n),
                ValueRef::Real(f) => Value::Text(f.to_string()),
                ValueRef::Text(t) | ValueRef::Blob(t) => {
                    Value::Text(String::from_utf8_lossy(t).into_owned())
                }
            });
        }
        out.push(values);
    }
    Ok(out)
}

// ---- the batch interface ----

/// [`BatchStore`] inside a write transaction on one connection.
pub(super) struct Store<'a> {
    pub(super) conn: &'a mut Connection,
    /// The membership id [`BatchStore::read`] found for each key it read (`None`: no row), so that
    /// an upsert changes the id only of rows stored under another one.
    pub(super) read_ids: &'a mut HashMap<Key, Option<String>>,
}

impl BatchStore for Store<'_> {
    async fn lock_memberships(&mut self, _keys: &[&Key]) -> Result<(), DbError> {
        // BEGIN IMMEDIATE holds the database's one write lock.
        Ok(())
    }

    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        let memberships = memberships_of(&*self.conn, keys)?;
        for &key in keys {
            let id = memberships.get(key).map(|m| m.membership_id.clone());
            self.read_ids.insert(key.clone(), id);
        }
        let roles = self
            .conn
            .prepare_cached("SELECT slug FROM roles")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            known_events: known_events(&*self.conn, event_ids)?,
            memberships,
            roles,
        })
    }

    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
        trails(&*self.conn, points)
    }

    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        upsert_memberships(&*self.conn, &writes.memberships, self.read_ids)?;
        insert_audit(&*self.conn, writes.audits)?;
        enqueue(&*self.conn, &writes.refetches, received_at.millis())?;
        insert_events(&*self.conn, events, received_at)
    }
}

impl Store<'_> {
    /// The stored row of one membership, inside the transaction.
    pub(super) fn membership(
        &self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, DbError> {
        Ok(membership_with_role(&*self.conn, organization_id, user_id)?.map(|(m, _)| m))
    }
}
