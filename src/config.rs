//! Settings: flags with environment fallbacks, validated at parse time, secrets redacted in `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::db::Backend;

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for signing and comparing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters".into());
        }
        Ok(Self(s.to_owned()))
    }
}

/// The webhook secrets: the first signs, all verify (rotation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSecrets(pub Vec<Secret>);

impl FromStr for WebhookSecrets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let secrets: Vec<Secret> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.parse::<Secret>().map_err(|why| format!("a secret {why}")))
            .collect::<Result<_, _>>()?;
        if secrets.is_empty() {
            return Err("expected one or more comma-separated secrets".into());
        }
        Ok(Self(secrets))
    }
}

/// The accepted issuers of access tokens: a comma-separated list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuers(pub Vec<String>);

impl FromStr for Issuers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let issuers: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| parse_word(p).map_err(|why| format!("an issuer {why}")))
            .collect::<Result<_, _>>()?;
        if issuers.is_empty() {
            return Err("expected one or more comma-separated issuers".into());
        }
        Ok(Self(issuers))
    }
}

/// A non-blank value without whitespace or control characters (an id, a claim name).
fn parse_word(text: &str) -> Result<String, String> {
    text.parse::<Secret>().map(|s| s.0)
}

/// A database URL with a supported scheme.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    /// The backend the URL names.
    pub fn backend(&self) -> Backend {
        Backend::of_url(&self.0).expect("validated at parse time")
    }
}

impl fmt::Debug for DatabaseUrl {
    /// Hides a password (`scheme://user:password@host`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            "not a URL (expected sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB)"
                .to_owned()
        })?;
        if Backend::of_url(s).is_none() {
            return Err(format!(
                "unknown scheme {scheme:?} (expected sqlite or postgres)"
            ));
        }
        if rest.is_empty() {
            return Err("the URL names no database".into());
        }
        if Backend::of_url(s) == Some(Backend::Postgres) {
            let before_query = rest.split('?').next().unwrap_or_default();
            let database = before_query.split_once('/').map_or("", |(_, db)| db);
            if database.is_empty() {
                return Err(
                    "the URL names no database (postgres://USER[:PASSWORD]@HOST[:PORT]/DB)".into(),
                );
            }
        }
        Ok(Self(s.to_owned()))
    }
}

/// `scheme://user:****@host/...?password=****` for logs and errors. Everything between the first
/// `:` and the last `@` before the query is hidden, so a password holding `@`, `/` or `#` (which
/// a URL should percent-encode, but an operator may not) is hidden whole; at worst more is hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let mut shown = match before_query.rsplit_once('@') {
        Some((auth, host)) if auth.contains(':') => {
            let user = auth.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:****@{host}")
        }
        _ => format!("{scheme}://{before_query}"),
    };
    if let Some(query) = query {
        shown.push('?');
        shown.push_str(&redact_query_passwords(query));
    }
    shown
}

/// `password=...` parameters of a URL's query (PostgreSQL accepts the password there too).
fn redact_query_passwords(query: &str) -> String {
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=****"),
            _ => param.to_owned(),
        })
        .collect();
    params.join("&")
}

/// An HTTP base URL (`http://` or `https://`), kept without a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl(pub String);

impl FromStr for BaseUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(format!("{s:?} is not an http(s) URL"));
        }
        Ok(Self(s.trim_end_matches('/').to_owned()))
    }
}

/// The longest duration a setting or flag takes: 100 years, so that `now` minus it is a time.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// A duration written as a number and a unit: `30d`, `12h`, `90m`, `45s`; at most 36500d. A bare
/// number is refused: `45` could mean seconds or days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shape = || format!("{text:?} is not a duration like 30d, 12h, 90m or 45s");
    let n: u64 = match number.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => u64::MAX,
        Err(_) => return Err(shape()),
    };
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        "" => return Err(format!("{text:?} has no unit (use d, h, m or s, e.g. 30d)")),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use d, h, m or s)"
            ))
        }
    };
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{text:?} is too long (at most 36500d)"))
}

/// A secret from the command line or the environment; blank is refused, surrounding spaces dropped.
fn parse_secret(text: &str) -> Result<Secret, String> {
    text.parse()
}

