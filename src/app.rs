//! Shared state and the router; building the router does no I/O.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::config::{Config, Secret};
use crate::db::Db;
use crate::login::{self, LoginService};
use crate::timestamp::{SharedClock, SystemClock};
use crate::webhook;

/// Everything a request handler needs, shared behind an `Arc`.
pub struct AppState {
    pub db: Db,
    pub webhook_secrets: Vec<Secret>,
    pub tolerance_ms: i64,
    pub clock: SharedClock,
    pub login: LoginService,
}

impl AppState {
    /// State from settings, over an open database, on the system clock.
    pub fn new(config: &Config, db: Db) -> Self {
        Self {
            db,
            webhook_secrets: config
                .webhook_secret
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            tolerance_ms: i64::from(config.webhook_tolerance_secs) * 1000,
            clock: Arc::new(SystemClock),
            login: LoginService::new(config),
        }
    }
}

/// Every route of rolesync.
pub fn build_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/webhooks/workos", post(webhook::receive))
        .route("/v1/reconcile", post(login::reconcile_login))
        .route(
            "/v1/memberships/{organization_id}/{user_id}",
            get(login::get_membership),
        )
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}
