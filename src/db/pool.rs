//! The one boundary of the database layer: [`Db`] (connecting, reads, write transactions and their
//! turn, the health checks readiness reads), [`WriteTx`] and the group-commit [`Committer`]. Each
//! call goes to the backend's module ([`super::sqlite`] or [`super::postgres`]), which holds its SQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::base::{Backend, DbError, Key, Value};
use super::refetch::Queued;
use super::sqlite::conn::{self as sqlite_conn, Checkpointer, Pooled, Target};
use super::store::{
    AuditRow, BatchStore, InboxRow, Snapshot, StoredEvent, StoredFilter, TrailPoint, Writes,
};
use super::{postgres, sqlite};
use crate::domain::{HistoryMark, Membership};
use crate::timestamp::Timestamp;

/// A connection pool and the backend it talks to.
#[derive(Debug, Clone)]
pub struct Db {
    link: Link,
    /// Write transactions that failed in a row (any path); reset by one that commits.
    write_failures: Arc<AtomicU32>,
    /// When each write under way began, by ticket: a write that waits long (a lock held by
    /// another process) makes readiness fail before it fails itself.
    writes_under_way: Arc<std::sync::Mutex<BTreeMap<u64, std::time::Instant>>>,
    write_tickets: Arc<AtomicU64>,
}

#[derive(Debug, Clone)]
enum Link {
    Sqlite(Arc<SqliteDb>),
    Postgres(PgPool),
}

#[derive(Debug)]
struct SqliteDb {
    pool: Arc<sqlite_conn::Pool>,
    /// SQLite admits one writer at a time; the writers of this process queue here, in order,
    /// rather than in SQLite's busy handler, which sleeps up to 100 ms between tries.
    writers: Arc<Mutex<()>>,
    /// The database file; `None` in memory.
    file: Option<Arc<Path>>,
    /// The device and inode of the file opened at start-up: a file deleted or replaced at the same
    /// path is not the database this process answers for.
    identity: Option<(u64, u64)>,
    /// Copies the WAL into the database file after commits; `None` in memory.
    checkpointer: Option<Arc<Checkpointer>>,
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

/// A write transaction; on SQLite it holds the process's writer turn until it ends. Dropped
/// without [`WriteTx::commit`], it rolls back.
pub struct WriteTx<'c>(Tx<'c>);

enum Tx<'c> {
    Sqlite {
        conn: SqliteConn<'c>,
        read_ids: HashMap<Key, Option<String>>,
        _turn: OwnedMutexGuard<()>,
        checkpointer: Option<Arc<Checkpointer>>,
    },
    Postgres(sqlx::Transaction<'c, Postgres>),
    /// Committed or rolled back (PostgreSQL's transaction moved out).
    Ended,
}

/// A pooled connection (begun and ended on a blocking thread) or a committer's own.
enum SqliteConn<'c> {
    Pooled(Option<Pooled>),
    Own(&'c mut rusqlite::Connection),
}

impl SqliteConn<'_> {
    fn get(&self) -> Result<&rusqlite::Connection, DbError> {
        match self {
            Self::Pooled(Some(conn)) => Ok(conn),
            Self::Own(conn) => Ok(conn),
            Self::Pooled(None) => Err(DbError::Unavailable("the transaction has ended".into())),
        }
    }

    fn get_mut(&mut self) -> Result<&mut rusqlite::Connection, DbError> {
        match self {
            Self::Pooled(Some(conn)) => Ok(conn),
            Self::Own(conn) => Ok(conn),
            Self::Pooled(None) => Err(DbError::Unavailable("the transaction has ended".into())),
        }
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if let Tx::Sqlite { conn, .. } = &self.0 {
            if let Ok(conn) = conn.get() {
                let _ = sqlite::rollback(conn);
            }
        }
    }
}

