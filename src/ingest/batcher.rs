//! Group commit: concurrent deliveries share one transaction of a few set-based statements, and each
//! is answered only after that commit. A failed batch is retried one delivery at a time, so one bad
//! delivery never turns into a wrong answer for another.

use std::sync::Arc;
use std::time::Duration;

use std::hash::{Hash, Hasher};

use tokio::sync::{mpsc, oneshot};

use crate::db::{Committer, Db, DbError};
use crate::ingest::{deliver_batch_on, Incoming, Receipt};
use crate::metrics::Metrics;
use crate::timestamp::SharedClock;

/// Most deliveries committed together.
pub const MAX_BATCH: usize = 256;
const TRANSIENT_RETRIES: u32 = 3;

struct Job {
    incoming: Incoming,
    reply: oneshot::Sender<Result<Receipt, DbError>>,
}

/// The handle request handlers submit deliveries to.
#[derive(Clone)]
pub struct Batcher {
    /// One queue per committer; a membership's deliveries always go to the same one.
    queues: Arc<[mpsc::Sender<Job>]>,
}

impl Batcher {
    /// Starts `workers` committers over `db`; they stop when every handle is dropped.
    ///
    /// Each committer has a queue of its own, and every delivery of one membership goes to the same
    /// queue: two committers then never hold the same membership, so on PostgreSQL they never wait
    /// for each other's locks (with one shared queue, two batches of ~100 deliveries over 10,000
    /// memberships shared a membership more often than not, and the second waited for the first to
    /// commit). A delivery of no membership goes by its event id.
    ///
    /// At most `queued` deliveries wait in all (split evenly between the queues); a delivery beyond
    /// that is refused at once with [`SubmitError::Overloaded`] rather than waiting (holding its
    /// connection and memory) behind a backlog that is only growing.
    pub fn spawn(
        db: Db,
        clock: SharedClock,
        workers: usize,
        queued: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let workers = workers.max(1);
        let mut queues = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (jobs, mut queue) = mpsc::channel((queued / workers).max(1));
            queues.push(jobs);
            let (db, clock, metrics) = (db.clone(), clock.clone(), metrics.clone());
            // The writers are the serial part of the service: each committer gets a thread of its
            // own, so that its statements never wait behind request tasks in the shared runtime.
            // Its queue has no other consumer, so a committer that panics is started again (the
            // deliveries of the batch it held are answered 503 and retried by WorkOS).
            let run = move || loop {
                let committer = Worker {
                    db: db.clone(),
                    clock: clock.clone(),
                    metrics: metrics.clone(),
                    link: db.committer(),
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                let worked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(work(committer, &mut queue))
                }));
                match worked {
                    Ok(()) => return,
                    Err(_) => tracing::error!("a group-commit worker panicked; starting it again"),
                }
            };
            std::thread::Builder::new()
                .name("rolesync-commit".into())
                .spawn(run)
                .expect("the committer thread starts");
        }
        Self {
            queues: queues.into(),
        }
    }

    /// Stores one delivery with whatever else is waiting; resolves after the commit.
    pub async fn submit(&self, incoming: Incoming) -> Result<Receipt, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let closed = || DbError::Unavailable("the committer has stopped".into());
        let queue = &self.queues[shard(&incoming, self.queues.len())];
        queue
            .try_send(Job { incoming, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Storage(closed()),
            })?;
        Ok(answer.await.map_err(|_| closed())??)
    }
}

/// Why a delivery was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Its committer's queue is full; nothing was stored.
    #[error("the group-commit queue is full")]
    Overloaded,
    #[error(transparent)]
    Storage(#[from] DbError),
}

/// The queue, of `queues`, of a delivery: by membership, else by event id.
fn shard(incoming: &Incoming, queues: usize) -> usize {
    if queues <= 1 {
        return 0;
    }
    let mut hasher = std::hash::DefaultHasher::new();
    match incoming.observation() {
        Some(obs) => (&obs.organization_id, &obs.user_id).hash(&mut hasher),
        None => incoming.event_id.hash(&mut hasher),
    }
    (hasher.finish() % queues as u64) as usize
}

