//! The `memberships` table: one row per (organization, user), the state the web app gates on.

use sqlx::{Any, Executor};

use std::collections::{HashMap, HashSet};

use super::base::{slugs_text, Backend, DbError, Key, Slugs};
use crate::domain::Membership;
use crate::timestamp::Timestamp;

/// A `memberships` row as sqlx decodes it; [`Membership`] (the domain's) knows no driver.
#[derive(sqlx::FromRow)]
pub(super) struct Row {
    organization_id: String,
    user_id: String,
    membership_id: String,
    role_slug: Option<String>,
    workos_role_slug: Option<String>,
    status: String,
    #[sqlx(try_from = "String")]
    version: Timestamp,
    #[sqlx(try_from = "String")]
    updated_at: Timestamp,
    #[sqlx(try_from = "String")]
    role_slugs: Slugs,
    #[sqlx(try_from = "String")]
    workos_role_slugs: Slugs,
}

impl From<Row> for Membership {
    fn from(r: Row) -> Self {
        Self {
            organization_id: r.organization_id,
            user_id: r.user_id,
            membership_id: r.membership_id,
            role_slug: r.role_slug,
            workos_role_slug: r.workos_role_slug,
            status: r.status,
            version: r.version,
            updated_at: r.updated_at,
            role_slugs: r.role_slugs.0,
            workos_role_slugs: r.workos_role_slugs.0,
        }
    }
}

/// The same columns, qualified for a join on `m`.
pub(super) const PREFIXED_COLUMNS: &str = "m.organization_id, m.user_id, m.membership_id, m.role_slug, m.workos_role_slug, m.status, m.version, m.updated_at, m.role_slugs, m.workos_role_slugs";
pub(super) const COLUMNS: &str = "organization_id, user_id, membership_id, role_slug, workos_role_slug, status, version, updated_at, role_slugs, workos_role_slugs";
/// How many [`COLUMNS`] there are.
pub(super) const COLUMN_COUNT: usize = 10;

/// The columns an upsert replaces besides `membership_id`.
macro_rules! replaced_but_id {
    () => {
        "role_slug = excluded.role_slug, workos_role_slug = excluded.workos_role_slug, \
         status = excluded.status, version = excluded.version, updated_at = excluded.updated_at, \
         role_slugs = excluded.role_slugs, workos_role_slugs = excluded.workos_role_slugs"
    };
}

/// What an upsert of a row does to a stored one: replace every column but the key.
pub(super) const UPSERT_CONFLICT: &str = concat!(
    "ON CONFLICT (organization_id, user_id) DO UPDATE SET membership_id = excluded.membership_id, ",
    replaced_but_id!()
);

/// The same, leaving `membership_id` as stored. SQLite rewrites the entry of every index whose
/// column an UPDATE assigns, changed or not, so assigning the id that rarely changes would dirty a
/// page of `memberships_membership_id` per row (about 0.9 of the 3.3 WAL frames a delivery writes
/// in batches of 20); [`SET_MEMBERSHIP_ID`] then changes it where it differs.
pub(super) const UPSERT_CONFLICT_BUT_ID: &str = concat!(
    "ON CONFLICT (organization_id, user_id) DO UPDATE SET ",
    replaced_but_id!()
);

/// Gives a stored row (`?1`, `?2`) the membership id `?3` when it has another one.
pub(super) const SET_MEMBERSHIP_ID: &str = "UPDATE memberships SET membership_id = ?3 \
     WHERE organization_id = ?1 AND user_id = ?2 AND membership_id <> ?3";

/// [`get`]'s statement.
pub(super) static GET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {COLUMNS} FROM memberships WHERE organization_id = $1 AND user_id = $2")
});

/// The stored row of one membership.
pub async fn get<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<Membership>, DbError> {
    let row: Option<Row> = sqlx::query_as(&GET)
        .bind(organization_id)
        .bind(user_id)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(Membership::from))
}

