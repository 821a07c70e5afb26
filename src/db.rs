//! Connecting to SQLite or PostgreSQL, migrations, write transactions and per-membership locks.
//! Every SQL statement of rolesync lives under this module, once per dialect: `sqlite` (rusqlite)
//! and `postgres` (sqlx's native driver). `pool` is the one boundary the rest of rolesync calls
//! ([`Db`], [`WriteTx`], [`Committer`]); `store` the batch interface and the rows read back; `base`
//! what every part shares (errors, backends, keys, migrations).

mod base;
mod pool;
mod postgres;
pub mod refetch;
pub mod schema;
mod sqlite;
pub mod store;

pub use base::{Backend, DbError, Key, Value};
pub use pool::{
    Committer, Db, Store, SyncLease, WriteTx, WriteUnderWay, STALLED_WRITE,
    WRITE_FAILURES_NOT_READY,
};
pub use store::{
    AuditRow, BatchStore, InboxRow, QueuedRefetch, RoleSet, Snapshot, StoredEvent, StoredFilter,
    Writes,
};