/// One committer: it keeps its own connection ([`Committer`]), so that SQLite's page cache and the
/// prepared statements stay warm from one batch to the next (a pooled connection would change every
/// batch).
struct Worker {
    db: Db,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    link: Committer,
}

async fn work(mut committer: Worker, queue: &mut mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = queue.recv_many(&mut jobs, MAX_BATCH).await;
        if received == 0 {
            return;
        }
        let started = std::time::Instant::now();
        committer.metrics.batch_size.observe(received as f64);
        committer.commit(std::mem::take(&mut jobs)).await;
        committer
            .metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
    }
}

impl Worker {
    async fn commit(&mut self, jobs: Vec<Job>) {
        let (batch, replies): (Vec<Incoming>, Vec<_>) =
            jobs.into_iter().map(|j| (j.incoming, j.reply)).unzip();
        match self.with_retries(&batch).await {
            Ok(receipts) => {
                for (reply, receipt) in replies.into_iter().zip(receipts) {
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) if batch.len() == 1 => {
                let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
            }
            Err(e) => {
                tracing::warn!(error = %e, size = batch.len(), "batch failed; committing its deliveries one by one");
                for (incoming, reply) in batch.into_iter().zip(replies) {
                    let one = self.with_retries(std::slice::from_ref(&incoming)).await;
                    let _ = reply.send(one.map(|mut r| r.remove(0)));
                }
            }
        }
    }

    async fn with_retries(&mut self, batch: &[Incoming]) -> Result<Vec<Receipt>, DbError> {
        let mut attempt = 0;
        loop {
            match self.once(batch).await {
                Err(e) if e.is_transient() && attempt < TRANSIENT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "transient database error; retrying the batch");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                result => return result,
            }
        }
    }

    /// One attempt on the committer's connection (its transaction is rolled back on any error);
    /// after an error a retry cannot clear (not a conflict, deadlock or busy database) the connection
    /// is dropped and the next attempt takes a fresh one, so a broken connection is never reused.
    async fn once(&mut self, batch: &[Incoming]) -> Result<Vec<Receipt>, DbError> {
        if self.db.is_closed() {
            self.link.reset();
            return Err(DbError::Unavailable("the database pool is closed".into()));
        }
        let under_way = self.db.write_under_way();
        let result = self.attempt(batch).await;
        drop(under_way);
        self.db.note_write(&result);
        result
    }

    async fn attempt(&mut self, batch: &[Incoming]) -> Result<Vec<Receipt>, DbError> {
        if let Err(e) = self.db.check_file() {
            self.link.reset();
            return Err(e);
        }
        let now = self.clock.now();
        let result = deliver_batch_on(&mut self.link, batch, now).await;
        if result.as_ref().is_err_and(|e| !e.is_transient()) {
            self.link.reset();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Observation, Source};
    use crate::ingest::event::EventKind;
    use crate::timestamp::Timestamp;

    fn delivery(event_id: &str, user: &str, role: &str) -> Incoming {
        let obs = Observation {
            organization_id: "org_1".into(),
            user_id: user.into(),
            membership_id: format!("om_{user}"),
            role_slug: Some(role.into()),
            role_slugs: vec![role.into()],
            roles_reported: true,
            status: "active".into(),
            deleted: false,
            inferred: false,
            directory_managed: false,
            version: Timestamp::from_millis(1).unwrap(),
            source: Source::Webhook,
            event_id: Some(event_id.into()),
        };
        Incoming {
            event_id: event_id.into(),
            event_type: "organization_membership.updated".into(),
            payload: String::new(),
            kind: EventKind::Membership(obs),
        }
    }

    #[test]
    fn every_delivery_of_a_membership_goes_to_one_queue_and_memberships_spread() {
        for user in ["user_1", "user_2", "user_3"] {
            let first = shard(&delivery("e1", user, "admin"), 2);
            for (event, role) in [("e2", "member"), ("e3", "admin"), ("e4", "owner")] {
                assert_eq!(shard(&delivery(event, user, role), 2), first, "{user}");
            }
        }
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|i| shard(&delivery("e", &format!("user_{i}"), "admin"), 2))
            .collect();
        assert_eq!(used.len(), 2);
        assert_eq!(shard(&delivery("e", "user_1", "admin"), 1), 0);
    }
}
