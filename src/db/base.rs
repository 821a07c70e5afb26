//! What every part of the database layer shares: the error, the backends, membership keys, the
//! migrations and the SQLite pragmas.

use sqlx::migrate::Migrator;

pub(super) static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
pub(super) static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// A membership's identity: (organization_id, user_id).
pub type Key = (String, String);

/// A storage failure; the request path answers it with 503 so that WorkOS retries.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Unavailable(String),
    #[error("a concurrent transaction stored the same event; retrying")]
    Conflict,
}

impl DbError {
    /// A deadlock or serialization failure that a retry of the whole transaction may clear.
    pub fn is_transient(&self) -> bool {
        if matches!(self, Self::Conflict) {
            return true;
        }
        if let Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) = self {
            return matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            );
        }
        let Self::Sqlx(sqlx::Error::Database(e)) = self else {
            return false;
        };
        matches!(
            e.code().as_deref(),
            Some("40P01" | "40001" | "5" | "6" | "517")
        )
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `rows` tuples of `columns` placeholders: `($1, $2), ($3, $4), ...` on PostgreSQL; `(?, ?), ...`
    /// on SQLite, whose driver looks every numbered name up by a linear scan when binding.
    pub fn values_list(self, rows: usize, columns: usize) -> String {
        let mut out = String::with_capacity(rows * columns * 5);
        for row in 0..rows {
            out.push_str(if row == 0 { "(" } else { ", (" });
            for column in 0..columns {
                if column > 0 {
                    out.push_str(", ");
                }
                match self {
                    Self::Sqlite => out.push('?'),
                    Self::Postgres => {
                        out.push('$');
                        out.push_str(&(row * columns + column + 1).to_string());
                    }
                }
            }
            out.push(')');
        }
        out
    }

    /// The statement that begins a write transaction: on SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`) so that a read-then-write never fails to upgrade.
    pub(super) fn begin_write_sql(self) -> &'static str {
        match self {
            Self::Sqlite => "BEGIN IMMEDIATE",
            Self::Postgres => "BEGIN",
        }
    }

    /// The backend of a `sqlite:` or `postgres:`/`postgresql:` URL.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// A timestamp column read as text, as a decode error when it is not one.
pub(super) fn decode_timestamp(text: String) -> Result<crate::timestamp::Timestamp, DbError> {
    crate::timestamp::Timestamp::try_from(text)
        .map_err(|e| DbError::Sqlx(sqlx::Error::Decode(e.into())))
}

/// The advisory lock names of these memberships, sorted and distinct: every PostgreSQL writer takes
/// them in this order, so that two never wait on each other in a cycle.
pub(super) fn lock_names(keys: &[&Key]) -> Vec<String> {
    let mut names: Vec<String> = keys
        .iter()
        .map(|(org, user)| format!("{org}/{user}"))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Pragmas that make an acknowledged SQLite write survive a crash and let readers run beside a writer.
/// `wal_autocheckpoint` is a fallback: the checkpointer ([`sqlite_writer::Checkpointer`], woken by
/// every commit of the process) keeps the WAL far smaller, outside every writer's transaction
/// (SQLite's default, 1,000 frames, would make every writer checkpoint by itself).
pub(super) const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -8000; \
     PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 10000;";

/// A role set as stored (`memberships.role_slugs`, `role_audit.old_roles`, ...): a JSON array of slugs.
pub(super) fn slugs_text(slugs: &[String]) -> String {
    serde_json::to_string(slugs).expect("a list of strings serializes")
}

/// A stored role set, read back.
#[derive(Debug, Default)]
pub(super) struct Slugs(pub Vec<String>);

impl TryFrom<String> for Slugs {
    type Error = serde_json::Error;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        serde_json::from_str(&text).map(Self)
    }
}

/// A stored role set column, as a decode error when it is not one.
pub(super) fn decode_slugs(text: String) -> Result<Vec<String>, DbError> {
    Slugs::try_from(text)
        .map(|s| s.0)
        .map_err(|e| DbError::Sqlx(sqlx::Error::Decode(e.into())))
}
