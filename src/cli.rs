//! The commands: serve, migrate, roles, audit, replay.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::parse_duration;
use crate::config::Config;
use crate::db::schema;
use crate::db::{self, Db, StoredFilter};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::output::emit;
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
        #[arg(long, value_parser = parse_id)]
        org: Option<String>,
        /// Only this user
        #[arg(long, value_parser = parse_id)]
        user: Option<String>,
        /// At most this many rows
        #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Fetch one membership from the WorkOS API and reconcile it now (source `cli`)
    Reconcile {
        /// WorkOS user id (user_...)
        #[arg(long, value_parser = parse_id)]
        user: String,
        /// WorkOS organization id (org_...)
        #[arg(long, value_parser = parse_id)]
        org: String,
    },
    /// Sign fixture or scenario files with the first webhook secret and POST them to a running rolesync
    Replay {
        /// Files or folders of WorkOS event bodies or scenario files
        #[arg(required_unless_present = "stored", conflicts_with = "stored")]
        paths: Vec<std::path::PathBuf>,
        /// Webhook endpoint to deliver to [default: /webhooks/workos at ROLESYNC_LISTEN]
        #[arg(long, value_parser = replay::parse_url, conflicts_with = "stored")]
        url: Option<String>,
        /// How long to wait for each answer (e.g. 10s, 2m)
        #[arg(long, default_value = "10s", value_parser = parse_timeout, conflicts_with = "stored")]
        timeout: Duration,
        /// Instead of files: re-run events stored in the inbox through the reconcile (source `replay`)
        #[arg(long)]
        stored: bool,
        /// With --stored: only events received at or after this ISO-8601 time
        #[arg(long, requires = "stored", value_parser = parse_time)]
        since: Option<Timestamp>,
        /// With --stored: only this event
        #[arg(long, requires = "stored", value_parser = parse_id)]
        event_id: Option<String>,
        /// With --stored: only events whose stored outcome is this
        #[arg(long, requires = "stored", value_parser = STORED_OUTCOMES)]
        outcome: Option<String>,
    },
    /// One catch-up pass over the WorkOS Events API, then exit
    Sync,
    /// Reconcile every membership of an organization against the WorkOS API (source `resync`)
    Resync {
        /// WorkOS organization id (org_...)
        #[arg(long, value_parser = parse_id)]
        org: String,
        /// Print the differences and write nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop stored webhook payloads (and optionally event ids) older than a duration; audit rows are never pruned
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true)))]
    Prune {
        /// Drop payloads of deliveries received longer ago than this (e.g. 30d)
        #[arg(long, value_parser = parse_duration, group = "what")]
        payloads_older_than: Option<Duration>,
        /// Also delete event ids received longer ago than this; at least 3d, so that a late retry is still a duplicate
        #[arg(long, value_parser = parse_retention, group = "what")]
        ids_older_than: Option<Duration>,
    },
}

/// The outcomes an inbox row can hold.
const STORED_OUTCOMES: [&str; 7] = [
    "applied",
    "unchanged",
    "stale",
    "unknown_role",
    "removed",
    "ignored",
    "invalid",
];

/// The longest id rolesync stores (the webhook caps event ids at the same length).
const MAX_ID_CHARS: usize = crate::domain::MAX_ID_LEN;

fn parse_time(text: &str) -> Result<Timestamp, String> {
    Timestamp::parse(text).map_err(|e| e.to_string())
}

/// A WorkOS id (`org_...`, `user_...`, `event_...`): not empty, no whitespace or control
/// characters, at most 255 characters.
fn parse_id(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an id holds no spaces or control characters".into());
    }
    if text.chars().count() > MAX_ID_CHARS {
        return Err(format!("longer than {MAX_ID_CHARS} characters"));
    }
    Ok(text.to_owned())
}

