//! The `memberships` table: one row per (organization, user), the state the web app gates on.

use sqlx::{Any, Executor};

use super::DbError;
use crate::reconcile::Membership;

const COLUMNS: &str = "organization_id, user_id, membership_id, role_slug, workos_role_slug, status, version, updated_at";

/// The stored row of one membership.
pub async fn get<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<Membership>, DbError> {
    let sql =
        format!("SELECT {COLUMNS} FROM memberships WHERE organization_id = $1 AND user_id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(organization_id)
        .bind(user_id)
        .fetch_optional(conn)
        .await?)
}

/// Every stored row, ordered by organization then user (for tests and operators).
pub async fn list<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: Option<&str>,
) -> Result<Vec<Membership>, DbError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM memberships WHERE ($1 IS NULL OR organization_id = $1) \
         ORDER BY organization_id, user_id"
    );
    Ok(sqlx::query_as(&sql)
        .bind(organization_id)
        .fetch_all(conn)
        .await?)
}

/// Inserts or replaces the row of one membership.
pub async fn upsert<'c>(
    conn: impl Executor<'c, Database = Any>,
    row: &Membership,
) -> Result<(), DbError> {
    let sql = format!(
        "INSERT INTO memberships ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (organization_id, user_id) DO UPDATE SET \
         membership_id = excluded.membership_id, role_slug = excluded.role_slug, \
         workos_role_slug = excluded.workos_role_slug, status = excluded.status, \
         version = excluded.version, updated_at = excluded.updated_at"
    );
    sqlx::query(&sql)
        .bind(&row.organization_id)
        .bind(&row.user_id)
        .bind(&row.membership_id)
        .bind(&row.role_slug)
        .bind(&row.workos_role_slug)
        .bind(&row.status)
        .bind(row.version.to_string())
        .bind(row.updated_at.to_string())
        .execute(conn)
        .await?;
    Ok(())
}
