//! Every route and the operations endpoints; building the router does no I/O.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::error::AppError;
use super::state::AppState;
use super::{login, middleware, webhook};

/// Every route of rolesync. The routes that do work sit behind the request middleware.
pub fn build_router(state: Arc<AppState>) -> Router {
    let work = Router::new()
        .route("/webhooks/workos", post(webhook::receive))
        .route("/v1/reconcile", post(login::reconcile_login))
        .route(
            "/v1/memberships/{organization_id}/{user_id}",
            get(login::get_membership),
        )
        .fallback(not_found)
        // Set before the layers, so that a 405 passes them too (counted, with a request id).
        .method_not_allowed_fallback(method_not_allowed);
    let work = middleware::layered(work, state.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(work)
        .with_state(state)
}

/// Any path rolesync does not serve.
async fn not_found() -> AppError {
    AppError::NoSuchRoute
}

/// A served path asked with a method it does not take.
async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok"
}

/// The database answers and every migration is applied.
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    // The catch-up is reported beside readiness, not in it: a failing Events API is no reason
    // to stop sending this process webhooks.
    let catch_up = match app.metrics.catch_up_failing() {
        true => "failing",
        false => "ok",
    };
    match app.db.check_ready().await {
        Ok(()) => {
            let body = json!({"status": "ready", "catch_up": catch_up});
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            let body =
                json!({"status": "not_ready", "reason": e.to_string(), "catch_up": catch_up});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// The Prometheus exposition.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], app.metrics.render()).into_response()
}
