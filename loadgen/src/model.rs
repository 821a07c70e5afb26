//! The generator's model of rolesync: the outcome words, the final row each membership must reach, and
//! the outcomes a server would give if deliveries arrived exactly in send order.

use crate::workload::{is_known, Event, Kind, Workload, PREFILL_VERSION_MS};

/// Status of a deleted membership.
pub const DELETED: &str = "deleted";
/// The status under which the web app lets a role through.
pub const ACTIVE: &str = "active";

/// A successful webhook answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Unchanged,
    Duplicate,
    Stale,
    UnknownRole,
    Removed,
    Ignored,
}

impl Outcome {
    /// Every outcome, in ledger order.
    pub const ALL: [Outcome; 7] = [
        Self::Applied,
        Self::Unchanged,
        Self::Duplicate,
        Self::Stale,
        Self::UnknownRole,
        Self::Removed,
        Self::Ignored,
    ];

    /// The word rolesync answers and stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::UnknownRole => "unknown_role",
            Self::Removed => "removed",
            Self::Ignored => "ignored",
        }
    }

    /// The outcome a word names.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == word)
    }
}

/// Counts per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally([usize; 7]);

impl Tally {
    pub fn add(&mut self, outcome: Outcome) {
        self.0[outcome as usize] += 1;
    }

    pub fn get(&self, outcome: Outcome) -> usize {
        self.0[outcome as usize]
    }

    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }
}

/// A stored row as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    role: Option<&'static str>,
    workos: Option<&'static str>,
    status: &'static str,
    version: i64,
}

/// The row a membership must end with. `role` is `None` when it depends on arrival order (the newest
/// version carries an unknown role), and so is `status` when that version would also activate (an
/// unknown role never makes a kept role active): then only the other fields are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub role: Option<Option<&'static str>>,
    pub workos: Option<&'static str>,
    pub status: Option<&'static str>,
    pub version: i64,
}

fn prefilled_row() -> Stored {
    Stored {
        role: Some("member"),
        workos: Some("member"),
        status: "active",
        version: PREFILL_VERSION_MS,
    }
}

/// The reconcile rules of the README, on the model's rows; returns the outcome and the row after it.
fn decide(stored: Option<&Stored>, e: &Event) -> (Outcome, Option<Stored>) {
    if e.kind == Kind::Other {
        return (Outcome::Ignored, None);
    }
    if stored.is_some_and(|s| s.version > e.version) {
        return (Outcome::Stale, None);
    }
    let old_role = stored.and_then(|s| s.role);
    let (role, status, outcome) = match e.kind {
        Kind::Deleted => (None, DELETED, Outcome::Removed),
        _ if !is_known(e.role) => (
            old_role,
            unknown_role_status(stored, e),
            Outcome::UnknownRole,
        ),
        _ => (Some(e.role), e.status, Outcome::Applied),
    };
    let row = Stored {
        role,
        workos: Some(e.role),
        status,
        version: e.version,
    };
    let repeat = stored.is_some_and(|s| {
        s.role == row.role
            && s.status == row.status
            && (outcome != Outcome::UnknownRole || s.workos == row.workos)
    });
    (if repeat { Outcome::Unchanged } else { outcome }, Some(row))
}

/// The status an unknown role leaves: the event's, unless that would make a kept role active
/// (the model's copy of `rolesync::reconcile`'s rule, which it checks from outside).
fn unknown_role_status(stored: Option<&Stored>, e: &Event) -> &'static str {
    match stored {
        Some(s) if s.role.is_some() && e.status == ACTIVE && s.status != ACTIVE => s.status,
        _ => e.status,
    }
}

/// The outcomes if every delivery were decided in send order (true for concurrency 1).
pub fn serial_outcomes(w: &Workload) -> Tally {
    let mut rows: Vec<Option<Stored>> = (0..w.memberships)
        .map(|i| (i < w.prefilled).then(prefilled_row))
        .collect();
    let mut seen = vec![false; w.events.len()];
    let mut tally = Tally::default();
    for &i in &w.order {
        let e = &w.events[i as usize];
        if std::mem::replace(&mut seen[e.seq], true) {
            tally.add(Outcome::Duplicate);
            continue;
        }
        let (outcome, row) = decide(rows[e.member].as_ref(), e);
        tally.add(outcome);
        if let Some(row) = row.filter(|_| e.kind != Kind::Other) {
            rows[e.member] = Some(row);
        }
    }
    tally
}

/// The final row of every membership (`None`: no row); what depends on arrival order is left out
/// (see [`Expected`]).
pub fn expected_rows(w: &Workload) -> Vec<Option<Expected>> {
    let mut newest: Vec<Option<&Event>> = vec![None; w.memberships];
    for e in w.events.iter().filter(|e| e.kind != Kind::Other) {
        newest[e.member] = Some(e);
    }
    newest
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            Some(e) => Some(expected_of(e)),
            None if i < w.prefilled => Some(expected_of_row(&prefilled_row())),
            None => None,
        })
        .collect()
}

fn expected_of(e: &Event) -> Expected {
    let (role, status) = match e.kind {
        Kind::Deleted => (Some(None), Some(DELETED)),
        _ if is_known(e.role) => (Some(Some(e.role)), Some(e.status)),
        _ => (None, (e.status != ACTIVE).then_some(e.status)),
    };
    Expected {
        role,
        workos: Some(e.role),
        status,
        version: e.version,
    }
}

fn expected_of_row(s: &Stored) -> Expected {
    Expected {
        role: Some(s.role),
        workos: s.workos,
        status: Some(s.status),
        version: s.version,
    }
}
