//! The `sync_state` table: the Events API cursor, and the lease that lets one replica sync at a time.

use sqlx::{Any, AnyConnection, Connection, Executor};

use super::base::{Backend, DbError};
use super::pool::Db;
use crate::timestamp::Timestamp;

/// The cursor of a catch-up stream; `None` before its first event.
pub async fn cursor<'c>(
    conn: impl Executor<'c, Database = Any>,
    name: &str,
) -> Result<Option<String>, DbError> {
    let row: Option<Option<String>> =
        sqlx::query_scalar("SELECT cursor FROM sync_state WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(row.flatten())
}

/// Clears the cursor of `name` if it is still `old` (a cursor WorkOS no longer honours); `false`
/// when someone else moved it first.
pub async fn clear<'c>(
    conn: impl Executor<'c, Database = Any>,
    name: &str,
    old: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE sync_state SET cursor = NULL, updated_at = $3 WHERE name = $1 AND cursor = $2",
    )
    .bind(name)
    .bind(old)
    .bind(now.to_string())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves the cursor from `old` to `new`; `false` when someone else moved it first. `None` is no
/// cursor: no row yet, or a row whose cursor an operator cleared to start over.
pub async fn advance<'c>(
    conn: impl Executor<'c, Database = Any>,
    name: &str,
    old: Option<&str>,
    new: &str,
    now: Timestamp,
) -> Result<bool, DbError> {
    let sql = match old {
        None => "INSERT INTO sync_state (name, cursor, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at \
                 WHERE sync_state.cursor IS NULL",
        Some(_) => "UPDATE sync_state SET cursor = $2, updated_at = $3 WHERE name = $1 AND cursor = $4",
    };
    let mut query = sqlx::query(sql).bind(name).bind(new).bind(now.to_string());
    if let Some(old) = old {
        query = query.bind(old);
    }
    let done = query.execute(conn).await?;
    Ok(done.rows_affected() == 1)
}

/// Held while one process syncs. On PostgreSQL a session advisory lock on a dedicated connection;
/// on SQLite nothing (the write lock and the cursor check already make a second syncer harmless).
/// A lease dropped without `release` (a cancelled pass) drops its connection, which frees the lock.
pub struct SyncLease {
    conn: Option<AnyConnection>,
}

const LEASE_KEY: i64 = 0x726f_6c65_7379_6e63; // "rolesync"

impl Db {
    /// Takes the sync lease unless another process holds it.
    pub async fn try_sync_lease(&self) -> Result<Option<SyncLease>, DbError> {
        if self.backend() != Backend::Postgres {
            return Ok(Some(SyncLease { conn: None }));
        }
        // A connection of its own, outside the pool: the pass needs pool connections while the
        // lease is held, and a pool of one would otherwise time out waiting for the lease's.
        let mut conn = AnyConnection::connect_with(&self.pool().connect_options()).await?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEASE_KEY)
            .fetch_one(&mut conn)
            .await?;
        if !held {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(SyncLease { conn: Some(conn) }))
    }
}

impl SyncLease {
    /// Gives the lease back.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Unlocked before closing, so that the next pass finds the lock free at once.
            let _ = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(LEASE_KEY)
                .fetch_one(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}
