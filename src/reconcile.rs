//! The one idempotent reconcile: pure rules over (stored row, observation), and the transaction that applies them.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::db::store::QueuedRefetch;
use crate::db::{BatchStore, Db, DbError, InboxRow, Key, Snapshot, WriteTx, Writes};
use crate::domain::role_set;
use crate::timestamp::Timestamp;

pub use crate::domain::{
    check_id, Applied, AuditEntry, HistoryMark, Membership, Observation, Outcome, Refetch, Source,
    ACTIVE, DELETED, MAX_ID_LEN, MAX_VERSION_AHEAD_MS,
};

/// The deletion a path infers when WorkOS no longer lists a membership (a login that finds none, a
/// resync). Absence carries no version, and an answer from the wrong WorkOS environment looks the
/// same, so the observation carries the version of the row it removes (the Unix epoch when nothing
/// is stored, which [`decide`] answers `unchanged` without writing) and its tombstone is written
/// one microsecond below it: any later
/// sighting of that state or a newer one outranks it and restores the membership, while an older
/// one stays `stale`. A row newer than the one the inference rests on makes it `stale`.
pub fn inferred_deletion(
    organization_id: &str,
    user_id: &str,
    stored: Option<&Membership>,
    source: Source,
) -> Observation {
    let epoch = Timestamp::from_micros(0).expect("the epoch is in range");
    Observation {
        organization_id: organization_id.to_owned(),
        user_id: user_id.to_owned(),
        membership_id: stored.map(|s| s.membership_id.clone()).unwrap_or_default(),
        role_slug: None,
        role_slugs: Vec::new(),
        roles_reported: true,
        status: DELETED.to_owned(),
        deleted: true,
        inferred: true,
        directory_managed: false,
        version: stored.map_or(epoch, |s| s.version),
        source,
        event_id: None,
    }
}

/// The version an inferred deletion's tombstone takes over a live row: just below the row's, so
/// that a sighting of the same state outranks it.
fn below_live(stored: Option<&Membership>, obs: &Observation) -> Option<Timestamp> {
    let live = stored.filter(|s| s.status != DELETED && s.version == obs.version)?;
    obs.inferred
        .then(|| Timestamp::from_micros(live.version.micros() - 1))
        .flatten()
}

/// The result of the rules: the outcome, the row to write (if any) and the audit row (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub write: Option<Membership>,
    pub audit: Option<AuditEntry>,
    /// The observation left its role set unsaid over a stored set of several roles
    /// ([`reported_set`]): the membership is to be fetched again to learn it.
    pub refetch: bool,
}

/// Whether the stored row is newer than the observation (rule 1). At the same version a stored
/// deletion is the newer of the two: WorkOS's `.deleted` carries the last state, `updated_at`
/// included, so a live observation of that version comes from before the deletion.
pub fn is_stale(stored: Option<&Membership>, obs: &Observation) -> bool {
    stored.is_some_and(|s| {
        s.version > obs.version || (s.version == obs.version && s.status == DELETED && !obs.deleted)
    })
}

/// The roles an app knows (the `roles` table), as the rules ask about them.
pub trait KnownRoles {
    fn knows(&self, slug: &str) -> bool;
}

impl KnownRoles for std::collections::HashSet<String> {
    fn knows(&self, slug: &str) -> bool {
        self.contains(slug)
    }
}

