//! The login path: heals one membership from the WorkOS API through the reconcile, never failing a
//! login because of WorkOS; concurrent logins of a membership share one fetch.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::{Config, Secret};
use crate::db::{self, Db};
use crate::domain::{role_set, Membership, Observation, Outcome, Source, ACTIVE};
use crate::metrics::Metrics;
use crate::reconcile::{inferred_deletion, reconcile_and_read};
use crate::timestamp::{SharedClock, Timestamp};
use crate::token::{Claims, TokenVerifier};
use crate::workos::{WorkosClient, WorkosError};

type Key = (String, String);
/// One fetch, shared by every login of the membership that arrives while it runs.
type Flight = Arc<OnceCell<(Result<LoginAnswer, LoginError>, Fetched)>>;

/// What a fetch gave, for the logins that joined it.
#[derive(Debug, Clone)]
enum Fetched {
    /// WorkOS answered with this observation.
    Observed(Observation),
    /// No answer from WorkOS (not asked, or it failed), for the reason given.
    Unfetched(Option<String>),
}

/// The answer to a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoginAnswer {
    pub user_id: String,
    pub organization_id: String,
    pub role: Option<String>,
    /// Every role the membership holds (`membership_roles`), sorted; `role` is the primary one.
    pub roles: Vec<String>,
    pub status: Option<String>,
    /// The reconcile outcome; null when the answer comes from the database.
    pub outcome: Option<Outcome>,
    /// `workos` (fetched now), `database` (the stored row) or `token` (the stored row, which the
    /// access token's claims agree with).
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workos_error: Option<String>,
}

/// Why a login got no answer at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Neither WorkOS nor a stored row: the reason WorkOS gave none.
    #[error("WorkOS gave no answer ({0}) and no membership is stored")]
    WorkosUnavailable(String),
    #[error("the database is unavailable: {0}")]
    StorageUnavailable(String),
    /// An impersonation token for a membership rolesync has not stored.
    #[error("no membership is stored, and an impersonation token fetches none")]
    NotStored,
}

/// The login machinery: WorkOS client, budget, limiters and in-flight fetches.
pub struct LoginService {
    pub workos: WorkosClient,
    /// Verifies the access tokens of token sign-ins.
    pub tokens: TokenVerifier,
    db: Db,
    clock: SharedClock,
    token: Option<Secret>,
    budget: Duration,
    per_membership: Option<DefaultKeyedRateLimiter<Key>>,
    global: Option<Arc<DefaultDirectRateLimiter>>,
    inflight: Mutex<HashMap<Key, Flight>>,
    logins: AtomicU64,
    configuration_error_logged: AtomicBool,
    metrics: Arc<Metrics>,
}

impl LoginService {
    /// From settings.
    pub fn new(config: &Config, db: Db, clock: SharedClock, metrics: Arc<Metrics>) -> Self {
        let per_membership = Duration::from_secs(config.login_refresh_secs)
            .gt(&Duration::ZERO)
            .then(|| Quota::with_period(Duration::from_secs(config.login_refresh_secs)))
            .flatten()
            .map(RateLimiter::keyed);
        let global = NonZeroU32::new(config.workos_rps)
            .map(|rps| Arc::new(RateLimiter::direct(Quota::per_second(rps))));
        let workos = WorkosClient::new(
            &config.api_base_url.0,
            config.api_key.clone(),
            metrics.clone(),
        );
        Self {
            tokens: TokenVerifier::new(config, workos.clone()),
            workos,
            db,
            clock,
            token: config.login_token.clone(),
            budget: Duration::from_millis(config.login_budget_ms),
            per_membership,
            global,
            inflight: Mutex::new(HashMap::new()),
            logins: AtomicU64::new(0),
            configuration_error_logged: AtomicBool::new(false),
            metrics,
        }
    }

    /// The process's budget of WorkOS calls (`ROLESYNC_WORKOS_RPS`), which the refetch queue's
    /// worker shares; `None` when unlimited.
    pub fn workos_budget(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.global.clone()
    }

    /// Whether the login endpoints are enabled (a token is configured).
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `presented` is the configured token, compared in constant time; `None` when no
    /// token is configured (the login endpoints are off).
    pub fn token_matches(&self, presented: &str) -> Option<bool> {
        let expected = self.token.as_ref()?;
        Some(bool::from(
            presented.as_bytes().ct_eq(expected.expose().as_bytes()),
        ))
    }

