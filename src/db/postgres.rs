//! Every SQL statement rolesync runs on PostgreSQL, grouped by table, through sqlx's native driver.
//! Times are `timestamptz`, bound and read as [`OffsetDateTime`] (microseconds, like [`Timestamp`]).
//! A batch's statements have one fixed text each, their rows bound as arrays (`unnest`), so that
//! each is prepared once per connection ([`Store`]).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Executor, PgConnection, Postgres, Row, TypeInfo, ValueRef};
use time::OffsetDateTime;

use super::base::{decode_slugs, lock_names, slugs_text, DbError, Key, Value};
use super::refetch::{self, Queued};
use super::store::{
    AuditRow, BatchStore, InboxRow, QueuedRefetch, RoleSet, Snapshot, StoredEvent, StoredFilter,
    TrailPoint, Writes,
};
use crate::domain::{HistoryMark, Membership};
use crate::timestamp::Timestamp;

/// A [`Timestamp`] as sqlx binds `timestamptz`.
fn at(t: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.micros()) * 1000)
        .expect("a Timestamp is within OffsetDateTime's range")
}

/// A `timestamptz` read back (the column, for the error).
fn timestamp(t: OffsetDateTime, column: &str) -> Result<Timestamp, DbError> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000))
        .ok()
        .and_then(Timestamp::from_micros)
        .ok_or_else(|| {
            DbError::Sqlx(sqlx::Error::ColumnDecode {
                index: column.into(),
                source: format!("{t} is outside years 0000..=9999").into(),
            })
        })
}

fn timestamp_at(row: &PgRow, column: usize) -> Result<Timestamp, DbError> {
    timestamp(row.try_get(column)?, &column.to_string())
}

// ---- write transactions ----

/// Takes transaction-scoped advisory locks on these memberships, in key order, so that two
/// batches never wait on each other in a cycle.
async fn lock_memberships(conn: &mut PgConnection, keys: &[&Key]) -> Result<(), DbError> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT COUNT(pg_advisory_xact_lock(hashtextextended(k, 0))::text) \
         FROM unnest($1::text[]) AS t(k)",
    )
    .bind(lock_names(keys))
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Plans made for each execution's arrays (their lengths vary from batch to batch), for a
/// group-commit worker's own connection.
pub(super) async fn custom_plans(conn: &mut PgConnection) -> Result<(), DbError> {
    conn.execute("SET plan_cache_mode = force_custom_plan")
        .await?;
    Ok(())
}

// ---- memberships ----

const MEMBERSHIP_COLUMNS: &str = "organization_id, user_id, membership_id, role_slug, \
     workos_role_slug, status, version, updated_at, role_slugs, workos_role_slugs";

/// A role set column (a JSON array of slugs) read back.
fn slugs_at(row: &PgRow, column: usize) -> Result<Vec<String>, DbError> {
    let text: String = row.try_get(column)?;
    decode_slugs(&text).map_err(|e| decode_error(column, e))
}

/// An audit row's role set (NULL: none recorded).
fn slugs_or_null_at(row: &PgRow, column: usize) -> Result<Option<Vec<String>>, DbError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| decode_slugs(&t).map_err(|e| decode_error(column, e)))
        .transpose()
}

fn decode_error(column: usize, e: serde_json::Error) -> DbError {
    DbError::Sqlx(sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: e.into(),
    })
}

/// A membership from columns `first..first + 10` of a row.
fn membership(row: &PgRow, first: usize) -> Result<Membership, DbError> {
    Ok(Membership {
        organization_id: row.try_get(first)?,
        user_id: row.try_get(first + 1)?,
        membership_id: row.try_get(first + 2)?,
        role_slug: row.try_get(first + 3)?,
        workos_role_slug: row.try_get(first + 4)?,
        status: row.try_get(first + 5)?,
        version: timestamp_at(row, first + 6)?,
        updated_at: timestamp_at(row, first + 7)?,
        role_slugs: slugs_at(row, first + 8)?,
        workos_role_slugs: slugs_at(row, first + 9)?,
    })
}

static MEMBERSHIP_WITH_ROLE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {MEMBERSHIP_COLUMNS}, \
         ARRAY(SELECT slug FROM roles WHERE slug = memberships.workos_role_slug \
         OR slug IN (SELECT json_array_elements_text(memberships.workos_role_slugs::json))) \
         FROM memberships WHERE organization_id = $1 AND user_id = $2"
    )
});

