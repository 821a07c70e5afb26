//! The SQLite group-commit writer: a connection of its own that runs a batch's statements on the
//! calling thread (the committer's), one cached prepared statement per row.
//!
//! sqlx runs each SQLite statement on a worker thread of its connection and hands arguments and rows
//! across threads; a batch made about eight such round trips, each waiting for that thread to get a
//! core, and the writer is the one serial part of the service. Here a statement costs what SQLite
//! itself spends on it. Everything else (reads, logins, migrations) stays on sqlx.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

use super::base::{slugs_text, Backend, DbError, Key, Slugs, SQLITE_PRAGMAS};
use super::inbox::InboxRow;
use super::refetch::Enqueue;
use super::store::{BatchStore, QueuedRefetch, Snapshot, TrailPoint, Writes};
use super::{audit, inbox, memberships, refetch};
use crate::domain::{AuditEntry, HistoryMark, Membership};
use crate::timestamp::Timestamp;

/// Prepared statements kept per connection: every statement the writer runs, `BEGIN IMMEDIATE` and
/// `COMMIT` included, has one fixed text (15 of them).
const STATEMENT_CACHE: usize = 20;

static UPSERT_MEMBERSHIP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO memberships ({}) VALUES {} {}",
        memberships::COLUMNS,
        Backend::Sqlite.values_list(1, memberships::COLUMN_COUNT),
        memberships::UPSERT_CONFLICT_BUT_ID
    )
});
static INSERT_AUDIT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} {}",
        audit::INSERT,
        Backend::Sqlite.values_list(1, audit::COLUMN_COUNT)
    )
});
static INSERT_EVENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} {} ON CONFLICT (event_id) DO NOTHING",
        inbox::INSERT,
        Backend::Sqlite.values_list(1, 5)
    )
});

/// WAL frames after which the checkpointer starts the WAL over (4 KiB pages: 16 MiB).
const RESTART_FRAMES: i64 = 4_000;

/// One connection to the database file, for write transactions of the group-commit worker.
pub struct SqliteWriter {
    conn: Connection,
    /// Woken after each commit.
    checkpointer: Option<Arc<Checkpointer>>,
}

impl SqliteWriter {
    /// Opens `file` (which [`super::pool::Db::connect`] has created and migrated) with the pool's pragmas.
    pub fn open(file: &Path, checkpointer: Option<Arc<Checkpointer>>) -> Result<Self, DbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(file, flags)?;
        conn.execute_batch(SQLITE_PRAGMAS)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        if compile_options(&conn)?
            .iter()
            .any(|o| o == "ENABLE_MEMORY_MANAGEMENT")
        {
            tracing::warn!(
                "the bundled SQLite was built without the LIBSQLITE3_FLAGS of .cargo/config.toml \
                 (a build outside the repository, or LIBSQLITE3_FLAGS set in the environment); \
                 it works, with a few percent more CPU per delivery"
            );
        }
        Ok(Self { conn, checkpointer })
    }

    /// Begins a write transaction that takes the write lock up front (`BEGIN IMMEDIATE`), after
    /// rolling back one an interrupted batch may have left open. The caller holds the writer turn.
    pub fn begin(&mut self) -> Result<SqliteStore<'_>, DbError> {
        self.rollback()?;
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(SqliteStore {
            conn: &mut self.conn,
            read_ids: HashMap::new(),
        })
    }

    pub fn commit(&mut self) -> Result<(), DbError> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.wake();
        }
        Ok(())
    }

    /// Rolls back the open transaction, if any.
    pub fn rollback(&mut self) -> Result<(), DbError> {
        if !self.conn.is_autocommit() {
            self.conn.prepare_cached("ROLLBACK")?.execute([])?;
        }
        Ok(())
    }
}

