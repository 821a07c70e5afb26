//! Verified deliveries: parsing an event into what it means, and storing a batch of deliveries in
//! the inbox and reconciling their membership events in one transaction (webhooks, the Events API,
//! replays).

pub mod batcher;
pub mod event;

use serde::Serialize;

use sqlx::AnyConnection;

use crate::db::pg_writer::PgStore;
use crate::db::sqlite_writer::SqliteWriter;
use crate::db::sqlx_store::SqlxStore;
use crate::db::store::BatchStore;
use crate::db::{Db, DbError};
use crate::domain::Applied;
use crate::reconcile::{self, Item, Observation, Source};
use crate::timestamp::Timestamp;
use event::{classify, parse_envelope, EventKind, PayloadError};
use sqlx::{Connection, PgConnection};

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
/// transaction. An event id already stored (or earlier in the same batch) is a `duplicate` and
/// changes nothing. Receipts come back in input order. On a SQLite file this opens a
/// [`SqliteWriter`] for the call, as the group-commit worker keeps one.
pub async fn deliver_batch(
    db: &Db,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    if let Some(mut writer) = db.sqlite_writer()? {
        return deliver_batch_sqlite(&mut writer, db, batch, now).await;
    }
    let mut tx = db.begin_write().await?;
    let receipts = deliver_batch_in(&mut tx, db, batch, now).await?;
    tx.commit().await?;
    Ok(receipts)
}

/// [`deliver_batch`] on a sqlx connection the caller keeps (the group-commit worker's own on an
/// in-memory SQLite database).
pub async fn deliver_batch_on(
    conn: &mut AnyConnection,
    db: &Db,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let mut tx = db.begin_write_on(conn).await?;
    match deliver_batch_in(&mut tx, db, batch, now).await {
        Ok(receipts) => {
            tx.commit().await?;
            Ok(receipts)
        }
        Err(e) => {
            roll_back_now(tx.rollback()).await;
            Err(e)
        }
    }
}

/// [`deliver_batch`] on a native PostgreSQL connection the caller keeps (the PostgreSQL
/// group-commit workers' own), with fixed-text statements ([`PgStore`]).
pub async fn deliver_batch_pg(
    conn: &mut PgConnection,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let mut tx = conn.begin().await?;
    match deliver_into(&mut PgStore { conn: &mut tx }, batch, now).await {
        Ok(receipts) => {
            tx.commit().await?;
            Ok(receipts)
        }
        Err(e) => {
            roll_back_now(tx.rollback()).await;
            Err(e)
        }
    }
}

/// Awaits a failed batch's rollback (for at most 5 s): a dropped sqlx transaction only queues its
/// rollback, and a committer's own connection may then sit unused, holding its locks, until the next
/// batch.
async fn roll_back_now(rollback: impl std::future::Future<Output = Result<(), sqlx::Error>>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), rollback).await;
}

/// [`deliver_batch`] on the SQLite writer the caller keeps (the SQLite group-commit worker's own),
/// in this process's writer turn.
pub async fn deliver_batch_sqlite(
    writer: &mut SqliteWriter,
    db: &Db,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    let _turn = db.writer_turn().await;
    let result = match writer.begin() {
        Ok(mut store) => deliver_into(&mut store, batch, now).await,
        Err(e) => Err(e),
    };
    let result = result.and_then(|receipts| writer.commit().map(|()| receipts));
    if result.is_err() {
        let _ = writer.rollback();
    }
    result
}

/// [`deliver_batch`] inside the caller's sqlx write transaction, which the caller commits.
pub async fn deliver_batch_in(
    conn: &mut AnyConnection,
    db: &Db,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Receipt>, DbError> {
    deliver_into(&mut SqlxStore { conn, db }, batch, now).await
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
