//! The statements of a batch write, behind one interface, so that the reconcile rules and the
//! webhook batch run unchanged on every way rolesync talks to its database: sqlx (both backends), the
//! SQLite group-commit writer ([`super::sqlite_writer`]) and the PostgreSQL one ([`super::pg_writer`]).

use std::collections::{HashMap, HashSet};

use super::base::{DbError, Key};
use super::inbox::InboxRow;
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
    /// The audit trail of each point as of its version ([`audit::as_of_many`]); a point with no
    /// trail is absent.
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

/// The rows a batch writes: memberships inserted or replaced (each key at most once), those of them
/// whose role set changed (whose `membership_roles` rows the write replaces), and audit rows
/// appended in order.
pub struct Writes<'a> {
    pub memberships: Vec<&'a Membership>,
    pub role_sets: Vec<&'a Membership>,
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