fn parse_lookback(text: &str) -> Result<Duration, String> {
    let lookback = parse_duration(text)?;
    match lookback <= Duration::from_secs(30 * 86_400) {
        true => Ok(lookback),
        false => Err("at most 30d: WorkOS keeps events for 30 days".into()),
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting of rolesync. Each flag falls back to the environment variable it names.
#[derive(Args, Clone, Debug)]
pub struct Config {
    /// Database: sqlite://PATH (created by serve and migrate) or postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = "sqlite://rolesync.db",
        hide_env_values = true,
        global = true
    )]
    pub database_url: DatabaseUrl,

    /// Address `serve` binds
    #[arg(
        long,
        env = "ROLESYNC_LISTEN",
        value_name = "ROLESYNC_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,

    /// Comma-separated webhook secrets; the first signs (replay), all verify
    #[arg(
        long,
        env = "WORKOS_WEBHOOK_SECRET",
        value_name = "WORKOS_WEBHOOK_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub webhook_secret: Option<WebhookSecrets>,

    /// Accepted clock difference of a webhook signature's timestamp, both directions
    #[arg(
        long,
        env = "ROLESYNC_WEBHOOK_TOLERANCE_SECS",
        value_name = "ROLESYNC_WEBHOOK_TOLERANCE_SECS",
        default_value_t = 180,
        global = true
    )]
    pub webhook_tolerance_secs: u32,

    /// WorkOS API key (sk_...)
    #[arg(
        long,
        env = "WORKOS_API_KEY",
        value_name = "WORKOS_API_KEY",
        hide_env_values = true,
        value_parser = parse_secret,
        global = true
    )]
    pub api_key: Option<Secret>,

    /// WorkOS API base URL (tests point it at a local fake)
    #[arg(
        long,
        env = "WORKOS_API_BASE_URL",
        value_name = "WORKOS_API_BASE_URL",
        default_value = "https://api.workos.com",
        global = true
    )]
    pub api_base_url: BaseUrl,

    /// Bearer token the web app presents to /v1/reconcile and /v1/memberships
    #[arg(
        long,
        env = "ROLESYNC_LOGIN_TOKEN",
        value_name = "ROLESYNC_LOGIN_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret,
        global = true
    )]
    pub login_token: Option<Secret>,

    /// WorkOS client id (client_...): sign-in with an AuthKit access token verifies it against this client's key set (off when unset)
    #[arg(
        long,
        env = "WORKOS_CLIENT_ID",
        value_name = "WORKOS_CLIENT_ID",
        value_parser = parse_word,
        global = true
    )]
    pub client_id: Option<String>,

    /// Comma-separated accepted `iss` of access tokens [default: https://api.workos.com and https://api.workos.com/user_management/<WORKOS_CLIENT_ID>]
    #[arg(
        long,
        env = "ROLESYNC_TOKEN_ISSUERS",
        value_name = "ROLESYNC_TOKEN_ISSUERS",
        global = true
    )]
    pub token_issuers: Option<Issuers>,

    /// The access token claim holding the role slug (JWT templates can rename it)
    #[arg(
        long,
        env = "ROLESYNC_TOKEN_ROLE_CLAIM",
        value_name = "ROLESYNC_TOKEN_ROLE_CLAIM",
        default_value = "role",
        value_parser = parse_word,
        global = true
    )]
    pub token_role_claim: String,

    /// The access token claim holding the list of role slugs
    #[arg(
        long,
        env = "ROLESYNC_TOKEN_ROLES_CLAIM",
        value_name = "ROLESYNC_TOKEN_ROLES_CLAIM",
        default_value = "roles",
        value_parser = parse_word,
        global = true
    )]
    pub token_roles_claim: String,

    /// Total time a login may spend on WorkOS (retries included) before answering from the database
    #[arg(
        long,
        env = "ROLESYNC_LOGIN_BUDGET_MS",
        value_name = "ROLESYNC_LOGIN_BUDGET_MS",
        default_value_t = 1500,
        value_parser = clap::value_parser!(u64).range(..=600_000),
        global = true
    )]
    pub login_budget_ms: u64,

    /// At most one WorkOS fetch per membership per this many seconds (0: no limit)
    #[arg(
        long,
        env = "ROLESYNC_LOGIN_REFRESH_SECS",
        value_name = "ROLESYNC_LOGIN_REFRESH_SECS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(..=86_400),
        global = true
    )]
    pub login_refresh_secs: u64,

    /// At most this many WorkOS fetches per second from this process (0: no limit)
    #[arg(
        long,
        env = "ROLESYNC_WORKOS_RPS",
        value_name = "ROLESYNC_WORKOS_RPS",
        default_value_t = 50,
        global = true
    )]
    pub workos_rps: u32,

    /// Log format: json (default when stderr is not a terminal) or pretty
    #[arg(
        long,
        env = "ROLESYNC_LOG_FORMAT",
        value_name = "ROLESYNC_LOG_FORMAT",
        global = true
    )]
    pub log_format: Option<LogFormat>,

    /// Requests per second allowed per client address before 429 (0: off, the default)
    #[arg(
        long,
        env = "ROLESYNC_RATE_LIMIT_PER_IP",
        value_name = "ROLESYNC_RATE_LIMIT_PER_IP",
        default_value_t = 0,
        global = true
    )]
    pub rate_limit_per_ip: u32,

    /// Burst allowed per client address above the steady rate
    #[arg(
        long,
        env = "ROLESYNC_RATE_LIMIT_BURST",
        value_name = "ROLESYNC_RATE_LIMIT_BURST",
        default_value_t = 50,
        global = true
    )]
    pub rate_limit_burst: u32,

    /// Comma-separated addresses of reverse proxies whose X-Forwarded-For is trusted
    #[arg(
        long,
        env = "ROLESYNC_TRUSTED_PROXY",
        value_name = "ROLESYNC_TRUSTED_PROXY",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxy: Vec<std::net::IpAddr>,

    /// Longest a request may take before it is answered 503
    #[arg(
        long,
        env = "ROLESYNC_REQUEST_TIMEOUT_SECS",
        value_name = "ROLESYNC_REQUEST_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(..=86_400),
        global = true
    )]
    pub request_timeout_secs: u64,

    /// Longest a connection may take to send a request's headers (from its opening, or from the first byte after an answer) before it is closed
    #[arg(
        long,
        env = "ROLESYNC_HEADER_TIMEOUT_SECS",
        value_name = "ROLESYNC_HEADER_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    pub header_timeout_secs: u64,

    /// Longest a keep-alive connection may stay idle between requests before it is closed
    #[arg(
        long,
        env = "ROLESYNC_IDLE_TIMEOUT_SECS",
        value_name = "ROLESYNC_IDLE_TIMEOUT_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400),
        global = true
    )]
    pub idle_timeout_secs: u64,

    /// Open connections served at once; beyond it new connections wait in the listen queue
    #[arg(
        long,
        env = "ROLESYNC_MAX_CONNECTIONS",
        value_name = "ROLESYNC_MAX_CONNECTIONS",
        default_value_t = 4096,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000),
        global = true
    )]
    pub max_connections: u32,

    /// Webhook deliveries that may wait for a commit, split between the committers' queues; a delivery whose queue is full is answered 503 `overloaded`
    #[arg(
        long,
        env = "ROLESYNC_MAX_QUEUED_DELIVERIES",
        value_name = "ROLESYNC_MAX_QUEUED_DELIVERIES",
        default_value_t = 2048,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub max_queued_deliveries: u32,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish
    #[arg(
        long,
        env = "ROLESYNC_SHUTDOWN_GRACE_SECS",
        value_name = "ROLESYNC_SHUTDOWN_GRACE_SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(..=86_400),
        global = true
    )]
    pub shutdown_grace_secs: u64,

    /// Seconds between Events API catch-up passes inside `serve` (0: off; off without WORKOS_API_KEY)
    #[arg(
        long,
        env = "ROLESYNC_SYNC_INTERVAL_SECS",
        value_name = "ROLESYNC_SYNC_INTERVAL_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(..=86_400),
        global = true
    )]
    pub sync_interval_secs: u64,

    /// How far back the first catch-up pass starts (e.g. 3d, 72h; at most 30d)
    #[arg(long, env = "ROLESYNC_SYNC_LOOKBACK", value_name = "ROLESYNC_SYNC_LOOKBACK", default_value = "3d", value_parser = parse_lookback, global = true)]
    pub sync_lookback: Duration,

    /// Seconds an Events API event must be old before the catch-up cursor moves past it (WorkOS may show new events late)
    #[arg(
        long,
        env = "ROLESYNC_SYNC_SETTLE_SECS",
        value_name = "ROLESYNC_SYNC_SETTLE_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(..=3600),
        global = true
    )]
    pub sync_settle_secs: u64,

    /// Seconds a refetch of one membership holds its queue row before another worker or replica may take it over (an organization's: ten times as long)
    #[arg(
        long,
        env = "ROLESYNC_REFETCH_LEASE_SECS",
        value_name = "ROLESYNC_REFETCH_LEASE_SECS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    pub refetch_lease_secs: u64,

    /// Database connections in the pool
    #[arg(
        long,
        env = "ROLESYNC_DB_MAX_CONNECTIONS",
        value_name = "ROLESYNC_DB_MAX_CONNECTIONS",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub db_max_connections: u32,
}

