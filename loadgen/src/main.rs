//! loadgen: drives a real `rolesync serve` process with signed webhook deliveries or logins, measures
//! throughput, latency and peak memory, and checks every answer against the database (the ledger).

mod deliver;
mod fake_workos;
mod http1;
mod ledger;
mod login;
mod model;
mod prefill;
mod report;
mod run;
mod send;
mod server;
mod stats;
mod token;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Load generator and result checker for rolesync (see scripts/bench).
#[derive(Parser, Debug)]
#[command(name = "loadgen", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Signed webhook deliveries, closed loop at a concurrency or open loop at a fixed rate
    Webhooks(WebhookArgs),
    /// Logins (`POST /v1/reconcile`) against an in-process stand-in WorkOS
    Login(LoginArgs),
}

/// Settings shared by both modes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Database the server runs on; must be fresh (sqlite://PATH or postgres://...)
    #[arg(long)]
    pub database_url: String,
    /// The rolesync binary under test
    #[arg(long, default_value = "target/release/rolesync")]
    pub server_bin: PathBuf,
    /// Folder for the server log (kept by scripts/bench when a run fails)
    #[arg(long)]
    pub work_dir: PathBuf,
    /// Requests in flight (closed loop)
    #[arg(short = 'c', long, default_value_t = 64)]
    pub concurrency: usize,
    /// Print one JSON object instead of the text report
    #[arg(long)]
    pub json: bool,
    /// Free text shown with the results (scripts/bench passes `git describe --dirty`)
    #[arg(long, default_value = "")]
    pub label: String,
    /// RUST_LOG of the server (its own default is info)
    #[arg(long, default_value = "info")]
    pub server_log: String,
    /// Extra server environment, KEY=VALUE (repeatable), e.g. ROLESYNC_DB_MAX_CONNECTIONS=16
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
    /// Tokio worker threads of the load generator itself
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
}

/// `loadgen webhooks`.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    #[command(flatten)]
    pub common: Common,
    /// Deliveries to send in total (duplicates included)
    #[arg(short = 'n', long, default_value_t = 100_000)]
    pub deliveries: usize,
    /// Memberships the deliveries are spread over
    #[arg(short = 'm', long, default_value_t = 10_000)]
    pub memberships: usize,
    /// Open loop: start deliveries at this fixed rate per second (latency counts from the due time)
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// Open loop: at most this many requests in flight (later ones wait, and their wait is latency)
    #[arg(long, default_value_t = 4096)]
    pub max_inflight: usize,
    /// After the run, resend every delivery answered 503 (as WorkOS retries), up to 60 rounds a
    /// second apart, so that an overloaded run can still balance its ledger
    #[arg(long)]
    pub retry_refused: bool,
    /// Rows bulk-inserted into `memberships` before the server starts
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub prefill_memberships: usize,
    /// Rows bulk-inserted into `role_audit` (over the prefilled memberships) before the server starts
    #[arg(long, value_name = "J", default_value_t = 0)]
    pub prefill_audit: usize,
    /// Seed of the workload (random when absent; printed so a run can be repeated)
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub mix: workload::Mix,
}

/// `loadgen login`.
#[derive(Args, Debug, Clone)]
pub struct LoginArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users, each logging in once per round (two rounds)
    #[arg(short = 'm', long, default_value_t = 10_000)]
    pub memberships: usize,
    /// Delay of every stand-in WorkOS answer, in milliseconds
    #[arg(long, default_value_t = 20)]
    pub delay_ms: u64,
    /// A third round: each user signs in with an AuthKit access token agreeing with WorkOS (RS256,
    /// key made with openssl, key set served by the stand-in); checks zero WorkOS calls and writes
    #[arg(long)]
    pub token: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Webhooks(a) => a.common.client_threads,
        Command::Login(a) => a.common.client_threads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Webhooks(args) => run::webhooks(args).await,
            Command::Login(args) => login::run(args).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