/// The stored row of one membership, and which slugs of the set WorkOS last reported for it
/// (`workos_role_slugs`, `workos_role_slug`) are known roles: the row's last column lists them.
pub(super) async fn membership_with_role<'c>(
    conn: impl Executor<'c, Database = Postgres>,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<(Membership, HashSet<String>)>, DbError> {
    let row = sqlx::query(&MEMBERSHIP_WITH_ROLE)
        .bind(organization_id)
        .bind(user_id)
        .fetch_optional(conn)
        .await?;
    row.map(|row| {
        let known: Vec<String> = row.try_get(10)?;
        Ok((membership(&row, 0)?, known.into_iter().collect()))
    })
    .transpose()
}

/// The stored row holding a WorkOS membership id, if any.
pub(super) async fn membership_by_id(
    pool: &PgPool,
    membership_id: &str,
) -> Result<Option<Membership>, DbError> {
    let sql =
        format!("SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE membership_id = $1 LIMIT 1");
    let row = sqlx::query(&sql)
        .bind(membership_id)
        .fetch_optional(pool)
        .await?;
    row.map(|row| membership(&row, 0)).transpose()
}

/// The roles `membership_roles` holds for a membership, sorted.
pub(super) async fn roles_of(
    pool: &PgPool,
    organization_id: &str,
    user_id: &str,
) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT role_slug FROM membership_roles WHERE organization_id = $1 AND user_id = $2 \
         ORDER BY role_slug",
    )
    .bind(organization_id)
    .bind(user_id)
    .fetch_all(pool)
    .await?)
}

/// Every stored row (of one organization), ordered by organization then user.
pub(super) async fn memberships(
    pool: &PgPool,
    organization_id: Option<&str>,
) -> Result<Vec<Membership>, DbError> {
    let sql = format!(
        "SELECT {MEMBERSHIP_COLUMNS} FROM memberships \
         WHERE ($1::text IS NULL OR organization_id = $1) ORDER BY organization_id, user_id"
    );
    let rows = sqlx::query(&sql)
        .bind(organization_id)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| membership(row, 0)).collect()
}

/// Every organization with a stored membership, in order.
pub(super) async fn organizations(pool: &PgPool) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT organization_id FROM memberships ORDER BY organization_id",
    )
    .fetch_all(pool)
    .await?)
}

// ---- role_audit ----

/// Rows filtered by organization and/or user, newest first, at most `limit`.
pub(super) async fn audit(
    pool: &PgPool,
    organization_id: Option<&str>,
    user_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditRow>, DbError> {
    let rows = sqlx::query(
        "SELECT id, recorded_at, organization_id, user_id, membership_id, source, event_id, \
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version, \
         old_roles, new_roles FROM role_audit WHERE ($1::text IS NULL OR organization_id = $1) \
         AND ($2::text IS NULL OR user_id = $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(organization_id)
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(AuditRow {
                id: row.try_get(0)?,
                recorded_at: timestamp_at(row, 1)?.to_string(),
                organization_id: row.try_get(2)?,
                user_id: row.try_get(3)?,
                membership_id: row.try_get(4)?,
                source: row.try_get(5)?,
                event_id: row.try_get(6)?,
                workos_role_slug: row.try_get(7)?,
                old_role: row.try_get(8)?,
                new_role: row.try_get(9)?,
                old_status: row.try_get(10)?,
                new_status: row.try_get(11)?,
                outcome: row.try_get(12)?,
                detail: row.try_get(13)?,
                version: timestamp_at(row, 14)?.to_string(),
                old_roles: RoleSet(slugs_or_null_at(row, 15)?),
                new_roles: RoleSet(slugs_or_null_at(row, 16)?),
            })
        })
        .collect()
}

// ---- webhook_events ----

/// Sets the outcome of stored deliveries: `(event_id, outcome)` pairs.
pub(super) async fn set_outcomes(
    conn: &mut PgConnection,
    outcomes: &[(&str, &str)],
) -> Result<(), DbError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = outcomes.iter().map(|o| o.0).collect();
    let words: Vec<&str> = outcomes.iter().map(|o| o.1).collect();
    sqlx::query(
        "UPDATE webhook_events SET outcome = v.outcome \
         FROM unnest($1::text[], $2::text[]) AS v(event_id, outcome) \
         WHERE webhook_events.event_id = v.event_id",
    )
    .bind(ids)
    .bind(words)
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn event_count(pool: &PgPool) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(pool)
        .await?)
}

