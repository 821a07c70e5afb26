//! Whether a database is ready for a command: a SQLite file that is one, and every migration applied.
//! Only `serve` and `migrate` migrate; every other command refuses a database that is not ready.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sqlx::migrate::Migrator;

use super::base::{Backend, DbError, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use super::pool::Db;
use super::sqlite::conn::file_of_url;
use super::{postgres, sqlite};

/// What a SQLite file holds first (the SQLite file format's 16-byte header string).
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Where a database stands against this build's migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationState {
    pub applied: usize,
    pub known: usize,
}

impl MigrationState {
    /// Every migration of this build is applied.
    pub fn is_current(self) -> bool {
        self.applied >= self.known
    }
}

impl Backend {
    pub(super) fn migrator(self) -> &'static Migrator {
        match self {
            Self::Sqlite => &SQLITE_MIGRATIONS,
            Self::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// The SQLite file a `sqlite:` URL names, as an absolute path (relative paths are read from the
/// working directory); `None` for an in-memory database or another backend.
pub fn sqlite_path(url: &str) -> Result<Option<PathBuf>, DbError> {
    if Backend::of_url(url) != Some(Backend::Sqlite) {
        return Ok(None);
    }
    Ok(file_of_url(url)?.map(|file| {
        std::env::current_dir()
            .map(|dir| dir.join(&file))
            .unwrap_or(file)
    }))
}

/// Refuses a file that exists, is not empty and is not a SQLite database, before any connection
/// waits on it (SQLite reports such a file only at the first statement).
pub fn check_sqlite_file(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut header = Vec::with_capacity(16);
    let read = file.by_ref().take(16).read_to_end(&mut header);
    match read {
        Ok(0) => Ok(()),
        Ok(_) if header.as_slice() == SQLITE_HEADER => Ok(()),
        Ok(_) if path.is_dir() => Err(format!("{} is a directory", path.display())),
        Ok(_) => Err(format!("{} is not a SQLite database", path.display())),
        Err(e) if path.is_dir() => Err(format!("{} is a directory: {e}", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl Db {
    /// How many of this build's migrations the database has applied (none when it has no
    /// migration table). Changes nothing.
    pub async fn migration_state(&self) -> Result<MigrationState, DbError> {
        let migrator = self.backend().migrator();
        let known = migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration());
        let applied = self.applied_checksums().await?;
        let mut state = MigrationState {
            applied: 0,
            known: 0,
        };
        for migration in known {
            state.known += 1;
            match applied.get(&migration.version) {
                Some(sum) if **sum != *migration.checksum => {
                    return Err(DbError::Unavailable(format!(
                        "migration {} was changed after it was applied",
                        migration.version
                    )))
                }
                Some(_) => state.applied += 1,
                None => {}
            }
        }
        Ok(state)
    }

    /// Applies pending migrations; a second run is a no-op.
    pub async fn migrate(&self) -> Result<(), DbError> {
        self.apply_migrations().await.map(|_| ())
    }

    /// Applies pending migrations; returns how many. An up-to-date database is only read: on
    /// PostgreSQL the migrator's `CREATE TABLE IF NOT EXISTS` would log a notice at every start.
    pub async fn apply_migrations(&self) -> Result<usize, DbError> {
        if let Some(pool) = self.postgres_pool() {
            postgres::create_search_path_schema(pool).await?;
        }
        let before = self.migration_state().await?;
        if before.is_current() {
            return Ok(0);
        }
        match self.sqlite_or(sqlite::migrate).await {
            Ok(done) => done?,
            Err(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        let after = self.migration_state().await?;
        Ok(after.applied.saturating_sub(before.applied))
    }

    /// Version to checksum of each successful migration; empty without a migration table.
    async fn applied_checksums(&self) -> Result<HashMap<i64, Vec<u8>>, DbError> {
        match self.sqlite_or(sqlite::applied_checksums).await {
            Ok(done) => done,
            Err(pool) => postgres::applied_checksums(pool).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sqlite_header_an_empty_file_or_no_file_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("text.db"), "hello, this is not a database").unwrap();
        std::fs::write(path("short.db"), "SQL").unwrap();
        std::fs::write(path("empty.db"), "").unwrap();
        std::fs::write(path("real.db"), [&SQLITE_HEADER[..], &[0; 84]].concat()).unwrap();
        assert!(check_sqlite_file(&path("text.db"))
            .unwrap_err()
            .ends_with("text.db is not a SQLite database"));
        assert!(check_sqlite_file(&path("short.db")).is_err());
        assert!(check_sqlite_file(dir.path()).is_err(), "a directory");
        for ok in ["empty.db", "real.db", "missing.db"] {
            assert_eq!(check_sqlite_file(&path(ok)), Ok(()), "{ok}");
        }
    }
}
