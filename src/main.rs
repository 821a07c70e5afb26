//! The rolesync command line: parse, set up logging, dispatch, and map errors to an exit status.

use std::process::ExitCode;

use clap::Parser;
use rolesync::cli::{self, Cli};

/// mimalloc instead of glibc's malloc: per-thread free lists without glibc's consolidation passes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let text = hide_database_password(e.render().to_string());
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
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
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// A usage error quotes the value it refused: a `DATABASE_URL` (from the environment or the flag)
/// is shown with its password hidden (a value that is not a URL, whole).
fn hide_database_password(mut text: String) -> String {
    let flag = std::env::args()
        .skip_while(|a| a != "--database-url")
        .nth(1);
    let inline =
        std::env::args().find_map(|a| a.strip_prefix("--database-url=").map(str::to_owned));
    for url in [std::env::var("DATABASE_URL").ok(), flag, inline]
        .into_iter()
        .flatten()
    {
        if !url.is_empty() {
            let shown = match url.contains("://") {
                true => rolesync::config::redact_url(&url),
                false => "****".to_owned(),
            };
            text = text.replace(&url, &shown);
        }
    }
    text
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
