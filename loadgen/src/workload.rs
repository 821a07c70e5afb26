//! The webhook workload: unique membership events in version order, a send order with older versions
//! and duplicates mixed in, and the event bodies as WorkOS would send them.

use clap::Args;
use rolesync::timestamp::Timestamp;
use serde_json::{json, Value};

/// `2026-01-01T00:00:00.000Z`: the version of the first generated event; event `seq` has `BASE_MS + seq`.
pub const BASE_MS: i64 = 1_767_225_600_000;
/// Version of every prefilled membership (a day before the first event).
pub const PREFILL_VERSION_MS: i64 = BASE_MS - 86_400_000;
/// Memberships per organization.
pub const USERS_PER_ORG: usize = 50;
/// Largest membership count the zero-padded ids keep in text order.
pub const MAX_MEMBERSHIPS: usize = 10_000_000;
/// A role slug rolesync does not know.
pub const UNKNOWN_ROLE: &str = "creator";
/// How far (in deliveries) a resend may trail its original.
const DUPLICATE_SPREAD: usize = 1_000;

/// The percentages of the mix.
#[derive(Args, Debug, Clone, Copy)]
pub struct Mix {
    /// Percent of deliveries that resend an earlier body (same event id, new signature)
    #[arg(long, default_value_t = 10.0)]
    pub duplicate_pct: f64,
    /// Percent of deliveries sent after a newer version of the same membership
    #[arg(long, default_value_t = 10.0)]
    pub older_pct: f64,
    /// Percent of membership events carrying a role rolesync does not know
    #[arg(long, default_value_t = 5.0)]
    pub unknown_pct: f64,
    /// Percent of membership events that delete an existing membership
    #[arg(long, default_value_t = 3.0)]
    pub delete_pct: f64,
    /// Percent of events that are not membership events (answered `ignored`)
    #[arg(long, default_value_t = 1.0)]
    pub ignored_pct: f64,
}

/// What an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Created,
    Updated,
    Deleted,
    Other,
}

/// One unique event. `role`/`status` are what WorkOS reports (for a deletion: the last state).
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: usize,
    pub member: usize,
    pub kind: Kind,
    pub role: &'static str,
    pub status: &'static str,
    pub version: i64,
}

/// The generated workload.
#[derive(Debug)]
pub struct Workload {
    pub seed: u64,
    pub memberships: usize,
    /// Memberships `0..prefilled` start as the prefill wrote them.
    pub prefilled: usize,
    /// Unique events, in version order (`events[i].seq == i`).
    pub events: Vec<Event>,
    /// Send order: indices into `events`; a resend repeats an index.
    pub order: Vec<u32>,
    pub duplicates: usize,
    /// Unique deliveries sent after a newer version of the same membership.
    pub older: usize,
}

/// The organization of membership `i`.
pub fn org_id(i: usize) -> String {
    format!("org_bench_{:06}", i / USERS_PER_ORG)
}

/// The user of membership `i`.
pub fn user_id(i: usize) -> String {
    format!("user_bench_{i:07}")
}

/// The WorkOS id of membership `i`.
pub fn membership_id(i: usize) -> String {
    format!("om_bench_{i:07}")
}

/// The membership index of a generated user id.
pub fn user_index(user_id: &str) -> Option<usize> {
    user_id.strip_prefix("user_bench_")?.parse().ok()
}

/// The canonical text of a version.
pub fn ts(ms: i64) -> String {
    Timestamp::from_millis(ms)
        .expect("generated versions are in range")
        .to_string()
}

/// Whether rolesync knows the slug (its seeded roles).
pub fn is_known(role: &str) -> bool {
    matches!(role, "admin" | "member")
}

impl Workload {
    /// `deliveries` in total over `memberships`, the first `prefilled` of which exist already.
    pub fn generate(
        seed: u64,
        deliveries: usize,
        memberships: usize,
        prefilled: usize,
        mix: &Mix,
    ) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let duplicates = percent_of(deliveries, mix.duplicate_pct);
        let unique = deliveries - duplicates;
        let mut state: Vec<Option<(&'static str, &'static str)>> = (0..memberships)
            .map(|i| (i < prefilled).then_some(("member", "active")))
            .collect();
        let events: Vec<Event> = (0..unique)
            .map(|seq| next_event(&mut rng, seq, &mut state, mix))
            .collect();
        let mut order: Vec<u32> = (0..unique as u32).collect();
        swap_older(
            &mut rng,
            &events,
            &mut order,
            percent_of(deliveries, mix.older_pct),
        );
        let order = with_duplicates(&mut rng, order, duplicates);
        let older = count_older(&events, &order, memberships);
        Self {
            seed,
            memberships,
            prefilled,
            events,
            order,
            duplicates,
            older,
        }
    }

    /// The event id of event `seq`.
    pub fn event_id(&self, seq: usize) -> String {
        format!("event_b{:08x}{seq:09}", self.seed as u32)
    }

    /// How many unique events are of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.events.iter().filter(|e| e.kind == kind).count()
    }

    /// How many unique membership events carry an unknown role.
    pub fn unknown_roles(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e.kind != Kind::Other && !is_known(e.role))
            .count()
    }

    /// The body WorkOS would send for event `seq`.
    pub fn body(&self, seq: usize) -> Vec<u8> {
        let e = &self.events[seq];
        let at = ts(e.version);
        let id = self.event_id(seq);
        let value = match e.kind {
            Kind::Other => json!({
                "object": "event", "id": id, "event": "organization.updated",
                "data": {"object": "organization", "id": org_id(e.member), "name": "Bench org", "domains": []},
                "created_at": at, "context": {}
            }),
            _ => membership_body(e, id, at),
        };
        serde_json::to_vec(&value).expect("a JSON value serializes")
    }
}

