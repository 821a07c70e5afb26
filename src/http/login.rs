//! `POST /v1/reconcile` (a login heals its membership) and `GET /v1/memberships/{org}/{user}` (the
//! stored row), both behind the login token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde_json::Value;

use super::error::AppError;
use super::state::AppState;
use crate::domain::{check_id, Membership, Outcome};
use crate::login::{self, LoginAnswer, LoginService};
use crate::metrics::{LoginLabels, ReasonLabel};
use crate::token::{Claims, TokenError};

/// The bearer token check of both routes.
fn authorize(login: &LoginService, headers: &HeaderMap) -> Result<(), AppError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    match login.token_matches(presented) {
        None => Err(AppError::LoginDisabled),
        Some(true) => Ok(()),
        Some(false) => Err(AppError::Unauthorized),
    }
}

/// The credentials of `Bearer <token>`; the scheme is case-insensitive (RFC 9110, section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// `POST /v1/reconcile`.
pub async fn reconcile_login(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LoginAnswer>, AppError> {
    let result = handle(&app, &headers, &body).await;
    let (outcome, source) = match &result {
        Ok(a) => (a.outcome.map_or("none", Outcome::as_str), a.source),
        Err(e) => (e.status_and_code().1, "none"),
    };
    let labels = LoginLabels {
        outcome: outcome.to_owned(),
        source: source.to_owned(),
    };
    app.metrics.login_answers.get_or_create(&labels).inc();
    tracing::Span::current().record("outcome", outcome);
    result
}

async fn handle(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Json<LoginAnswer>, AppError> {
    authorize(&app.login, headers)?;
    let answer = match parse_request(body)? {
        LoginRequest::Ids {
            user_id,
            organization_id,
        } => {
            record_ids(&user_id, &organization_id);
            login::login(&app.login, &user_id, &organization_id).await?
        }
        LoginRequest::Token {
            access_token,
            user_id,
            organization_id,
        } => token_sign_in(app, &access_token, user_id, organization_id).await?,
    };
    tracing::info!(
        user_id = %answer.user_id,
        organization_id = %answer.organization_id,
        outcome = answer.outcome.map(Outcome::as_str).unwrap_or("-"),
        source = answer.source,
        workos_error = answer.workos_error.as_deref().unwrap_or("-"),
        "login reconciled"
    );
    Ok(Json(answer))
}

fn record_ids(user_id: &str, organization_id: &str) {
    let span = tracing::Span::current();
    span.record("user_id", user_id);
    span.record("organization_id", organization_id);
}

/// A sign-in with an access token: verified, matched with the body's ids, then decided.
async fn token_sign_in(
    app: &AppState,
    access_token: &str,
    user_id: Option<String>,
    organization_id: Option<String>,
) -> Result<LoginAnswer, AppError> {
    let claims = verify(app, access_token).await?;
    let org_id = organization_of(&claims, user_id, organization_id)?;
    record_ids(&claims.user_id, &org_id);
    Ok(login::token_login(&app.login, &claims, &org_id).await?)
}

/// The token's claims; a refused token is counted by reason.
async fn verify(app: &AppState, access_token: &str) -> Result<Claims, AppError> {
    let verified = app.login.tokens.verify(access_token, app.clock.now()).await;
    if let Err(TokenError::Invalid { reason, .. }) = &verified {
        let label = ReasonLabel {
            reason: (*reason).to_owned(),
        };
        app.metrics.token_rejections.get_or_create(&label).inc();
    }
    Ok(verified?)
}

/// The token's `org_id`, once the token names an organization and the body's ids (when given)
/// are the token's.
fn organization_of(
    claims: &Claims,
    user_id: Option<String>,
    organization_id: Option<String>,
) -> Result<String, AppError> {
    let invalid = |text: String| AppError::InvalidRequest(text);
    let org_id = claims.organization_id.clone().ok_or_else(|| {
        invalid(
            "the access token names no organization (`org_id`): none was selected at sign-in"
                .into(),
        )
    })?;
    check_id(&claims.user_id).map_err(|why| invalid(format!("the access token's `sub` {why}")))?;
    check_id(&org_id).map_err(|why| invalid(format!("the access token's `org_id` {why}")))?;
    if user_id.is_some_and(|u| u != claims.user_id) {
        return Err(invalid(
            "`user_id` does not match the access token's `sub`".into(),
        ));
    }
    if organization_id.is_some_and(|o| o != org_id) {
        return Err(invalid(
            "`organization_id` does not match the access token's `org_id`".into(),
        ));
    }
    Ok(org_id)
}

/// `GET /v1/memberships/{organization_id}/{user_id}`.
pub async fn get_membership(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Membership>, AppError> {
    authorize(&app.login, &headers)?;
    // A segment that is not UTF-8 names no membership rolesync could hold.
    let Ok(Path((organization_id, user_id))) = path else {
        return Err(AppError::NotFound);
    };
    // An id rolesync could never have stored (a NUL, which PostgreSQL refuses in text) is absent.
    if check_id(&organization_id).is_err() || check_id(&user_id).is_err() {
        return Err(AppError::NotFound);
    }
    app.db
        .membership(&organization_id, &user_id)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound)
}

/// What `POST /v1/reconcile` asks.
enum LoginRequest {
    /// `{"user_id", "organization_id"}`: today's login.
    Ids {
        user_id: String,
        organization_id: String,
    },
    /// `{"access_token", "user_id"?, "organization_id"?}`: a sign-in with an AuthKit access token.
    Token {
        access_token: String,
        user_id: Option<String>,
        organization_id: Option<String>,
    },
}

fn parse_request(body: &[u8]) -> Result<LoginRequest, AppError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| AppError::InvalidRequest("body must be a JSON object".into()))?;
    let field = |name: &str| -> Result<Option<String>, AppError> {
        let Some(raw) = value.get(name).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let text = raw
            .as_str()
            .ok_or_else(|| AppError::InvalidRequest(format!("`{name}` must be a string")))?;
        check_id(text)
            .map(|()| Some(text.to_owned()))
            .map_err(|why| AppError::InvalidRequest(format!("`{name}` {why}")))
    };
    let required = |name: &str| {
        field(name)?.ok_or_else(|| AppError::InvalidRequest(format!("`{name}` must be a string")))
    };
    match value.get("access_token").filter(|v| !v.is_null()) {
        None => Ok(LoginRequest::Ids {
            user_id: required("user_id")?,
            organization_id: required("organization_id")?,
        }),
        Some(token) => Ok(LoginRequest::Token {
            access_token: token
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    AppError::InvalidRequest("`access_token` must be a non-empty string".into())
                })?
                .to_owned(),
            user_id: field("user_id")?,
            organization_id: field("organization_id")?,
        }),
    }
}