/// Applies the rules, in order: stale, removed, unknown_role, unchanged, applied.
/// `known` holds the roles the app knows; `history` is the audit trail as of the observation's
/// version, read only for a stale observation.
///
/// The unknown-role guard applies per slug of the observed role set: known slugs are applied, an
/// unknown one is never stored as a role and makes the outcome `unknown_role` (so that `replay
/// --stored --outcome unknown_role` finds it once the role is added). An unknown primary slug leaves
/// the stored primary role, and the status rule of [`status_under_unknown_role`]; a set with no known
/// slug leaves the stored set.
pub fn decide(
    stored: Option<&Membership>,
    obs: &Observation,
    known: &impl KnownRoles,
    history: Option<&HistoryMark>,
    now: Timestamp,
) -> Decision {
    let old_role = stored.and_then(|s| s.role_slug.clone());
    let old_status = stored.map(|s| s.status.clone());
    let old_roles = stored.map(|s| s.role_slugs.clone());
    let primary_known = obs.role_slug.as_deref().is_some_and(|s| known.knows(s));
    if let Some(s) = stored.filter(|_| is_stale(stored, obs)) {
        let detail = format!("stored version {} is newer than {}", s.version, obs.version);
        let audit = audit(
            obs,
            now,
            Outcome::Stale,
            (old_role.clone(), old_role),
            (old_roles.clone(), old_roles),
            (old_status.clone(), old_status),
            detail,
        );
        let news = !history.is_some_and(|h| already_known(h, obs, primary_known));
        return Decision {
            outcome: Outcome::Stale,
            write: None,
            audit: news.then_some(audit),
            refetch: false,
        };
    }
    // WorkOS lists no membership where none is stored: nothing to remove, nothing to record.
    if obs.inferred && stored.is_none() {
        return Decision {
            outcome: Outcome::Unchanged,
            write: None,
            audit: None,
            refetch: false,
        };
    }
    let (reported, refetch) = reported_set(stored, obs);
    let lowered;
    let obs = match below_live(stored, obs) {
        Some(version) => {
            lowered = Observation {
                version,
                ..obs.clone()
            };
            &lowered
        }
        None => obs,
    };
    let refused: Vec<&str> = reported
        .iter()
        .map(String::as_str)
        .filter(|s| !known.knows(s))
        .collect();
    let (new_role, new_roles, new_status, outcome, detail) = if obs.inferred {
        (
            None,
            Vec::new(),
            DELETED.to_owned(),
            Outcome::Removed,
            "WorkOS no longer lists the membership".to_owned(),
        )
    } else if obs.deleted {
        (
            None,
            Vec::new(),
            DELETED.to_owned(),
            Outcome::Removed,
            "membership deleted in WorkOS".to_owned(),
        )
    } else if !primary_known || !refused.is_empty() {
        let accepted: Vec<String> = reported
            .iter()
            .filter(|s| known.knows(s))
            .cloned()
            .collect();
        let (role, status) = match primary_known {
            true => (obs.role_slug.clone(), obs.status.clone()),
            false => (old_role.clone(), status_under_unknown_role(stored, obs)),
        };
        // A primary role kept under an unknown slug stays in the set: `role_slug` is always one
        // of `roles`.
        let roles = match accepted.is_empty() {
            true => old_roles.clone().unwrap_or_default(),
            false => role_set(role.as_deref(), accepted),
        };
        let mut detail = refusal(obs, &refused, primary_known, old_role.as_deref());
        if primary_known || !roles_of_role(&roles, role.as_deref()) {
            let change = describe_change(
                (&old_role, &role),
                (old_roles.as_deref(), &roles),
                (&old_status, &status),
            );
            detail.push_str(&format!("; {change}"));
        }
        if status != obs.status {
            detail.push_str(&format!(", kept status {status} (not {})", obs.status));
        }
        (role, roles, status, Outcome::UnknownRole, detail)
    } else {
        let change = describe_change(
            (&old_role, &obs.role_slug),
            (old_roles.as_deref(), &reported),
            (&old_status, &obs.status),
        );
        (
            obs.role_slug.clone(),
            reported.to_vec(),
            obs.status.clone(),
            Outcome::Applied,
            match directory_cause(old_status.as_deref(), obs) {
                Some(cause) => format!("{cause}: {change}"),
                None => change,
            },
        )
    };
    let row = Membership {
        organization_id: obs.organization_id.clone(),
        user_id: obs.user_id.clone(),
        membership_id: obs.membership_id.clone(),
        role_slug: new_role.clone(),
        // Absence reports no slug: the last ones WorkOS reported stay on record.
        workos_role_slug: match obs.inferred {
            true => stored.and_then(|s| s.workos_role_slug.clone()),
            false => obs.role_slug.clone(),
        },
        role_slugs: new_roles.clone(),
        workos_role_slugs: match obs.inferred {
            true => stored
                .map(|s| s.workos_role_slugs.clone())
                .unwrap_or_default(),
            false => reported.to_vec(),
        },
        status: new_status.clone(),
        version: obs.version,
        updated_at: now,
    };
    if let Some(s) = stored.filter(|s| is_repeat(s, &row, outcome)) {
        let write = says_more(s, &row).then_some(row);
        return Decision {
            outcome: Outcome::Unchanged,
            write,
            audit: None,
            refetch,
        };
    }
    let audit = audit(
        obs,
        now,
        outcome,
        (old_role, new_role),
        (old_roles, Some(new_roles)),
        (old_status, Some(new_status)),
        detail,
    );
    Decision {
        outcome,
        write: Some(row),
        audit: Some(audit),
        refetch,
    }
}

