//! What every request handler shares: the state behind an `Arc`, built from settings.

use std::sync::Arc;
use std::time::Duration;

use super::limiter::Inbound;
use crate::config::{Config, Secret};
use crate::db::{Backend, Db};
use crate::ingest::batcher::Batcher;
use crate::login::LoginService;
use crate::metrics::Metrics;
use crate::timestamp::{SharedClock, SystemClock};

/// What one connection may cost: how long it may take to send a request's headers, how long it may
/// sit idle between requests, and how many connections are served at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// From settings.
    pub fn new(config: &Config) -> Self {
        Self {
            header_timeout: Duration::from_secs(config.header_timeout_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            max_connections: config.max_connections as usize,
        }
    }
}

/// Everything a request handler needs, shared behind an `Arc`.
pub struct AppState {
    pub db: Db,
    pub webhook_secrets: Vec<Secret>,
    pub tolerance_ms: i64,
    pub clock: SharedClock,
    pub login: LoginService,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub inbound: Inbound,
    pub connections: ConnectionLimits,
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
        let metrics = Arc::new(Metrics::new());
        Self {
            batcher: Batcher::spawn(
                db.clone(),
                clock.clone(),
                workers,
                config.max_queued_deliveries as usize,
                metrics.clone(),
            ),
            login: LoginService::new(config, db.clone(), clock.clone(), metrics.clone()),
            inbound: Inbound::new(config),
            connections: ConnectionLimits::new(config),
            webhook_secrets: config
                .webhook_secret
                .clone()
                .map(|s| s.0)
                .unwrap_or_default(),
            tolerance_ms: i64::from(config.webhook_tolerance_secs) * 1000,
            db,
            clock,
            metrics,
        }
    }
}
