//! The append-only `role_audit` table: every decision of every path.

use serde::Serialize;
use sqlx::{Any, Executor};

use super::DbError;
use crate::reconcile::AuditEntry;

/// A stored audit row, as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub recorded_at: String,
    pub organization_id: String,
    pub user_id: String,
    pub membership_id: String,
    pub source: String,
    pub event_id: Option<String>,
    pub workos_role_slug: Option<String>,
    pub old_role: Option<String>,
    pub new_role: Option<String>,
    pub old_status: Option<String>,
    pub new_status: Option<String>,
    pub outcome: String,
    pub detail: String,
    pub version: String,
}

/// Appends one row. With `once`, nothing is appended when a row for the same membership already
/// records the same observed version.
pub async fn insert<'c>(
    conn: impl Executor<'c, Database = Any>,
    e: &AuditEntry,
    once: bool,
) -> Result<(), DbError> {
    let guard = if once {
        " WHERE NOT EXISTS (SELECT 1 FROM role_audit WHERE organization_id = $2 AND user_id = $3 AND version = $14)"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO role_audit (recorded_at, organization_id, user_id, membership_id, source, event_id, \
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14{guard}"
    );
    sqlx::query(&sql)
        .bind(e.recorded_at.to_string())
        .bind(&e.organization_id)
        .bind(&e.user_id)
        .bind(&e.membership_id)
        .bind(e.source.as_str())
        .bind(&e.event_id)
        .bind(&e.workos_role_slug)
        .bind(&e.old_role)
        .bind(&e.new_role)
        .bind(&e.old_status)
        .bind(&e.new_status)
        .bind(e.outcome.as_str())
        .bind(&e.detail)
        .bind(e.version.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Rows filtered by organization and/or user, newest first, at most `limit`.
pub async fn list<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: Option<&str>,
    user_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditRow>, DbError> {
    Ok(sqlx::query_as(
        "SELECT id, recorded_at, organization_id, user_id, membership_id, source, event_id, \
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version \
         FROM role_audit WHERE ($1 IS NULL OR organization_id = $1) AND ($2 IS NULL OR user_id = $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(organization_id)
    .bind(user_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
