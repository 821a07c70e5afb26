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
use crate::metrics::LoginLabels;

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
    let (user_id, organization_id) = parse_request(body)?;
    let span = tracing::Span::current();
    span.record("user_id", user_id.as_str());
    span.record("organization_id", organization_id.as_str());
    let answer = login::login(&app.login, &user_id, &organization_id).await?;
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

fn parse_request(body: &[u8]) -> Result<(String, String), AppError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| AppError::InvalidRequest("body must be a JSON object".into()))?;
    let field = |name: &str| {
        let text = value
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| AppError::InvalidRequest(format!("`{name}` must be a string")))?;
        check_id(text)
            .map(|()| text.to_owned())
            .map_err(|why| AppError::InvalidRequest(format!("`{name}` {why}")))
    };
    Ok((field("user_id")?, field("organization_id")?))
}