    /// Logs why WorkOS gave a login no answer. A configuration error (a key of another
    /// environment) is logged as an error once per process, then as the warning every failure gets.
    fn report(&self, error: &WorkosError, user_id: &str, organization_id: &str) {
        let configuration = matches!(error, WorkosError::UnknownOrganization(_));
        if configuration
            && !self
                .configuration_error_logged
                .swap(true, Ordering::Relaxed)
        {
            tracing::error!(user_id, organization_id, error = %error, "WorkOS configuration error; answering logins from the database");
        } else {
            tracing::warn!(user_id, organization_id, error = %error, "WorkOS gave no answer; using the stored row");
        }
    }

    /// Whether this login may call WorkOS now; `Err` carries the reason to answer from the database.
    fn admit(&self, key: &Key) -> Result<(), Option<String>> {
        if self.logins.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            if let Some(limiter) = &self.per_membership {
                limiter.retain_recent();
            }
        }
        if self
            .per_membership
            .as_ref()
            .is_some_and(|l| l.check_key(key).is_err())
        {
            self.metrics.limited("per_membership");
            return Err(None);
        }
        if self.global.as_ref().is_some_and(|l| l.check().is_err()) {
            self.metrics.limited("global");
            tracing::warn!("ROLESYNC_WORKOS_RPS reached; answering logins from the database");
            return Err(Some("rate_limited_locally".into()));
        }
        Ok(())
    }
}

/// One login: joins a fetch already in flight for the membership, or starts one.
pub async fn login(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
) -> Result<LoginAnswer, LoginError> {
    let key: Key = (organization_id.to_owned(), user_id.to_owned());
    let flight = inflight(&svc.inflight)
        .entry(key.clone())
        .or_default()
        .clone();
    let mut led = false;
    let (answer, fetched) = flight
        .get_or_init(|| async {
            led = true;
            match svc.admit(&key) {
                Ok(()) => fetch_and_apply(svc, user_id, organization_id, Source::Login).await,
                Err(reason) => unfetched(svc, user_id, organization_id, reason).await,
            }
        })
        .await
        .clone();
    {
        let mut flights = inflight(&svc.inflight);
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
    }
    match led {
        true => answer,
        false => joined(svc, user_id, organization_id, fetched).await,
    }
}

/// What a verified token's claims lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenDecision {
    /// The claims agree with the stored row: answer it, no fetch, no write.
    Agrees,
    /// The stored row was written after the token was minted (or the token is an impersonation):
    /// answer it, no fetch.
    Stored,
    /// The claims disagree, or nothing is stored: today's login path.
    Fetch,
}

/// A sign-in with a verified access token for `organization_id` (its `org_id`). The claims only
/// decide whether to fetch: every write comes from the API's versioned answer.
pub async fn token_login(
    svc: &LoginService,
    claims: &Claims,
    organization_id: &str,
) -> Result<LoginAnswer, LoginError> {
    let user_id = claims.user_id.as_str();
    let stored = svc
        .db
        .membership(organization_id, user_id)
        .await
        .map_err(|e| LoginError::StorageUnavailable(e.to_string()))?;
    let row = stored.as_ref();
    match decide_token(claims, row) {
        TokenDecision::Agrees => Ok(answer_of(user_id, organization_id, row, "token")),
        TokenDecision::Stored if row.is_some() => {
            Ok(answer_of(user_id, organization_id, row, "database"))
        }
        TokenDecision::Stored => Err(LoginError::NotStored),
        TokenDecision::Fetch => login(svc, user_id, organization_id).await,
    }
}

fn decide_token(claims: &Claims, stored: Option<&Membership>) -> TokenDecision {
    // An impersonation token never leads to a write, not even through a fetch.
    if claims.impersonated {
        return TokenDecision::Stored;
    }
    let Some(stored) = stored else {
        return TokenDecision::Fetch;
    };
    if claims_agree(claims, stored) {
        return TokenDecision::Agrees;
    }
    // `iat` has whole seconds: only a version a full second after it is surely newer.
    if claims.issued_at.millis().saturating_add(1000) <= stored.version.millis() {
        return TokenDecision::Stored;
    }
    TokenDecision::Fetch
}

/// Whether the token says what WorkOS last said of the stored membership: it is active, and the
/// token's role and role set (where the token carries one) are the ones WorkOS last reported
/// (`workos_role_slug`, `workos_role_slugs`; an unknown slug among them was refused then and would
/// be refused again). Then a fetch could only repeat what is stored.
fn claims_agree(claims: &Claims, stored: &Membership) -> bool {
    let Some(role) = stored.workos_role_slug.as_deref() else {
        return false;
    };
    let same_set = claims.roles.as_ref().is_none_or(|roles| {
        !roles.is_empty() && role_set(Some(role), roles.iter().cloned()) == stored.workos_role_slugs
    });
    stored.status == ACTIVE && claims.role.as_deref() == Some(role) && same_set
}

