//! The refetch queue's worker: fetches again from the WorkOS API what an event changed without
//! saying how (a group membership, a directory user, a deleted or changed role), and reconciles the
//! answer with source `refetch` and the event's id. Rows are claimed with a lease, so a worker that
//! dies (a SIGKILL) leaves its row to the next one once the lease ends; a failure is retried with
//! backoff; every WorkOS call waits its turn under `ROLESYNC_WORKOS_RPS`, shared with logins.

use std::sync::Arc;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use tokio::time::Instant;

use crate::db::refetch::Queued;
use crate::db::{Db, DbError};
use crate::domain::{Outcome, Source, ORGANIZATION_TARGET};
use crate::metrics::Metrics;
use crate::reconcile::{inferred_deletion, reconcile};
use crate::resync::{resync_for, Cause};
use crate::timestamp::SharedClock;
use crate::workos::WorkosClient;

/// Rows claimed per pass.
const PASS: i64 = 32;
/// How long one membership's fetch may take, the client's retries included: a failing row holds the
/// queue no longer than this, and the queue's own backoff retries it.
const FETCH_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts after which a row is dropped (about 45 minutes of backoff): a permanent refusal (an
/// organization WorkOS no longer has, a membership rolesync cannot store) must not stay queued for
/// ever; the membership's next login or event still heals it.
const MAX_ATTEMPTS: i64 = 16;
/// Longest wait between two attempts of one row.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Attempts that find a deleted role still held before the answer is taken as it is: WorkOS moves
/// the holders of a deleted role asynchronously (half a minute to a minute of backoff in all).
const GONE_ROLE_WAITS: i64 = 7;

/// The worker and what it needs.
pub struct Refetcher {
    pub db: Db,
    pub workos: WorkosClient,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    /// The WorkOS call budget shared with logins (`None`: unlimited).
    pub budget: Option<Arc<DefaultDirectRateLimiter>>,
    /// How long a claimed row is left alone by other workers (`ROLESYNC_REFETCH_LEASE_SECS`); an
    /// organization's listing takes up to ten times as long.
    pub lease: Duration,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Rows fetched and reconciled (and removed from the queue).
    pub done: usize,
    /// Rows put back for later: a failure, or a deleted role WorkOS has not yet moved them off.
    pub deferred: usize,
}

/// How a claimed row went.
enum Attempt {
    Done,
    /// Not yet: try again later, for this reason.
    Later(String),
}

impl Refetcher {
    /// Claims and works every due row (up to [`PASS`]), one at a time; without an API key it only
    /// measures the queue.
    pub async fn run_once(&self) -> Result<Pass, DbError> {
        let mut pass = Pass::default();
        self.measure().await?;
        if !self.workos.is_configured() {
            return Ok(pass);
        }
        let due = self.db.refetch_due(self.clock.now().millis(), PASS).await?;
        for row in due {
            // Each row's lease starts when it is claimed: an earlier row's fetch may have taken long.
            let now = self.clock.now().millis();
            let lease = match row.target.starts_with(ORGANIZATION_TARGET) {
                true => self.lease * 10,
                false => self.lease,
            };
            let until = now.saturating_add(lease.as_millis() as i64);
            if !self.db.refetch_claim(&row.target, now, until).await? {
                continue;
            }
            match self.attempt(&row).await {
                Attempt::Done => {
                    self.db
                        .refetch_finish(&row, self.clock.now().millis())
                        .await?;
                    self.metrics.refetch_attempt("done");
                    pass.done += 1;
                }
                Attempt::Later(why) if row.attempts + 1 >= MAX_ATTEMPTS => {
                    self.db
                        .refetch_finish(&row, self.clock.now().millis())
                        .await?;
                    self.metrics.refetch_attempt("abandoned");
                    tracing::error!(target = %row.target, event_id = %row.event_id, attempts = row.attempts + 1,
                        reason = %why, "refetch abandoned; the membership's next login or event heals it");
                    pass.deferred += 1;
                }
                Attempt::Later(why) => {
                    let wait = backoff(row.attempts);
                    let next = self.clock.now().millis() + wait.as_millis() as i64;
                    self.db.refetch_retry(&row, next, &why).await?;
                    self.metrics
                        .refetch_attempt(match why.starts_with(STILL_HELD) {
                            true => "deferred",
                            false => "failed",
                        });
                    tracing::warn!(target = %row.target, event_id = %row.event_id, attempts = row.attempts + 1,
                        retry_in_ms = wait.as_millis() as u64, reason = %why, "refetch not done; retrying later");
                    pass.deferred += 1;
                }
            }
            self.measure().await?;
        }
        Ok(pass)
    }

    /// Passes every `poll`, for ever; a failed pass is logged and the next one tries again.
    pub async fn run_forever(self, poll: Duration) {
        loop {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "refetch pass failed");
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Sets the queue's depth and oldest age gauges.
    pub async fn measure(&self) -> Result<(), DbError> {
        let (depth, oldest) = self.db.refetch_depth().await?;
        self.metrics.refetch_queue_depth.set(depth);
        let age_ms = oldest.map_or(0, |t| (self.clock.now().millis() - t).max(0));
        self.metrics.refetch_queue_oldest_seconds.set(age_ms / 1000);
        Ok(())
    }

    async fn attempt(&self, row: &Queued) -> Attempt {
        let result = match row.target.strip_prefix(ORGANIZATION_TARGET) {
            Some(organization) => self.organization(row, organization).await,
            None => self.membership(row).await,
        };
        match result {
            Ok(attempt) => attempt,
            Err(e) => Attempt::Later(e.to_string()),
        }
    }

    /// Waits for a WorkOS call under the shared budget.
    async fn turn(&self) {
        if let Some(budget) = &self.budget {
            budget.until_ready().await;
        }
    }

    /// Fetches one membership and reconciles it; a 404 removes the stored row (an inferred
    /// deletion, as a login that finds none).
    async fn membership(&self, row: &Queued) -> anyhow::Result<Attempt> {
        self.turn().await;
        let found = self
            .workos
            .get_membership(&row.target, Instant::now() + FETCH_DEADLINE)
            .await?;
        let now = self.clock.now();
        let mut observation = match found {
            Some(membership) => membership.observation(Source::Refetch, now)?,
            None => {
                let Some(stored) = self.db.membership_by_id(&row.target).await? else {
                    return Ok(Attempt::Done);
                };
                inferred_deletion(
                    &stored.organization_id,
                    &stored.user_id,
                    Some(&stored),
                    Source::Refetch,
                )
            }
        };
        if let Some(gone) = &row.gone_role {
            if observation.role_slugs.contains(gone) && row.attempts + 1 < GONE_ROLE_WAITS {
                return Ok(Attempt::Later(format!(
                    "{STILL_HELD} {gone:?}, deleted in WorkOS"
                )));
            }
        }
        observation.event_id = Some(row.event_id.clone());
        let outcome = reconcile(&self.db, &observation, now).await?;
        self.healed(outcome);
        tracing::info!(membership_id = %row.target, event_id = %row.event_id, reason = %row.reason,
            outcome = outcome.as_str(), "refetched");
        Ok(Attempt::Done)
    }

    /// Resyncs an organization (a directory event names a directory user, not a membership).
    async fn organization(&self, row: &Queued, organization: &str) -> anyhow::Result<Attempt> {
        self.turn().await;
        let cause = Cause {
            source: Source::Refetch,
            event_id: Some(&row.event_id),
        };
        let now = self.clock.now();
        let changes = resync_for(&self.db, &self.workos, organization, false, cause, now).await?;
        for change in &changes {
            self.healed(change.outcome);
        }
        tracing::info!(organization_id = organization, event_id = %row.event_id, reason = %row.reason,
            memberships = changes.len(), "refetched an organization");
        Ok(Attempt::Done)
    }

    fn healed(&self, outcome: Outcome) {
        self.metrics
            .healed
            .get_or_create(&crate::metrics::PathOutcomeLabels {
                path: "refetch".into(),
                outcome: outcome.as_str().into(),
            })
            .inc();
    }
}

/// The start of the reason a row waits for WorkOS to move a deleted role's holders.
const STILL_HELD: &str = "WorkOS still lists the role";

/// The wait before attempt `attempts + 1`: 1 s doubling, capped, with jitter.
fn backoff(attempts: i64) -> Duration {
    let ceiling = Duration::from_secs(1 << attempts.clamp(0, 9)).min(MAX_BACKOFF);
    ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
}