impl<'c> WriteTx<'c> {
    /// The transaction's [`super::BatchStore`].
    pub fn store(&mut self) -> Store<'_> {
        Store(match &mut self.0 {
            Tx::Sqlite { conn, read_ids, .. } => Inner::Sqlite(sqlite::Store {
                conn: conn
                    .get_mut()
                    .expect("a transaction under way has its connection"),
                read_ids,
            }),
            Tx::Postgres(tx) => Inner::Postgres(postgres::Store { conn: &mut *tx }),
            Tx::Ended => unreachable!("commit and rollback consume the transaction"),
        })
    }

    /// The stored row of one membership, as this transaction sees it.
    pub async fn membership(
        &mut self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, DbError> {
        match self.store().0 {
            Inner::Sqlite(store) => store.membership(organization_id, user_id),
            Inner::Postgres(mut store) => store.membership(organization_id, user_id).await,
        }
    }

    /// Sets the outcome of stored deliveries: `(event_id, outcome)` pairs.
    pub async fn set_outcomes(&mut self, outcomes: &[(&str, &str)]) -> Result<(), DbError> {
        match &mut self.0 {
            Tx::Sqlite { conn, .. } => sqlite::set_outcomes(conn.get()?, outcomes),
            Tx::Postgres(tx) => postgres::set_outcomes(tx, outcomes).await,
            Tx::Ended => Ok(()),
        }
    }

    /// Moves the cursor of `name` from `old` to `new`; `false` when someone else moved it first.
    /// `None` is no cursor: no row yet, or a row whose cursor an operator cleared to start over.
    pub async fn advance_cursor(
        &mut self,
        name: &str,
        old: Option<&str>,
        new: &str,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        match &mut self.0 {
            Tx::Sqlite { conn, .. } => sqlite::advance_cursor(conn.get()?, name, old, new, now),
            Tx::Postgres(tx) => postgres::advance_cursor(&mut **tx, name, old, new, now).await,
            Tx::Ended => Ok(false),
        }
    }

    /// Runs SQL (any statements, no parameters) inside the transaction (operators' tools, tests).
    pub async fn execute(&mut self, sql: &str) -> Result<(), DbError> {
        match &mut self.0 {
            Tx::Sqlite { conn, .. } => Ok(conn.get()?.execute_batch(sql)?),
            Tx::Postgres(tx) => {
                sqlx::raw_sql(sql).execute(&mut **tx).await?;
                Ok(())
            }
            Tx::Ended => Ok(()),
        }
    }

    pub async fn commit(mut self) -> Result<(), DbError> {
        match &mut self.0 {
            Tx::Sqlite {
                conn, checkpointer, ..
            } => {
                match conn {
                    SqliteConn::Pooled(pooled) => {
                        let taken = pooled.take().ok_or_else(|| {
                            DbError::Unavailable("the transaction has ended".into())
                        })?;
                        let (back, done) = sqlite_conn::blocking(taken, sqlite::commit).await;
                        *pooled = back;
                        done?;
                    }
                    SqliteConn::Own(conn) => sqlite::commit(conn)?,
                }
                if let Some(checkpointer) = checkpointer {
                    checkpointer.wake();
                }
                Ok(())
            }
            Tx::Postgres(_) => {
                let Tx::Postgres(tx) = std::mem::replace(&mut self.0, Tx::Ended) else {
                    unreachable!()
                };
                Ok(tx.commit().await?)
            }
            Tx::Ended => Ok(()),
        }
    }

    /// Rolls back now (awaiting PostgreSQL's answer for at most 5 s: a dropped sqlx transaction
    /// only queues its rollback, and a committer's own connection may then sit unused, holding its
    /// locks, until the next batch).
    pub async fn rollback(mut self) {
        if let Tx::Postgres(_) = &self.0 {
            let Tx::Postgres(tx) = std::mem::replace(&mut self.0, Tx::Ended) else {
                unreachable!()
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), tx.rollback()).await;
        }
        // SQLite: the drop rolls back at once.
    }
}

