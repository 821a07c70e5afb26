//! The reconcile rules, their audit rows, convergence under any order, and concurrent writers.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rolesync::db::{Backend, Db};
use rolesync::reconcile::{reconcile, Observation, Outcome};

use crate::support::{assert_chain, audit_of, membership, obs, v, TestDb};

/// outcome, old_role, new_role, old_status, new_status of an expected audit row.
type AuditExpectation = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

/// One rule case: observations applied first, then the one under test and what it must do.
struct Case {
    what: &'static str,
    before: Vec<Observation>,
    then: Observation,
    outcome: Outcome,
    /// role_slug, workos_role_slug, status, version of the row afterwards
    row: (
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
        i64,
    ),
    /// outcome, old_role, new_role, old_status, new_status of the new audit row; None when none
    audit: Option<AuditExpectation>,
}

fn cases() -> Vec<Case> {
    let member = |n| obs(n, Some("member"), "active", false);
    let admin = |n| obs(n, Some("admin"), "active", false);
    let creator = |n| obs(n, Some("creator"), "active", false);
    let deleted = |n| obs(n, Some("member"), "active", true);
    vec![
        Case {
            what: "a new membership is applied",
            before: vec![],
            then: member(1),
            outcome: Outcome::Applied,
            row: (Some("member"), Some("member"), "active", 1),
            audit: Some(("applied", None, Some("member"), None, "active")),
        },
        Case {
            what: "a role change is applied",
            before: vec![member(1)],
            then: admin(2),
            outcome: Outcome::Applied,
            row: (Some("admin"), Some("admin"), "active", 2),
            audit: Some((
                "applied",
                Some("member"),
                Some("admin"),
                Some("active"),
                "active",
            )),
        },
        Case {
            what: "a status change is applied",
            before: vec![member(1)],
            then: obs(2, Some("member"), "inactive", false),
            outcome: Outcome::Applied,
            row: (Some("member"), Some("member"), "inactive", 2),
            audit: Some((
                "applied",
                Some("member"),
                Some("member"),
                Some("active"),
                "inactive",
            )),
        },
        Case {
            what: "an older observation is stale and changes nothing",
            before: vec![admin(5)],
            then: member(3),
            outcome: Outcome::Stale,
            row: (Some("admin"), Some("admin"), "active", 5),
            audit: Some((
                "stale",
                Some("admin"),
                Some("admin"),
                Some("active"),
                "active",
            )),
        },
        Case {
            what: "a repeated stale observation is audited once",
            before: vec![admin(5), member(3)],
            then: member(3),
            outcome: Outcome::Stale,
            row: (Some("admin"), Some("admin"), "active", 5),
            audit: None,
        },
        Case {
            what: "a late repeat of an applied observation writes no audit",
            before: vec![member(1), admin(5)],
            then: member(1),
            outcome: Outcome::Stale,
            row: (Some("admin"), Some("admin"), "active", 5),
            audit: None,
        },
        Case {
            what: "a deletion leaves a tombstone without role",
            before: vec![admin(1)],
            then: deleted(2),
            outcome: Outcome::Removed,
            row: (None, Some("member"), "deleted", 2),
            audit: Some(("removed", Some("admin"), None, Some("active"), "deleted")),
        },
        Case {
            what: "a deletion of an unknown membership is recorded",
            before: vec![],
            then: deleted(2),
            outcome: Outcome::Removed,
            row: (None, Some("member"), "deleted", 2),
            audit: Some(("removed", None, None, None, "deleted")),
        },
        Case {
            what: "a second deletion is unchanged and advances the version",
            before: vec![admin(1), deleted(2)],
            then: deleted(3),
            outcome: Outcome::Unchanged,
            row: (None, Some("member"), "deleted", 3),
            audit: None,
        },
        Case {
            what: "a late older update cannot resurrect a deleted membership",
            before: vec![admin(1), deleted(3)],
            then: member(2),
            outcome: Outcome::Stale,
            row: (None, Some("member"), "deleted", 3),
            audit: Some(("stale", None, None, Some("deleted"), "deleted")),
        },
        Case {
            what: "an unknown role keeps the stored role",
            before: vec![member(1)],
            then: creator(2),
            outcome: Outcome::UnknownRole,
            row: (Some("member"), Some("creator"), "active", 2),
            audit: Some((
                "unknown_role",
                Some("member"),
                Some("member"),
                Some("active"),
                "active",
            )),
        },
        Case {
            what: "an unknown role never grants a role to a new membership",
            before: vec![],
            then: creator(1),
            outcome: Outcome::UnknownRole,
            row: (None, Some("creator"), "active", 1),
            audit: Some(("unknown_role", None, None, None, "active")),
        },
        Case {
            what: "an unknown role never makes a kept role active",
            before: vec![obs(1, Some("admin"), "inactive", false)],
            then: creator(2),
            outcome: Outcome::UnknownRole,
            row: (Some("admin"), Some("creator"), "inactive", 2),
            audit: Some((
                "unknown_role",
                Some("admin"),
                Some("admin"),
                Some("inactive"),
                "inactive",
            )),
        },
        Case {
            what: "the refused activation again is unchanged",
            before: vec![obs(1, Some("admin"), "inactive", false), creator(2)],
            then: creator(3),
            outcome: Outcome::Unchanged,
            row: (Some("admin"), Some("creator"), "inactive", 3),
            audit: None,
        },
        Case {
            what: "a late repeat of a refused activation writes no audit",
            before: vec![
                obs(1, Some("admin"), "inactive", false),
                creator(2),
                creator(3),
                member(4),
            ],
            then: creator(3),
            outcome: Outcome::Stale,
            row: (Some("member"), Some("member"), "active", 4),
            audit: None,
        },
        Case {
            what: "an unknown role still deactivates",
            before: vec![admin(1)],
            then: obs(2, Some("creator"), "inactive", false),
            outcome: Outcome::UnknownRole,
            row: (Some("admin"), Some("creator"), "inactive", 2),
            audit: Some((
                "unknown_role",
                Some("admin"),
                Some("admin"),
                Some("active"),
                "inactive",
            )),
        },
        Case {
            what: "a known role re-activates after a refused activation",
            before: vec![obs(1, Some("admin"), "inactive", false), creator(2)],
            then: member(3),
            outcome: Outcome::Applied,
            row: (Some("member"), Some("member"), "active", 3),
            audit: Some((
                "applied",
                Some("admin"),
                Some("member"),
                Some("inactive"),
                "active",
            )),
        },
        Case {
            what: "the same unknown role again is unchanged",
            before: vec![member(1), creator(2)],
            then: creator(3),
            outcome: Outcome::Unchanged,
            row: (Some("member"), Some("creator"), "active", 3),
            audit: None,
        },
        Case {
            what: "an identical newer observation only advances the version",
            before: vec![member(1)],
            then: member(2),
            outcome: Outcome::Unchanged,
            row: (Some("member"), Some("member"), "active", 2),
            audit: None,
        },
        Case {
            what: "the same observation twice changes nothing the second time",
            before: vec![admin(4)],
            then: admin(4),
            outcome: Outcome::Unchanged,
            row: (Some("admin"), Some("admin"), "active", 4),
            audit: None,
        },
        Case {
            what: "an equal version is not stale",
            before: vec![member(4)],
            then: admin(4),
            outcome: Outcome::Applied,
            row: (Some("admin"), Some("admin"), "active", 4),
            audit: Some((
                "applied",
                Some("member"),
                Some("admin"),
                Some("active"),
                "active",
            )),
        },
        Case {
            what: "a live update of the deletion's own version cannot resurrect it",
            before: vec![admin(1), deleted(3)],
            then: member(3),
            outcome: Outcome::Stale,
            row: (None, Some("member"), "deleted", 3),
            audit: None,
        },
        Case {
            what: "a deletion of the stored version applies",
            before: vec![admin(3)],
            then: deleted(3),
            outcome: Outcome::Removed,
            row: (None, Some("member"), "deleted", 3),
            audit: Some(("removed", Some("admin"), None, Some("active"), "deleted")),
        },
        Case {
            what: "a newer update after a deletion re-creates the membership",
            before: vec![admin(1), deleted(2)],
            then: member(3),
            outcome: Outcome::Applied,
            row: (Some("member"), Some("member"), "active", 3),
            audit: Some(("applied", None, Some("member"), Some("deleted"), "active")),
        },
    ]
}

