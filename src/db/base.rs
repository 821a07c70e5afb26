//! What every part of the database layer shares: the error, the backends, membership keys, the
//! migrations and the values of operators' rows.

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
        // PostgreSQL's deadlock_detected and serialization_failure.
        matches!(e.code().as_deref(), Some("40P01" | "40001"))
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
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

/// One value of a row read by an operator's statement ([`crate::db::Db::rows`]): SQL NULL, an
/// integer (booleans as 0 and 1), or text (times as rolesync renders them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    /// The text, or `None` for NULL; an integer as digits.
    pub fn text(&self) -> Option<String> {
        match self {
            Self::Null => None,
            Self::Int(n) => Some(n.to_string()),
            Self::Text(s) => Some(s.clone()),
        }
    }

    /// The integer; 0 for NULL or text that is no integer.
    pub fn int(&self) -> i64 {
        match self {
            Self::Int(n) => *n,
            Self::Text(s) => s.parse().unwrap_or(0),
            Self::Null => 0,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// A role set as stored (`memberships.role_slugs`, `role_audit.old_roles`, ...): a JSON array of slugs.
pub(super) fn slugs_text(slugs: &[String]) -> String {
    serde_json::to_string(slugs).expect("a list of strings serializes")
}

/// A stored role set column, read back (a decode error when it is not one).
pub(super) fn decode_slugs(text: &str) -> Result<Vec<String>, serde_json::Error> {
    serde_json::from_str(text)
}
