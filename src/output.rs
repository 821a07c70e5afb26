//! Writing command output to stdout, where a closed pipe (`rolesync audit | head -1`) ends a
//! command quietly instead of failing it.

use std::io::Write;

use anyhow::{Context, Result};

/// Stdout's reader went away (`rolesync audit | head -1`).
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct ClosedStdout;

/// Writes to stdout; a closed pipe is [`ClosedStdout`], told apart from a broken pipe elsewhere
/// (a database connection's), which stays an error.
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedStdout.into()),
        written => Ok(written.context("cannot write to stdout")?),
    }
}

/// Whether a command stopped because stdout was closed: it ends quietly, like other Unix tools.
pub fn is_closed_stdout(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ClosedStdout>().is_some()
}

/// A setting a command needs is missing: a usage error (exit status 2), like a bad value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingSetting(pub String);

/// Whether a command stopped for a missing setting.
pub fn is_usage_error(error: &anyhow::Error) -> bool {
    error.downcast_ref::<MissingSetting>().is_some()
}
