//! Bulk prefill before the server starts: K memberships and J audit rows generated inside the database
//! (a recursive CTE on SQLite, `generate_series` on PostgreSQL), in chunks of half a million rows.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rolesync::db::{Backend, Db, Value};

use crate::workload::{ts, PREFILL_VERSION_MS, USERS_PER_ORG};

/// Rows per statement (each statement is one transaction).
const CHUNK: usize = 500_000;

const MEMBERSHIP_COLUMNS: &str =
    "organization_id, user_id, membership_id, role_slug, workos_role_slug, status, version, updated_at";
const AUDIT_COLUMNS: &str =
    "recorded_at, organization_id, user_id, membership_id, source, event_id, \
     workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version";

/// The SQL of one chunk: rows `$1..$2`; `$3` the version text; for audit rows `$4` the membership count.
fn chunk_sql(backend: Backend, audit: bool) -> String {
    let (seq, n, from, at) = match backend {
        Backend::Sqlite => (
            "WITH RECURSIVE seq(n) AS (SELECT $1 UNION ALL SELECT n + 1 FROM seq WHERE n + 1 < $2) ",
            if audit { "(n % $4)" } else { "n" },
            "FROM seq",
            "$3",
        ),
        Backend::Postgres => (
            "",
            if audit { "(n % $4::bigint)" } else { "n" },
            "FROM generate_series($1::bigint, $2::bigint - 1) AS g(n)",
            "$3::timestamptz",
        ),
    };
    let id = |prefix: &str, width: usize, of: &str| match backend {
        Backend::Sqlite => format!("printf('{prefix}%0{width}d', {of})"),
        Backend::Postgres => format!("'{prefix}' || lpad(({of})::text, {width}, '0')"),
    };
    let keys = format!(
        "{}, {}, {}",
        id("org_bench_", 6, &format!("{n} / {USERS_PER_ORG}")),
        id("user_bench_", 7, n),
        id("om_bench_", 7, n)
    );
    if audit {
        format!(
            "{seq}INSERT INTO role_audit ({AUDIT_COLUMNS}) SELECT {at}, {keys}, 'resync', NULL, 'member', \
             'member', 'member', 'active', 'active', 'applied', 'bench prefill', {at} {from}"
        )
    } else {
        format!(
            "{seq}INSERT INTO memberships ({MEMBERSHIP_COLUMNS}) SELECT {keys}, 'member', 'member', \
             'active', {at}, {at} {from}"
        )
    }
}

/// Inserts memberships `0..memberships` and `audit` audit rows spread over them; returns the time taken.
pub async fn run(db: &Db, memberships: usize, audit: usize) -> Result<Duration> {
    let started = Instant::now();
    // Each chunk is one transaction, so PostgreSQL's commit waits once per half a million rows.
    if db.backend() == Backend::Sqlite {
        // A throwaway load: durability of each chunk does not matter, speed does (the prefill runs
        // on one connection at a time, so the pool hands the same one back).
        db.execute("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
            .await?;
    }
    let version = ts(PREFILL_VERSION_MS);
    insert_chunks(db, false, memberships, memberships, &version)
        .await
        .context("prefill memberships")?;
    insert_chunks(db, true, audit, memberships, &version)
        .await
        .context("prefill role_audit")?;
    settle(db).await?;
    Ok(started.elapsed())
}

async fn insert_chunks(
    db: &Db,
    audit: bool,
    rows: usize,
    memberships: usize,
    version: &str,
) -> Result<()> {
    let sql = chunk_sql(db.backend(), audit);
    for lo in (0..rows).step_by(CHUNK) {
        let hi = (lo + CHUNK).min(rows);
        let mut params = vec![
            Value::Int(lo as i64),
            Value::Int(hi as i64),
            Value::from(version),
        ];
        if audit {
            params.push(Value::Int(memberships as i64));
        }
        db.rows(&sql, &params).await?;
        eprintln!(
            "loadgen: prefilled {hi}/{rows} {}",
            if audit { "audit rows" } else { "memberships" }
        );
    }
    Ok(())
}

/// Leaves the database as a long-running one would be: WAL checkpointed (SQLite), vacuumed and
/// analysed (PostgreSQL, whose autovacuum would otherwise do it during the run).
async fn settle(db: &Db) -> Result<()> {
    let statements: &[&str] = match db.backend() {
        Backend::Sqlite => &["PRAGMA wal_checkpoint(TRUNCATE)"],
        Backend::Postgres => &["VACUUM ANALYZE memberships", "VACUUM ANALYZE role_audit"],
    };
    for sql in statements {
        db.execute(sql).await?;
    }
    Ok(())
}
