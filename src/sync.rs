//! Catch-up from the WorkOS Events API: pages of membership events applied through the same inbox
//! and reconcile as webhooks (source `events`), with the cursor advanced in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::db::{Db, DbError};
use crate::domain::Source;
use crate::ingest::{deliver_batch_in, Incoming};
use crate::metrics::{Metrics, PathOutcomeLabels};
use crate::timestamp::{SharedClock, Timestamp};
use crate::workos::{ApiList, WorkosClient, WorkosError};

/// The event types the catch-up follows: membership events, and those that change roles without
/// carrying them ([`crate::ingest::event::REFETCH_EVENTS`]), which queue a refetch.
pub const EVENTS: &str = "organization_membership.created,organization_membership.updated,organization_membership.deleted,\
     group.member_added,group.member_removed,role.deleted,organization_role.deleted,organization_role.updated,\
     dsync.user.updated,dsync.group.user_added,dsync.group.user_removed";
/// The `sync_state` row of this stream.
pub const STREAM: &str = "events";
const PAGE_SIZE: usize = 100;
const PAGE_DEADLINE: Duration = Duration::from_secs(30);
/// Retries of a page's transaction after a transient storage failure.
const TRANSIENT_RETRIES: usize = 3;

/// How far a page moved the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// To its last event (or another process had moved it: the page is read again).
    Whole,
    /// Short of events younger than the settle window.
    Unsettled,
    /// Not at all: no event of the page had an id and a type.
    Unusable,
}

