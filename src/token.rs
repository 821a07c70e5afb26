//! AuthKit access tokens: RS256 verification against WorkOS's key set (cached, refetched at most
//! once a minute for an unknown key id, served from cache while WorkOS is down) and the claims read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::Config;
use crate::timestamp::Timestamp;
use crate::workos::WorkosClient;

/// Clock difference accepted on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// An unknown key id refetches the key set at most this often.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// With no key set at all, a failed fetch is retried after this long.
const EMPTY_RETRY: Duration = Duration::from_secs(5);
/// A key set older than this is refreshed in the background (a key WorkOS dropped stops verifying).
const MAX_KEY_SET_AGE: Duration = Duration::from_secs(600);
/// Longest access token read: WorkOS's are under 2 KB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What rolesync reads from a verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`.
    pub user_id: String,
    /// `org_id`: absent when no organization was selected at sign-in.
    pub organization_id: Option<String>,
    /// The role claim (`ROLESYNC_TOKEN_ROLE_CLAIM`), when a string.
    pub role: Option<String>,
    /// The roles claim (`ROLESYNC_TOKEN_ROLES_CLAIM`) when present; a value that is not a list of
    /// strings reads as an empty set, which never agrees with a stored role.
    pub roles: Option<Vec<String>>,
    /// `iat`.
    pub issued_at: Timestamp,
    /// An `act` claim: someone is impersonating the user.
    pub impersonated: bool,
}

/// Why a token gave no claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token failed a check; `reason` is a stable word for answers and metrics.
    #[error("the access token is not valid ({reason}): {detail}")]
    Invalid {
        reason: &'static str,
        detail: String,
    },
    #[error("no WORKOS_CLIENT_ID is configured: sign-in with an access token is off")]
    NotConfigured,
    #[error("WorkOS's key set could not be fetched ({0}) and none is cached")]
    KeysUnavailable(String),
}

fn invalid(reason: &'static str, detail: impl Into<String>) -> TokenError {
    TokenError::Invalid {
        reason,
        detail: detail.into(),
    }
}

/// What the settings say about tokens.
#[derive(Debug, Clone)]
struct Settings {
    issuers: Vec<String>,
    role_claim: String,
    roles_claim: String,
}

/// Verifies access tokens; holds the cached key set.
pub struct TokenVerifier {
    settings: Option<Settings>,
    keys: Option<Arc<KeySet>>,
}

/// The cached key set of one client id, and how it is fetched.
struct KeySet {
    workos: WorkosClient,
    client_id: String,
    budget: Duration,
    cached: RwLock<Option<Cached>>,
    /// When fetches began; held while a fetch runs, so that one runs at a time.
    fetches: tokio::sync::Mutex<Fetches>,
    refreshing: AtomicBool,
}

/// When the last fetch of any kind began, and the last refetch of a set already cached.
#[derive(Default)]
struct Fetches {
    last: Option<Instant>,
    last_refetch: Option<Instant>,
}

fn within(at: Option<Instant>, interval: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() < interval)
}

struct Cached {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Instant,
}

impl TokenVerifier {
    /// From settings; off (every token answers [`TokenError::NotConfigured`]) without a client id.
    pub fn new(config: &Config, workos: WorkosClient) -> Self {
        let Some(client_id) = config.client_id.clone() else {
            return Self {
                settings: None,
                keys: None,
            };
        };
        let issuers = match &config.token_issuers {
            Some(list) => list.0.clone(),
            None => default_issuers(&client_id),
        };
        let settings = Settings {
            issuers,
            role_claim: config.token_role_claim.clone(),
            roles_claim: config.token_roles_claim.clone(),
        };
        let keys = KeySet {
            workos,
            client_id,
            budget: Duration::from_millis(config.login_budget_ms),
            cached: RwLock::new(None),
            fetches: tokio::sync::Mutex::new(Fetches::default()),
            refreshing: AtomicBool::new(false),
        };
        Self {
            settings: Some(settings),
            keys: Some(Arc::new(keys)),
        }
    }

    /// The claims of `token` if it is an RS256 token signed by a key of the set, within its
    /// validity at `now` (with [`LEEWAY_SECS`]) and from an accepted issuer. `aud` is not checked:
    /// WorkOS sets none.
    pub async fn verify(&self, token: &str, now: Timestamp) -> Result<Claims, TokenError> {
        let (Some(settings), Some(keys)) = (&self.settings, &self.keys) else {
            return Err(TokenError::NotConfigured);
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("malformed", "longer than 16 KiB"));
        }
        let kid = key_id(token)?;
        let key = keys.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        // Times are checked below against rolesync's clock; `aud` is not set by WorkOS.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(signature_error)?;
        claims(&data.claims, settings, now)
    }
}

/// The issuers WorkOS documents for a client id.
pub fn default_issuers(client_id: &str) -> Vec<String> {
    vec![
        "https://api.workos.com".to_owned(),
        format!("https://api.workos.com/user_management/{client_id}"),
    ]
}