/// A role slug as WorkOS can name one: its documentation allows lowercase letters, digits, `-` and
/// `_` (organization roles start with `org-`), at most 48 characters. Accepted here: 1 to 255
/// printable ASCII characters other than a comma (255, like every id rolesync stores, so that any
/// slug a webhook can carry can be added); refused: blanks, whitespace, commas, control and
/// non-ASCII characters.
pub fn parse_slug(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a role slug must not be empty".into());
    }
    if let Some(c) = text.chars().find(|c| !c.is_ascii_graphic() || *c == ',') {
        let what = match c {
            ',' => "a comma".to_owned(),
            c if c.is_whitespace() => "whitespace".to_owned(),
            c if c.is_control() => "a control character".to_owned(),
            c => format!("{c:?} (a slug is ASCII letters, digits, '-' and '_')"),
        };
        return Err(format!("a role slug must not contain {what}"));
    }
    if text.len() > MAX_ID_CHARS {
        return Err(format!("a role slug is at most {MAX_ID_CHARS} characters"));
    }
    Ok(text.to_owned())
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be at least 1s".into()),
        d => Ok(d),
    }
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
    /// Add role slugs; nothing is added when any slug is refused
    Add {
        /// Role slugs as WorkOS names them (e.g. admin, org-billing-admin)
        #[arg(required = true, value_parser = parse_slug)]
        slugs: Vec<String>,
    },
    /// Remove role slugs (stored memberships keep their role); nothing is removed when any slug is refused
    Remove {
        /// Role slugs as WorkOS names them (e.g. admin, org-billing-admin)
        #[arg(required = true, value_parser = parse_slug)]
        slugs: Vec<String>,
    },
}

/// The settings a command uses besides the log format; `None`: all of them (`serve`). The others
/// stay accepted but are left out of the command's `--help`.
fn settings_used(command: &str) -> Option<Vec<&'static str>> {
    let workos = ["api_key", "api_base_url"];
    let mut used = vec!["log_format", "database_url", "db_max_connections"];
    match command {
        "migrate" | "roles" | "audit" | "prune" => {}
        "reconcile" => used.extend(workos.iter().chain(&["login_budget_ms"])),
        "sync" => used.extend(workos.iter().chain(&["sync_lookback", "sync_settle_secs"])),
        "resync" => used.extend(workos),
        "replay" => used.extend(["webhook_secret", "listen"]),
        _ => return None,
    }
    Some(used)
}

/// The command line: [`Cli`] with each subcommand's `--help` limited to the settings it uses.
pub fn command() -> clap::Command {
    let cli = negative_numbers_as_values(Cli::command());
    let globals: Vec<clap::Arg> = cli
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    let names: Vec<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    names.iter().fold(cli, |cli, name| {
        let Some(used) = settings_used(name) else {
            return cli;
        };
        // A subcommand that has an argument of a global's id does not get the global copied in.
        let unused = globals
            .iter()
            .filter(|a| !used.contains(&a.get_id().as_str()));
        cli.mut_subcommand(name, |sub| {
            unused.fold(sub, |sub, a| sub.arg(a.clone().hide(true)))
        })
    })
}

/// Parses a command line through [`command`].
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = command();
    let matches = command.try_get_matches_from_mut(args)?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
}

/// The arguments that take a duration.
const DURATIONS: [&str; 4] = [
    "payloads_older_than",
    "ids_older_than",
    "sync_lookback",
    "timeout",
];

/// Lets every argument take a negative number as its value, so that `--limit -1` is refused by
/// the argument's own range check, naming it, rather than read as an unknown flag `-1`.
fn negative_numbers_as_values(command: clap::Command) -> clap::Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let command = command.mut_args(|a| match a.get_action().takes_values() {
        // A duration's own parser refuses "-1d" (or a flag taken for the value), naming it.
        true if DURATIONS.contains(&a.get_id().as_str()) => a.allow_hyphen_values(true),
        true => a.allow_negative_numbers(true),
        false => a,
    });
    names.iter().fold(command, |command, name| {
        command.mut_subcommand(name, negative_numbers_as_values)
    })
}

/// The longest usage error line printed.
const MAX_USAGE_LINE: usize = 300;