impl Config {
    /// Defaults for everything, with this database (for tests and embedding).
    pub fn with_database(url: &str) -> Result<Self, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        Wrapper::try_parse_from(["rolesync", "--database-url", url])
            .map(|w| w.config)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_with_whitespace_or_control_characters_are_refused() {
        for bad in ["sk_test\n_", "sk test", "tab\there", "\u{7}bell"] {
            assert!(bad.parse::<Secret>().is_err(), "{bad:?}");
            assert!(
                format!("whsec_ok,{bad}").parse::<WebhookSecrets>().is_err(),
                "{bad:?} among webhook secrets"
            );
        }
        assert_eq!(
            " whsec_a , whsec_b ,"
                .parse::<WebhookSecrets>()
                .unwrap()
                .0
                .len(),
            2,
            "spaces around commas and a trailing comma are fine"
        );
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let mut config = Config::with_database("postgres://app:hunter2@db/rolesync").unwrap();
        config.webhook_secret = Some("whsec_one,whsec_two".parse().unwrap());
        config.api_key = Some("sk_live_key".parse().unwrap());
        config.login_token = Some("login-token".parse().unwrap());
        let shown = format!("{config:?}");
        for secret in [
            "hunter2",
            "whsec_one",
            "whsec_two",
            "sk_live_key",
            "login-token",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked into {shown}");
        }
    }