/// The header's `kid`, once its `alg` is RS256: every other algorithm (`none`, HS256 keyed with the
/// public key, ...) is refused before any key is looked at.
fn key_id(token: &str) -> Result<String, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed", "not three dot-separated parts"));
    };
    let header: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| invalid("malformed", "the header is not base64url JSON"))?;
    match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => {}
        Some(other) => {
            let shown: String = other.chars().take(16).collect();
            return Err(invalid(
                "algorithm",
                format!("alg {shown:?}; only RS256 is accepted"),
            ));
        }
        None => return Err(invalid("algorithm", "no alg; only RS256 is accepted")),
    }
    header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| invalid("unknown_kid", "the header names no kid"))
}

fn signature_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => invalid("signature", "the signature does not verify"),
        ErrorKind::InvalidAlgorithm => invalid("algorithm", "only RS256 is accepted"),
        _ => invalid("malformed", "the token could not be decoded"),
    }
}

/// The checks on the verified payload, against `now`.
fn claims(
    map: &Map<String, Value>,
    settings: &Settings,
    now: Timestamp,
) -> Result<Claims, TokenError> {
    let now_secs = now.millis().div_euclid(1000);
    let exp = seconds(map, "exp")?.ok_or_else(|| invalid("missing_claim", "no exp"))?;
    if now_secs > exp.saturating_add(LEEWAY_SECS) {
        return Err(invalid("expired", "exp has passed"));
    }
    if let Some(nbf) = seconds(map, "nbf")? {
        if now_secs.saturating_add(LEEWAY_SECS) < nbf {
            return Err(invalid("not_yet_valid", "nbf is in the future"));
        }
    }
    let iss = map.get("iss").and_then(Value::as_str);
    if !iss.is_some_and(|iss| settings.issuers.iter().any(|accepted| accepted == iss)) {
        return Err(invalid(
            "issuer",
            "iss is not an accepted issuer (ROLESYNC_TOKEN_ISSUERS)",
        ));
    }
    let iat = seconds(map, "iat")?.ok_or_else(|| invalid("missing_claim", "no iat"))?;
    let issued_at = iat
        .checked_mul(1000)
        .and_then(Timestamp::from_millis)
        .ok_or_else(|| invalid("malformed", "iat is out of range"))?;
    let text = |name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
    let user_id = text("sub").ok_or_else(|| invalid("missing_claim", "no sub"))?;
    Ok(Claims {
        user_id,
        organization_id: text("org_id"),
        role: text(&settings.role_claim),
        roles: map.get(&settings.roles_claim).map(role_list),
        issued_at,
        impersonated: map.get("act").is_some_and(|act| !act.is_null()),
    })
}

/// A NumericDate claim in whole seconds; `None` when absent, an error when not a number.
fn seconds(map: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, TokenError> {
    match map.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .map(Some)
            .ok_or_else(|| invalid("malformed", format!("{name} is not a number"))),
    }
}

fn role_list(value: &Value) -> Vec<String> {
    let slugs: Option<Vec<String>> = value.as_array().and_then(|items| {
        items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    });
    slugs.unwrap_or_default()
}

impl KeySet {
    /// The key `kid` names, and whether the set is old enough to be refreshed.
    fn cached(&self, kid: &str) -> (Option<Arc<DecodingKey>>, bool) {
        let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            None => (None, false),
            Some(c) => (
                c.keys.get(kid).cloned(),
                c.fetched_at.elapsed() > MAX_KEY_SET_AGE,
            ),
        }
    }

    fn has_keys(&self) -> bool {
        self.cached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The key `kid` names, fetching the set when it is unknown (at most once per
    /// [`REFETCH_INTERVAL`]); a cached set keeps verifying while WorkOS is down.
    async fn key(self: &Arc<Self>, kid: &str) -> Result<Arc<DecodingKey>, TokenError> {
        if let (Some(key), old) = self.cached(kid) {
            if old {
                self.refresh_in_background();
            }
            return Ok(key);
        }
        let mut fetches = self.fetches.lock().await;
        // Another request may have fetched the set while this one waited.
        if let (Some(key), _) = self.cached(kid) {
            return Ok(key);
        }
        let had_keys = self.has_keys();
        let too_soon = match had_keys {
            true => within(fetches.last_refetch, REFETCH_INTERVAL),
            false => within(fetches.last, EMPTY_RETRY),
        };
        if too_soon {
            return Err(match had_keys {
                true => invalid("unknown_kid", "no key of the set has this kid"),
                false => TokenError::KeysUnavailable("the last fetch failed moments ago".into()),
            });
        }
        fetches.last = Some(Instant::now());
        if had_keys {
            fetches.last_refetch = fetches.last;
        }
        // The fetch runs as a task of its own: a client that hangs up does not cancel it halfway
        // (which would leave the set unfetched, yet the fetch counted as made).
        let set = self.clone();
        let fetched = tokio::spawn(async move { set.fetch().await })
            .await
            .unwrap_or_else(|e| Err(format!("the key set fetch stopped: {e}")));
        match fetched {
            Ok(()) => self
                .cached(kid)
                .0
                .ok_or_else(|| invalid("unknown_kid", "no key of the set has this kid")),
            Err(why) if had_keys => Err(invalid(
                "unknown_kid",
                format!("no cached key has this kid, and refetching the set failed ({why})"),
            )),
            Err(why) => Err(TokenError::KeysUnavailable(why)),
        }
    }

    /// Fetches the set and replaces the cached one; on failure the cached one stays.
    async fn fetch(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.budget;
        let body = self
            .workos
            .jwks(&self.client_id, deadline)
            .await
            .map_err(|e| e.reason())?;
        let keys = parse_key_set(&body)?;
        // A set with no usable key would refuse every token: the cached one stays.
        if keys.is_empty() {
            return Err("key_set_without_rs256_keys".into());
        }
        tracing::info!(keys = keys.len(), "fetched WorkOS's key set");
        *self.cached.write().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            keys,
            fetched_at: Instant::now(),
        });
        Ok(())
    }

    /// Refreshes an old set without holding up the request that noticed its age.
    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let set = self.clone();
        tokio::spawn(async move {
            let mut fetches = set.fetches.lock().await;
            if !within(fetches.last, REFETCH_INTERVAL) {
                fetches.last = Some(Instant::now());
                if let Err(why) = set.fetch().await {
                    tracing::warn!(error = %why, "refreshing WorkOS's key set failed; the cached one stays");
                }
            }
            set.refreshing.store(false, Ordering::Release);
        });
    }
}