/// A thread and connection of their own that copy committed WAL frames into the database file after
/// commits, beside the writers (the group-commit worker is the serial part of the service), which
/// then checkpoint by themselves only as a fallback (`wal_autocheckpoint` in the pool's pragmas).
/// It stops when the last handle is dropped.
#[derive(Debug)]
pub struct Checkpointer {
    wake: SyncSender<()>,
}

impl Checkpointer {
    /// Starts the checkpointer of `file`; `turn` is the process's writer turn, which it takes only to
    /// start the WAL over.
    pub fn start(file: &Path, turn: Arc<tokio::sync::Mutex<()>>) -> Result<Self, DbError> {
        let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.execute_batch(SQLITE_PRAGMAS)?;
        // A reader holding an old snapshot makes a restart wait; give up soon and try later.
        conn.busy_timeout(Duration::from_millis(100))?;
        let (wake, commits) = sync_channel(1);
        std::thread::Builder::new()
            .name("rolesync-checkpoint".into())
            .spawn(move || checkpoint_after_commits(&conn, &commits, &turn))
            .map_err(|e| DbError::Unavailable(format!("cannot start the checkpointer: {e}")))?;
        Ok(Self { wake })
    }

    /// Tells it a commit happened (never waits: a wake-up already pending covers this commit too).
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

/// After each wake-up, copies what is committed with a passive checkpoint, which never blocks the
/// writer. Under a steady stream of commits a passive checkpoint never finds the WAL fully copied, so
/// the WAL would only grow: once it holds [`RESTART_FRAMES`], the checkpointer takes the writer turn
/// and restarts it (copying the few frames committed since the passive pass), so that the next
/// write starts at the beginning of the file again. Stops when the last [`Checkpointer`] is dropped.
fn checkpoint_after_commits(
    conn: &Connection,
    commits: &Receiver<()>,
    turn: &tokio::sync::Mutex<()>,
) {
    // (busy, frames in the WAL): busy when readers kept a RESTART from finishing.
    let checkpoint = |pragma: &str| {
        conn.prepare_cached(pragma)?.query_row([], |row| {
            Ok((row.get::<_, i64>(0)? != 0, row.get::<_, i64>(1)?))
        })
    };
    let mut restart_at = RESTART_FRAMES;
    while commits.recv().is_ok() {
        let done = checkpoint("PRAGMA wal_checkpoint(PASSIVE)").and_then(|(_, frames)| {
            if frames < restart_at {
                return Ok(());
            }
            let _turn = turn.blocking_lock();
            let (busy, _) = checkpoint("PRAGMA wal_checkpoint(RESTART)")?;
            // Readers held it up: try again only after as many frames more, not at every commit
            // (each try holds the writer turn for up to the busy timeout).
            restart_at = if busy {
                frames + RESTART_FRAMES
            } else {
                RESTART_FRAMES
            };
            Ok(())
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "WAL checkpoint failed; the writer checkpoints by itself");
        }
    }
}

/// The database file a `sqlite:` URL names; `None` for an in-memory database.
pub fn file_of_url(url: &str) -> Result<Option<PathBuf>, DbError> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let file = options.get_filename();
    // sqlx names an in-memory database `file:sqlx-in-memory-N` (shared cache).
    let in_memory = file.as_os_str().is_empty()
        || file == Path::new(":memory:")
        || file.to_string_lossy().starts_with("file:sqlx-in-memory-")
        || url.contains("mode=memory");
    Ok((!in_memory).then(|| file.to_path_buf()))
}

/// [`BatchStore`] inside a [`SqliteWriter`] transaction.
pub struct SqliteStore<'a> {
    conn: &'a mut Connection,
    /// The membership id [`BatchStore::read`] found for each key it read (`None`: no row), so that
    /// an upsert changes the id only of rows stored under another one.
    read_ids: HashMap<Key, Option<String>>,
}

/// The options the linked SQLite was compiled with (`PRAGMA compile_options`).
fn compile_options(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare("PRAGMA compile_options")?
        .query_map([], |row| row.get(0))?
        .collect()
}