/// Stored deliveries that still have their payload, oldest first, at most `limit` after `after`.
pub(super) async fn stored_events(
    pool: &PgPool,
    filter: &StoredFilter,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<StoredEvent>, DbError> {
    let after_at = match after {
        Some((received_at, _)) => Some(at(Timestamp::parse(received_at)
            .map_err(|e| DbError::Unavailable(format!("a stored delivery's time: {e}")))?)),
        None => None,
    };
    let rows = sqlx::query(
        "SELECT event_id, received_at, payload, outcome FROM webhook_events WHERE payload IS NOT NULL \
         AND ($1::timestamptz IS NULL OR received_at >= $1) AND ($2::text IS NULL OR event_id = $2) \
         AND ($3::text IS NULL OR outcome = $3) \
         AND ($4::timestamptz IS NULL OR received_at > $4 OR (received_at = $4 AND event_id > $5)) \
         ORDER BY received_at, event_id LIMIT $6",
    )
    .bind(filter.since.map(at))
    .bind(filter.event_id.as_deref())
    .bind(filter.outcome.as_deref())
    .bind(after_at)
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(StoredEvent {
                event_id: row.try_get(0)?,
                received_at: timestamp_at(row, 1)?.to_string(),
                payload: row.try_get(2)?,
                outcome: row.try_get(3)?,
            })
        })
        .collect()
}

/// How many stored deliveries the filter matches whose payload was pruned.
pub(super) async fn pruned_events(pool: &PgPool, filter: &StoredFilter) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_events WHERE payload IS NULL \
         AND ($1::timestamptz IS NULL OR received_at >= $1) AND ($2::text IS NULL OR event_id = $2) \
         AND ($3::text IS NULL OR outcome = $3)",
    )
    .bind(filter.since.map(at))
    .bind(filter.event_id.as_deref())
    .bind(filter.outcome.as_deref())
    .fetch_one(pool)
    .await?)
}

/// Drops the payloads of deliveries received before `cutoff`; returns how many.
pub(super) async fn prune_payloads(pool: &PgPool, cutoff: Timestamp) -> Result<u64, DbError> {
    let done = sqlx::query(
        "UPDATE webhook_events SET payload = NULL WHERE received_at < $1 AND payload IS NOT NULL",
    )
    .bind(at(cutoff))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes deliveries received before `cutoff`; returns how many.
pub(super) async fn prune_ids(pool: &PgPool, cutoff: Timestamp) -> Result<u64, DbError> {
    let done = sqlx::query("DELETE FROM webhook_events WHERE received_at < $1")
        .bind(at(cutoff))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

// ---- roles ----

pub(super) async fn roles(pool: &PgPool) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar("SELECT slug FROM roles ORDER BY slug")
        .fetch_all(pool)
        .await?)
}

pub(super) async fn add_role(pool: &PgPool, slug: &str, now: Timestamp) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO roles (slug, created_at) VALUES ($1, $2) ON CONFLICT (slug) DO NOTHING",
    )
    .bind(slug)
    .bind(at(now))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn remove_role(pool: &PgPool, slug: &str) -> Result<bool, DbError> {
    let done = sqlx::query("DELETE FROM roles WHERE slug = $1")
        .bind(slug)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

// ---- sync_state ----

pub(super) async fn cursor(pool: &PgPool, name: &str) -> Result<Option<String>, DbError> {
    let row: Option<Option<String>> =
        sqlx::query_scalar("SELECT cursor FROM sync_state WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(row.flatten())
}

pub(super) async fn clear_cursor(
    pool: &PgPool,
    name: &str,
    old: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE sync_state SET cursor = NULL, updated_at = $3 WHERE name = $1 AND cursor = $2",
    )
    .bind(name)
    .bind(old)
    .bind(at(now))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn advance_cursor<'c>(
    conn: impl Executor<'c, Database = Postgres>,
    name: &str,
    old: Option<&str>,
    new: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let sql = match old {
        None => "INSERT INTO sync_state (name, cursor, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at \
                 WHERE sync_state.cursor IS NULL",
        Some(_) => "UPDATE sync_state SET cursor = $2, updated_at = $3 WHERE name = $1 AND cursor = $4",
    };
    let mut query = sqlx::query(sql).bind(name).bind(new).bind(at(now));
    if let Some(old) = old {
        query = query.bind(old);
    }
    Ok(query.execute(conn).await?.rows_affected() == 1)
}

/// The `readyz` row of `sync_state`: a write any healthy database takes.
pub(super) async fn probe_write(conn: &mut PgConnection, now: Timestamp) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO sync_state (name, cursor, updated_at) VALUES ('readyz', NULL, $1) \
         ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
    )
    .bind(at(now))
    .execute(conn)
    .await?;
    Ok(())
}