/// The RSA signing keys of a JWKS document, by `kid`; keys for other uses or algorithms are skipped.
fn parse_key_set(body: &Value) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
    let listed = body
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("malformed_key_set")?;
    let field = |key: &Value, name: &str| key.get(name).and_then(Value::as_str).map(str::to_owned);
    let mut keys = HashMap::new();
    for key in listed {
        let usable = field(key, "kty").as_deref() == Some("RSA")
            && field(key, "use").is_none_or(|u| u == "sig")
            && field(key, "alg").is_none_or(|a| a == "RS256");
        let (Some(kid), Some(n), Some(e)) = (field(key, "kid"), field(key, "n"), field(key, "e"))
        else {
            continue;
        };
        if let (true, Ok(decoding)) = (usable, DecodingKey::from_rsa_components(&n, &e)) {
            keys.insert(kid, Arc::new(decoding));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            issuers: default_issuers("client_1"),
            role_claim: "role".into(),
            roles_claim: "roles".into(),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_millis(secs * 1000).unwrap()
    }

    fn payload(extra: Value) -> Map<String, Value> {
        let mut map = serde_json::json!({"iss": "https://api.workos.com", "sub": "user_1",
            "org_id": "org_1", "role": "admin", "iat": 1_000, "exp": 1_300})
        .as_object()
        .unwrap()
        .clone();
        map.extend(extra.as_object().unwrap().clone());
        map
    }

    #[test]
    fn times_are_checked_with_the_leeway() {
        let s = settings();
        assert!(claims(&payload(serde_json::json!({})), &s, at(1_300 + LEEWAY_SECS)).is_ok());
        let reason = |r: Result<Claims, TokenError>| match r {
            Err(TokenError::Invalid { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(claims(&payload(serde_json::json!({})), &s, at(1_331))),
            "expired"
        );
        let early = payload(serde_json::json!({"nbf": 1_100}));
        assert_eq!(reason(claims(&early, &s, at(1_069))), "not_yet_valid");
        assert!(claims(&early, &s, at(1_070)).is_ok());
        let no_exp = {
            let mut p = payload(serde_json::json!({}));
            p.remove("exp");
            p
        };
        assert_eq!(reason(claims(&no_exp, &s, at(1_000))), "missing_claim");
    }

    #[test]
    fn only_rs256_headers_name_a_key() {
        let token =
            |header: Value| format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(header.to_string()));
        assert_eq!(
            key_id(&token(serde_json::json!({"alg": "RS256", "kid": "k1"}))),
            Ok("k1".into())
        );
        for alg in ["none", "HS256", "RS512", "PS256", "ES256", "rs256"] {
            let refused = key_id(&token(serde_json::json!({"alg": alg, "kid": "k1"})));
            assert!(
                matches!(
                    refused,
                    Err(TokenError::Invalid {
                        reason: "algorithm",
                        ..
                    })
                ),
                "{alg}"
            );
        }
        assert!(matches!(
            key_id("a.b"),
            Err(TokenError::Invalid {
                reason: "malformed",
                ..
            })
        ));
    }

    #[test]
    fn a_roles_claim_that_is_not_a_list_of_strings_reads_as_empty() {
        assert_eq!(role_list(&serde_json::json!(["a", "b"])), ["a", "b"]);
        assert!(role_list(&serde_json::json!("admin")).is_empty());
        assert!(role_list(&serde_json::json!(["a", 1])).is_empty());
    }
}
