//! The `roles` table: the role slugs the app knows.

use sqlx::{Any, Executor};

use super::base::DbError;
use crate::timestamp::Timestamp;

/// Every known slug, sorted.
pub async fn list<'c>(conn: impl Executor<'c, Database = Any>) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar("SELECT slug FROM roles ORDER BY slug")
        .fetch_all(conn)
        .await?)
}

/// Adds a slug; `false` when it was already known.
pub async fn add<'c>(
    conn: impl Executor<'c, Database = Any>,
    slug: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO roles (slug, created_at) VALUES ($1, $2) ON CONFLICT (slug) DO NOTHING",
    )
    .bind(slug)
    .bind(now.to_string())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes a slug; `false` when it was not known.
pub async fn remove<'c>(
    conn: impl Executor<'c, Database = Any>,
    slug: &str,
) -> Result<bool, DbError> {
    let done = sqlx::query("DELETE FROM roles WHERE slug = $1")
        .bind(slug)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