/// The session advisory lock that lets one replica sync at a time.
const LEASE_KEY: i64 = 0x726f_6c65_7379_6e63; // "rolesync"

/// Takes the sync lease on `conn`; `false` when another session holds it.
pub(super) async fn try_lease(conn: &mut PgConnection) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LEASE_KEY)
        .fetch_one(conn)
        .await?)
}

pub(super) async fn release_lease(conn: &mut PgConnection) -> Result<(), DbError> {
    sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
        .bind(LEASE_KEY)
        .fetch_one(conn)
        .await?;
    Ok(())
}

// ---- _sqlx_migrations and the schema ----

/// How many migrations succeeded (readiness).
pub(super) async fn migrations_applied(pool: &PgPool) -> Result<i64, DbError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?,
    )
}

/// Version to checksum of each successful migration; empty without a migration table.
pub(super) async fn applied_checksums(pool: &PgPool) -> Result<HashMap<i64, Vec<u8>>, DbError> {
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await?;
    if tables == 0 {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Creates the schema a URL's `options=-c search_path=NAME[,...]` names first when it does not
/// exist yet, so that rolesync's tables (and `_sqlx_migrations`) go there rather than into
/// `public` beside the app's own tables (PostgreSQL creates in the first schema that exists).
pub(super) async fn create_search_path_schema(pool: &PgPool) -> Result<(), DbError> {
    let path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(pool)
        .await?;
    let Some(schema) = first_schema(&path) else {
        return Ok(());
    };
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&schema)
            .fetch_one(pool)
            .await?;
    if !exists {
        // Only when missing: CREATE SCHEMA needs a privilege that using an existing one does not.
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            schema.replace('"', "\"\"")
        );
        pool.execute(sql.as_str()).await?;
    }
    Ok(())
}

/// The first schema named in a `search_path` setting (`"$user"`, a session-dependent entry, skipped).
fn first_schema(search_path: &str) -> Option<String> {
    search_path
        .split(',')
        .map(|entry| {
            let entry = entry.trim();
            match entry.strip_prefix('"').and_then(|e| e.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => entry.to_ascii_lowercase(),
            }
        })
        .find(|name| !name.is_empty() && name != "$user")
}

// ---- any statement (operators' tools and tests) ----

/// Runs one statement with `$n` parameters; every row, each column as a [`Value`] (a time as
/// rolesync renders it).
/// Binds `params` to `$1`, `$2`, ...
fn bind<'q>(
    mut query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    params: &'q [Value],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for param in params {
        query = match param {
            Value::Null => query.bind(None::<String>),
            Value::Int(n) => query.bind(*n),
            Value::Text(s) => query.bind(s.as_str()),
        };
    }
    query
}

pub(super) async fn rows(
    pool: &PgPool,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Vec<Value>>, DbError> {
    let rows = bind(sqlx::query(sql), params).fetch_all(pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut values = Vec::with_capacity(row.len());
        for i in 0..row.len() {
            let raw = row.try_get_raw(i)?;
            if raw.is_null() {
                values.push(Value::Null);
                continue;
            }
            let name = raw.type_info().name().to_owned();
            values.push(match name.as_str() {
                "INT2" => Value::Int(row.try_get::<i16, _>(i)?.into()),
                "INT4" => Value::Int(row.try_get::<i32, _>(i)?.into()),
                "INT8" => Value::Int(row.try_get(i)?),
                "BOOL" => Value::Int(row.try_get::<bool, _>(i)?.into()),
                "TIMESTAMPTZ" => Value::Text(timestamp_at(row, i)?.to_string()),
                "FLOAT8" => Value::Text(row.try_get::<f64, _>(i)?.to_string()),
                _ => Value::Text(row.try_get(i)?),
            });
        }
        out.push(values);
    }
    Ok(out)
}

// ---- refetch_queue ----

/// Queues refetches (rare: group, role and directory events), one statement each, in the batch's
/// transaction.
async fn enqueue(
    conn: &mut PgConnection,
    refetches: &[QueuedRefetch<'_>],
    now_ms: i64,
) -> Result<(), DbError> {
    for queued in refetches {
        let (sql, params) = refetch::statement(queued, now_ms);
        bind(sqlx::query(sql), &params).execute(&mut *conn).await?;
    }
    Ok(())
}

pub(super) async fn refetch_due(
    pool: &PgPool,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<Queued>, DbError> {
    let rows = sqlx::query(refetch::DUE)
        .bind(now_ms)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Queued {
                target: row.try_get(0)?,
                organization_id: row.try_get(1)?,
                event_id: row.try_get(2)?,
                reason: row.try_get(3)?,
                gone_role: row.try_get(4)?,
                signals: row.try_get(5)?,
                attempts: row.try_get(6)?,
            })
        })
        .collect()
}

