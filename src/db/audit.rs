//! The append-only `role_audit` table: every decision of every path.

use serde::Serialize;
use sqlx::{Any, Executor, Row};

use std::collections::HashMap;

use super::base::{slugs_text, Backend, DbError};
use crate::domain::{AuditEntry, HistoryMark};
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
    /// The role sets before and after; `None` where no row was stored, and on rows written before
    /// role sets were recorded.
    #[sqlx(try_from = "Option<String>")]
    pub old_roles: RoleSet,
    #[sqlx(try_from = "Option<String>")]
    pub new_roles: RoleSet,
}

/// A role set column of an audit row (a JSON array of slugs), `None` where none was recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RoleSet(pub Option<Vec<String>>);

impl TryFrom<Option<String>> for RoleSet {
    type Error = serde_json::Error;
    fn try_from(text: Option<String>) -> Result<Self, Self::Error> {
        text.map(|t| serde_json::from_str(&t)).transpose().map(Self)
    }
}

/// The insert of audit rows, up to its VALUES list of [`COLUMN_COUNT`] columns.
pub(super) const INSERT: &str = "INSERT INTO role_audit (recorded_at, organization_id, user_id, \
     membership_id, source, event_id, workos_role_slug, old_role, new_role, old_status, new_status, \
     outcome, detail, version, old_roles, new_roles) VALUES";
/// How many columns [`INSERT`] names.
pub(super) const COLUMN_COUNT: usize = 16;

/// The trail of one membership as of a version ($1, $2, $3), as [`as_of_many`] reads it.
pub(super) const AS_OF: &str = "SELECT version, workos_role_slug, new_status FROM role_audit \
     WHERE organization_id = $1 AND user_id = $2 AND version <= $3 AND (outcome <> 'stale' OR version = $3) \
     ORDER BY version DESC, id DESC LIMIT 1";

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
        "{INSERT} {}",
        backend.values_list(entries.len(), COLUMN_COUNT)
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
            .bind(e.version.to_string())
            .bind(e.old_roles.as_deref().map(slugs_text))
            .bind(e.new_roles.as_deref().map(slugs_text));
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
         workos_role_slug, old_role, new_role, old_status, new_status, outcome, detail, version, \
         old_roles, new_roles FROM role_audit WHERE ($1 IS NULL OR organization_id = $1) AND ($2 IS NULL OR user_id = $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(organization_id)
    .bind(user_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The trail of each `(organization_id, user_id, version)` as of that version, in one statement: the
/// latest row at or before it, where a stale row counts only at exactly that version; a point with no
/// trail is absent from the map.
pub async fn as_of_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    points: &[(&str, &str, Timestamp)],
) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
    if points.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT k.column1 AS organization_id, k.column2 AS user_id, k.column3 AS as_of, \
         a.version, a.workos_role_slug, a.new_status \
         FROM (VALUES {}) AS k JOIN role_audit a ON a.id = (SELECT b.id FROM role_audit b \
         WHERE b.organization_id = k.column1 AND b.user_id = k.column2 AND b.version <= k.column3 \
         AND (b.outcome <> 'stale' OR b.version = k.column3) ORDER BY b.version DESC, b.id DESC LIMIT 1)",
        backend.values_list(points.len(), 3)
    );
    let mut query = sqlx::query(&sql);
    for (org, user, version) in points {
        query = query.bind(*org).bind(*user).bind(version.to_string());
    }
    let mut out = HashMap::with_capacity(points.len());
    for row in query.fetch_all(conn).await? {
        let timestamp = |column: &str| -> Result<Timestamp, DbError> {
            super::base::decode_timestamp(row.try_get(column)?)
        };
        let point = (
            row.try_get("organization_id")?,
            row.try_get("user_id")?,
            timestamp("as_of")?,
        );
        let mark = HistoryMark {
            version: timestamp("version")?,
            workos_role_slug: row.try_get("workos_role_slug")?,
            new_status: row.try_get("new_status")?,
        };
        out.insert(point, mark);
    }
    Ok(out)
}