async fn run_case(db: &Db, case: &Case) {
    for (i, o) in case.before.iter().enumerate() {
        reconcile(db, o, v(100 + i as i64)).await.unwrap();
    }
    let audit_before = audit_of(db, "org_1", "user_1").await.len();
    let outcome = reconcile(db, &case.then, v(200)).await.unwrap();
    assert_eq!(outcome, case.outcome, "{}: outcome", case.what);
    let row = membership(db, "org_1", "user_1").await.expect("row exists");
    let got = (
        row.role_slug.as_deref(),
        row.workos_role_slug.as_deref(),
        row.status.as_str(),
        row.version,
    );
    let (role, workos, status, version) = case.row;
    assert_eq!(
        got,
        (role, workos, status, v(version)),
        "{}: stored row",
        case.what
    );
    let audit = audit_of(db, "org_1", "user_1").await;
    assert_chain(&audit);
    match case.audit {
        None => assert_eq!(
            audit.len(),
            audit_before,
            "{}: no audit row expected",
            case.what
        ),
        Some((outcome, old_role, new_role, old_status, new_status)) => {
            assert_eq!(
                audit.len(),
                audit_before + 1,
                "{}: one audit row expected",
                case.what
            );
            let r = audit.last().unwrap();
            let got = (
                r.outcome.as_str(),
                r.old_role.as_deref(),
                r.new_role.as_deref(),
                r.old_status.as_deref(),
                r.new_status.as_deref(),
            );
            assert_eq!(
                got,
                (outcome, old_role, new_role, old_status, Some(new_status)),
                "{}: audit values",
                case.what
            );
            let t = &case.then;
            assert_eq!(
                (
                    r.organization_id.as_str(),
                    r.user_id.as_str(),
                    r.membership_id.as_str(),
                    r.source.as_str()
                ),
                ("org_1", "user_1", "om_1", "cli"),
                "{}: audit identity",
                case.what
            );
            assert_eq!(
                r.workos_role_slug, t.role_slug,
                "{}: audit workos slug",
                case.what
            );
            assert_eq!(r.event_id, None, "{}: audit event id", case.what);
            assert_eq!(
                r.version,
                t.version.to_string(),
                "{}: audit version",
                case.what
            );
            assert_eq!(
                r.recorded_at,
                v(200).to_string(),
                "{}: audit time",
                case.what
            );
            assert!(!r.detail.is_empty(), "{}: audit detail", case.what);
        }
    }
}

