//! The connection pool: connecting, write transactions and their turn, per-membership locks, and
//! the health checks readiness reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::base::{
    lock_names, Backend, DbError, Key, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, SQLITE_PRAGMAS,
};
use super::sqlite_writer;

/// A connection pool and the backend it talks to.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// SQLite admits one writer at a time; the writers of this process queue here, in order,
    /// rather than in SQLite's busy handler, which sleeps up to 100 ms between tries.
    writers: Arc<Mutex<()>>,
    /// The SQLite database file, for [`Db::sqlite_writer`]; `None` on PostgreSQL or in memory.
    sqlite_file: Option<Arc<Path>>,
    /// Copies the SQLite WAL into the database file after commits; `None` on PostgreSQL or in memory.
    checkpointer: Option<Arc<sqlite_writer::Checkpointer>>,
    /// The PostgreSQL URL, for [`Db::postgres_committer`].
    postgres_url: Option<Arc<str>>,
    /// The device and inode of the SQLite file opened at start-up: a file deleted or replaced at
    /// the same path is not the database this process answers for.
    sqlite_identity: Option<(u64, u64)>,
    /// Write transactions that failed in a row (any path); reset by one that commits.
    write_failures: Arc<AtomicU32>,
    /// When each write under way began, by ticket: a write that waits long (a lock held by
    /// another process) makes readiness fail before it fails itself.
    writes_under_way: Arc<std::sync::Mutex<BTreeMap<u64, std::time::Instant>>>,
    write_tickets: Arc<AtomicU64>,
}

/// How long a write may be under way before `/readyz` reports not ready.
pub const STALLED_WRITE: Duration = Duration::from_secs(5);

/// A write under way, from [`Db::write_under_way`] until dropped.
pub struct WriteUnderWay {
    ticket: u64,
    writes: Arc<std::sync::Mutex<BTreeMap<u64, std::time::Instant>>>,
}

impl Drop for WriteUnderWay {
    fn drop(&mut self) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.remove(&self.ticket);
        }
    }
}

/// Consecutive failed writes after which `/readyz` reports not ready.
pub const WRITE_FAILURES_NOT_READY: u32 = 3;

/// The (device, inode) of a file.
fn file_identity(file: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file)?;
    Ok((meta.dev(), meta.ino()))
}

/// A write transaction from [`Db::begin_write`]; on SQLite it holds the process's writer turn until
/// it ends. It derefs to the connection, like a [`Transaction`].
pub struct WriteTx<'c> {
    tx: Transaction<'c, Any>,
    _turn: Option<OwnedMutexGuard<()>>,
    checkpointer: Option<Arc<sqlite_writer::Checkpointer>>,
}

