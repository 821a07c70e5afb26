//! Connecting to SQLite or PostgreSQL, migrations, write transactions and per-membership locks.
//! Every SQL statement of rolesync lives under this module. `base` holds what every part shares
//! (errors, backends, keys); `pool` the connection pool and write transactions.

pub mod audit;
mod base;
pub mod inbox;
pub mod memberships;
pub mod pg_writer;
mod pool;
pub mod refetch;
pub mod roles;
pub mod schema;
pub mod sqlite_writer;
pub mod sqlx_store;
pub mod store;
pub mod sync_state;

pub use base::{Backend, DbError, Key};
pub use pool::{Db, WriteTx, WriteUnderWay, STALLED_WRITE, WRITE_FAILURES_NOT_READY};