both! {
    async fn every_rule_decides_and_audits_as_specified(t) {
        for case in cases() {
            let fresh = TestDb::new(t.db.backend()).await;
            run_case(&fresh.db, &case).await;
        }
    }

    async fn concurrent_reconciles_of_one_membership_serialize(t) {
        let sixteen = TestDb::with_connections(t.db.backend(), 16).await;
        concurrent_reconciles(&sixteen.db).await;
    }

    async fn a_write_transaction_dropped_or_failed_lets_the_next_writer_in(t) {
        // On SQLite each write transaction holds the process's writer turn: dropping one
        // (the path of every error) must hand the turn on, or every later write would hang.
        let dropped = t.db.begin_write().await.unwrap();
        drop(dropped);
        let mut failing = t.db.begin_write().await.unwrap();
        assert!(failing.execute("INSERT INTO no_such_table VALUES (1)").await.is_err());
        drop(failing);
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), t.db.begin_write()).await;
        let mut next = next.expect("the next writer gets its turn").unwrap();
        rolesync::reconcile::reconcile_batch(&mut next, &[&obs(1, Some("admin"), "active", false)], v(2)).await.unwrap();
        next.commit().await.unwrap();
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap().role_slug.as_deref(), Some("admin"));
    }
}

/// The newest observation decides the final row.
fn expected_final(observations: &[Observation]) -> (Option<String>, String) {
    let newest = observations.iter().max_by_key(|o| o.version).unwrap();
    if newest.deleted {
        (None, "deleted".into())
    } else {
        (newest.role_slug.clone(), newest.status.clone())
    }
}