/// The stored row of one membership, and which slugs of the set WorkOS last reported for it
/// (`workos_role_slugs`, `workos_role_slug`) are in `roles`.
pub async fn get_with_role(
    pool: &sqlx::AnyPool,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<(Membership, HashSet<String>)>, DbError> {
    #[derive(sqlx::FromRow)]
    struct WithRole {
        #[sqlx(flatten)]
        membership: Row,
        role_known: i64,
    }
    let sql = format!(
        "SELECT {COLUMNS}, \
         (SELECT COUNT(*) FROM roles WHERE slug = memberships.workos_role_slug) AS role_known \
         FROM memberships WHERE organization_id = $1 AND user_id = $2"
    );
    let row: Option<WithRole> = sqlx::query_as(&sql)
        .bind(organization_id)
        .bind(user_id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let membership = Membership::from(row.membership);
    let primary = membership.workos_role_slug.clone();
    // Single-role (the reported set is the primary role): the count above says it all.
    if membership.workos_role_slugs.len() <= 1
        && membership.workos_role_slugs.first() == primary.as_ref()
    {
        let known = primary.filter(|_| row.role_known > 0).into_iter().collect();
        return Ok(Some((membership, known)));
    }
    let known = super::roles::list(pool)
        .await?
        .into_iter()
        .filter(|s| membership.workos_role_slugs.contains(s) || primary.as_ref() == Some(s))
        .collect();
    Ok(Some((membership, known)))
}

/// The stored row holding a WorkOS membership id, if any.
pub async fn get_by_membership_id<'c>(
    conn: impl Executor<'c, Database = Any>,
    membership_id: &str,
) -> Result<Option<Membership>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM memberships WHERE membership_id = $1 LIMIT 1");
    let row: Option<Row> = sqlx::query_as(&sql)
        .bind(membership_id)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(Membership::from))
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
    let rows: Vec<Row> = sqlx::query_as(&sql)
        .bind(organization_id)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(Membership::from).collect())
}

/// Every organization with a stored membership, in order.
pub async fn organizations<'c>(
    conn: impl Executor<'c, Database = Any>,
) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT organization_id FROM memberships ORDER BY organization_id",
    )
    .fetch_all(conn)
    .await?)
}

/// The stored rows of these memberships.
pub async fn get_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    keys: &[&Key],
) -> Result<HashMap<Key, Membership>, DbError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT {} FROM (VALUES {}) AS k JOIN memberships m \
         ON m.organization_id = k.column1 AND m.user_id = k.column2",
        PREFIXED_COLUMNS,
        backend.values_list(keys.len(), 2)
    );
    let mut query = sqlx::query_as::<_, Row>(&sql);
    for (org, user) in keys {
        query = query.bind(org).bind(user);
    }
    let rows = query.fetch_all(conn).await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.organization_id.clone(), r.user_id.clone()), r.into()))
        .collect())
}

/// Inserts or replaces the rows of several memberships (each key at most once).
pub async fn upsert_many<'c>(
    conn: impl Executor<'c, Database = Any>,
    backend: Backend,
    rows: &[&Membership],
) -> Result<(), DbError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO memberships ({COLUMNS}) VALUES {} {UPSERT_CONFLICT}",
        backend.values_list(rows.len(), COLUMN_COUNT)
    );
    let mut query = sqlx::query(&sql);
    for row in rows {
        query = query
            .bind(&row.organization_id)
            .bind(&row.user_id)
            .bind(&row.membership_id)
            .bind(&row.role_slug)
            .bind(&row.workos_role_slug)
            .bind(&row.status)
            .bind(row.version.to_string())
            .bind(row.updated_at.to_string())
            .bind(slugs_text(&row.role_slugs))
            .bind(slugs_text(&row.workos_role_slugs));
    }
    query.execute(conn).await?;
    Ok(())
}

/// Removes the `membership_roles` rows of a membership (`$1`, `$2`).
pub(super) const CLEAR_ROLES: &str =
    "DELETE FROM membership_roles WHERE organization_id = $1 AND user_id = $2";
/// Inserts one `membership_roles` row (`$1`, `$2`, `$3`).
pub(super) const ADD_ROLE: &str =
    "INSERT INTO membership_roles (organization_id, user_id, role_slug) \
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// Makes `membership_roles` hold exactly each row's `role_slugs`.
pub async fn set_roles_many(
    conn: &mut sqlx::AnyConnection,
    rows: &[&Membership],
) -> Result<(), DbError> {
    for row in rows {
        sqlx::query(CLEAR_ROLES)
            .bind(&row.organization_id)
            .bind(&row.user_id)
            .execute(&mut *conn)
            .await?;
        for slug in &row.role_slugs {
            sqlx::query(ADD_ROLE)
                .bind(&row.organization_id)
                .bind(&row.user_id)
                .bind(slug)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The roles of a membership as `membership_roles` holds them, sorted.
pub async fn roles_of<'c>(
    conn: impl Executor<'c, Database = Any>,
    organization_id: &str,
    user_id: &str,
) -> Result<Vec<String>, DbError> {
    Ok(sqlx::query_scalar(
        "SELECT role_slug FROM membership_roles WHERE organization_id = $1 AND user_id = $2 \
         ORDER BY role_slug",
    )
    .bind(organization_id)
    .bind(user_id)
    .fetch_all(conn)
    .await?)
}