/// The role set an observation reports, and whether it is to be confirmed by a refetch. A webhook or
/// Events API payload without `roles` (which WorkOS may leave out even with multiple roles on)
/// names only its primary role: over a stored set of more than its primary role, taking that as
/// the set would take away roles WorkOS may still give. The stored set is kept, with the new
/// primary role, and the membership is fetched again to learn its set.
fn reported_set<'a>(
    stored: Option<&Membership>,
    obs: &'a Observation,
) -> (Cow<'a, [String]>, bool) {
    match stored {
        Some(s)
            if !obs.roles_reported
                && !obs.deleted
                && obs.event_id.is_some()
                && !roles_of_role(&s.role_slugs, s.role_slug.as_deref()) =>
        {
            let set = role_set(obs.role_slug.as_deref(), s.role_slugs.iter().cloned());
            (Cow::Owned(set), true)
        }
        _ => (Cow::Borrowed(&obs.role_slugs), false),
    }
}

/// The status an observation with an unknown slug leaves: its own, except that it never makes a
/// kept role active. It may take access away (a deactivation), never give it: an inactive admin
/// whom WorkOS re-activates under a slug the app does not know stays inactive.
fn status_under_unknown_role(stored: Option<&Membership>, obs: &Observation) -> String {
    match stored {
        Some(s) if s.role_slug.is_some() && obs.status == ACTIVE && s.status != ACTIVE => {
            s.status.clone()
        }
        _ => obs.status.clone(),
    }
}

/// A stale observation the trail already accounts for: one decided before (same version), or one that
/// says what the membership was at that version. Such a late repeat writes no audit row.
/// Under an unknown slug the trail holds the status that was kept: an activation it refused is
/// accounted for too (decided in order, it would have been refused and changed nothing).
fn already_known(history: &HistoryMark, obs: &Observation, role_known: bool) -> bool {
    let status = if obs.deleted {
        DELETED
    } else {
        obs.status.as_str()
    };
    let refused_activation =
        !role_known && status == ACTIVE && history.new_status.as_deref() != Some(ACTIVE);
    history.version == obs.version
        || (history.workos_role_slug == obs.role_slug
            && (history.new_status.as_deref() == Some(status) || refused_activation))
}

/// Whether the new row repeats the stored role and status (for a refused slug: the same refused slug),
/// which makes the observation `unchanged`.
fn is_repeat(stored: &Membership, row: &Membership, outcome: Outcome) -> bool {
    stored.role_slug == row.role_slug
        && stored.role_slugs == row.role_slugs
        && stored.status == row.status
        && (outcome != Outcome::UnknownRole
            || (stored.workos_role_slug == row.workos_role_slug
                && stored.workos_role_slugs == row.workos_role_slugs))
}

/// Whether an unchanged observation still moves the row on (a newer version, a new reported slug).
fn says_more(stored: &Membership, row: &Membership) -> bool {
    stored.version < row.version
        || stored.workos_role_slug != row.workos_role_slug
        || stored.workos_role_slugs != row.workos_role_slugs
        || stored.membership_id != row.membership_id
}

/// What a change of a directory-managed membership's status means: WorkOS deprovisions a member
/// (inactive, role reset to the default) and reprovisions one (active, previous role) when the
/// directory says so, so an operator asking why an admin lost access reads the cause.
fn directory_cause(old_status: Option<&str>, obs: &Observation) -> Option<&'static str> {
    if !obs.directory_managed {
        return None;
    }
    match (old_status, obs.status.as_str()) {
        (Some(ACTIVE), "inactive") => Some("directory deprovision"),
        (Some("inactive"), ACTIVE) => Some("directory reprovision"),
        _ => None,
    }
}

