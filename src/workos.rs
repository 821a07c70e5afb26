//! The WorkOS API client: one shared reqwest client, a deadline per call, retries with backoff and
//! jitter on 429/5xx/transport errors honouring `Retry-After`, and lenient response types.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::time::Instant;

use std::sync::Arc;

use crate::config::Secret;
use crate::domain::{reported_roles, Observation, Source};
use crate::metrics::Metrics;
use crate::timestamp::Timestamp;

/// Statuses to ask for: without them WorkOS lists only active memberships.
pub const ALL_STATUSES: &str = "active,inactive,pending";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Longest one request is retried, whatever its deadline: a long listing (`resync`, up to 600 s)
/// gives up on a page that keeps failing instead of retrying it until the whole deadline passes.
const RETRY_WINDOW: Duration = Duration::from_secs(30);
const MAX_PAGES: usize = 50;
/// Largest answer read: a page of 100 memberships is about 100 KiB, a key set a few KiB. A larger
/// one is refused unread (it is no WorkOS answer, and would be held in memory whole).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Why a WorkOS call gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkosError {
    #[error("no WORKOS_API_KEY configured")]
    NotConfigured,
    #[error("WorkOS did not answer within the budget")]
    Timeout,
    #[error("WorkOS rejected the API key (HTTP {0})")]
    Unauthorized(u16),
    #[error("WorkOS rate limited the request")]
    RateLimited,
    #[error("WorkOS answered HTTP {0}")]
    Status(u16),
    #[error("could not reach WorkOS: {0}")]
    Transport(String),
    #[error("WorkOS answered with an unreadable body: {0}")]
    Malformed(String),
    #[error("this WorkOS environment does not know organization {0:?}; check that WORKOS_API_KEY belongs to the environment that holds it")]
    UnknownOrganization(String),
}

impl WorkosError {
    /// A short machine-readable reason for answers and metrics.
    pub fn reason(&self) -> String {
        match self {
            Self::NotConfigured => "not_configured".into(),
            Self::Timeout => "timeout".into(),
            Self::UnknownOrganization(_) => "unknown_organization".into(),
            Self::Unauthorized(_) => "unauthorized".into(),
            Self::RateLimited => "rate_limited".into(),
            Self::Status(code) => format!("http_{code}"),
            Self::Transport(_) => "unreachable".into(),
            Self::Malformed(_) => "malformed_response".into(),
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, Self::RateLimited | Self::Transport(_) | Self::Timeout)
            || matches!(self, Self::Status(code) if *code >= 500)
    }
}

/// A membership as the API lists it; unknown fields are ignored, most fields optional.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiMembership {
    pub id: String,
    pub user_id: String,
    pub organization_id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub role: Option<ApiRole>,
    /// Every role of the membership (multiple roles); absent or null when WorkOS sends none.
    #[serde(default)]
    pub roles: Option<Vec<ApiRole>>,
    pub updated_at: String,
    /// Only `true` marks the membership directory-managed; any other value is no reason to
    /// refuse the answer.
    #[serde(default)]
    pub directory_managed: Option<serde_json::Value>,
}

/// `{"slug": ...}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiRole {
    pub slug: Option<String>,
}

/// A list envelope: `data` and the cursor of the next page.
#[derive(Debug, Deserialize)]
pub struct ApiList<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub list_metadata: Option<ListMetadata>,
}

/// Pagination cursors.
#[derive(Debug, Default, Deserialize)]
pub struct ListMetadata {
    #[serde(default)]
    pub after: Option<String>,
}

impl ApiMembership {
    /// The observation this membership makes, for a path, checked against `now`
    /// ([`Observation::check`]).
    pub fn observation(&self, source: Source, now: Timestamp) -> Result<Observation, WorkosError> {
        let version = Timestamp::parse(&self.updated_at)
            .map_err(|e| WorkosError::Malformed(e.to_string()))?;
        let roles = self
            .roles
            .as_ref()
            .map(|roles| roles.iter().map(|r| r.slug.clone()).collect());
        let primary = self.role.as_ref().and_then(|r| r.slug.as_deref());
        let (role_slugs, roles_reported) = reported_roles(primary, roles)
            .map_err(|why| WorkosError::Malformed(format!("membership {}: {why}", self.id)))?;
        let observation = Observation {
            organization_id: self.organization_id.clone(),
            user_id: self.user_id.clone(),
            membership_id: self.id.clone(),
            role_slug: self.role.as_ref().and_then(|r| r.slug.clone()),
            role_slugs,
            roles_reported,
            status: self.status.clone().unwrap_or_else(|| "unknown".into()),
            deleted: false,
            inferred: false,
            directory_managed: self.directory_managed == Some(serde_json::Value::Bool(true)),
            version,
            source,
            event_id: None,
        };
        observation
            .check(now)
            .map_err(|why| WorkosError::Malformed(format!("membership {}: {why}", self.id)))?;
        Ok(observation)
    }
}

