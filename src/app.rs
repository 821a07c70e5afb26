//! Shared state and the router; building the router does no I/O.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::batcher::Batcher;
use crate::config::{Config, Secret};
use crate::db::{Backend, Db};
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
    pub batcher: Batcher,
}

impl AppState {
    /// State from settings, over an open database, on the system clock.
    pub fn new(config: &Config, db: Db) -> Self {
        Self::with_clock(config, db, Arc::new(SystemClock))
    }

    /// State with the given clock; starts the group-commit workers.
    pub fn with_clock(config: &Config, db: Db, clock: SharedClock) -> Self {
        let workers = match db.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => 2,
        };
        Self {
            batcher: Batcher::spawn(db.clone(), clock.clone(), workers),
            db,
            webhook_secrets: config
                .webhook_secret
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            tolerance_ms: i64::from(config.webhook_tolerance_secs) * 1000,
            clock,
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