/// The start of an `unknown_role` detail: which slugs were refused and what was kept.
fn refusal(obs: &Observation, refused: &[&str], primary_known: bool, kept: Option<&str>) -> String {
    let primary = obs.role_slug.as_deref().unwrap_or("");
    if !primary_known && refused.iter().all(|s| *s == primary) {
        return format!(
            "role {primary:?} is not a known role; kept {}",
            kept.unwrap_or("no role")
        );
    }
    let names: Vec<String> = refused.iter().map(|s| format!("{s:?}")).collect();
    let mut detail = match names.len() {
        1 => format!("role {} is not a known role", names[0]),
        _ => format!("roles {} are not known roles", names.join(", ")),
    };
    if !primary_known {
        detail.push_str(&format!("; kept {}", kept.unwrap_or("no role")));
    }
    detail
}

/// Whether a role set is just its primary role (what a single-role environment reports).
fn roles_of_role(roles: &[String], role: Option<&str>) -> bool {
    match role {
        Some(role) => roles.len() == 1 && roles[0] == role,
        None => roles.is_empty(),
    }
}

/// `role a -> b, status x -> y`, with `, roles [..] -> [..]` when either set holds more than its
/// primary role (so that single-role environments read as before).
fn describe_change(
    (old_role, new_role): (&Option<String>, &Option<String>),
    (old_roles, new_roles): (Option<&[String]>, &[String]),
    (old_status, new_status): (&Option<String>, &str),
) -> String {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".to_owned());
    let mut change = format!(
        "role {} -> {}, status {} -> {}",
        show(old_role),
        show(new_role),
        show(old_status),
        new_status
    );
    let plain = old_roles.is_none_or(|old| roles_of_role(old, old_role.as_deref()))
        && roles_of_role(new_roles, new_role.as_deref());
    if !plain {
        change.push_str(&format!(
            ", roles [{}] -> [{}]",
            old_roles.unwrap_or_default().join(", "),
            new_roles.join(", ")
        ));
    }
    change
}

type Pair = (Option<String>, Option<String>);
type Sets = (Option<Vec<String>>, Option<Vec<String>>);

fn audit(
    obs: &Observation,
    now: Timestamp,
    outcome: Outcome,
    role: Pair,
    roles: Sets,
    status: Pair,
    detail: String,
) -> AuditEntry {
    AuditEntry {
        recorded_at: now,
        organization_id: obs.organization_id.clone(),
        user_id: obs.user_id.clone(),
        membership_id: obs.membership_id.clone(),
        source: obs.source,
        event_id: obs.event_id.clone(),
        workos_role_slug: obs.role_slug.clone(),
        old_role: role.0,
        new_role: role.1,
        old_roles: roles.0,
        new_roles: roles.1,
        old_status: status.0,
        new_status: status.1,
        outcome,
        detail,
        version: obs.version,
    }
}

/// Reconciles one observation in its own transaction (none when a read shows it would write
/// nothing).
pub async fn reconcile(db: &Db, obs: &Observation, now: Timestamp) -> Result<Outcome, DbError> {
    let stored = db
        .membership_with_role(&obs.organization_id, &obs.user_id)
        .await?;
    Ok(reconcile_and_read(db, obs, now, stored.as_ref()).await?.0)
}

/// Reconciles one observation and reads the row it leaves. `earlier` is the stored row as a caller
/// read it before it made the observation, with whether the slug WorkOS last reported for it is a
/// known role (`None`: nothing stored, or not read). When the rules, run against that row, would
/// write nothing and answer `unchanged`, that is the answer and nothing is written or locked: the
/// read is a consistent snapshot, so the login is ordered at the moment of that read. Anything
/// else goes through a write transaction that reads the row again.
pub async fn reconcile_and_read(
    db: &Db,
    obs: &Observation,
    now: Timestamp,
    earlier: Option<&(Membership, HashSet<String>)>,
) -> Result<(Outcome, Option<Membership>), DbError> {
    if let Some((stored, _)) = earlier.filter(|e| writes_nothing(e, obs, now)) {
        return Ok((Outcome::Unchanged, Some(stored.clone())));
    }
    let _under_way = db.write_under_way();
    let written = async {
        let mut tx = db.begin_write().await?;
        let outcomes = reconcile_batch(&mut tx, &[obs], now).await?;
        let row = tx.membership(&obs.organization_id, &obs.user_id).await?;
        tx.commit().await?;
        Ok((outcomes[0], row))
    }
    .await;
    db.note_write(&written);
    written
}