/// The in-flight map. A panic while it was held leaves it poisoned but whole (each change is one
/// map operation), so it is used as it is rather than failing every later login.
fn inflight(map: &Mutex<HashMap<Key, Flight>>) -> std::sync::MutexGuard<'_, HashMap<Key, Flight>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A login that joined another's fetch: the same observation, against a row read after it joined.
/// The fetch's own answer rests on a row read when that fetch began, which a webhook may have
/// replaced before this login arrived.
async fn joined(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
    fetched: Fetched,
) -> Result<LoginAnswer, LoginError> {
    match fetched {
        Fetched::Observed(obs) => {
            let stored = svc
                .db
                .membership_with_role(organization_id, user_id)
                .await
                .ok()
                .flatten();
            apply(svc, &obs, stored.as_ref()).await
        }
        Fetched::Unfetched(reason) => from_database(svc, user_id, organization_id, reason).await,
    }
}

/// Fetches the membership within the budget and reconciles it; on a WorkOS failure answers from the
/// database without writing. The stored row is read while WorkOS answers, so a login that changes
/// nothing needs no database work after the fetch.
pub async fn refresh(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
    source: Source,
) -> Result<LoginAnswer, LoginError> {
    fetch_and_apply(svc, user_id, organization_id, source)
        .await
        .0
}

/// [`refresh`], and what the fetch gave.
async fn fetch_and_apply(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
    source: Source,
) -> (Result<LoginAnswer, LoginError>, Fetched) {
    let deadline = Instant::now() + svc.budget;
    let (fetched, stored) = tokio::join!(
        find(&svc.workos, user_id, organization_id, deadline),
        svc.db.membership_with_role(organization_id, user_id),
    );
    // A failed read only costs the shortcut: the write path reads again.
    let stored = stored.ok().flatten();
    let observation = fetched.and_then(|found| {
        observe(
            user_id,
            organization_id,
            found,
            stored.as_ref().map(|(m, _)| m),
            source,
            svc.clock.now(),
        )
    });
    match observation {
        Ok(obs) => (
            apply(svc, &obs, stored.as_ref()).await,
            Fetched::Observed(obs),
        ),
        Err(e) => {
            svc.report(&e, user_id, organization_id);
            unfetched(svc, user_id, organization_id, Some(e.reason())).await
        }
    }
}

/// The membership WorkOS holds; when it lists none, whether the organization exists at all in this
/// environment (an API key of another environment lists nothing and answers 200).
async fn find(
    workos: &WorkosClient,
    user_id: &str,
    organization_id: &str,
    deadline: Instant,
) -> Result<Option<crate::workos::ApiMembership>, WorkosError> {
    let found = workos
        .find_membership(user_id, organization_id, deadline)
        .await?;
    if found.is_none()
        && !workos
            .organization_exists(organization_id, deadline)
            .await?
    {
        return Err(WorkosError::UnknownOrganization(organization_id.to_owned()));
    }
    Ok(found)
}

/// The observation a fetch makes: the membership found, or a deletion inferred from its absence.
fn observe(
    user_id: &str,
    organization_id: &str,
    found: Option<crate::workos::ApiMembership>,
    stored: Option<&Membership>,
    source: Source,
    now: Timestamp,
) -> Result<Observation, WorkosError> {
    match found {
        Some(m) => m.observation(source, now),
        None => Ok(inferred_deletion(organization_id, user_id, stored, source)),
    }
}

/// The answer from the database when WorkOS gave none, with the reason for the logins that joined.
async fn unfetched(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
    reason: Option<String>,
) -> (Result<LoginAnswer, LoginError>, Fetched) {
    let answer = from_database(svc, user_id, organization_id, reason.clone()).await;
    (answer, Fetched::Unfetched(reason))
}

async fn apply(
    svc: &LoginService,
    obs: &Observation,
    stored: Option<&(Membership, HashSet<String>)>,
) -> Result<LoginAnswer, LoginError> {
    let storage = |e: db::DbError| LoginError::StorageUnavailable(e.to_string());
    let (outcome, row) = reconcile_and_read(&svc.db, obs, svc.clock.now(), stored)
        .await
        .map_err(storage)?;
    let mut answer = answer_of(&obs.user_id, &obs.organization_id, row.as_ref(), "workos");
    answer.outcome = Some(outcome);
    Ok(answer)
}