fn membership_body(e: &Event, id: String, at: String) -> Value {
    let kind = match e.kind {
        Kind::Created => "created",
        Kind::Updated => "updated",
        _ => "deleted",
    };
    json!({
        "object": "event",
        "id": id,
        "event": format!("organization_membership.{kind}"),
        "data": {
            "object": "organization_membership",
            "id": membership_id(e.member),
            "user_id": user_id(e.member),
            "organization_id": org_id(e.member),
            "status": e.status,
            "role": {"slug": e.role},
            "roles": [{"slug": e.role}],
            "custom_attributes": {},
            "created_at": ts(PREFILL_VERSION_MS),
            "updated_at": at,
        },
        "created_at": at,
        "context": {}
    })
}

fn percent_of(n: usize, pct: f64) -> usize {
    ((n as f64 * pct / 100.0).round() as usize).min(n)
}

/// The next event, in version order; `state` holds each live membership's (role, status).
fn next_event(
    rng: &mut fastrand::Rng,
    seq: usize,
    state: &mut [Option<(&'static str, &'static str)>],
    mix: &Mix,
) -> Event {
    let member = rng.usize(..state.len());
    let version = BASE_MS + seq as i64;
    if rng.f64() * 100.0 < mix.ignored_pct {
        return Event {
            seq,
            member,
            kind: Kind::Other,
            role: "",
            status: "",
            version,
        };
    }
    let unknown = rng.f64() * 100.0 < mix.unknown_pct;
    let (kind, role, status) = match state[member] {
        None => (Kind::Created, first_role(rng, unknown), first_status(rng)),
        Some((role, status)) if rng.f64() * 100.0 < mix.delete_pct => (Kind::Deleted, role, status),
        Some((role, status)) => {
            let (role, status) = change(rng, unknown, role, status);
            (Kind::Updated, role, status)
        }
    };
    state[member] = (kind != Kind::Deleted).then_some((role, status));
    Event {
        seq,
        member,
        kind,
        role,
        status,
        version,
    }
}

fn first_role(rng: &mut fastrand::Rng, unknown: bool) -> &'static str {
    match (unknown, rng.u8(..10)) {
        (true, _) => UNKNOWN_ROLE,
        (false, 0..=1) => "admin",
        _ => "member",
    }
}

fn first_status(rng: &mut fastrand::Rng) -> &'static str {
    if rng.u8(..10) < 3 {
        "pending"
    } else {
        "active"
    }
}

/// An update: mostly a role change, sometimes a status change, sometimes neither (attributes only).
fn change(
    rng: &mut fastrand::Rng,
    unknown: bool,
    role: &'static str,
    status: &'static str,
) -> (&'static str, &'static str) {
    let known = if is_known(role) { role } else { "member" };
    match (unknown, rng.u8(..10)) {
        (true, _) => (UNKNOWN_ROLE, status),
        (false, 0..=6) => (if known == "admin" { "member" } else { "admin" }, status),
        (false, 7..=8) => (
            known,
            if status == "active" {
                "inactive"
            } else {
                "active"
            },
        ),
        _ => (known, status),
    }
}

/// Swaps `target` disjoint pairs of consecutive versions of one membership, so that the newer one is
/// sent first: each pair makes exactly one older delivery.
fn swap_older(rng: &mut fastrand::Rng, events: &[Event], order: &mut [u32], target: usize) {
    let mut next_of = vec![None; events.len()];
    let mut last: Vec<Option<usize>> =
        vec![None; events.iter().map(|e| e.member + 1).max().unwrap_or(0)];
    for e in events.iter().filter(|e| e.kind != Kind::Other) {
        if let Some(prev) = last[e.member].replace(e.seq) {
            next_of[prev] = Some(e.seq);
        }
    }
    let mut used = vec![false; events.len()];
    let (mut swapped, mut tries) = (0, 0);
    while swapped < target && tries < target.saturating_mul(20) && !events.is_empty() {
        tries += 1;
        let e = rng.usize(..events.len());
        let Some(f) = next_of[e] else { continue };
        if used[e] || used[f] {
            continue;
        }
        // `order` is still the identity here, so positions are event indices.
        order.swap(e, f);
        used[e] = true;
        used[f] = true;
        swapped += 1;
    }
}

/// Inserts `count` resends, each up to `DUPLICATE_SPREAD` deliveries after its original.
fn with_duplicates(rng: &mut fastrand::Rng, order: Vec<u32>, count: usize) -> Vec<u32> {
    let n = order.len();
    if n == 0 {
        return order;
    }
    let mut keyed: Vec<(usize, u32)> = order.iter().enumerate().map(|(p, &e)| (2 * p, e)).collect();
    for _ in 0..count {
        let p = rng.usize(..n);
        let at = (p + 1 + rng.usize(..DUPLICATE_SPREAD)).min(n - 1);
        keyed.push((2 * at + 1, order[p]));
    }
    keyed.sort_by_key(|k| k.0);
    keyed.into_iter().map(|k| k.1).collect()
}

/// Unique membership deliveries whose version is older than one sent before for the same membership.
fn count_older(events: &[Event], order: &[u32], memberships: usize) -> usize {
    let mut newest = vec![i64::MIN; memberships];
    let mut seen = vec![false; events.len()];
    let mut older = 0;
    for &i in order {
        let e = &events[i as usize];
        if std::mem::replace(&mut seen[e.seq], true) || e.kind == Kind::Other {
            continue;
        }
        if e.version < newest[e.member] {
            older += 1;
        }
        newest[e.member] = newest[e.member].max(e.version);
    }
    older
}