/// Whether the rules, run against `stored`, answer `unchanged` and write nothing. That needs the
/// observed slug to be the one WorkOS last reported (otherwise the row would move on), so the
/// known-ness read with the row is the observed slug's.
fn writes_nothing(
    (stored, reported_known): &(Membership, HashSet<String>),
    obs: &Observation,
    now: Timestamp,
) -> bool {
    if obs.role_slug != stored.workos_role_slug || obs.role_slugs != stored.workos_role_slugs {
        return false;
    }
    let decision = decide(Some(stored), obs, reported_known, None, now);
    decision.outcome == Outcome::Unchanged && decision.write.is_none()
}

/// Reconciles observations, in order, inside the caller's write transaction (which the caller
/// commits): one lock statement, one read of every membership touched, one upsert and one audit
/// insert, whatever the number of observations. Each observation sees the ones before it.
pub async fn reconcile_batch(
    tx: &mut WriteTx<'_>,
    observations: &[&Observation],
    now: Timestamp,
) -> Result<Vec<Outcome>, DbError> {
    reconcile_in(&mut tx.store(), observations, now).await
}

/// [`reconcile_batch`] in any [`BatchStore`]'s transaction: [`apply`] with observations only.
pub async fn reconcile_in<S: BatchStore>(
    store: &mut S,
    observations: &[&Observation],
    now: Timestamp,
) -> Result<Vec<Outcome>, DbError> {
    let items: Vec<Item> = observations.iter().map(|o| Item::Observed(o)).collect();
    let applied = apply(store, &items, now).await?;
    Ok(applied
        .into_iter()
        .map(|a| match a {
            Applied::Reconciled(outcome) => outcome,
            // An observation is always reconciled; the other words belong to deliveries.
            _ => Outcome::Unchanged,
        })
        .collect())
}

/// One item of a batch: an observation a path made, or a delivery for the inbox with the
/// observation of its membership event (none for another event type or an invalid one).
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    Observed(&'a Observation),
    Delivered {
        event_id: &'a str,
        event_type: &'a str,
        payload: &'a str,
        observation: Option<&'a Observation>,
        /// What it asks to fetch again from the WorkOS API (queued with the delivery).
        refetch: Option<&'a Refetch>,
        /// How the inbox takes it when there is no observation (ignored, invalid, refetch_queued).
        settled: Applied,
    },
}

impl<'a> Item<'a> {
    fn observation(&self) -> Option<&'a Observation> {
        match *self {
            Self::Observed(obs) => Some(obs),
            Self::Delivered { observation, .. } => observation,
        }
    }

    fn event_id(&self) -> Option<&'a str> {
        match *self {
            Self::Observed(_) => None,
            Self::Delivered { event_id, .. } => Some(event_id),
        }
    }
}

