//! The statements of a batch write, behind one interface, so that the one write path
//! ([`crate::reconcile::apply`]) runs unchanged on both backends; and the rows the rest of rolesync
//! reads back. [`super::Store`] is a write transaction's interface, whichever backend holds it.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::base::{DbError, Key};
use crate::domain::{AuditEntry, HistoryMark, Membership, Refetch};
use crate::timestamp::Timestamp;

/// A point of a membership's audit trail: (organization_id, user_id, as of version).
pub type TrailPoint<'a> = (&'a str, &'a str, Timestamp);

/// Reads and writes inside one write transaction that the caller begins and ends.
// Every implementation is used where its concrete type is known, so the futures' auto traits are
// inferred there; none needs to be named.
#[allow(async_fn_in_trait)]
pub trait BatchStore {
    /// Locks these memberships (sorted, distinct) until the transaction ends.
    async fn lock_memberships(&mut self, keys: &[&Key]) -> Result<(), DbError>;
    /// What a batch reads once it holds its locks: which of these event ids the inbox holds, the
    /// stored rows of these memberships and every known role.
    async fn read(&mut self, event_ids: &[&str], keys: &[&Key]) -> Result<Snapshot, DbError>;
    /// The audit trail of each point as of its version: the latest row at or before it, where a
    /// stale row counts only at exactly that version; a point with no trail is absent.
    async fn trails(
        &mut self,
        points: &[TrailPoint<'_>],
    ) -> Result<HashMap<(String, String, Timestamp), HistoryMark>, DbError>;
    /// Writes a batch's decisions and records its deliveries (ids distinct); returns how many
    /// deliveries were new, the others being duplicates.
    async fn write(
        &mut self,
        writes: &Writes<'_>,
        events: &[InboxRow<'_>],
        received_at: Timestamp,
    ) -> Result<u64, DbError>;
}

/// What [`BatchStore::read`] found.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub known_events: HashSet<String>,
    pub memberships: HashMap<Key, Membership>,
    pub roles: HashSet<String>,
}

/// The rows a batch writes: memberships inserted or replaced (each key at most once; a row's role
/// set is a column of it, which the view `membership_roles` reads), and audit rows appended in order.
pub struct Writes<'a> {
    pub memberships: Vec<&'a Membership>,
    pub audits: &'a [AuditEntry],
    /// Refetches the batch's deliveries ask for, queued in `refetch_queue`.
    pub refetches: Vec<QueuedRefetch<'a>>,
}

/// A refetch a delivery asks for: what, and the event (id and type) that asked.
#[derive(Debug, Clone, Copy)]
pub struct QueuedRefetch<'a> {
    pub refetch: &'a Refetch,
    pub event_id: &'a str,
    pub reason: &'a str,
}

/// A delivery to record.
#[derive(Debug, Clone)]
pub struct InboxRow<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub outcome: &'a str,
}

/// A stored audit row, as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub recorded_at: String,
    pub organization_id: String,
    pub user_id: String,
    pub membership_id: String,
    pub source: String,
    pub event_id: Option<String>,
    pub workos_role_slug: Option<String>,
    pub old_role: Option<String>,
    pub new_role: Option<String>,
    pub old_status: Option<String>,
    pub new_status: Option<String>,
    pub outcome: String,
    pub detail: String,
    pub version: String,
    /// The role sets before and after; `None` where no row was stored, and on rows written before
    /// role sets were recorded.
    pub old_roles: RoleSet,
    pub new_roles: RoleSet,
}

/// A role set column of an audit row (a JSON array of slugs), `None` where none was recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RoleSet(pub Option<Vec<String>>);

/// A stored delivery read back for replay.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: String,
    pub received_at: String,
    pub payload: String,
    pub outcome: String,
}

/// Which stored deliveries to read back.
#[derive(Debug, Clone, Default)]
pub struct StoredFilter {
    pub since: Option<Timestamp>,
    pub event_id: Option<String>,
    pub outcome: Option<String>,
}
