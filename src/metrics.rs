//! Prometheus metrics: one registry per process state (no globals), rendered at `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// `{position}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PositionLabel {
    pub position: String,
}

/// `{outcome, source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    pub outcome: String,
    pub source: String,
}

/// `{status_class}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabel {
    pub status_class: String,
}

/// `{limiter}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabel {
    pub limiter: String,
}

/// `{route, method, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

/// `{path, outcome}` for the healing paths that are not requests (events, resync, replay).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathOutcomeLabels {
    pub path: String,
    pub outcome: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric rolesync exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    pub signature_failures: Family<ReasonLabel, Counter>,
    pub signature_secret: Family<PositionLabel, Counter>,
    pub login_answers: Family<LoginLabels, Counter>,
    pub token_rejections: Family<ReasonLabel, Counter>,
    pub workos_requests: Family<StatusClassLabel, Counter>,
    pub workos_retries: Counter,
    pub limiter_rejections: Family<LimiterLabel, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub reconcile_duration: Histogram,
    pub batch_size: Histogram,
    pub healed: Family<PathOutcomeLabels, Counter>,
    pub sync_cursor_lag_seconds: Gauge,
    pub sync_failed_passes: Counter,
    pub sync_cursor_resets: Counter,
    /// Catch-up passes that failed in a row (0 after one that did not).
    pub sync_consecutive_failures: Gauge,
    pub refetch_queue_depth: Gauge,
    pub refetch_queue_oldest_seconds: Gauge,
    pub refetch_attempts: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            webhook_deliveries: Family::default(),
            signature_failures: Family::default(),
            signature_secret: Family::default(),
            login_answers: Family::default(),
            token_rejections: Family::default(),
            workos_requests: Family::default(),
            workos_retries: Counter::default(),
            limiter_rejections: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            reconcile_duration: latency_histogram(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            healed: Family::default(),
            sync_cursor_lag_seconds: Gauge::default(),
            sync_failed_passes: Counter::default(),
            sync_cursor_resets: Counter::default(),
            sync_consecutive_failures: Gauge::default(),
            refetch_queue_depth: Gauge::default(),
            refetch_queue_oldest_seconds: Gauge::default(),
            refetch_attempts: Family::default(),
        };
        m.register();
        m
    }

    fn register(&self) {
        let mut r = self.registry.lock().expect("registry lock");
        r.register(
            "rolesync_webhook_deliveries",
            "Webhook deliveries by outcome or error code",
            self.webhook_deliveries.clone(),
        );
        r.register(
            "rolesync_signature_failures",
            "Refused webhook signatures by reason",
            self.signature_failures.clone(),
        );
        r.register(
            "rolesync_signature_secret",
            "Verified webhooks by position of the matching secret",
            self.signature_secret.clone(),
        );
        r.register(
            "rolesync_login_answers",
            "Login answers by outcome and source",
            self.login_answers.clone(),
        );
        r.register(
            "rolesync_token_rejections",
            "Access tokens of sign-ins refused (401 invalid_token), by reason",
            self.token_rejections.clone(),
        );
        r.register(
            "rolesync_workos_requests",
            "WorkOS API calls by status class",
            self.workos_requests.clone(),
        );
        r.register(
            "rolesync_workos_retries",
            "WorkOS API calls retried",
            self.workos_retries.clone(),
        );
        r.register(
            "rolesync_limiter_rejections",
            "Requests or fetches refused by a limiter",
            self.limiter_rejections.clone(),
        );
        r.register(
            "rolesync_http_request_duration_seconds",
            "Request latency by route",
            self.request_duration.clone(),
        );
        r.register(
            "rolesync_reconcile_duration_seconds",
            "Time to commit one reconcile batch",
            self.reconcile_duration.clone(),
        );
        r.register(
            "rolesync_batch_size",
            "Deliveries committed per transaction",
            self.batch_size.clone(),
        );
        r.register(
            "rolesync_healed",
            "Observations applied by the catch-up paths, by path and outcome",
            self.healed.clone(),
        );
        r.register(
            "rolesync_sync_cursor_lag_seconds",
            "Age of the newest event applied by the Events API catch-up",
            self.sync_cursor_lag_seconds.clone(),
        );
        r.register(
            "rolesync_sync_failed_passes",
            "Events API catch-up passes that failed",
            self.sync_failed_passes.clone(),
        );
        r.register(
            "rolesync_sync_cursor_resets",
            "Events API cursors WorkOS refused (expired or unknown): cleared, organizations resynced",
            self.sync_cursor_resets.clone(),
        );
        r.register(
            "rolesync_sync_consecutive_failures",
            "Events API catch-up passes that failed in a row",
            self.sync_consecutive_failures.clone(),
        );
        r.register(
            "rolesync_refetch_queue_depth",
            "Memberships and organizations queued for a refetch from the WorkOS API",
            self.refetch_queue_depth.clone(),
        );
        r.register(
            "rolesync_refetch_queue_oldest_seconds",
            "Age of the oldest queued refetch (0 when the queue is empty)",
            self.refetch_queue_oldest_seconds.clone(),
        );
        r.register(
            "rolesync_refetch_attempts",
            "Refetch attempts by outcome: done, deferred (WorkOS not yet moved off a deleted role), failed",
            self.refetch_attempts.clone(),
        );
    }

    /// The exposition in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock");
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }

    /// Counts one value of a one-label family.
    pub fn outcome(&self, outcome: &str) {
        self.webhook_deliveries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a refetch attempt by outcome.
    pub fn refetch_attempt(&self, outcome: &str) {
        self.refetch_attempts
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Catch-up passes failed in a row after which `/readyz` reports the catch-up as failing.
    pub const SYNC_FAILURES_REPORTED: i64 = 3;

    /// Whether the catch-up has failed [`Self::SYNC_FAILURES_REPORTED`] passes in a row.
    pub fn catch_up_failing(&self) -> bool {
        self.sync_consecutive_failures.get() >= Self::SYNC_FAILURES_REPORTED
    }

    /// Counts a limiter refusal.
    pub fn limited(&self, limiter: &str) {
        self.limiter_rejections
            .get_or_create(&LimiterLabel {
                limiter: limiter.to_owned(),
            })
            .inc();
    }

    /// Counts a WorkOS call by the class of its answer (`2xx`, `4xx`, `5xx`, `timeout`, `transport`).
    pub fn workos_call(&self, class: &str) {
        self.workos_requests
            .get_or_create(&StatusClassLabel {
                status_class: class.to_owned(),
            })
            .inc();
    }
}
