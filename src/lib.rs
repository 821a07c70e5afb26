//! rolesync keeps an application's membership roles in step with WorkOS through one idempotent reconcile.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod ingest;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod output;
pub mod reconcile;
pub mod refetch;
pub mod replay;
pub mod resync;
pub mod server;
pub mod signature;
pub mod sync;
pub mod table;
pub mod timestamp;
pub mod token;
pub mod workos;