async fn from_database(
    svc: &LoginService,
    user_id: &str,
    organization_id: &str,
    workos_error: Option<String>,
) -> Result<LoginAnswer, LoginError> {
    let row = svc
        .db
        .membership(organization_id, user_id)
        .await
        .map_err(|e| LoginError::StorageUnavailable(e.to_string()))?;
    match row {
        Some(row) => Ok(LoginAnswer {
            workos_error,
            ..answer_of(user_id, organization_id, Some(&row), "database")
        }),
        None => Err(LoginError::WorkosUnavailable(
            workos_error.unwrap_or_else(|| "refresh_limited".into()),
        )),
    }
}

fn answer_of(
    user_id: &str,
    organization_id: &str,
    row: Option<&Membership>,
    source: &'static str,
) -> LoginAnswer {
    LoginAnswer {
        user_id: user_id.to_owned(),
        organization_id: organization_id.to_owned(),
        role: row.and_then(|r| r.role_slug.clone()),
        roles: row.map(|r| r.role_slugs.clone()).unwrap_or_default(),
        status: row.map(|r| r.status.clone()),
        outcome: None,
        source,
        workos_error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(role: Option<&str>, status: &str, version_secs: i64) -> Membership {
        let at = Timestamp::from_millis(version_secs * 1000).unwrap();
        Membership {
            organization_id: "org_1".into(),
            user_id: "user_1".into(),
            membership_id: "om_1".into(),
            role_slug: role.map(str::to_owned),
            workos_role_slug: role.map(str::to_owned),
            role_slugs: role.map(str::to_owned).into_iter().collect(),
            workos_role_slugs: role.map(str::to_owned).into_iter().collect(),
            status: status.into(),
            version: at,
            updated_at: at,
        }
    }

    fn claims(role: &str, roles: Option<&[&str]>, iat_secs: i64) -> Claims {
        Claims {
            user_id: "user_1".into(),
            organization_id: Some("org_1".into()),
            role: Some(role.into()),
            roles: roles.map(|r| r.iter().map(|s| s.to_string()).collect()),
            issued_at: Timestamp::from_millis(iat_secs * 1000).unwrap(),
            impersonated: false,
        }
    }

    #[test]
    fn a_token_agrees_only_with_an_active_row_of_the_same_role_and_role_set() {
        use TokenDecision::*;
        let admin = stored(Some("admin"), "active", 100);
        let cases: [(&str, Claims, Option<Membership>, TokenDecision); 9] = [
            (
                "same role",
                claims("admin", None, 200),
                Some(admin.clone()),
                Agrees,
            ),
            (
                "same role and set",
                claims("admin", Some(&["admin"]), 200),
                Some(admin.clone()),
                Agrees,
            ),
            (
                "a set with another role",
                claims("admin", Some(&["admin", "creator"]), 200),
                Some(admin.clone()),
                Fetch,
            ),
            (
                "an unreadable set",
                claims("admin", Some(&[]), 200),
                Some(admin.clone()),
                Fetch,
            ),
            (
                "another role",
                claims("member", None, 200),
                Some(admin.clone()),
                Fetch,
            ),
            (
                "inactive",
                claims("admin", None, 200),
                Some(stored(Some("admin"), "inactive", 100)),
                Fetch,
            ),
            (
                "no stored role",
                claims("admin", None, 200),
                Some(stored(None, "active", 100)),
                Fetch,
            ),
            ("nothing stored", claims("admin", None, 200), None, Fetch),
            (
                "minted a second before the stored version",
                claims("member", None, 99),
                Some(admin.clone()),
                Stored,
            ),
        ];
        for (what, claims, row, expected) in cases {
            assert_eq!(decide_token(&claims, row.as_ref()), expected, "{what}");
        }
        let same_second = claims("member", None, 100);
        assert_eq!(
            decide_token(&same_second, Some(&admin)),
            Fetch,
            "iat has whole seconds"
        );
        let mut impersonated = claims("admin", None, 200);
        impersonated.impersonated = true;
        assert_eq!(
            decide_token(&impersonated, Some(&admin)),
            Stored,
            "impersonation"
        );
        assert_eq!(decide_token(&impersonated, None), Stored, "impersonation");
    }

    #[test]
    fn a_poisoned_in_flight_map_is_used_as_it_is() {
        let map: Mutex<HashMap<Key, Flight>> = Mutex::new(HashMap::new());
        let poisoned = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _held = map.lock().unwrap();
                    panic!("a panic while the map is held");
                })
                .join()
        });
        assert!(poisoned.is_err() && map.is_poisoned());
        let key: Key = ("org_1".into(), "user_1".into());
        inflight(&map).entry(key.clone()).or_default();
        assert!(inflight(&map).contains_key(&key), "logins go on");
    }
}