async fn concurrent_reconciles(db: &Db) {
    let roles = ["admin", "member"];
    let statuses = ["active", "inactive", "pending"];
    let observations: Vec<Observation> = (1..=64)
        .map(|n| {
            obs(
                n,
                Some(roles[fastrand::usize(..2)]),
                statuses[fastrand::usize(..3)],
                n % 11 == 0,
            )
        })
        .collect();
    let mut shuffled = observations.clone();
    fastrand::shuffle(&mut shuffled);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let db = db.clone();
            let mine: Vec<Observation> = shuffled.iter().skip(i).step_by(16).cloned().collect();
            tokio::spawn(async move {
                for o in mine {
                    reconcile(&db, &o, o.version).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let row = membership(db, "org_1", "user_1").await.unwrap();
    assert_eq!(
        (row.role_slug, row.status),
        expected_final(&observations),
        "final state is the newest"
    );
    assert_eq!(row.version, v(64));
    let audit = audit_of(db, "org_1", "user_1").await;
    assert_chain(&audit);
    assert_versions_audited_once(&audit);
}

fn assert_versions_audited_once(audit: &[rolesync::db::AuditRow]) {
    let mut seen = BTreeMap::new();
    for r in audit {
        *seen.entry(r.version.clone()).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "a version was audited twice: {seen:?}"
    );
}

/// A runtime for a property test's cases and a fresh database on `backend`.
fn property_db(backend: Backend) -> (tokio::runtime::Runtime, TestDb) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(TestDb::new(backend));
    (rt, t)
}

/// Any order of any multiset of observations (distinct versions, role sets among them) ends in the
/// newest state, `membership_roles` included, with a consistent audit chain and no audit row for a
/// repeated observation.
fn convergence_property(backend: Backend) {
    let (rt, t) = property_db(backend);
    let observation = (
        prop::sample::select(vec!["admin", "member"]),
        prop::sample::select(vec!["active", "inactive", "pending"]),
        prop::bool::weighted(0.2),
        prop::sample::subsequence(vec!["admin", "member", "viewer"], 0..=3),
    );
    let strategy =
        prop::collection::vec((observation, 1usize..=3), 1..8).prop_flat_map(|distinct| {
            let deliveries: Vec<usize> = distinct
                .iter()
                .enumerate()
                .flat_map(|(i, (_, n))| std::iter::repeat_n(i, *n))
                .collect();
            (Just(distinct), Just(deliveries).prop_shuffle())
        });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |((distinct, order) in strategy)| {
        let user = format!("user_p{}", counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let observations: Vec<Observation> = distinct.iter().enumerate().map(|(i, ((role, status, deleted, others), _))| {
            let mut o = obs(i as i64 + 1, Some(role), status, *deleted);
            o.user_id = user.clone();
            o.role_slugs = rolesync::domain::role_set(Some(role), others.iter().map(|s| s.to_string()));
            o
        }).collect();
        rt.block_on(async {
            for &i in &order {
                reconcile(&t.db, &observations[i], v(500)).await.unwrap();
            }
            let row = membership(&t.db, "org_1", &user).await.unwrap();
            prop_assert_eq!((row.role_slug, row.status), expected_final(&observations));
            let newest = observations.iter().max_by_key(|o| o.version).unwrap();
            // `viewer` is no role the app knows: never stored, the rest of the set applied.
            let set: Vec<String> = match newest.deleted {
                true => vec![],
                false => newest.role_slugs.iter().filter(|s| *s != "viewer").cloned().collect(),
            };
            let held = t.db.roles_of("org_1", &user).await.unwrap();
            prop_assert_eq!(&held, &set, "membership_roles holds the newest set");
            prop_assert_eq!(&row.role_slugs, &set);
            let audit = audit_of(&t.db, "org_1", &user).await;
            assert_chain(&audit);
            prop_assert!(audit.len() <= observations.len(), "more audit rows than distinct observations");
            assert_versions_audited_once(&audit);
            Ok(())
        })?;
    });
}

#[test]
fn any_order_of_observations_converges_on_sqlite() {
    convergence_property(Backend::Sqlite);
}

#[test]
fn any_order_of_observations_converges_on_postgres() {
    convergence_property(Backend::Postgres);
}

async fn commit_batch(db: &Db, part: &[&Observation]) -> Vec<Outcome> {
    let mut tx = db.begin_write().await.unwrap();
    let outcomes = rolesync::reconcile::reconcile_batch(&mut tx, part, v(100))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    outcomes
}

/// [`commit_batch`] on a group-commit worker's own connection ([`rolesync::db::Committer`]: on
/// SQLite a rusqlite connection of its own, on PostgreSQL a native one with per-execution plans).
async fn commit_batch_on_committer(db: &Db, part: &[&Observation]) -> Vec<Outcome> {
    let mut committer = db.committer();
    let mut tx = committer.begin().await.unwrap();
    let outcomes = rolesync::reconcile::reconcile_in(&mut tx.store(), part, v(100))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    outcomes
}

/// Which implementation commits the batches of [`batching_property`].
#[derive(Clone, Copy)]
enum Batches {
    Pooled,
    Committer,
}

/// Any split of a delivery sequence into batches (as group commit makes them) gives the same
/// outcomes, audit rows and final row as reconciling the deliveries one at a time (through the pool),
/// stale repeats and their trail lookups included.
fn batching_property(backend: Backend, batches: Batches) {
    let (rt, t) = property_db(backend);
    let observation = (
        prop::sample::select(vec!["admin", "member", "creator"]),
        prop::sample::select(vec!["active", "inactive"]),
        prop::bool::weighted(0.15),
        1i64..6,
    );
    let strategy = (
        prop::collection::vec(observation, 1..14),
        prop::collection::vec(prop::bool::ANY, 14),
    );
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |((sequence, cuts) in strategy)| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let for_user = |user: &str| -> Vec<Observation> {
            sequence.iter().map(|(role, status, deleted, version)| {
                let mut o = obs(*version, Some(role), status, *deleted);
                o.user_id = user.to_owned();
                o
            }).collect()
        };
        let (single, batched) = (format!("user_s{n}"), format!("user_b{n}"));
        let (one_by_one, in_batches) = (for_user(&single), for_user(&batched));
        rt.block_on(async {
            let mut expected = Vec::new();
            for o in &one_by_one {
                expected.extend(commit_batch(&t.db, &[o]).await);
            }
            let mut got = Vec::new();
            let mut part = Vec::new();
            for (i, o) in in_batches.iter().enumerate() {
                part.push(o);
                if cuts[i] || i + 1 == in_batches.len() {
                    let part = std::mem::take(&mut part);
                    got.extend(match batches {
                        Batches::Pooled => commit_batch(&t.db, &part).await,
                        Batches::Committer => commit_batch_on_committer(&t.db, &part).await,
                    });
                }
            }
            prop_assert_eq!(&got, &expected, "outcomes");
            let strip = |rows: Vec<rolesync::db::AuditRow>| -> Vec<_> {
                rows.into_iter().map(|r| (r.outcome, r.version, r.workos_role_slug, r.old_role, r.new_role, r.old_status, r.new_status)).collect()
            };
            let audit_single = strip(audit_of(&t.db, "org_1", &single).await);
            let audit_batched = strip(audit_of(&t.db, "org_1", &batched).await);
            prop_assert_eq!(audit_batched, audit_single, "audit rows");
            let row = |m: rolesync::reconcile::Membership| (m.role_slug, m.workos_role_slug, m.status, m.version);
            prop_assert_eq!(
                row(membership(&t.db, "org_1", &batched).await.unwrap()),
                row(membership(&t.db, "org_1", &single).await.unwrap())
            );
            Ok(())
        })?;
    });
}

#[test]
fn any_split_into_batches_matches_one_at_a_time_on_sqlite() {
    batching_property(Backend::Sqlite, Batches::Pooled);
}

#[test]
fn any_split_into_batches_matches_one_at_a_time_on_postgres() {
    batching_property(Backend::Postgres, Batches::Pooled);
}

#[test]
fn any_split_into_batches_on_the_sqlite_committer_matches_one_at_a_time_through_the_pool() {
    batching_property(Backend::Sqlite, Batches::Committer);
}

#[test]
fn any_split_into_batches_on_the_postgres_committer_matches_one_at_a_time_through_the_pool() {
    batching_property(Backend::Postgres, Batches::Committer);
}
