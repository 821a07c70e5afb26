//! rolesync's integration tests: every test runs on a real SQLite file and on a real PostgreSQL database.

#[macro_use]
pub mod support;

mod catchup;
mod cli;
mod connections;
mod fake_workos;
mod login;
mod migrations;
mod ops;
mod process;
mod reconcile;
mod refetch;
mod reliability;
mod role_sets;
mod schema;
mod sqlite_build;
mod token;
mod webhook;