/// A usage error on one line: the first line of clap's message, with the offending value shown
/// escaped and cut (a slug with a newline or of 100 KB stays one readable line).
pub fn usage_line(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut text = error.render().to_string();
    if let Some(ContextValue::String(value)) = error.get(ContextKind::InvalidValue) {
        let shown: String = value.escape_debug().collect();
        let shown: String = match shown.chars().count() > 80 {
            true => shown.chars().take(79).chain(['…']).collect(),
            false => shown,
        };
        text = text.replacen(&format!("'{value}'"), &format!("'{shown}'"), 1);
    }
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_owned();
    // "the following required arguments were not provided:" names them on the next line.
    if let Some(next) = lines.next().filter(|_| line.ends_with(':')) {
        line = format!("{line} {next}");
    }
    // "[possible values: a, b]" stands on a later line of clap's text.
    if let Some(values) = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("[possible values:"))
    {
        line = format!("{line} {values}");
    }
    match line.chars().count() > MAX_USAGE_LINE {
        true => line.chars().take(MAX_USAGE_LINE - 1).chain(['…']).collect(),
        false => line,
    }
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
            replay_stored(&open_migrated(&config).await?, &filter).await?
        }
        Command::Replay {
            paths,
            url,
            timeout,
            ..
        } => {
            let url = url.unwrap_or_else(|| replay::url_for(config.listen));
            return replay::run(&config, &paths, &url, timeout).await;
        }
        Command::Sync => sync_once(&config).await?,
        Command::Resync { org, dry_run } => resync(&config, &org, dry_run).await?,
        Command::Prune {
            payloads_older_than,
            ids_older_than,
        } => prune(&config, payloads_older_than, ids_older_than).await?,
        Command::Serve => serve(config).await?,
        Command::Migrate => migrate(&config).await?,
        Command::Roles { action } => roles(&open_migrated(&config).await?, action).await?,
        Command::Reconcile { user, org } => return reconcile_now(config, &user, &org).await,
        Command::Audit { org, user, limit } => {
            let db = open_migrated(&config).await?;
            let rows = db.audit(org.as_deref(), user.as_deref(), limit).await?;
            emit(&audit_table(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects (a SQLite file is created if missing); errors name `DATABASE_URL`.
async fn connect(config: &Config) -> Result<Db> {
    let url = &config.database_url;
    if let Some(path) = schema::sqlite_path(&url.0).context("DATABASE_URL")? {
        schema::check_sqlite_file(&path).map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
    }
    Db::connect(&url.0, config.db_max_connections)
        .await
        .with_context(|| format!("DATABASE_URL: cannot connect to {url}"))
}

/// Connects and applies pending migrations (`serve`, `migrate`); returns how many were applied.
pub async fn open_db(config: &Config) -> Result<(Db, usize)> {
    let db = connect(config).await?;
    let url = &config.database_url;
    let applied = db
        .apply_migrations()
        .await
        .with_context(|| format!("DATABASE_URL: cannot migrate {url}"))?;
    Ok((db, applied))
}

/// Connects to a database that `rolesync migrate` has brought up to date, changing nothing: a
/// missing SQLite file or a database with pending migrations is refused.
pub async fn open_migrated(config: &Config) -> Result<Db> {
    let url = &config.database_url;
    let path = schema::sqlite_path(&url.0).context("DATABASE_URL")?;
    if let Some(path) = path.as_ref().filter(|p| !p.exists()) {
        bail!(
            "DATABASE_URL: {} does not exist; run `rolesync migrate` to create it",
            path.display()
        );
    }
    // An empty file is a database with nothing applied; opening it would write SQLite's header.
    if let Some(path) = path
        .as_ref()
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && m.len() == 0))
    {
        bail!(
            "DATABASE_URL: {} is empty, with none of this build's migrations applied; run `rolesync migrate`",
            path.display()
        );
    }
    let db = connect(config).await?;
    let state = db
        .migration_state()
        .await
        .with_context(|| format!("DATABASE_URL: cannot read the migrations of {url}"))?;
    if !state.is_current() {
        db.close().await;
        bail!(
            "DATABASE_URL: {url} has {} of {} migrations applied; run `rolesync migrate`",
            state.applied,
            state.known
        );
    }
    Ok(db)
}

async fn migrate(config: &Config) -> Result<()> {
    let (db, applied) = open_db(config).await?;
    db.close().await;
    match applied {
        0 => emit(&format!("{}: up to date\n", config.database_url)),
        n => emit(&format!(
            "{}: {n} migrations applied\n",
            config.database_url
        )),
    }
}

async fn serve(config: Config) -> Result<()> {
    if config.webhook_secret.is_none() {
        return Err(crate::output::MissingSetting(
            "WORKOS_WEBHOOK_SECRET: not set; serve needs it to verify webhook deliveries".into(),
        )
        .into());
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
    let (db, _) = open_db(&config).await?;
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
    let refetches = Some(tokio::spawn(
        refetcher(&config, &state).run_forever(REFETCH_POLL),
    ));
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    server::serve(listener, state, server::shutdown_signal(), grace).await?;
    for task in [catch_up, refetches].into_iter().flatten() {
        task.abort();
    }
    db.close().await;
    tracing::info!("rolesync stopped");
    Ok(())
}

async fn reconcile_now(config: Config, user: &str, org: &str) -> Result<ExitCode> {
    if config.api_key.is_none() {
        return Err(crate::output::MissingSetting(
            "WORKOS_API_KEY: not set; reconcile fetches the membership from WorkOS".into(),
        )
        .into());
    }
    let db = open_migrated(&config).await?;
    let metrics = Arc::new(Metrics::new());
    let service = login::LoginService::new(&config, db, Arc::new(SystemClock), metrics);
    let answer = login::refresh(&service, user, org, Source::Cli).await;
    let answer = answer?;
    emit(&(serde_json::to_string_pretty(&answer)? + "\n"))?;
    Ok(match answer.workos_error {
        Some(_) => ExitCode::FAILURE,
        None => ExitCode::SUCCESS,
    })
}

fn workos_client(config: &Config, metrics: Arc<Metrics>) -> Result<WorkosClient> {
    if config.api_key.is_none() {
        return Err(crate::output::MissingSetting(
            "WORKOS_API_KEY: not set; this command reads the WorkOS API".into(),
        )
        .into());
    }
    Ok(WorkosClient::new(
        &config.api_base_url.0,
        config.api_key.clone(),
        metrics,
    ))
}

/// How often the refetch worker looks for due rows.
const REFETCH_POLL: Duration = Duration::from_secs(1);

/// The refetch queue's worker of `serve` (without an API key it only measures the queue).
fn refetcher(config: &Config, state: &AppState) -> crate::refetch::Refetcher {
    if config.api_key.is_none() {
        tracing::warn!(
            "WORKOS_API_KEY is not set: group, role and directory events are queued for a refetch that will not run"
        );
    }
    crate::refetch::Refetcher {
        db: state.db.clone(),
        workos: state.login.workos.clone(),
        clock: state.clock.clone(),
        metrics: state.metrics.clone(),
        budget: state.login.workos_budget(),
        lease: Duration::from_secs(config.refetch_lease_secs),
    }
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
        settle: Duration::from_secs(config.sync_settle_secs),
    };
    Some((syncer, interval))
}

async fn sync_once(config: &Config) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let workos = workos_client(config, metrics.clone())?;
    let syncer = Syncer {
        db: open_migrated(config).await?,
        workos,
        clock: Arc::new(SystemClock),
        metrics,
        lookback: config.sync_lookback,
        settle: Duration::from_secs(config.sync_settle_secs),
    };
    let report = syncer.run_once().await?;
    let outcomes: Vec<String> = report
        .outcomes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    match report.skipped {
        true => emit("another process is syncing; nothing done\n"),
        false => emit(&format!(
            "{} pages, {} events: {}\n",
            report.pages,
            report.events,
            outcomes.join(" ")
        )),
    }
}

