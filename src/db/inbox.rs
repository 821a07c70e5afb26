//! The `webhook_events` inbox: one row per event id, the raw payload and the outcome.

use sqlx::{Any, Executor};

use std::collections::HashSet;

use super::base::{Backend, DbError};
use crate::timestamp::Timestamp;

/// A delivery to record.
#[derive(Debug, Clone)]
pub struct InboxRow<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub outcome: &'a str,
}

/// The insert of deliveries, up to its VALUES list of 5 columns.
pub(super) const INSERT: &str =
    "INSERT INTO webhook_events (event_id, event_type, payload, outcome, received_at) VALUES";

/// Records deliveries (event ids distinct); returns how many were new, the others being duplicates.
pub async fn insert_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    rows: &[InboxRow<'_>],
    received_at: Timestamp,
) -> Result<u64, DbError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "{INSERT} {} ON CONFLICT (event_id) DO NOTHING",
        backend.values_list(rows.len(), 5)
    );
    let received_at = received_at.to_string();
    let mut query = sqlx::query(&sql);
    for row in rows {
        query = query
            .bind(row.event_id)
            .bind(row.event_type)
            .bind(row.payload)
            .bind(row.outcome)
            .bind(received_at.as_str());
    }
    Ok(query.execute(conn).await?.rows_affected())
}

/// Which of these event ids are already stored.
pub async fn existing<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    ids: &[&str],
) -> Result<HashSet<String>, DbError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT event_id FROM webhook_events WHERE event_id IN (VALUES {})",
        backend.values_list(ids.len(), 1)
    );
    let mut query = sqlx::query_scalar::<_, String>(&sql);
    for id in ids {
        query = query.bind(*id);
    }
    Ok(query.fetch_all(conn).await?.into_iter().collect())
}

/// Sets the outcome of stored deliveries: `(event_id, outcome)` pairs.
pub async fn set_outcomes<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    outcomes: &[(&str, &str)],
) -> Result<(), DbError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE webhook_events SET outcome = v.column2 FROM (VALUES {}) AS v \
         WHERE webhook_events.event_id = v.column1",
        backend.values_list(outcomes.len(), 2)
    );
    let mut query = sqlx::query(&sql);
    for (id, outcome) in outcomes {
        query = query.bind(*id).bind(*outcome);
    }
    query.execute(conn).await?;
    Ok(())
}

/// How many deliveries are stored.
pub async fn count<'c>(conn: impl Executor<'c, Database = Any>) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(conn)
        .await?)
}

/// A stored delivery read back for replay.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub event_id: String,
    pub received_at: String,
    pub payload: String,
    pub outcome: String,
}

/// Which stored deliveries to read back.
#[derive(Debug, Clone, Default)]
pub struct StoredFilter {
    pub since: Option<Timestamp>,
    pub event_id: Option<String>,
    pub outcome: Option<String>,
}

/// Stored deliveries that still have their payload, oldest first, at most `limit` after `after_id`.
pub async fn stored<'c>(
    conn: impl Executor<'c, Database = Any>,
    filter: &StoredFilter,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<StoredEvent>, DbError> {
    Ok(sqlx::query_as(
        "SELECT event_id, received_at, payload, outcome FROM webhook_events WHERE payload IS NOT NULL \
         AND ($1 IS NULL OR received_at >= $1) AND ($2 IS NULL OR event_id = $2) AND ($3 IS NULL OR outcome = $3) \
         AND ($4 IS NULL OR received_at > $4 OR (received_at = $4 AND event_id > $5)) \
         ORDER BY received_at, event_id LIMIT $6",
    )
    .bind(filter.since.map(|t| t.to_string()))
    .bind(filter.event_id.as_deref())
    .bind(filter.outcome.as_deref())
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// How many stored deliveries the filter matches whose payload was pruned (they cannot be replayed).
pub async fn pruned<'c>(
    conn: impl Executor<'c, Database = Any>,
    filter: &StoredFilter,
) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_events WHERE payload IS NULL \
         AND ($1 IS NULL OR received_at >= $1) AND ($2 IS NULL OR event_id = $2) AND ($3 IS NULL OR outcome = $3)",
    )
    .bind(filter.since.map(|t| t.to_string()))
    .bind(filter.event_id.as_deref())
    .bind(filter.outcome.as_deref())
    .fetch_one(conn)
    .await?)
}

/// Drops the payloads of deliveries received before `cutoff`, keeping their ids; returns how many.
pub async fn prune_payloads<'c>(
    conn: impl Executor<'c, Database = Any>,
    cutoff: Timestamp,
) -> Result<u64, DbError> {
    let done = sqlx::query(
        "UPDATE webhook_events SET payload = NULL WHERE received_at < $1 AND payload IS NOT NULL",
    )
    .bind(cutoff.to_string())
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes deliveries (ids included) received before `cutoff`; returns how many.
pub async fn prune_ids<'c>(
    conn: impl Executor<'c, Database = Any>,
    cutoff: Timestamp,
) -> Result<u64, DbError> {
    let done = sqlx::query("DELETE FROM webhook_events WHERE received_at < $1")
        .bind(cutoff.to_string())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}
