//! The commands: serve, migrate, roles, audit, replay.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::app::AppState;

use crate::config::Config;
use crate::db::{self, Db};
use std::time::Duration;

use crate::config::parse_duration;
use crate::db::inbox::StoredFilter;
use crate::metrics::Metrics;
use crate::reconcile::{Outcome, Source};
use crate::resync;
use crate::sync::Syncer;
use crate::timestamp::SystemClock;
use crate::timestamp::Timestamp;
use crate::workos::WorkosClient;
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
        #[arg(required_unless_present = "stored", conflicts_with = "stored")]
        paths: Vec<std::path::PathBuf>,
        /// Webhook endpoint to deliver to
        #[arg(long, default_value = replay::DEFAULT_URL)]
        url: String,
        /// Instead of files: re-run events stored in the inbox through the reconcile (source `replay`)
        #[arg(long)]
        stored: bool,
        /// With --stored: only events received at or after this ISO-8601 time
        #[arg(long, requires = "stored", value_parser = parse_time)]
        since: Option<Timestamp>,
        /// With --stored: only this event
        #[arg(long, requires = "stored")]
        event_id: Option<String>,
        /// With --stored: only events whose stored outcome is this (e.g. unknown_role)
        #[arg(long, requires = "stored")]
        outcome: Option<String>,
    },
    /// One catch-up pass over the WorkOS Events API, then exit
    Sync,
    /// Reconcile every membership of an organization against the WorkOS API (source `resync`)
    Resync {
        /// WorkOS organization id (org_...)
        #[arg(long)]
        org: String,
        /// Print the differences and write nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop stored webhook payloads (and optionally event ids) older than a duration; audit rows are never pruned
    Prune {
        /// Drop payloads of deliveries received longer ago than this (e.g. 30d)
        #[arg(long, value_parser = parse_duration)]
        payloads_older_than: Option<Duration>,
        /// Also delete event ids received longer ago than this; at least 3d, so that a late retry is still a duplicate
        #[arg(long, value_parser = parse_retention)]
        ids_older_than: Option<Duration>,
    },
}

fn parse_time(text: &str) -> Result<Timestamp, String> {
    Timestamp::parse(text).map_err(|e| e.to_string())
}