/// A group-commit worker's connection of its own, so that SQLite's page cache and the prepared
/// statements stay warm from one batch to the next: a rusqlite connection on a SQLite file, a
/// native connection with per-execution plans on PostgreSQL, pooled transactions in memory.
pub struct Committer {
    db: Db,
    link: Option<CommitLink>,
}

enum CommitLink {
    Sqlite(rusqlite::Connection),
    Postgres(PgConnection),
    Pooled,
}

impl Committer {
    /// Begins a write transaction on the committer's connection (opened first if it has none).
    /// On SQLite it waits for this process's writer turn.
    pub async fn begin(&mut self) -> Result<WriteTx<'_>, DbError> {
        if self.link.is_none() {
            let link = match &self.db.link {
                Link::Sqlite(s) => match &s.file {
                    Some(file) => CommitLink::Sqlite(sqlite_conn::open(file, false)?),
                    None => CommitLink::Pooled,
                },
                Link::Postgres(pool) => {
                    let options = pool.connect_options();
                    let connect = PgConnection::connect_with(&options);
                    let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
                        .await
                        .map_err(|_| {
                            DbError::Unavailable("connecting to PostgreSQL timed out".into())
                        })??;
                    postgres::custom_plans(&mut conn).await?;
                    CommitLink::Postgres(conn)
                }
            };
            self.link = Some(link);
        }
        match (self.link.as_mut(), &self.db.link) {
            (Some(CommitLink::Sqlite(conn)), Link::Sqlite(s)) => {
                let turn = s.writers.clone().lock_owned().await;
                sqlite::begin(conn)?;
                Ok(WriteTx(Tx::Sqlite {
                    conn: SqliteConn::Own(conn),
                    read_ids: HashMap::new(),
                    _turn: turn,
                    checkpointer: s.checkpointer.clone(),
                }))
            }
            (Some(CommitLink::Postgres(conn)), _) => Ok(WriteTx(Tx::Postgres(conn.begin().await?))),
            _ => self.db.begin_write().await,
        }
    }

    /// Drops the connection, so that the next transaction takes a fresh one (after an error a
    /// retry cannot clear, a broken connection is never reused).
    pub fn reset(&mut self) {
        self.link = None;
    }
}

/// Held while one process syncs. On PostgreSQL a session advisory lock on a dedicated connection;
/// on SQLite nothing (the write lock and the cursor check already make a second syncer harmless).
/// A lease dropped without `release` (a cancelled pass) drops its connection, which frees the lock.
pub struct SyncLease {
    conn: Option<PgConnection>,
}

impl SyncLease {
    /// Gives the lease back.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Unlocked before closing, so that the next pass finds the lock free at once.
            let _ = postgres::release_lease(&mut conn).await;
            let _ = conn.close().await;
        }
    }
}

