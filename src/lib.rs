//! rolesync keeps an application's membership roles in step with WorkOS through one idempotent reconcile.

pub mod app;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod middleware;
pub mod reconcile;
pub mod replay;
pub mod resync;
pub mod server;
pub mod sync;
pub mod table;
pub mod timestamp;
pub mod webhook;
pub mod workos;