pub(super) async fn refetch_claim(
    pool: &PgPool,
    target: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, DbError> {
    let done = sqlx::query(refetch::CLAIM)
        .bind(until_ms)
        .bind(target)
        .bind(now_ms)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn refetch_finish(
    pool: &PgPool,
    done: &Queued,
    now_ms: i64,
) -> Result<(), DbError> {
    let removed = sqlx::query(refetch::FINISH)
        .bind(&done.target)
        .bind(done.signals)
        .execute(pool)
        .await?;
    if removed.rows_affected() == 0 {
        sqlx::query(refetch::AGAIN)
            .bind(now_ms)
            .bind(&done.target)
            .execute(pool)
            .await?;
    }
    Ok(())
}

pub(super) async fn refetch_retry(
    pool: &PgPool,
    failed: &Queued,
    next_ms: i64,
    error: &str,
) -> Result<(), DbError> {
    sqlx::query(refetch::RETRY)
        .bind(failed.attempts + 1)
        .bind(next_ms)
        .bind(error)
        .bind(&failed.target)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn refetch_depth(pool: &PgPool) -> Result<(i64, Option<i64>), DbError> {
    Ok(sqlx::query_as(refetch::DEPTH).fetch_one(pool).await?)
}

// ---- the batch interface ----

/// The one read statement of a batch: event ids ($1), membership keys ($2, $3).
const READ: &str =
    "SELECT 'm' AS kind, m.organization_id, m.user_id, m.membership_id, m.role_slug, \
         m.workos_role_slug, m.status, m.version, m.updated_at, m.role_slugs, m.workos_role_slugs \
         FROM unnest($2::text[], $3::text[]) AS k(org, usr) \
         JOIN memberships m ON m.organization_id = k.org AND m.user_id = k.usr \
         UNION ALL SELECT 'e', event_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
         FROM webhook_events WHERE event_id = ANY($1::text[]) \
         UNION ALL SELECT 'r', slug, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM roles";

/// The one write statement of a batch: memberships ($1-$8 and their role sets $28, $29), audit rows
/// ($9-$22 and their role sets $30, $31, inserted in array order so that ids ascend in slice order),
/// deliveries ($23-$26, inserted in array order, which the caller sorts by event id) received at
/// $27.
static WRITE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH m AS (INSERT INTO memberships ({MEMBERSHIP_COLUMNS}) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::timestamptz[], $8::timestamptz[], $28::text[], $29::text[]) \
         ON CONFLICT (organization_id, user_id) DO UPDATE SET membership_id = excluded.membership_id, \
         role_slug = excluded.role_slug, workos_role_slug = excluded.workos_role_slug, \
         status = excluded.status, version = excluded.version, updated_at = excluded.updated_at, \
         role_slugs = excluded.role_slugs, workos_role_slugs = excluded.workos_role_slugs \
         RETURNING 1), \
         a AS (INSERT INTO role_audit (recorded_at, organization_id, user_id, membership_id, source, \
         event_id, workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version, \
         old_roles, new_roles) \
         SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16 \
         FROM unnest($9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], \
         $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], \
         $22::timestamptz[], $30::text[], $31::text[]) \
         WITH ORDINALITY AS r(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, n) \
         ORDER BY n RETURNING 1), \
         e AS (INSERT INTO webhook_events (event_id, event_type, payload, outcome, received_at) \
         SELECT r.e, r.t, r.p, r.o, $27 FROM unnest($23::text[], $24::text[], $25::text[], $26::text[]) \
         WITH ORDINALITY AS r(e, t, p, o, n) ORDER BY n ON CONFLICT (event_id) DO NOTHING RETURNING 1) \
         SELECT COUNT(*) FROM e"
    )
});

/// [`BatchStore`] on a PostgreSQL connection inside a transaction.
pub(super) struct Store<'a> {
    pub(super) conn: &'a mut PgConnection,
}