fn timestamp(row: &Row<'_>, column: usize) -> rusqlite::Result<Timestamp> {
    let text: String = row.get(column)?;
    Timestamp::try_from(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, e.into()))
}

fn slugs(row: &Row<'_>, column: usize) -> rusqlite::Result<Vec<String>> {
    let text: String = row.get(column)?;
    Slugs::try_from(text)
        .map(|s| s.0)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, e.into()))
}

fn membership(row: &Row<'_>) -> rusqlite::Result<Membership> {
    Ok(Membership {
        organization_id: row.get(0)?,
        user_id: row.get(1)?,
        membership_id: row.get(2)?,
        role_slug: row.get(3)?,
        workos_role_slug: row.get(4)?,
        status: row.get(5)?,
        version: timestamp(row, 6)?,
        updated_at: timestamp(row, 7)?,
        role_slugs: slugs(row, 8)?,
        workos_role_slugs: slugs(row, 9)?,
    })
}

impl BatchStore for SqliteStore<'_> {
    async fn lock_memberships(&mut self, _keys: &[&Key]) -> Result<(), DbError> {
        // BEGIN IMMEDIATE holds the database's one write lock.
        Ok(())
    }

    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        let memberships = self.memberships(keys)?;
        for &key in keys {
            let id = memberships.get(key).map(|m| m.membership_id.clone());
            self.read_ids.insert(key.clone(), id);
        }
        Ok(Snapshot {
            known_events: self.known_events(event_ids)?,
            memberships,
            roles: self.roles()?,
        })
    }

    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
        let mut statement = self.conn.prepare_cached(audit::AS_OF)?;
        let mut marks = HashMap::with_capacity(points.len());
        for (org, user, version) in points {
            let mark = statement
                .query_row(rusqlite::params![org, user, version.to_string()], |row| {
                    Ok(HistoryMark {
                        version: timestamp(row, 0)?,
                        workos_role_slug: row.get(1)?,
                        new_status: row.get(2)?,
                    })
                })
                .optional()?;
            if let Some(mark) = mark {
                marks.insert(((*org).to_owned(), (*user).to_owned(), *version), mark);
            }
        }
        Ok(marks)
    }

    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        self.upsert_memberships(&writes.memberships)?;
        self.set_roles(&writes.role_sets)?;
        self.append_audit(writes.audits)?;
        self.enqueue(&writes.refetches, received_at.millis())?;
        self.insert_events(events, received_at)
    }
}