    #[test]
    fn redacted_urls_hide_the_whole_password() {
        let cases = [
            (
                "postgres://app:hunter2@db/rolesync",
                "postgres://app:****@db/rolesync",
            ),
            (
                "postgres://app:p@ss@db:5432/x",
                "postgres://app:****@db:5432/x",
            ),
            ("postgres://app:pa/ss#w@db/x", "postgres://app:****@db/x"),
            (
                "postgres://app:pw@[::1]:5432/x",
                "postgres://app:****@[::1]:5432/x",
            ),
            (
                "sqlite:///tmp/a@b/rolesync.db",
                "sqlite:///tmp/a@b/rolesync.db",
            ),
            (
                "postgres://app:secret@db/x?sslmode=require&password=other",
                "postgres://app:****@db/x?sslmode=require&password=****",
            ),
            (
                "postgres://db/x?user=app&PASSWORD=s3cret",
                "postgres://db/x?user=app&PASSWORD=****",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            ("postgres://db/x?note=a@b:c", "postgres://db/x?note=a@b:c"),
            ("sqlite://rolesync.db", "sqlite://rolesync.db"),
            ("sqlite::memory:", "sqlite::memory:"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn database_urls_are_checked() {
        for ok in [
            "sqlite://rolesync.db",
            "postgres://u@h/db",
            "postgresql://u:p@h:5/d",
        ] {
            assert!(ok.parse::<DatabaseUrl>().is_ok(), "{ok} should parse");
        }
        for bad in [
            "rolesync.db",
            "mysql://h/db",
            "sqlite://",
            "http://x",
            "postgres://u@h:5432/",
            "postgres://u@h",
            "postgres://u@h/?sslmode=disable",
        ] {
            assert!(
                bad.parse::<DatabaseUrl>().is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn durations_read_days_hours_minutes_and_seconds() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        for bad in [
            "",
            "d",
            "3w",
            "-1d",
            "1.5h",
            "45",
            "0",
            "36501d",
            "800000d",
            "18446744073709551s",
            "99999999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_lookback("31d").is_err() && parse_lookback("30d").is_ok());
    }

    #[test]
    fn webhook_secrets_split_on_commas() {
        let s: WebhookSecrets = " a , b,,c ".parse().unwrap();
        let exposed: Vec<&str> = s.0.iter().map(Secret::expose).collect();
        assert_eq!(exposed, ["a", "b", "c"]);
        assert!(" , ".parse::<WebhookSecrets>().is_err());
    }
}
