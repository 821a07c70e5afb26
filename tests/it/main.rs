//! rolesync's integration tests: every test runs on a real SQLite file and on a real PostgreSQL database.

#[macro_use]
pub mod support;

mod migrations;
mod reconcile;
mod webhook;