impl Db {
    /// Connects to `url` (`sqlite://...`, created if missing, or `postgres://...`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        let backend = Backend::of_url(url).ok_or_else(|| {
            DbError::Unavailable(format!("unsupported database URL scheme in {url:?}"))
        })?;
        let link = match backend {
            Backend::Sqlite => Link::Sqlite(Arc::new(connect_sqlite(url, max_connections).await?)),
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(url)?;
                // One direct connection first, so that an unreachable server reports its real
                // cause rather than a pool timeout.
                PgConnection::connect_with(&options).await?.close().await?;
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await?;
                Link::Postgres(pool)
            }
        };
        Ok(Self {
            link,
            write_failures: Arc::default(),
            writes_under_way: Arc::default(),
            write_tickets: Arc::default(),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self.link {
            Link::Sqlite(_) => Backend::Sqlite,
            Link::Postgres(_) => Backend::Postgres,
        }
    }

    /// `Err` when the SQLite file at the configured path is no longer the one opened at start-up
    /// (deleted, or replaced by another file): writes to the open one would be lost with it.
    pub fn check_file(&self) -> Result<(), DbError> {
        let Link::Sqlite(s) = &self.link else {
            return Ok(());
        };
        let (Some(file), Some(opened)) = (&s.file, s.identity) else {
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

    /// Begins a transaction that will write. On SQLite it waits for this process's writer turn, then
    /// takes the database write lock up front (`BEGIN IMMEDIATE`) so that a read-then-write never
    /// fails to upgrade.
    pub async fn begin_write(&self) -> Result<WriteTx<'static>, DbError> {
        self.check_file()?;
        match &self.link {
            Link::Sqlite(s) => {
                let turn = s.writers.clone().lock_owned().await;
                let conn = s.pool.acquire().await?;
                let (conn, begun) = sqlite_conn::blocking(conn, sqlite::begin).await;
                begun?;
                Ok(WriteTx(Tx::Sqlite {
                    conn: SqliteConn::Pooled(conn),
                    read_ids: HashMap::new(),
                    _turn: turn,
                    checkpointer: s.checkpointer.clone(),
                }))
            }
            Link::Postgres(pool) => Ok(WriteTx(Tx::Postgres(pool.begin().await?))),
        }
    }

    /// A group-commit worker's connection, opened at its first transaction.
    pub fn committer(&self) -> Committer {
        Committer {
            db: self.clone(),
            link: None,
        }
    }

    /// Whether [`Db::close`] was called.
    pub fn is_closed(&self) -> bool {
        match &self.link {
            Link::Sqlite(s) => s.pool.is_closed(),
            Link::Postgres(pool) => pool.is_closed(),
        }
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
        let applied = match &self.link {
            Link::Sqlite(s) => {
                s.pool
                    .run(|c| Ok(sqlite::applied_checksums(c)?.len()))
                    .await?
            }
            Link::Postgres(pool) => postgres::migrations_applied(pool).await? as usize,
        };
        let expected = self.backend().migrator().iter().count();
        if applied >= expected {
            Ok(())
        } else {
            Err(DbError::Unavailable(format!(
                "{applied} of {expected} migrations applied"
            )))
        }
    }

    async fn probe_write(&self) -> Result<(), DbError> {
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        match &mut tx.0 {
            Tx::Sqlite { conn, .. } => sqlite::probe_write(conn.get()?, now)?,
            Tx::Postgres(pg) => postgres::probe_write(pg, now).await?,
            Tx::Ended => {}
        }
        tx.commit().await
    }

    /// Takes the sync lease unless another process holds it.
    pub async fn try_sync_lease(&self) -> Result<Option<SyncLease>, DbError> {
        let Link::Postgres(pool) = &self.link else {
            return Ok(Some(SyncLease { conn: None }));
        };
        // A connection of its own, outside the pool: the pass needs pool connections while the
        // lease is held, and a pool of one would otherwise time out waiting for the lease's.
        let options = pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        if !postgres::try_lease(&mut conn).await? {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(SyncLease { conn: Some(conn) }))
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match &self.link {
            Link::Sqlite(s) => s.pool.close(),
            Link::Postgres(pool) => pool.close().await,
        }
    }

    /// Runs a read on SQLite's pool (on a blocking thread) or PostgreSQL's.
    pub(super) async fn sqlite_or<T: Send + 'static>(
        &self,
        on_sqlite: impl FnOnce(&rusqlite::Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<Result<T, DbError>, &PgPool> {
        match &self.link {
            Link::Sqlite(s) => Ok(s.pool.run(on_sqlite).await),
            Link::Postgres(pool) => Err(pool),
        }
    }

    pub(super) fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.link {
            Link::Postgres(pool) => Some(pool),
            Link::Sqlite(_) => None,
        }
    }

    // ---- reads and single writes outside a batch ----

    /// The stored row of one membership.
    pub async fn membership(
        &self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, DbError> {
        Ok(self
            .membership_with_role(organization_id, user_id)
            .await?
            .map(|(m, _)| m))
    }

    /// The stored row of one membership, and which slugs of the set WorkOS last reported for it
    /// (`workos_role_slugs`, `workos_role_slug`) are known roles.
    pub async fn membership_with_role(
        &self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<(Membership, HashSet<String>)>, DbError> {
        let (org, user) = (organization_id.to_owned(), user_id.to_owned());
        match self
            .sqlite_or(move |c| sqlite::membership_with_role(c, &org, &user))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::membership_with_role(pool, organization_id, user_id).await,
        }
    }

    /// The stored row holding a WorkOS membership id, if any.
    pub async fn membership_by_id(
        &self,
        membership_id: &str,
    ) -> Result<Option<Membership>, DbError> {
        let id = membership_id.to_owned();
        match self
            .sqlite_or(move |c| sqlite::membership_by_id(c, &id))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::membership_by_id(pool, membership_id).await,
        }
    }

    /// The roles `membership_roles` holds for a membership, sorted.
    pub async fn roles_of(
        &self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Vec<String>, DbError> {
        let (org, user) = (organization_id.to_owned(), user_id.to_owned());
        match self
            .sqlite_or(move |c| sqlite::roles_of(c, &org, &user))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::roles_of(pool, organization_id, user_id).await,
        }
    }

    // ---- the refetch queue (its worker: [`crate::refetch`]) ----

    /// Up to `limit` queued refetches due at `now_ms`, oldest due first.
    pub async fn refetch_due(&self, now_ms: i64, limit: i64) -> Result<Vec<Queued>, DbError> {
        match self
            .sqlite_or(move |c| sqlite::refetch_due(c, now_ms, limit))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::refetch_due(pool, now_ms, limit).await,
        }
    }

    /// Takes a due row until `until_ms` (another worker or replica leaves it alone); false when
    /// another took it first.
    pub async fn refetch_claim(
        &self,
        target: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, DbError> {
        let owned = target.to_owned();
        match self
            .sqlite_or(move |c| sqlite::refetch_claim(c, &owned, now_ms, until_ms))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::refetch_claim(pool, target, now_ms, until_ms).await,
        }
    }

    /// Ends a refetch: removes the row, unless it was signalled again since it was read, in which
    /// case it is due again at `now_ms` (the fetch may have read the state before that signal's change).
    pub async fn refetch_finish(&self, done: &Queued, now_ms: i64) -> Result<(), DbError> {
        let owned = done.clone();
        match self
            .sqlite_or(move |c| sqlite::refetch_finish(c, &owned, now_ms))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::refetch_finish(pool, done, now_ms).await,
        }
    }

    /// Schedules another attempt at `next_ms`, recording why this one did not finish.
    pub async fn refetch_retry(
        &self,
        failed: &Queued,
        next_ms: i64,
        error: &str,
    ) -> Result<(), DbError> {
        let (owned, why) = (failed.clone(), error.to_owned());
        match self
            .sqlite_or(move |c| sqlite::refetch_retry(c, &owned, next_ms, &why))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::refetch_retry(pool, failed, next_ms, error).await,
        }
    }

    /// How many refetches are queued, and when the oldest was (Unix ms).
    pub async fn refetch_depth(&self) -> Result<(i64, Option<i64>), DbError> {
        match self.sqlite_or(sqlite::refetch_depth).await {
            Ok(done) => done,
            Err(pool) => postgres::refetch_depth(pool).await,
        }
    }

    /// Every stored row (of one organization), ordered by organization then user.
    pub async fn memberships(
        &self,
        organization_id: Option<&str>,
    ) -> Result<Vec<Membership>, DbError> {
        let org = organization_id.map(str::to_owned);
        match self
            .sqlite_or(move |c| sqlite::memberships(c, org.as_deref()))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::memberships(pool, organization_id).await,
        }
    }

    /// Every organization with a stored membership, in order.
    pub async fn organizations(&self) -> Result<Vec<String>, DbError> {
        match self.sqlite_or(sqlite::organizations).await {
            Ok(done) => done,
            Err(pool) => postgres::organizations(pool).await,
        }
    }

    /// Audit rows filtered by organization and/or user, newest first, at most `limit`.
    pub async fn audit(
        &self,
        organization_id: Option<&str>,
        user_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, DbError> {
        let (org, user) = (
            organization_id.map(str::to_owned),
            user_id.map(str::to_owned),
        );
        match self
            .sqlite_or(move |c| sqlite::audit(c, org.as_deref(), user.as_deref(), limit))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::audit(pool, organization_id, user_id, limit).await,
        }
    }

    /// How many deliveries the inbox holds.
    pub async fn event_count(&self) -> Result<i64, DbError> {
        match self.sqlite_or(sqlite::event_count).await {
            Ok(done) => done,
            Err(pool) => postgres::event_count(pool).await,
        }
    }

    /// Stored deliveries that still have their payload, oldest first, at most `limit` after
    /// `after` (received_at, event_id).
    pub async fn stored_events(
        &self,
        filter: &StoredFilter,
        after: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, DbError> {
        let owned = (
            filter.clone(),
            after.map(|(a, b)| (a.to_owned(), b.to_owned())),
        );
        match self
            .sqlite_or(move |c| {
                let after = owned.1.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
                sqlite::stored_events(c, &owned.0, after, limit)
            })
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::stored_events(pool, filter, after, limit).await,
        }
    }

    /// How many stored deliveries the filter matches whose payload was pruned (they cannot be
    /// replayed).
    pub async fn pruned_events(&self, filter: &StoredFilter) -> Result<i64, DbError> {
        let owned = filter.clone();
        match self
            .sqlite_or(move |c| sqlite::pruned_events(c, &owned))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::pruned_events(pool, filter).await,
        }
    }

    /// Drops the payloads of deliveries received before `cutoff`, keeping their ids; returns how many.
    pub async fn prune_payloads(&self, cutoff: Timestamp) -> Result<u64, DbError> {
        match self
            .sqlite_or(move |c| sqlite::prune_payloads(c, cutoff))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::prune_payloads(pool, cutoff).await,
        }
    }

    /// Deletes deliveries (ids included) received before `cutoff`; returns how many.
    pub async fn prune_ids(&self, cutoff: Timestamp) -> Result<u64, DbError> {
        match self.sqlite_or(move |c| sqlite::prune_ids(c, cutoff)).await {
            Ok(done) => done,
            Err(pool) => postgres::prune_ids(pool, cutoff).await,
        }
    }

    /// Every known role slug, sorted.
    pub async fn roles(&self) -> Result<Vec<String>, DbError> {
        match self.sqlite_or(sqlite::roles).await {
            Ok(done) => done,
            Err(pool) => postgres::roles(pool).await,
        }
    }

    /// Adds a role slug; `false` when it was already known.
    pub async fn add_role(&self, slug: &str, now: Timestamp) -> Result<bool, DbError> {
        let owned = slug.to_owned();
        match self
            .sqlite_or(move |c| sqlite::add_role(c, &owned, now))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::add_role(pool, slug, now).await,
        }
    }

    /// Removes a role slug; `false` when it was not known.
    pub async fn remove_role(&self, slug: &str) -> Result<bool, DbError> {
        let owned = slug.to_owned();
        match self
            .sqlite_or(move |c| sqlite::remove_role(c, &owned))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::remove_role(pool, slug).await,
        }
    }

    /// The cursor of a catch-up stream; `None` before its first event.
    pub async fn cursor(&self, name: &str) -> Result<Option<String>, DbError> {
        let owned = name.to_owned();
        match self.sqlite_or(move |c| sqlite::cursor(c, &owned)).await {
            Ok(done) => done,
            Err(pool) => postgres::cursor(pool, name).await,
        }
    }

    /// Clears the cursor of `name` if it is still `old` (a cursor WorkOS no longer honours);
    /// `false` when someone else moved it first.
    pub async fn clear_cursor(
        &self,
        name: &str,
        old: &str,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        let owned = (name.to_owned(), old.to_owned());
        match self
            .sqlite_or(move |c| sqlite::clear_cursor(c, &owned.0, &owned.1, now))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::clear_cursor(pool, name, old, now).await,
        }
    }

    /// [`WriteTx::advance_cursor`] in a transaction of its own.
    pub async fn advance_cursor(
        &self,
        name: &str,
        old: Option<&str>,
        new: &str,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        let mut tx = self.begin_write().await?;
        let moved = tx.advance_cursor(name, old, new, now).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// Runs one statement with `$1`, `$2`, ... parameters and returns its rows (operators' tools
    /// and tests; rolesync's own statements live in the backends' modules).
    pub async fn rows(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, DbError> {
        let owned = (sql.to_owned(), params.to_vec());
        match self
            .sqlite_or(move |c| sqlite::rows(c, &owned.0, &owned.1))
            .await
        {
            Ok(done) => done,
            Err(pool) => postgres::rows(pool, sql, params).await,
        }
    }

    /// Runs SQL (any statements, no parameters) outside a transaction (operators' tools, tests).
    pub async fn execute(&self, sql: &str) -> Result<(), DbError> {
        let owned = sql.to_owned();
        match self.sqlite_or(move |c| Ok(c.execute_batch(&owned)?)).await {
            Ok(done) => done,
            Err(pool) => {
                sqlx::raw_sql(sql).execute(pool).await?;
                Ok(())
            }
        }
    }
}

/// Opens a SQLite database: one connection first, the only one that may create the file (the
/// pool's later ones open it read-write only, so that a file deleted while serving is never
/// silently recreated empty), then the pool and the checkpointer.
async fn connect_sqlite(url: &str, max_connections: u32) -> Result<SqliteDb, DbError> {
    let create = !url.contains("mode=") || url.contains("mode=rwc");
    let file: Option<Arc<Path>> = sqlite_conn::file_of_url(url)?.map(Arc::from);
    let opened = file.clone();
    let first = tokio::task::spawn_blocking(move || {
        let conn = match &opened {
            Some(file) => sqlite_conn::open(file, create)?,
            None => sqlite_conn::Pool::open_memory()?,
        };
        sqlite_conn::check_build(&conn)?;
        Ok::<_, DbError>(conn)
    })
    .await
    .map_err(|e| DbError::Unavailable(format!("opening the database failed: {e}")))??;
    let identity =
        match &file {
            Some(file) => Some(file_identity(file).map_err(|e| {
                DbError::Unavailable(format!("cannot read {}: {e}", file.display()))
            })?),
            None => None,
        };
    let target = match &file {
        Some(file) => Target::File(Arc::clone(file)),
        None => Target::Memory,
    };
    let writers = Arc::default();
    let checkpointer = match &file {
        Some(file) => Some(Arc::new(Checkpointer::start(file, Arc::clone(&writers))?)),
        None => None,
    };
    Ok(SqliteDb {
        pool: sqlite_conn::Pool::new(target, first, max_connections),
        writers,
        file,
        identity,
        checkpointer,
    })
}

/// A write transaction's [`BatchStore`], on either backend.
pub struct Store<'a>(Inner<'a>);

enum Inner<'a> {
    Sqlite(sqlite::Store<'a>),
    Postgres(postgres::Store<'a>),
}

impl BatchStore for Store<'_> {
    async fn lock_memberships(&mut self, keys: &[&Key]) -> Result<(), DbError> {
        match &mut self.0 {
            Inner::Sqlite(s) => s.lock_memberships(keys).await,
            Inner::Postgres(s) => s.lock_memberships(keys).await,
        }
    }

    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        match &mut self.0 {
            Inner::Sqlite(s) => s.read(event_ids, keys).await,
            Inner::Postgres(s) => s.read(event_ids, keys).await,
        }
    }

    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
        match &mut self.0 {
            Inner::Sqlite(s) => s.trails(points).await,
            Inner::Postgres(s) => s.trails(points).await,
        }
    }

    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        match &mut self.0 {
            Inner::Sqlite(s) => s.write(writes, events, received_at).await,
            Inner::Postgres(s) => s.write(writes, events, received_at).await,
        }
    }
}