async fn resync(config: &Config, org: &str, dry_run: bool) -> Result<()> {
    let workos = workos_client(config, Arc::new(Metrics::new()))?;
    let db = open_migrated(config).await?;
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
    emit(&table::render(
        &[
            "USER",
            "STORED ROLE / STATUS",
            "WORKOS ROLE / STATUS",
            "OUTCOME",
        ],
        &rows,
    ))?;
    let verb = if dry_run {
        "would change (dry run, nothing written)"
    } else {
        "reconciled"
    };
    emit(&format!(
        "{} memberships in WorkOS or stored; {} {verb}\n",
        changes.len(),
        rows.len()
    ))
}

async fn replay_stored(db: &Db, filter: &StoredFilter) -> Result<()> {
    let done = replay::replay_stored(db, filter, Timestamp::now()).await?;
    let rows: Vec<Vec<String>> = done
        .iter()
        .map(|r| vec![r.event_id.clone(), r.before.clone(), r.after.clone()])
        .collect();
    emit(&table::render(&["EVENT", "BEFORE", "AFTER"], &rows))?;
    let pruned = db.pruned_events(filter).await?;
    let skipped = match pruned {
        0 => String::new(),
        1 => "; 1 matching event skipped: its payload was pruned".to_owned(),
        n => format!("; {n} matching events skipped: their payloads were pruned"),
    };
    emit(&format!(
        "{} stored events re-applied{skipped}\n",
        rows.len()
    ))
}

