//! SQLite's connections, through rusqlite: the pool (reads run on a blocking thread), the
//! group-commit writer's own connection, and the checkpointer that keeps the WAL small.
//!
//! A statement here costs what SQLite itself spends on it: the connection runs on the calling thread
//! (a blocking thread for pool reads, the committer's thread for its batches), with no hand-off of
//! arguments and rows between threads. The statements are in [`super`], one per purpose.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::super::base::DbError;

/// Pragmas that make an acknowledged SQLite write survive a crash and let readers run beside a writer.
/// `wal_autocheckpoint` is a fallback: the [`Checkpointer`] (woken by every commit of the process)
/// keeps the WAL far smaller, outside every writer's transaction (SQLite's default, 1,000 frames,
/// would make every writer checkpoint by itself).
pub(crate) const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -8000; \
     PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 10000;";

/// Prepared statements kept per connection: every statement rolesync runs has one fixed text.
const STATEMENT_CACHE: usize = 64;

/// WAL frames after which the checkpointer starts the WAL over (4 KiB pages: 16 MiB).
const RESTART_FRAMES: i64 = 4_000;

/// Where a pool's connections lead: a file, or one in-memory database (a pool of one connection).
#[derive(Debug, Clone)]
pub(crate) enum Target {
    File(Arc<Path>),
    Memory,
}

/// Connections to one database, at most `max` at a time.
pub(crate) struct Pool {
    target: Target,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .finish()
    }
}

/// A connection taken from the pool; it goes back when dropped.
pub(crate) struct Pooled {
    conn: Option<Connection>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a pooled connection until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn
            .as_mut()
            .expect("a pooled connection until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut idle)) = (self.conn.take(), self.pool.idle.lock()) {
            if !self.pool.permits.is_closed() {
                idle.push(conn);
            }
        }
    }
}

/// Opens a connection with rolesync's pragmas. `create`: the file may be created (only the first
/// connection of a process may: a file deleted while serving is never silently recreated empty).
pub(crate) fn open(file: &Path, create: bool) -> Result<Connection, DbError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(file, flags)?;
    prepare(conn)
}

fn prepare(conn: Connection) -> Result<Connection, DbError> {
    conn.execute_batch(PRAGMAS)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl Pool {
    /// A pool of `max` connections to `target`, whose file (or database) `first` has opened.
    pub(crate) fn new(target: Target, first: Connection, max: u32) -> Arc<Self> {
        let max = match target {
            Target::File(_) => max.max(1) as usize,
            Target::Memory => 1,
        };
        Arc::new(Self {
            target,
            idle: Mutex::new(vec![first]),
            permits: Arc::new(Semaphore::new(max)),
        })
    }

    /// An in-memory database's first (and only) connection.
    pub(crate) fn open_memory() -> Result<Connection, DbError> {
        prepare(Connection::open_in_memory()?)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.permits.is_closed()
    }

    /// Closes every idle connection; the ones in use close when they come back.
    pub(crate) fn close(&self) {
        self.permits.close();
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A connection, waiting (at most 5 s) while `max` are in use.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Pooled, DbError> {
        let closed = || DbError::Unavailable("the database pool is closed".into());
        let permit =
            tokio::time::timeout(Duration::from_secs(5), self.permits.clone().acquire_owned())
                .await
                .map_err(|_| {
                    DbError::Unavailable("timed out waiting for a database connection".into())
                })?
                .map_err(|_| closed())?;
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match (idle, &self.target) {
            (Some(conn), _) => conn,
            (None, Target::File(file)) => open(file, false)?,
            (None, Target::Memory) => return Err(closed()),
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    /// Runs `f` on a pooled connection on a blocking thread (a statement may wait up to the busy
    /// timeout for a lock another process holds).
    pub(crate) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let conn = self.acquire().await?;
        blocking(conn, f).await.1
    }
}

/// Runs `f` on `conn` on a blocking thread and hands the connection back.
pub(crate) async fn blocking<T: Send + 'static>(
    conn: Pooled,
    f: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
) -> (Option<Pooled>, Result<T, DbError>) {
    let done = tokio::task::spawn_blocking(move || {
        let result = f(&conn);
        (conn, result)
    })
    .await;
    match done {
        Ok((conn, result)) => (Some(conn), result),
        Err(e) => (
            None,
            Err(DbError::Unavailable(format!("a database task failed: {e}"))),
        ),
    }
}

/// The options the linked SQLite was compiled with (`PRAGMA compile_options`).
fn compile_options(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare("PRAGMA compile_options")?
        .query_map([], |row| row.get(0))?
        .collect()
}

/// Warns when the bundled SQLite was built without the flags of `.cargo/config.toml`.
pub(crate) fn check_build(conn: &Connection) -> Result<(), DbError> {
    if compile_options(conn)?
        .iter()
        .any(|o| o == "ENABLE_MEMORY_MANAGEMENT")
    {
        tracing::warn!(
            "the bundled SQLite was built without the LIBSQLITE3_FLAGS of .cargo/config.toml \
             (a build outside the repository, or LIBSQLITE3_FLAGS set in the environment); \
             it works, with a few percent more CPU per delivery"
        );
    }
    Ok(())
}

/// The database file a `sqlite:` URL names (`sqlite://PATH`, `sqlite:PATH`, with an optional
/// `?query`, percent-decoded); `None` for an in-memory database.
pub fn file_of_url(url: &str) -> Result<Option<PathBuf>, DbError> {
    let rest = url
        .strip_prefix("sqlite:")
        .ok_or_else(|| DbError::Unavailable(format!("not a sqlite: URL: {url:?}")))?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory =
        path.is_empty() || path == ":memory:" || query.split('&').any(|pair| pair == "mode=memory");
    if in_memory {
        return Ok(None);
    }
    Ok(Some(PathBuf::from(percent_decode(path)?)))
}

fn percent_decode(text: &str) -> Result<String, DbError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DbError::Unavailable(format!("bad escape in {text:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DbError::Unavailable(format!("not UTF-8: {text:?}")))
}

/// A thread and connection of their own that copy committed WAL frames into the database file after
/// commits, beside the writers (the group-commit worker is the serial part of the service), which
/// then checkpoint by themselves only as a fallback (`wal_autocheckpoint` in the pool's pragmas).
/// It stops when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    wake: SyncSender<()>,
}

impl Checkpointer {
    /// Starts the checkpointer of `file`; `turn` is the process's writer turn, which it takes only to
    /// start the WAL over.
    pub fn start(file: &Path, turn: Arc<tokio::sync::Mutex<()>>) -> Result<Self, DbError> {
        let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.execute_batch(PRAGMAS)?;
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
        assert_eq!(
            file_of_url("sqlite:rolesync.db").unwrap(),
            Some(PathBuf::from("rolesync.db"))
        );
        assert_eq!(
            file_of_url("sqlite:///tmp/a%20b.db").unwrap(),
            Some(PathBuf::from("/tmp/a b.db"))
        );
    }
}
