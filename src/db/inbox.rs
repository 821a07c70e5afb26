//! The `webhook_events` inbox: one row per event id, the raw payload and the outcome.

use sqlx::{Any, Executor};

use super::DbError;
use crate::timestamp::Timestamp;

/// Records a delivery; `false` when the event id is already there (a duplicate).
pub async fn insert<'c>(
    conn: impl Executor<'c, Database = Any>,
    event_id: &str,
    event_type: &str,
    received_at: Timestamp,
    payload: &str,
    outcome: &str,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO webhook_events (event_id, event_type, received_at, payload, outcome) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(received_at.to_string())
    .bind(payload)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets the outcome of a stored delivery.
pub async fn set_outcome<'c>(
    conn: impl Executor<'c, Database = Any>,
    event_id: &str,
    outcome: &str,
) -> Result<(), DbError> {
    sqlx::query("UPDATE webhook_events SET outcome = $1 WHERE event_id = $2")
        .bind(outcome)
        .bind(event_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many deliveries are stored.
pub async fn count<'c>(conn: impl Executor<'c, Database = Any>) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(conn)
        .await?)
}