/// WorkOS retries a delivery for up to 3 days: ids younger than that must stay.
fn parse_retention(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    match d >= Duration::from_secs(3 * 86_400) {
        true => Ok(d),
        false => Err("at least 3d: WorkOS retries deliveries for up to 3 days".into()),
    }
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

/// Runs one command.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config;
    match cli.command {
        Command::Replay {
            stored: true,
            since,
            event_id,
            outcome,
            ..
        } => {
            let filter = StoredFilter {
                since,
                event_id,
                outcome,
            };
            replay_stored(&open_db(&config).await?, &filter).await?
        }
        Command::Replay { paths, url, .. } => return replay::run(&config, &paths, &url).await,
        Command::Sync => sync_once(&config).await?,
        Command::Resync { org, dry_run } => resync(&config, &org, dry_run).await?,
        Command::Prune {
            payloads_older_than,
            ids_older_than,
        } => {
            prune(
                &open_db(&config).await?,
                payloads_older_than,
                ids_older_than,
            )
            .await?
        }
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
    match server::raise_open_file_limit() {
        Ok(limit) if limit < u64::from(config.max_connections) + 64 => tracing::warn!(
            open_files = limit,
            max_connections = config.max_connections,
            "the open-file limit is below ROLESYNC_MAX_CONNECTIONS; accept may fail before the cap"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let listener = server::bind(config.listen)
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
    let catch_up =
        syncer(&config, &state).map(|(s, interval)| tokio::spawn(s.run_forever(interval)));
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    server::serve(listener, state, server::shutdown_signal(), grace).await?;
    if let Some(task) = catch_up {
        task.abort();
    }
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

fn workos_client(config: &Config, metrics: Arc<Metrics>) -> Result<WorkosClient> {
    if config.api_key.is_none() {
        bail!("WORKOS_API_KEY: not set; this command reads the WorkOS API");
    }
    Ok(WorkosClient::new(
        &config.api_base_url.0,
        config.api_key.clone(),
        metrics,
    ))
}

/// The Events API catch-up of `serve`, unless disabled or without an API key.
fn syncer(config: &Config, state: &AppState) -> Option<(Syncer, Duration)> {
    let interval = Duration::from_secs(config.sync_interval_secs);
    if interval.is_zero() || config.api_key.is_none() {
        return None;
    }
    let syncer = Syncer {
        db: state.db.clone(),
        workos: state.login.workos.clone(),
        clock: state.clock.clone(),
        metrics: state.metrics.clone(),
        lookback: config.sync_lookback,
    };
    Some((syncer, interval))
}

async fn sync_once(config: &Config) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let syncer = Syncer {
        db: open_db(config).await?,
        workos: workos_client(config, metrics.clone())?,
        clock: Arc::new(SystemClock),
        metrics,
        lookback: config.sync_lookback,
    };
    let report = syncer.run_once().await?;
    let outcomes: Vec<String> = report
        .outcomes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    match report.skipped {
        true => println!("another process is syncing; nothing done"),
        false => println!(
            "{} pages, {} events: {}",
            report.pages,
            report.events,
            outcomes.join(" ")
        ),
    }
    Ok(())
}

async fn resync(config: &Config, org: &str, dry_run: bool) -> Result<()> {
    let db = open_db(config).await?;
    let workos = workos_client(config, Arc::new(Metrics::new()))?;
    let changes = resync::resync(&db, &workos, org, dry_run, Timestamp::now()).await?;
    let show = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let rows: Vec<Vec<String>> = changes
        .iter()
        .filter(|c| !dry_run || c.outcome != Outcome::Unchanged)
        .map(|c| {
            let stored = c.stored.as_ref();
            let observed = if c.observed.deleted {
                "deleted".to_owned()
            } else {
                c.observed.status.clone()
            };
            vec![
                c.observed.user_id.clone(),
                format!(
                    "{} / {}",
                    show(stored.and_then(|s| s.role_slug.as_deref())),
                    show(stored.map(|s| s.status.as_str()))
                ),
                format!("{} / {}", show(c.observed.role_slug.as_deref()), observed),
                c.outcome.as_str().to_owned(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "USER",
                "STORED ROLE / STATUS",
                "WORKOS ROLE / STATUS",
                "OUTCOME"
            ],
            &rows
        )
    );
    let verb = if dry_run {
        "would change (dry run, nothing written)"
    } else {
        "reconciled"
    };
    println!(
        "{} memberships in WorkOS or stored; {} {verb}",
        changes.len(),
        rows.len()
    );
    Ok(())
}

async fn replay_stored(db: &Db, filter: &StoredFilter) -> Result<()> {
    let done = replay::replay_stored(db, filter, Timestamp::now()).await?;
    let rows: Vec<Vec<String>> = done
        .iter()
        .map(|r| vec![r.event_id.clone(), r.before.clone(), r.after.clone()])
        .collect();
    print!("{}", table::render(&["EVENT", "BEFORE", "AFTER"], &rows));
    println!("{} stored events re-applied", rows.len());
    Ok(())
}

async fn prune(db: &Db, payloads: Option<Duration>, ids: Option<Duration>) -> Result<()> {
    if payloads.is_none() && ids.is_none() {
        bail!("nothing to prune: give --payloads-older-than and/or --ids-older-than");
    }
    let cutoff = |d: Duration| {
        Timestamp::from_millis(Timestamp::now().millis() - d.as_millis() as i64)
            .unwrap_or(Timestamp::now())
    };
    if let Some(d) = payloads {
        println!(
            "{} payloads dropped",
            db::inbox::prune_payloads(db.pool(), cutoff(d)).await?
        );
    }
    if let Some(d) = ids {
        println!(
            "{} event ids deleted",
            db::inbox::prune_ids(db.pool(), cutoff(d)).await?
        );
    }
    Ok(())
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