async fn prune(config: &Config, payloads: Option<Duration>, ids: Option<Duration>) -> Result<()> {
    let db = open_migrated(config).await?;
    if let Some(d) = payloads {
        let dropped = db.prune_payloads(cutoff(d)?).await?;
        emit(&format!("{dropped} payloads dropped\n"))?;
    }
    if let Some(d) = ids {
        let deleted = db.prune_ids(cutoff(d)?).await?;
        emit(&format!("{deleted} event ids deleted\n"))?;
    }
    Ok(())
}

/// Now minus `age`; durations are capped at parse time, so that this is a time after year 0.
fn cutoff(age: Duration) -> Result<Timestamp> {
    i64::try_from(age.as_millis())
        .ok()
        .and_then(|ms| Timestamp::now().millis().checked_sub(ms))
        .and_then(Timestamp::from_millis)
        .with_context(|| format!("{age:?} ago is before year 0"))
}

async fn roles(db: &Db, action: RolesAction) -> Result<()> {
    match action {
        RolesAction::List => {
            let slugs = db.roles().await?;
            emit(&slugs.iter().map(|s| format!("{s}\n")).collect::<String>())?;
        }
        RolesAction::Add { slugs } => {
            for slug in slugs {
                let added = db.add_role(&slug, Timestamp::now()).await?;
                let done = if added { "added" } else { "already known" };
                emit(&format!("{slug}: {done}\n"))?;
            }
        }
        RolesAction::Remove { slugs } => {
            for slug in slugs {
                let removed = db.remove_role(&slug).await?;
                let done = if removed { "removed" } else { "not known" };
                emit(&format!("{slug}: {done}\n"))?;
            }
        }
    }
    Ok(())
}

/// A role-set change as `[admin, member] -> [member]`; `-` for a set not recorded (a row written
/// before role sets were, or no membership stored).
fn roles_change(old: &db::RoleSet, new: &db::RoleSet) -> String {
    let show = |set: &db::RoleSet| match &set.0 {
        Some(slugs) => format!("[{}]", slugs.join(", ")),
        None => "-".into(),
    };
    format!("{} -> {}", show(old), show(new))
}

/// The audit rows as an aligned table.
pub fn audit_table(rows: &[db::AuditRow]) -> String {
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
                roles_change(&r.old_roles, &r.new_roles),
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
        "ROLES",
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
        super::command().debug_assert();
    }

    #[test]
    fn replay_outcome_takes_every_outcome_an_inbox_row_can_hold() {
        use crate::reconcile::Outcome;
        let outcomes = [
            Outcome::Applied,
            Outcome::Unchanged,
            Outcome::Stale,
            Outcome::UnknownRole,
            Outcome::Removed,
        ];
        let stored = outcomes.map(Outcome::as_str).into_iter().chain([
            crate::domain::Applied::Ignored.as_str(),
            crate::domain::Applied::Invalid.as_str(),
            // (not refetch_queued: replay re-runs membership events, and such an event queued its
            // refetch when it was stored)
        ]);
        for outcome in stored {
            assert!(super::STORED_OUTCOMES.contains(&outcome), "{outcome}");
        }
    }
}
