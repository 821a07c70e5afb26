//! The commands: serve, migrate, roles, audit, replay.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::app::AppState;
use crate::config::Config;
use crate::db::{self, Db};
use crate::reconcile::Source;
use crate::timestamp::Timestamp;
use crate::{login, replay, server, table};

/// Keeps an application's database in step with the organization roles held in WorkOS.
#[derive(Parser, Debug)]
#[command(name = "rolesync", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply migrations, then serve the webhook and login endpoints
    Serve,
    /// Apply pending database migrations (a second run does nothing)
    Migrate,
    /// List, add or remove the role slugs the app knows
    Roles {
        #[command(subcommand)]
        action: RolesAction,
    },
    /// Print the role audit trail, newest first
    Audit {
        /// Only this organization
        #[arg(long)]
        org: Option<String>,
        /// Only this user
        #[arg(long)]
        user: Option<String>,
        /// At most this many rows
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Fetch one membership from the WorkOS API and reconcile it now (source `cli`)
    Reconcile {
        /// WorkOS user id (user_...)
        #[arg(long)]
        user: String,
        /// WorkOS organization id (org_...)
        #[arg(long)]
        org: String,
    },
    /// Sign fixture or scenario files with the first webhook secret and POST them to a running rolesync
    Replay {
        /// Files or folders of WorkOS event bodies or scenario files
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// Webhook endpoint to deliver to
        #[arg(long, default_value = replay::DEFAULT_URL)]
        url: String,
    },
}

/// Role subcommands.
#[derive(Subcommand, Debug)]
pub enum RolesAction {
    /// Print every known role slug
    List,
    /// Add role slugs
    Add {
        #[arg(required = true)]
        slugs: Vec<String>,
    },
    /// Remove role slugs (stored memberships keep their role)
    Remove {
        #[arg(required = true)]
        slugs: Vec<String>,
    },
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config;
    match cli.command {
        Command::Replay { paths, url } => return replay::run(&config, &paths, &url).await,
        Command::Serve => serve(config).await?,
        Command::Migrate => {
            open_db(&config).await?;
            println!("migrations applied");
        }
        Command::Roles { action } => roles(&open_db(&config).await?, action).await?,
        Command::Reconcile { user, org } => return reconcile_now(config, &user, &org).await,
        Command::Audit { org, user, limit } => {
            let db = open_db(&config).await?;
            let rows = db::audit::list(db.pool(), org.as_deref(), user.as_deref(), limit).await?;
            print!("{}", audit_table(&rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects and migrates; errors name `DATABASE_URL`.
pub async fn open_db(config: &Config) -> Result<Db> {
    let url = &config.database_url;
    let db = Db::connect(&url.0, config.db_max_connections)
        .await
        .with_context(|| format!("DATABASE_URL: cannot connect to {url}"))?;
    db.migrate()
        .await
        .with_context(|| format!("DATABASE_URL: cannot migrate {url}"))?;
    Ok(db)
}

async fn serve(config: Config) -> Result<()> {
    if config.webhook_secret.is_none() {
        bail!("WORKOS_WEBHOOK_SECRET: not set; serve needs it to verify webhook deliveries");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("ROLESYNC_LISTEN: cannot bind {}", config.listen))?;
    let db = open_db(&config).await?;
    let state = Arc::new(AppState::new(&config, db.clone()));
    if !state.login.enabled() {
        tracing::warn!("ROLESYNC_LOGIN_TOKEN is not set: /v1/reconcile answers 503 login_disabled");
    }
    if !state.login.workos.is_configured() {
        tracing::warn!("WORKOS_API_KEY is not set: logins answer from the database only");
    }
    tracing::info!(listen = %config.listen, database = %config.database_url, "rolesync serving");
    server::serve(listener, state, server::shutdown_signal()).await?;
    db.close().await;
    tracing::info!("rolesync stopped");
    Ok(())
}

async fn reconcile_now(config: Config, user: &str, org: &str) -> Result<ExitCode> {
    if config.api_key.is_none() {
        bail!("WORKOS_API_KEY: not set; reconcile fetches the membership from WorkOS");
    }
    let state = AppState::new(&config, open_db(&config).await?);
    let answer = login::refresh(&state, user, org, Source::Cli).await;
    let answer = answer?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(match answer.workos_error {
        Some(_) => ExitCode::FAILURE,
        None => ExitCode::SUCCESS,
    })
}

async fn roles(db: &Db, action: RolesAction) -> Result<()> {
    match action {
        RolesAction::List => {
            for slug in db::roles::list(db.pool()).await? {
                println!("{slug}");
            }
        }
        RolesAction::Add { slugs } => {
            for slug in slugs {
                let added = db::roles::add(db.pool(), &slug, Timestamp::now()).await?;
                println!("{slug}: {}", if added { "added" } else { "already known" });
            }
        }
        RolesAction::Remove { slugs } => {
            for slug in slugs {
                let removed = db::roles::remove(db.pool(), &slug).await?;
                println!("{slug}: {}", if removed { "removed" } else { "not known" });
            }
        }
    }
    Ok(())
}

/// The audit rows as an aligned table.
pub fn audit_table(rows: &[db::audit::AuditRow]) -> String {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.recorded_at.clone(),
                r.organization_id.clone(),
                r.user_id.clone(),
                r.source.clone(),
                r.outcome.clone(),
                format!("{} -> {}", show(&r.old_role), show(&r.new_role)),
                format!("{} -> {}", show(&r.old_status), show(&r.new_status)),
                show(&r.workos_role_slug),
                show(&r.event_id),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "RECORDED",
        "ORGANIZATION",
        "USER",
        "SOURCE",
        "OUTCOME",
        "ROLE",
        "STATUS",
        "WORKOS ROLE",
        "EVENT",
    ];
    table::render(&headers, &body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
