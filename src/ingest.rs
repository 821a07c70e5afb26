//! Verified deliveries: parsing an event into what it means, and storing a batch of deliveries in
//! the inbox and reconciling their membership events in one transaction (webhooks, the Events API,
//! replays).

pub mod batcher;
pub mod event;

use serde::Serialize;

use crate::db::{BatchStore, Committer, Db, DbError, WriteTx};
use crate::domain::Applied;
use crate::reconcile::{self, Item, Observation, Source};
use crate::timestamp::Timestamp;
use event::{classify, parse_envelope, EventKind, PayloadError};

/// The answer to a stored (or duplicate) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Receipt {
    pub event_id: String,
    pub outcome: String,
}

/// A verified, parsed delivery, ready to store.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub kind: EventKind,
}

impl Incoming {
    /// Parses and classifies a body (already verified, or read back from the inbox) at `now`.
    pub fn parse(body: &[u8], source: Source, now: Timestamp) -> Result<Self, PayloadError> {
        let envelope = parse_envelope(body)?;
        let payload =
            std::str::from_utf8(body).map_err(|_| PayloadError("body is not UTF-8".into()))?;
        Ok(Self {
            kind: classify(&envelope, source, now),
            event_id: envelope.id,
            event_type: envelope.event,
            payload: payload.to_owned(),
        })
    }

    /// The observation of a membership event; `None` for any other delivery.
    pub fn observation(&self) -> Option<&Observation> {
        match &self.kind {
            EventKind::Membership(obs) => Some(obs),
            _ => None,
        }
    }

    /// The delivery as an item of a batch ([`reconcile::apply`]).
    pub fn item(&self) -> Item<'_> {
        Item::Delivered {
            event_id: &self.event_id,
            event_type: &self.event_type,
            payload: &self.payload,
            observation: self.observation(),
            refetch: match &self.kind {
                EventKind::Refetch(refetch) => Some(refetch),
                _ => None,
            },
            settled: match self.kind {
                EventKind::Invalid(_) => Applied::Invalid,
                EventKind::Refetch(_) => Applied::RefetchQueued,
                _ => Applied::Ignored,
            },
        }
    }
}

/// Stores deliveries in the inbox and reconciles the membership events among them, in one
/// transaction on a pooled connection. An event id already stored (or earlier in the same batch) is
/// a `duplicate` and changes nothing. Receipts come back in input order.
pub async fn deliver_batch(
    db: &Db,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let mut tx = db.begin_write().await?;
    match deliver_batch_in(&mut tx, batch, now).await {
        Ok(receipts) => {
            tx.commit().await?;
            Ok(receipts)
        }
        Err(e) => {
            tx.rollback().await;
            Err(e)
        }
    }
}

/// [`deliver_batch`] on a committer's connection, which the caller keeps (the group-commit
/// workers' own); on SQLite in this process's writer turn.
pub async fn deliver_batch_on(
    committer: &mut Committer,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let mut tx = committer.begin().await?;
    match deliver_into(&mut tx.store(), batch, now).await {
        Ok(receipts) => {
            tx.commit().await?;
            Ok(receipts)
        }
        Err(e) => {
            tx.rollback().await;
            Err(e)
        }
    }
}

/// [`deliver_batch`] inside the caller's write transaction, which the caller commits.
pub async fn deliver_batch_in(
    tx: &mut WriteTx<'_>,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    deliver_into(&mut tx.store(), batch, now).await
}

/// [`deliver_batch`] inside any [`BatchStore`]'s transaction: [`reconcile::apply`] with the
/// deliveries as items.
async fn deliver_into<S: BatchStore>(
    store: &mut S,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let items: Vec<Item> = batch.iter().map(Incoming::item).collect();
    let applied = reconcile::apply(store, &items, now).await?;
    Ok(batch
        .iter()
        .zip(applied)
        .map(|(d, a)| Receipt {
            event_id: d.event_id.clone(),
            outcome: a.as_str().to_owned(),
        })
        .collect())
}