/// The shared WorkOS client.
#[derive(Clone)]
pub struct WorkosClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<Secret>,
    metrics: Arc<Metrics>,
}

impl WorkosClient {
    /// A client for `base_url` (no trailing slash).
    pub fn new(base_url: &str, api_key: Option<Secret>, metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("rolesync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            base_url: base_url.to_owned(),
            api_key,
            metrics,
        }
    }

    /// Whether an API key is configured.
    pub fn is_configured(&self) -> bool {
        self.api_key.is_some()
    }

    /// The membership of a user in an organization, any status, following pages; `None` when WorkOS has none.
    pub async fn find_membership(
        &self,
        user_id: &str,
        organization_id: &str,
        deadline: Instant,
    ) -> Result<Option<ApiMembership>, WorkosError> {
        let wanted =
            |m: &ApiMembership| m.user_id == user_id && m.organization_id == organization_id;
        let filters = [
            ("user_id", user_id.to_owned()),
            ("organization_id", organization_id.to_owned()),
        ];
        let listed = self
            .list_memberships(&filters, deadline, MAX_PAGES, |page| {
                page.iter().any(wanted)
            })
            .await?;
        Ok(listed.into_iter().find(wanted))
    }

    /// One membership by id (`GET /user_management/organization_memberships/{id}`); `None` on 404.
    pub async fn get_membership(
        &self,
        membership_id: &str,
        deadline: Instant,
    ) -> Result<Option<ApiMembership>, WorkosError> {
        let path = format!(
            "/user_management/organization_memberships/{}",
            path_segment(membership_id)
        );
        match self.get_json::<ApiMembership>(&path, &[], deadline).await {
            Ok(membership) => Ok(Some(membership)),
            Err(WorkosError::Status(404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether this environment knows the organization (`GET /organizations/{id}`: 404 is no).
    pub async fn organization_exists(
        &self,
        organization_id: &str,
        deadline: Instant,
    ) -> Result<bool, WorkosError> {
        let path = format!("/organizations/{}", path_segment(organization_id));
        match self
            .get_json::<serde_json::Value>(&path, &[], deadline)
            .await
        {
            Ok(_) => Ok(true),
            Err(WorkosError::Status(404)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Memberships matching `filters`, all statuses, page after page until `enough` is satisfied by a
    /// page or the last page; more than `max_pages` pages is an error.
    pub async fn list_memberships(
        &self,
        filters: &[(&str, String)],
        deadline: Instant,
        max_pages: usize,
        mut enough: impl FnMut(&[ApiMembership]) -> bool,
    ) -> Result<Vec<ApiMembership>, WorkosError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..max_pages {
            let mut query = filters.to_vec();
            query.extend([
                ("statuses", ALL_STATUSES.to_owned()),
                ("limit", "100".to_owned()),
            ]);
            query.extend(after.take().map(|a| ("after", a)));
            let page: ApiList<ApiMembership> = self
                .get_json(
                    "/user_management/organization_memberships",
                    &query,
                    deadline,
                )
                .await?;
            let done = enough(&page.data);
            all.extend(page.data);
            match page.list_metadata.and_then(|m| m.after) {
                Some(cursor) if !done => after = Some(cursor),
                _ => return Ok(all),
            }
        }
        Err(WorkosError::Malformed(format!(
            "more than {max_pages} pages"
        )))
    }

    /// GETs `path` with `query` and decodes JSON, retrying transient failures until `deadline`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        deadline: Instant,
    ) -> Result<T, WorkosError> {
        let key = self.api_key.as_ref().ok_or(WorkosError::NotConfigured)?;
        self.fetch_json(path, query, Some(key), deadline).await
    }

    /// The public key set that signs the AuthKit access tokens of `client_id`. It is public: no API
    /// key is sent, as the SDKs send none, so it works without `WORKOS_API_KEY`.
    pub async fn jwks(
        &self,
        client_id: &str,
        deadline: Instant,
    ) -> Result<serde_json::Value, WorkosError> {
        let path = format!("/sso/jwks/{}", path_segment(client_id));
        self.fetch_json(&path, &[], None, deadline).await
    }

    /// [`Self::get_json`] with an optional key.
    async fn fetch_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        key: Option<&Secret>,
        deadline: Instant,
    ) -> Result<T, WorkosError> {
        let url = format!("{}{path}", self.base_url);
        let give_up = deadline.min(Instant::now() + RETRY_WINDOW);
        let mut attempt: u32 = 0;
        loop {
            let result = self.attempt(&url, query, key, deadline).await;
            let (error, retry_after) = match result {
                Ok(body) => {
                    return serde_json::from_slice(&body)
                        .map_err(|e| WorkosError::Malformed(e.to_string()))
                }
                Err(failure) => failure,
            };
            if !error.retryable() {
                return Err(error);
            }
            let wait = retry_wait(retry_after, attempt);
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|ready| ready >= give_up)
            {
                return Err(error);
            }
            tracing::info!(error = %error, attempt, wait_ms = wait.as_millis() as u64, "retrying WorkOS request");
            self.metrics.workos_retries.inc();
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One request; on failure, the error and any `Retry-After` wait.
    async fn attempt(
        &self,
        url: &str,
        query: &[(&str, String)],
        key: Option<&Secret>,
        deadline: Instant,
    ) -> Result<Vec<u8>, (WorkosError, Option<Duration>)> {
        let mut request = self.http.get(url).query(query);
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, format!("Bearer {}", key.expose()));
        }
        let request = request.send();
        let response = tokio::time::timeout_at(deadline, async {
            let mut response = request.await?;
            let status = response.status();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Ok((status, headers, None));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, headers, Some(body)))
        })
        .await;
        let (status, headers, body) = match response {
            Err(_) => {
                self.metrics.workos_call("timeout");
                return Err((WorkosError::Timeout, None));
            }
            Ok(Err(e)) => {
                self.metrics.workos_call("transport");
                return Err((WorkosError::Transport(e.without_url().to_string()), None));
            }
            Ok(Ok(parts)) => parts,
        };
        self.metrics
            .workos_call(&format!("{}xx", status.as_u16() / 100));
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::debug!(
            status = status.as_u16(),
            workos_request_id = request_id,
            "WorkOS answered"
        );
        classify(status, &headers, request_id)?;
        body.ok_or_else(|| {
            let why = format!("an answer larger than {} MiB", MAX_ANSWER_BYTES >> 20);
            (WorkosError::Malformed(why), None)
        })
    }
}

/// `text` as one URL path segment: every byte but the unreserved ones percent-encoded.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    request_id: &str,
) -> Result<(), (WorkosError, Option<Duration>)> {
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    let error = match code {
        401 | 403 => {
            tracing::error!(
                status = code,
                workos_request_id = request_id,
                "WorkOS refused the API key: check WORKOS_API_KEY"
            );
            WorkosError::Unauthorized(code)
        }
        429 => WorkosError::RateLimited,
        _ => WorkosError::Status(code),
    };
    if code == 429 || code >= 500 {
        tracing::warn!(
            status = code,
            workos_request_id = request_id,
            "WorkOS request failed"
        );
    }
    Err((error, retry_after(headers)))
}

/// `Retry-After` as a wait: delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The wait before the next attempt: the backoff, or `Retry-After` when that asks for longer. A
/// `Retry-After` of 0 or of a date already past is no reason to ask again at once.
fn retry_wait(retry_after: Option<Duration>, attempt: u32) -> Duration {
    let backoff = backoff(attempt);
    retry_after.map_or(backoff, |after| after.max(backoff))
}

/// Exponential backoff with full jitter: a random wait up to `base * 2^attempt`, capped.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_CAP);
    ceiling
        .mul_f64(fastrand::f64())
        .max(Duration::from_millis(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(28) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        for attempt in 0..40 {
            let wait = backoff(attempt);
            assert!(wait <= BACKOFF_CAP, "attempt {attempt}: {wait:?}");
        }
        assert!(backoff(0) <= BACKOFF_BASE.max(Duration::from_millis(5)));
    }

    #[test]
    fn only_transient_errors_are_retried() {
        assert!(WorkosError::RateLimited.retryable() && WorkosError::Status(503).retryable());
        assert!(
            !WorkosError::Unauthorized(401).retryable() && !WorkosError::Status(404).retryable()
        );
        assert!(!WorkosError::Malformed("x".into()).retryable());
    }
}
