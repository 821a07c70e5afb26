//! The rolesync command line: parse, set up logging, dispatch, and map errors to an exit status.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = rolesync::cli::Cli::parse();
    rolesync::cli::init_tracing();
    match rolesync::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
