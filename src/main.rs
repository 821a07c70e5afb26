//! The rolesync command line: parse, set up logging, dispatch, and map errors to an exit status.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use rolesync::cli;

/// mimalloc instead of glibc's malloc: per-thread free lists without glibc's consolidation passes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match cli::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            return ExitCode::from(2);
        }
        Err(e) if e.use_stderr() => {
            eprintln!("{}", hide_database_password(&e, cli::usage_line(&e)));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    rolesync::logging::init_tracing(cli.config.log_format);
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) if rolesync::output::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) if rolesync::output::is_usage_error(&e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// A usage error quotes the value it refused: a refused `DATABASE_URL` (from the environment or
/// the flag) is shown with its password hidden (a value that is not a URL, whole).
fn hide_database_password(error: &clap::Error, line: String) -> String {
    use clap::error::{ContextKind, ContextValue};
    let about_url = matches!(error.get(ContextKind::InvalidArg),
        Some(ContextValue::String(arg)) if arg.starts_with("--database-url"));
    let Some(ContextValue::String(url)) = error.get(ContextKind::InvalidValue) else {
        return line;
    };
    if !about_url || url.is_empty() {
        return line;
    }
    let shown = match (
        url.contains("://"),
        url.contains('@') || url.contains("password"),
    ) {
        (true, _) => rolesync::config::redact_url(url),
        // Not a URL: shown unless it may hold credentials (`user:password@host`).
        (false, false) => return line,
        (false, true) => "****".to_owned(),
    };
    match line.split_once("' for '--database-url") {
        Some((_, rest)) => format!("error: invalid value '{shown}' for '--database-url{rest}"),
        None => line.replace(url.as_str(), &shown),
    }
}

/// The error chain on one line, leaving out causes that the message before already quotes.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}