/// An event's `created_at`; `None` when absent or unreadable (such an event counts as settled).
fn created_at(event: &str) -> Option<Timestamp> {
    #[derive(serde::Deserialize)]
    struct Created {
        created_at: Option<String>,
    }
    let created = serde_json::from_str::<Created>(event).ok()?.created_at?;
    Timestamp::parse(&created).ok()
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Workos(#[from] WorkosError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Another process held the lease; nothing was done.
    pub skipped: bool,
    pub pages: usize,
    pub events: usize,
    pub outcomes: BTreeMap<String, usize>,
}

/// What a pass needs.
#[derive(Clone)]
pub struct Syncer {
    pub db: Db,
    pub workos: WorkosClient,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub lookback: Duration,
    /// How old an event must be before the cursor moves past it ([`Syncer::apply`]).
    pub settle: Duration,
}

impl Syncer {
    /// One pass: pages from the stored cursor (or `now - lookback`) until WorkOS has no more.
    pub async fn run_once(&self) -> Result<SyncReport, SyncError> {
        let Some(lease) = self.db.try_sync_lease().await? else {
            tracing::debug!("another process is syncing; skipping this pass");
            return Ok(SyncReport {
                skipped: true,
                ..SyncReport::default()
            });
        };
        let result = self.pages().await;
        lease.release().await;
        match &result {
            Ok(_) => {
                self.metrics.sync_consecutive_failures.set(0);
            }
            Err(_) => {
                self.metrics.sync_failed_passes.inc();
                self.metrics.sync_consecutive_failures.inc();
            }
        }
        result
    }

    async fn pages(&self) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        loop {
            let cursor = self.db.cursor(STREAM).await?;
            let page = match self.fetch(cursor.as_deref()).await {
                Err(WorkosError::Status(400 | 404 | 422)) if cursor.is_some() => {
                    self.cursor_refused(cursor.as_deref().unwrap_or_default())
                        .await?;
                    continue;
                }
                page => page?,
            };
            let fetched = page.data.len();
            let applied = match fetched {
                0 => Applied::Whole,
                _ => {
                    self.apply(cursor.as_deref(), &page.data, &mut report)
                        .await?
                }
            };
            let more = page.list_metadata.and_then(|m| m.after).is_some();
            if fetched < PAGE_SIZE && !more || fetched == 0 {
                return Ok(report);
            }
            if applied == Applied::Unsettled {
                // The cursor stopped before events too young to trust: the next pass reads on
                // from there (the inbox answers what this one applied as duplicates).
                return Ok(report);
            }
            if applied == Applied::Unusable {
                // The cursor could not move: asking again would return this page forever.
                return Err(WorkosError::Malformed(format!(
                    "{fetched} events after cursor {cursor:?}, none with an id and a type"
                ))
                .into());
            }
        }
    }

    /// WorkOS refused the stored cursor as `after` (older than its 30 days of events, or unknown):
    /// the cursor is cleared, so the pass goes on from `now - lookback`, and every organization
    /// with a stored membership is resynced, since events between the cursor and there are gone.
    async fn cursor_refused(&self, cursor: &str) -> Result<(), SyncError> {
        tracing::warn!(
            cursor,
            "WorkOS no longer honours the Events API cursor; starting from the lookback and resyncing every stored organization"
        );
        self.metrics.sync_cursor_resets.inc();
        let now = self.clock.now();
        if !self.db.clear_cursor(STREAM, cursor, now).await? {
            return Ok(());
        }
        for organization in self.db.organizations().await? {
            match crate::resync::resync(&self.db, &self.workos, &organization, false, now).await {
                Ok(changes) => {
                    tracing::info!(organization_id = %organization, memberships = changes.len(), "resynced after a refused cursor")
                }
                Err(e) => {
                    tracing::warn!(organization_id = %organization, error = %e, "resync after a refused cursor failed")
                }
            }
        }
        Ok(())
    }

    async fn fetch(&self, cursor: Option<&str>) -> Result<ApiList<Box<RawValue>>, WorkosError> {
        let mut query = vec![
            ("events", EVENTS.to_owned()),
            ("limit", PAGE_SIZE.to_string()),
            ("order", "asc".to_owned()),
        ];
        match cursor {
            Some(after) => query.push(("after", after.to_owned())),
            None => {
                let start = self.clock.now().millis() - self.lookback.as_millis() as i64;
                let start = Timestamp::from_millis(start).unwrap_or(self.clock.now());
                query.push(("range_start", start.to_string()));
            }
        }
        self.workos
            .get_json("/events", &query, Instant::now() + PAGE_DEADLINE)
            .await
    }

    /// Applies one page and moves the cursor, in one transaction: to its last event, or, when the
    /// page ends with events created less than the settle window ago, to the last event before
    /// them (not at all when none is that old). WorkOS can show a new event late while later ones
    /// are visible; a cursor past it would skip it for good. A page another process already
    /// applied (the cursor moved meanwhile) is rolled back and fetched again.
    async fn apply(
        &self,
        cursor: Option<&str>,
        events: &[Box<RawValue>],
        report: &mut SyncReport,
    ) -> Result<Applied, SyncError> {
        let now = self.clock.now();
        let batch: Vec<Incoming> = events
            .iter()
            .filter_map(|raw| match Incoming::parse(raw.get().as_bytes(), Source::Events, now) {
                Ok(incoming) => Some(incoming),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an event the Events API returned without id or type");
                    None
                }
            })
            .collect();
        if batch.is_empty() {
            return Ok(Applied::Unusable);
        }
        let now = self.clock.now();
        let settled_before = Timestamp::from_micros(
            now.micros()
                .saturating_sub(i64::try_from(self.settle.as_micros()).unwrap_or(i64::MAX)),
        )
        .unwrap_or(now);
        let settled = batch
            .iter()
            .take_while(|i| created_at(&i.payload).is_none_or(|at| at <= settled_before))
            .count();
        let moved_to = settled.checked_sub(1).map(|i| batch[i].event_id.clone());
        let mut attempt = 0;
        let (mut tx, receipts) = loop {
            let mut tx = self.db.begin_write().await.map_err(SyncError::Db)?;
            match deliver_batch_in(&mut tx, &batch, now).await {
                Ok(receipts) => break (tx, receipts),
                // A webhook stored one of these events meanwhile (or a deadlock): run the page
                // again, which now sees that event as a duplicate.
                Err(e) if e.is_transient() && attempt < TRANSIENT_RETRIES => {
                    tracing::debug!(error = %e, attempt, "retrying an Events API page");
                    attempt += 1;
                    tx.rollback().await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(to) = &moved_to {
            if !tx.advance_cursor(STREAM, cursor, to, now).await? {
                tx.rollback().await;
                return Ok(Applied::Whole);
            }
        }
        tx.commit().await?;
        report.pages += 1;
        report.events += receipts.len();
        for receipt in receipts {
            let labels = PathOutcomeLabels {
                path: "events".into(),
                outcome: receipt.outcome.clone(),
            };
            self.metrics.healed.get_or_create(&labels).inc();
            *report.outcomes.entry(receipt.outcome).or_default() += 1;
        }
        self.record_lag(events.last().map(|e| &**e), now);
        Ok(match settled == batch.len() {
            true => Applied::Whole,
            false => Applied::Unsettled,
        })
    }

    fn record_lag(&self, last: Option<&RawValue>, now: Timestamp) {
        if let Some(at) = last.and_then(|raw| created_at(raw.get())) {
            self.metrics
                .sync_cursor_lag_seconds
                .set((now.millis() - at.millis()) / 1000);
        }
    }

    /// Runs a pass every `interval` until the task is dropped; errors are logged, never fatal.
    pub async fn run_forever(self, interval: Duration) {
        loop {
            match self.run_once().await {
                Ok(r) if !r.skipped => {
                    tracing::info!(pages = r.pages, events = r.events, outcomes = ?r.outcomes, "events catch-up pass")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "events catch-up pass failed; retrying next interval")
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}
