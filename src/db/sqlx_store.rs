//! [`BatchStore`] over a sqlx connection (either backend): a few multi-row statements per batch.

use std::collections::HashMap;

use sqlx::AnyConnection;

use super::base::{DbError, Key};
use super::inbox::InboxRow;
use super::pool::Db;
use super::store::{BatchStore, Snapshot, TrailPoint, Writes};
use super::{audit, inbox, memberships, refetch, roles};
use crate::domain::HistoryMark;
use crate::timestamp::Timestamp;

/// [`BatchStore`] over a sqlx connection in a write transaction: a few multi-row statements per batch.
pub struct SqlxStore<'a> {
    pub conn: &'a mut AnyConnection,
    pub db: &'a Db,
}

impl BatchStore for SqlxStore<'_> {
    async fn lock_memberships(&mut self, keys: &[&Key]) -> Result<(), DbError> {
        self.db.lock_memberships(self.conn, keys).await
    }

    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError> {
        let backend = self.db.backend();
        Ok(Snapshot {
            known_events: inbox::existing(&mut *self.conn, backend, event_ids).await?,
            memberships: memberships::get_many(&mut *self.conn, backend, keys).await?,
            roles: roles::list(&mut *self.conn).await?.into_iter().collect(),
        })
    }

    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError> {
        audit::as_of_many(&mut *self.conn, self.db.backend(), points).await
    }

    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError> {
        let backend = self.db.backend();
        memberships::upsert_many(&mut *self.conn, backend, &writes.memberships).await?;
        memberships::set_roles_many(self.conn, &writes.role_sets).await?;
        audit::insert_many(&mut *self.conn, backend, writes.audits).await?;
        refetch::enqueue_many(self.conn, &writes.refetches, received_at.millis()).await?;
        inbox::insert_many(&mut *self.conn, backend, events, received_at).await
    }
}
