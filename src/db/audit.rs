//! The append-only `role_audit` table: every decision of every path.

use serde::Serialize;
use sqlx::{Any, Executor};

use super::{Backend, DbError};
use crate::reconcile::{AuditEntry, HistoryMark};
use crate::timestamp::Timestamp;

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

/// Appends rows in order (ids ascend in slice order).
pub async fn insert_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    entries: &[AuditEntry],
) -> Result<(), DbError> {
    if entries.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO role_audit (recorded_at, organization_id, user_id, membership_id, source, event_id, \
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version) VALUES {}",
        backend.values_list(entries.len(), 14)
    );
    let mut query = sqlx::query(&sql);
    for e in entries {
        query = query
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
            .bind(e.version.to_string());
    }
    query.execute(conn).await?;
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

/// The trail of a membership as of `version`: the latest row at or before it, where a stale row
/// counts only at exactly that version.
pub async fn as_of<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: &str,
    user_id: &str,
    version: Timestamp,
) -> Result<Option<HistoryMark>, DbError> {
    Ok(sqlx::query_as(
        "SELECT version, workos_role_slug, new_status FROM role_audit \
         WHERE organization_id = $1 AND user_id = $2 AND version <= $3 AND (outcome <> 'stale' OR version = $3) \
         ORDER BY version DESC, id DESC LIMIT 1",
    )
    .bind(organization_id)
    .bind(user_id)
    .bind(version.to_string())
    .fetch_optional(conn)
    .await?)
}
