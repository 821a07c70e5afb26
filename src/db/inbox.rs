//! The `webhook_events` inbox: one row per event id, the raw payload and the outcome.

use sqlx::{Any, Executor};

use std::collections::HashSet;

use super::{values_list, DbError};
use crate::timestamp::Timestamp;

/// A delivery to record.
#[derive(Debug, Clone)]
pub struct InboxRow<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub outcome: &'a str,
}

/// Records deliveries (event ids distinct); returns the ids that were new, the others being duplicates.
pub async fn insert_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    rows: &[InboxRow<'_>],
    received_at: Timestamp,
) -> Result<HashSet<String>, DbError> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "INSERT INTO webhook_events (event_id, event_type, payload, outcome, received_at) VALUES {} \
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        values_list(rows.len(), 5)
    );
    let received_at = received_at.to_string();
    let mut query = sqlx::query_scalar::<_, String>(&sql);
    for row in rows {
        query = query
            .bind(row.event_id)
            .bind(row.event_type)
            .bind(row.payload)
            .bind(row.outcome)
            .bind(received_at.as_str());
    }
    Ok(query.fetch_all(conn).await?.into_iter().collect())
}

/// Sets the outcome of stored deliveries: `(event_id, outcome)` pairs.
pub async fn set_outcomes<'c>(
    conn: impl Executor<'c, Database = Any>,
    outcomes: &[(&str, &str)],
) -> Result<(), DbError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE webhook_events SET outcome = v.column2 FROM (VALUES {}) AS v \
         WHERE webhook_events.event_id = v.column1",
        values_list(outcomes.len(), 2)
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