fn column<'r, T, U>(rows: &'r [T], value: impl Fn(&'r T) -> U) -> Vec<U> {
    rows.iter().map(value).collect()
}

impl BatchStore for Store<'_> {
    async fn lock_memberships(&mut self, keys: &[&Key]) -> Result<(), DbError> {
        lock_memberships(self.conn, keys).await
    }

    /// One statement: the memberships, the known event ids and the roles, as rows of a union told
    /// apart by their first column.
    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        let orgs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let users: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let rows = sqlx::query(READ)
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
                    let m = membership(&row, 1)?;
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
        let rows = sqlx::query(
            "SELECT k.org, k.usr, k.v, a.version, a.workos_role_slug, a.new_status \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(org, usr, v) \
             JOIN LATERAL (SELECT b.version, b.workos_role_slug, b.new_status FROM role_audit b \
             WHERE b.organization_id = k.org AND b.user_id = k.usr AND b.version <= k.v \
             AND (b.outcome <> 'stale' OR b.version = k.v) ORDER BY b.version DESC, b.id DESC LIMIT 1) a \
             ON true",
        )
        .bind(column(points, |p| p.0))
        .bind(column(points, |p| p.1))
        .bind(column(points, |p| at(p.2)))
        .fetch_all(&mut *self.conn)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let point = (row.try_get(0)?, row.try_get(1)?, timestamp_at(&row, 2)?);
            let mark = HistoryMark {
                version: timestamp_at(&row, 3)?,
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
        let inserted: i64 = sqlx::query_scalar(&WRITE)
            .bind(column(rows, |r| r.organization_id.as_str()))
            .bind(column(rows, |r| r.user_id.as_str()))
            .bind(column(rows, |r| r.membership_id.as_str()))
            .bind(column(rows, |r| r.role_slug.as_deref()))
            .bind(column(rows, |r| r.workos_role_slug.as_deref()))
            .bind(column(rows, |r| r.status.as_str()))
            .bind(column(rows, |r| at(r.version)))
            .bind(column(rows, |r| at(r.updated_at)))
            .bind(column(entries, |e| at(e.recorded_at)))
            .bind(column(entries, |e| e.organization_id.as_str()))
            .bind(column(entries, |e| e.user_id.as_str()))
            .bind(column(entries, |e| e.membership_id.as_str()))
            .bind(column(entries, |e| e.source.as_str()))
            .bind(column(entries, |e| e.event_id.as_deref()))
            .bind(column(entries, |e| e.workos_role_slug.as_deref()))
            .bind(column(entries, |e| e.old_role.as_deref()))
            .bind(column(entries, |e| e.new_role.as_deref()))
            .bind(column(entries, |e| e.old_status.as_deref()))
            .bind(column(entries, |e| e.new_status.as_deref()))
            .bind(column(entries, |e| e.outcome.as_str()))
            .bind(column(entries, |e| e.detail.as_str()))
            .bind(column(entries, |e| at(e.version)))
            .bind(column(events, |r| r.event_id))
            .bind(column(events, |r| r.event_type))
            .bind(column(events, |r| r.payload))
            .bind(column(events, |r| r.outcome))
            .bind(at(received_at))
            .bind(column(rows, |r| slugs_text(&r.role_slugs)))
            .bind(column(rows, |r| slugs_text(&r.workos_role_slugs)))
            .bind(column(entries, |e| e.old_roles.as_deref().map(slugs_text)))
            .bind(column(entries, |e| e.new_roles.as_deref().map(slugs_text)))
            .fetch_one(&mut *self.conn)
            .await?;
        enqueue(&mut *self.conn, &writes.refetches, received_at.millis()).await?;
        Ok(inserted as u64)
    }
}

impl Store<'_> {
    /// The stored row of one membership, inside the transaction.
    pub(super) async fn membership(
        &mut self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, DbError> {
        Ok(
            membership_with_role(&mut *self.conn, organization_id, user_id)
                .await?
                .map(|(m, _)| m),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::first_schema;

    #[test]
    fn the_first_schema_of_a_search_path_is_read_as_postgresql_reads_it() {
        for (path, expected) in [
            ("rolesync", Some("rolesync")),
            ("RoleSync, public", Some("rolesync")),
            ("\"$user\", public", Some("public")),
            ("\"Role \"\"Sync\"\"\", public", Some("Role \"Sync\"")),
            ("", None),
        ] {
            assert_eq!(first_schema(path).as_deref(), expected, "{path:?}");
        }
    }
}