/// The one write path of every healing path: in the caller's write transaction, locks every
/// membership the items touch (sorted), reads them with the inbox's ids and the known roles, runs
/// the rules over the observations in order ([`plan_with`]), and writes the plan and the new
/// deliveries. A delivery whose event id the inbox holds, or that came earlier in the batch, is
/// [`Applied::Duplicate`] and changes nothing. Answers come back in item order.
pub async fn apply<S: BatchStore>(
    store: &mut S,
    items: &[Item<'_>],
    now: Timestamp,
) -> Result<Vec<Applied>, DbError> {
    let first = first_occurrences(items);
    // Lock first, then look for duplicates: a concurrent batch (another committer or replica)
    // holding the same event holds its membership's lock, so once we have it that batch has
    // committed and its event id is visible here.
    let all: Vec<&Observation> = first
        .iter()
        .filter_map(|&i| items[i].observation())
        .collect();
    let keys = sorted_keys(&all);
    let keys: Vec<&Key> = keys.iter().collect();
    store.lock_memberships(&keys).await?;
    let ids: Vec<&str> = first.iter().filter_map(|&i| items[i].event_id()).collect();
    let mut snapshot = store.read(&ids, &keys).await?;
    let known = std::mem::take(&mut snapshot.known_events);
    let fresh: Vec<usize> = first
        .into_iter()
        .filter(|&i| items[i].event_id().is_none_or(|id| !known.contains(id)))
        .collect();
    let members: Vec<(usize, &Observation)> = fresh
        .iter()
        .filter_map(|&i| Some((i, items[i].observation()?)))
        .collect();
    let observations: Vec<&Observation> = members.iter().map(|(_, o)| *o).collect();
    let plan = plan_with(store, snapshot, &observations, now).await?;
    let mut answers = vec![Applied::Duplicate; items.len()];
    for &i in &fresh {
        if let Item::Delivered { settled, .. } = items[i] {
            answers[i] = settled;
        }
    }
    for ((i, _), outcome) in members.iter().zip(&plan.outcomes) {
        answers[*i] = Applied::Reconciled(*outcome);
    }
    let mut rows: Vec<InboxRow> = fresh
        .iter()
        .filter_map(|&i| match items[i] {
            Item::Delivered {
                event_id,
                event_type,
                payload,
                ..
            } => Some(InboxRow {
                event_id,
                event_type,
                payload,
                outcome: answers[i].as_str(),
            }),
            Item::Observed(_) => None,
        })
        .collect();
    // Events of no membership take no lock above, so two replicas can hold the same ids; inserted in
    // one order (by id), the second waits for the first instead of deadlocking with it.
    rows.sort_unstable_by_key(|r| r.event_id);
    let refetches: Vec<QueuedRefetch> = fresh
        .iter()
        .filter_map(|&i| match items[i] {
            Item::Delivered {
                event_id,
                event_type,
                refetch: Some(refetch),
                ..
            } => Some(QueuedRefetch {
                refetch,
                event_id,
                reason: event_type,
            }),
            _ => None,
        })
        .collect();
    let mut writes = plan.writes();
    writes.refetches = refetches;
    writes.refetches.extend(
        plan.refetches
            .iter()
            .map(|(refetch, event_id)| QueuedRefetch {
                refetch,
                event_id,
                reason: ROLES_ABSENT,
            }),
    );
    let inserted = store.write(&writes, &rows, now).await?;
    if inserted != rows.len() as u64 {
        // Another transaction (another replica) stored one of these ids since the read above.
        return Err(DbError::Conflict);
    }
    Ok(answers)
}

/// The `refetch_queue.reason` of a membership event that left its role set unsaid.
pub const ROLES_ABSENT: &str = "roles_absent";

/// Indexes of every observation and of the first delivery of each event id, in order.
fn first_occurrences(items: &[Item<'_>]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    (0..items.len())
        .filter(|&i| items[i].event_id().is_none_or(|id| seen.insert(id)))
        .collect()
}

/// The memberships these observations touch, sorted and distinct.
pub fn sorted_keys(observations: &[&Observation]) -> Vec<Key> {
    let mut keys: Vec<Key> = observations.iter().map(|o| key_of(o)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// What the rules decided for a batch of observations: an outcome each, and the rows to write.
#[derive(Debug, Default)]
pub struct Plan {
    pub outcomes: Vec<Outcome>,
    /// The last row decided for each membership written.
    pub memberships: BTreeMap<Key, Membership>,
    /// Memberships to fetch again ([`Decision::refetch`]), with the event that left the set unsaid.
    pub refetches: Vec<(Refetch, String)>,
    /// Audit rows, in order.
    pub audits: Vec<AuditEntry>,
}

impl Plan {
    /// The writes, as [`BatchStore::write`] takes them.
    pub fn writes(&self) -> Writes<'_> {
        Writes {
            memberships: self.memberships.values().collect(),
            audits: &self.audits,
            refetches: Vec::new(),
        }
    }
}

/// Runs the rules over the observations, in order, from a [`Snapshot`] the caller read after taking
/// the lock of every membership they touch (its memberships must include all of them); reads only
/// stale trails. Each observation sees the decisions before it; the caller writes the [`Plan`].
pub async fn plan_with<S: BatchStore>(
    store: &mut S,
    snapshot: Snapshot,
    observations: &[&Observation],
    now: Timestamp,
) -> Result<Plan, DbError> {
    let (mut rows, known) = (snapshot.memberships, snapshot.roles);
    let trails = stored_trails(store, &rows, observations).await?;
    let mut plan = Plan {
        outcomes: Vec::with_capacity(observations.len()),
        ..Plan::default()
    };
    for obs in observations {
        let key = key_of(obs);
        let stored = rows.get(&key);
        let history = match is_stale(stored, obs) {
            true => history_as_of(store, &trails, &plan.audits, obs).await?,
            false => None,
        };
        let decision = decide(stored, obs, &known, history.as_ref(), now);
        if let Some(row) = decision.write {
            rows.insert(key.clone(), row.clone());
            plan.memberships.insert(key, row);
        }
        plan.audits.extend(decision.audit);
        plan.outcomes.push(decision.outcome);
        if let (true, Some(event_id)) = (decision.refetch, &obs.event_id) {
            let refetch = Refetch::Membership(obs.membership_id.clone());
            plan.refetches.push((refetch, event_id.clone()));
        }
    }
    Ok(plan)
}

fn key_of(obs: &Observation) -> Key {
    (obs.organization_id.clone(), obs.user_id.clone())
}

/// The stored trails as of each observation that may turn out stale (older than or as old as a
/// version stored or seen earlier in the batch), read in one statement before the batch writes.
async fn stored_trails<S: BatchStore>(
    store: &mut S,
    rows: &HashMap<Key, Membership>,
    observations: &[&Observation],
) -> Result<StoredTrails, DbError> {
    let mut newest: HashMap<(&str, &str), Timestamp> = HashMap::new();
    let mut points = Vec::new();
    for obs in observations {
        let key = (obs.organization_id.as_str(), obs.user_id.as_str());
        let stored = rows.get(&key_of(obs)).map(|m| m.version);
        let seen = newest.get(&key).copied().max(stored);
        if seen.is_some_and(|v| obs.version <= v) {
            points.push((key.0, key.1, obs.version));
        }
        newest.insert(key, seen.map_or(obs.version, |v| v.max(obs.version)));
    }
    points.sort_unstable();
    points.dedup();
    let mut marks = store.trails(&points).await?;
    Ok(points
        .into_iter()
        .map(|(org, user, version)| {
            let point = (org.to_owned(), user.to_owned(), version);
            let mark = marks.remove(&point);
            (point, mark)
        })
        .collect())
}

/// What [`stored_trails`] read: for each point it asked for, the mark found (`None`: no trail).
type StoredTrails = HashMap<(String, String, Timestamp), Option<HistoryMark>>;

/// The trail as of the observation's version: the stored trail, overtaken by rows this batch is
/// about to append.
async fn history_as_of<S: BatchStore>(
    store: &mut S,
    trails: &StoredTrails,
    pending: &[AuditEntry],
    obs: &Observation,
) -> Result<Option<HistoryMark>, DbError> {
    let in_batch = pending
        .iter()
        .filter(|a| a.organization_id == obs.organization_id && a.user_id == obs.user_id)
        .filter(|a| {
            a.version <= obs.version && (a.outcome != Outcome::Stale || a.version == obs.version)
        })
        .max_by_key(|a| a.version)
        .map(|a| HistoryMark {
            version: a.version,
            workos_role_slug: a.workos_role_slug.clone(),
            new_status: a.new_status.clone(),
        });
    let point = (
        obs.organization_id.clone(),
        obs.user_id.clone(),
        obs.version,
    );
    let stored = match trails.get(&point) {
        Some(mark) => mark.clone(),
        // Not foreseen as possibly stale (it cannot happen, but a read is always right).
        None => {
            let asked = (
                obs.organization_id.as_str(),
                obs.user_id.as_str(),
                obs.version,
            );
            store.trails(&[asked]).await?.remove(&point)
        }
    };
    Ok(match (stored, in_batch) {
        (Some(s), Some(b)) if s.version > b.version => Some(s),
        (s, b) => b.or(s),
    })
}