impl SqliteStore<'_> {
    fn known_events(&mut self, ids: &[&str]) -> Result<HashSet<String>, DbError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT 1 FROM webhook_events WHERE event_id = ?1")?;
        let mut known = HashSet::new();
        for id in ids {
            if statement.exists([id])? {
                known.insert((*id).to_owned());
            }
        }
        Ok(known)
    }

    fn memberships(&mut self, keys: &[&Key]) -> Result<HashMap<Key, Membership>, DbError> {
        let mut statement = self.conn.prepare_cached(&memberships::GET)?;
        let mut rows = HashMap::with_capacity(keys.len());
        for (org, user) in keys {
            if let Some(row) = statement.query_row([org, user], membership).optional()? {
                rows.insert((org.clone(), user.clone()), row);
            }
        }
        Ok(rows)
    }

    fn roles(&mut self) -> Result<HashSet<String>, DbError> {
        let mut statement = self.conn.prepare_cached("SELECT slug FROM roles")?;
        let slugs = statement.query_map([], |row| row.get(0))?;
        Ok(slugs.collect::<Result<_, _>>()?)
    }

    fn upsert_memberships(&mut self, rows: &[&Membership]) -> Result<(), DbError> {
        let mut upsert = self.conn.prepare_cached(&UPSERT_MEMBERSHIP)?;
        for row in rows {
            upsert.execute(rusqlite::params![
                row.organization_id,
                row.user_id,
                row.membership_id,
                row.role_slug,
                row.workos_role_slug,
                row.status,
                row.version.to_string(),
                row.updated_at.to_string(),
                slugs_text(&row.role_slugs),
                slugs_text(&row.workos_role_slugs),
            ])?;
        }
        // Rows read with the same id, or read as absent (just inserted with theirs), are done.
        let mut set_id = self.conn.prepare_cached(memberships::SET_MEMBERSHIP_ID)?;
        for row in rows {
            let key = (row.organization_id.clone(), row.user_id.clone());
            match self.read_ids.get(&key) {
                Some(None) => continue,
                Some(Some(id)) if *id == row.membership_id => continue,
                _ => {}
            }
            set_id.execute(rusqlite::params![
                row.organization_id,
                row.user_id,
                row.membership_id
            ])?;
        }
        Ok(())
    }

    fn set_roles(&mut self, rows: &[&Membership]) -> Result<(), DbError> {
        let mut clear = self.conn.prepare_cached(memberships::CLEAR_ROLES)?;
        for row in rows {
            clear.execute([&row.organization_id, &row.user_id])?;
        }
        let mut add = self.conn.prepare_cached(memberships::ADD_ROLE)?;
        for row in rows {
            for slug in &row.role_slugs {
                add.execute([&row.organization_id, &row.user_id, slug])?;
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, refetches: &[QueuedRefetch<'_>], now_ms: i64) -> Result<(), DbError> {
        for queued in refetches {
            match Enqueue::of(queued) {
                Enqueue::Target {
                    target,
                    organization_id,
                    event_id,
                    reason,
                } => {
                    self.conn.prepare_cached(refetch::ENQUEUE_TARGET)?.execute(
                        rusqlite::params![
                            target,
                            organization_id,
                            event_id,
                            reason,
                            None::<String>,
                            now_ms
                        ],
                    )?;
                }
                Enqueue::RoleHolders {
                    event_id,
                    reason,
                    gone_role,
                    organization_id,
                    slug,
                } => {
                    self.conn
                        .prepare_cached(refetch::ENQUEUE_ROLE_HOLDERS)?
                        .execute(rusqlite::params![
                            event_id,
                            reason,
                            gone_role,
                            now_ms,
                            organization_id,
                            slug
                        ])?;
                }
            }
        }
        Ok(())
    }

    fn append_audit(&mut self, entries: &[AuditEntry]) -> Result<(), DbError> {
        let mut statement = self.conn.prepare_cached(&INSERT_AUDIT)?;
        for e in entries {
            statement.execute(rusqlite::params![
                e.recorded_at.to_string(),
                e.organization_id,
                e.user_id,
                e.membership_id,
                e.source.as_str(),
                e.event_id,
                e.workos_role_slug,
                e.old_role,
                e.new_role,
                e.old_status,
                e.new_status,
                e.outcome.as_str(),
                e.detail,
                e.version.to_string(),
                e.old_roles.as_deref().map(slugs_text),
                e.new_roles.as_deref().map(slugs_text),
            ])?;
        }
        Ok(())
    }

    fn insert_events(
        &mut self,
        rows: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        let mut statement = self.conn.prepare_cached(&INSERT_EVENT)?;
        let received_at = received_at.to_string();
        let mut inserted = 0;
        for row in rows {
            inserted += statement.execute(rusqlite::params![
                row.event_id,
                row.event_type,
                row.payload,
                row.outcome,
                received_at,
            ])? as u64;
        }
        Ok(inserted)
    }
}

#[cfg(test)]
mod tests {
    use super::file_of_url;
    use std::path::PathBuf;

    #[test]
    fn in_memory_urls_name_no_file() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite::memory:?mode=rwc",
        ] {
            assert_eq!(file_of_url(url).unwrap(), None, "{url}");
        }
        assert_eq!(
            file_of_url("sqlite:///tmp/x/rolesync.db?mode=rwc").unwrap(),
            Some(PathBuf::from("/tmp/x/rolesync.db"))
        );
    }
}