impl WriteTx<'_> {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.wake();
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx<'_> {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl Db {
    /// Connects to `url` (`sqlite://...`, created if missing, or `postgres://...`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or_else(|| {
            DbError::Unavailable(format!("unsupported database URL scheme in {url:?}"))
        })?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            _ => url.to_owned(),
        };
        let sqlite_file = match backend {
            Backend::Sqlite => sqlite_writer::file_of_url(&url)?.map(Arc::from),
            Backend::Postgres => None,
        };
        let options = AnyConnectOptions::from_str(&url)?;
        // One direct connection first, so that an unreachable server reports its real cause
        // rather than a pool timeout. It alone may create the SQLite file: the pool's later
        // connections open it read-write only, so a file deleted while serving is never
        // silently recreated empty.
        AnyConnection::connect_with(&options).await?.close().await?;
        let options = match url.contains("mode=rwc") {
            true => AnyConnectOptions::from_str(&url.replace("mode=rwc", "mode=rw"))?,
            false => options,
        };
        let sqlite_identity = match &sqlite_file {
            Some(file) => Some(file_identity(file).map_err(|e| {
                DbError::Unavailable(format!("cannot read {}: {e}", file.display()))
            })?),
            None => None,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            // A SQLite connection is a file handle that cannot drop; pinging it before every
            // use only adds a round trip to its worker thread.
            .test_before_acquire(backend == Backend::Postgres)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(SQLITE_PRAGMAS).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let writers = Arc::default();
        let checkpointer = match &sqlite_file {
            Some(file) => Some(Arc::new(sqlite_writer::Checkpointer::start(
                file,
                Arc::clone(&writers),
            )?)),
            None => None,
        };
        Ok(Self {
            pool,
            backend,
            writers,
            checkpointer,
            sqlite_file,
            postgres_url: (backend == Backend::Postgres).then(|| Arc::from(url.as_str())),
            sqlite_identity,
            write_failures: Arc::default(),
            writes_under_way: Arc::default(),
            write_tickets: Arc::default(),
        })
    }

    /// `Err` when the SQLite file at the configured path is no longer the one opened at start-up
    /// (deleted, or replaced by another file): writes to the open one would be lost with it.
    pub fn check_file(&self) -> Result<(), DbError> {
        let (Some(file), Some(opened)) = (&self.sqlite_file, self.sqlite_identity) else {
            return Ok(());
        };
        match file_identity(file) {
            Ok(now) if now == opened => Ok(()),
            Ok(_) => Err(DbError::Unavailable(format!(
                "the database file {} was replaced since start-up; restart rolesync",
                file.display()
            ))),
            Err(e) => Err(DbError::Unavailable(format!(
                "the database file {} is gone since start-up ({e}); restart rolesync",
                file.display()
            ))),
        }
    }

    /// Marks a write as under way until the guard drops, for readiness.
    pub fn write_under_way(&self) -> WriteUnderWay {
        let ticket = self.write_tickets.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut writes) = self.writes_under_way.lock() {
            writes.insert(ticket, std::time::Instant::now());
        }
        WriteUnderWay {
            ticket,
            writes: self.writes_under_way.clone(),
        }
    }

    /// How long the oldest write under way has been waiting.
    fn oldest_write(&self) -> Option<Duration> {
        let writes = self.writes_under_way.lock().ok()?;
        writes.values().min().map(|began| began.elapsed())
    }

    /// Records how a write transaction ended, for readiness.
    pub fn note_write<T>(&self, result: &Result<T, DbError>) {
        match result {
            Ok(_) => self.write_failures.store(0, Ordering::Relaxed),
            Err(_) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The pool, for reads.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a transaction that will write. On SQLite it waits for this process's writer turn, then
    /// takes the database write lock up front (`BEGIN IMMEDIATE`) so that a read-then-write never
    /// fails to upgrade.
    pub async fn begin_write(&self) -> Result<WriteTx<'static>, DbError> {
        self.check_file()?;
        let turn = self.writer_turn().await;
        let tx = self.pool.begin_with(self.backend.begin_write_sql()).await?;
        Ok(WriteTx {
            tx,
            _turn: turn,
            checkpointer: self.checkpointer.clone(),
        })
    }

    /// [`Db::begin_write`] on a connection the caller owns.
    pub async fn begin_write_on<'c>(
        &self,
        conn: &'c mut AnyConnection,
    ) -> Result<WriteTx<'c>, DbError> {
        let turn = self.writer_turn().await;
        let tx = conn.begin_with(self.backend.begin_write_sql()).await?;
        Ok(WriteTx {
            tx,
            _turn: turn,
            checkpointer: self.checkpointer.clone(),
        })
    }

    /// A connection of its own for the SQLite group-commit writer; `None` on PostgreSQL or for an
    /// in-memory database (whose writes then take the sqlx path).
    pub fn sqlite_writer(&self) -> Result<Option<sqlite_writer::SqliteWriter>, DbError> {
        self.sqlite_file
            .as_deref()
            .map(|file| sqlite_writer::SqliteWriter::open(file, self.checkpointer.clone()))
            .transpose()
    }

    /// A native PostgreSQL connection for a group-commit worker ([`pg_writer`]); `None` on SQLite.
    /// Its plans are made for each execution's arrays (their lengths vary from batch to batch).
    pub async fn postgres_committer(&self) -> Result<Option<sqlx::PgConnection>, DbError> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let connect = sqlx::PgConnection::connect(url);
        let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| DbError::Unavailable("connecting to PostgreSQL timed out".into()))??;
        conn.execute("SET plan_cache_mode = force_custom_plan")
            .await?;
        Ok(Some(conn))
    }

    /// This process's turn to write (SQLite); `None` on PostgreSQL, whose writers run side by side.
    pub async fn writer_turn(&self) -> Option<OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writers.clone().lock_owned().await),
            Backend::Postgres => None,
        }
    }

    /// A connection taken out of the pool for good (the pool may open another in its place), for a
    /// worker that wants the same connection, with its caches, for every transaction.
    pub async fn dedicated(&self) -> Result<AnyConnection, DbError> {
        Ok(self.pool.acquire().await?.detach())
    }

    /// Serializes writers of these memberships until the transaction ends. SQLite already holds the
    /// database write lock; PostgreSQL takes transaction-scoped advisory locks, in key order so that
    /// two batches never wait on each other in a cycle.
    pub async fn lock_memberships(
        &self,
        conn: &mut AnyConnection,
        keys: &[&Key],
    ) -> Result<(), DbError> {
        if self.backend != Backend::Postgres || keys.is_empty() {
            return Ok(());
        }
        let sorted = lock_names(keys);
        let sql = format!(
            "SELECT COUNT(pg_advisory_xact_lock(hashtextextended(k, 0))::text) FROM (VALUES {}) AS t(k)",
            self.backend.values_list(sorted.len(), 1)
        );
        let mut query = sqlx::query_scalar::<_, i64>(&sql);
        for key in &sorted {
            query = query.bind(key);
        }
        query.fetch_one(conn).await?;
        Ok(())
    }

    /// Whether the database answers, is the file opened at start-up, takes writes, and has every
    /// migration applied. After [`WRITE_FAILURES_NOT_READY`] failed writes in a row it commits a
    /// probe write (the `readyz` row of `sync_state`): not ready while that fails too, ready again
    /// once it (or any other write) commits.
    pub async fn check_ready(&self) -> Result<(), DbError> {
        self.check_file()?;
        if let Some(waited) = self.oldest_write().filter(|w| *w > STALLED_WRITE) {
            return Err(DbError::Unavailable(format!(
                "a write has waited {} s for the database (a lock held elsewhere?)",
                waited.as_secs()
            )));
        }
        let failures = self.write_failures.load(Ordering::Relaxed);
        if failures >= WRITE_FAILURES_NOT_READY {
            let probe = self.probe_write().await;
            self.note_write(&probe);
            probe.map_err(|e| {
                DbError::Unavailable(format!(
                    "{failures} writes failed in a row; a probe write too: {e}"
                ))
            })?;
        }
        let mut conn = self.pool.acquire().await?;
        conn.ping().await?;
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *conn)
                .await?;
        let expected = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.iter().count(),
            Backend::Postgres => POSTGRES_MIGRATIONS.iter().count(),
        };
        if applied as usize >= expected {
            Ok(())
        } else {
            Err(DbError::Unavailable(format!(
                "{applied} of {expected} migrations applied"
            )))
        }
    }

    async fn probe_write(&self) -> Result<(), DbError> {
        let mut tx = self.begin_write().await?;
        // The `readyz` row of `sync_state`: a write any healthy database takes.
        sqlx::query(
            "INSERT INTO sync_state (name, cursor, updated_at) VALUES ('readyz', NULL, $1) \
             ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
        )
        .bind(crate::timestamp::Timestamp::now().to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
