//! Catch-up paths: Events API sync, organization resync, replay of stored events, prune.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use rolesync::db::StoredFilter;
use rolesync::db::{Backend, Db};
use rolesync::metrics::Metrics;
use rolesync::reconcile::Outcome;
use rolesync::sync::{SyncError, SyncReport, Syncer, EVENTS, STREAM};
use rolesync::timestamp::Timestamp;
use rolesync::workos::{WorkosClient, WorkosError};
use serde_json::Value;

use crate::fake_workos::{api_membership, page, FakeWorkos, Reply, Seen};
use crate::support::{
    assert_chain, audit_count, audit_of, exec, int, membership, membership_event, rows, v, TestApp,
    TestClock, TestDb,
};

/// The time every syncer's clock reads, the same as `TestApp`'s.
const NOW: &str = "2026-11-25T12:00:00.000Z";

fn now() -> Timestamp {
    Timestamp::parse(NOW).unwrap()
}

/// A syncer over `db` that reads the Events API of `fake`, looking back one hour on its first run.
fn syncer(db: &Db, fake: &FakeWorkos) -> Syncer {
    let metrics = Arc::new(Metrics::new());
    Syncer {
        db: db.clone(),
        workos: WorkosClient::new(&fake.url, Some("sk_test".parse().unwrap()), metrics.clone()),
        clock: TestClock::at(NOW),
        metrics,
        lookback: Duration::from_secs(3600),
        settle: Duration::from_secs(30),
    }
}

/// A membership event as the Events API lists it, created `ago` before the tests' now.
fn event_created(id: &str, user: &str, version: i64, ago: Duration) -> Value {
    let mut e = event(id, "created", user, "member", "active", version);
    let at = Timestamp::from_micros(now().micros() - ago.as_micros() as i64).unwrap();
    e["created_at"] = Value::String(at.to_string());
    e
}

fn workos(fake: &FakeWorkos) -> WorkosClient {
    WorkosClient::new(
        &fake.url,
        Some("sk_test".parse().unwrap()),
        Arc::new(Metrics::new()),
    )
}

/// A membership event as the Events API lists it (the webhook envelope).
fn event(id: &str, kind: &str, user: &str, role: &str, status: &str, version: i64) -> Value {
    serde_json::from_slice(&membership_event(id, kind, user, role, status, version)).unwrap()
}

/// `n` `.created` events `evt_<first>`.. for users `user_<i>`, all `member`, version 1.
fn created_events(first: usize, n: usize) -> Vec<Value> {
    (first..first + n)
        .map(|i| {
            event(
                &format!("evt_{i:04}"),
                "created",
                &format!("user_{i:04}"),
                "member",
                "active",
                1,
            )
        })
        .collect()
}

/// The query string of a request the fake saw, decoded.
fn query_of(seen: &Seen) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://fake/?{}", seen.query))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

async fn cursor(db: &Db) -> Option<String> {
    db.cursor(STREAM).await.unwrap()
}

async fn inbox_count(db: &Db) -> i64 {
    db.event_count().await.unwrap()
}

/// The stored payload and outcome of one inbox row, if the row exists.
async fn inbox_row(db: &Db, event_id: &str) -> Option<(Option<String>, String)> {
    let sql = "SELECT payload, outcome FROM webhook_events WHERE event_id = $1";
    rows(db, sql, &[event_id])
        .await
        .pop()
        .map(|mut row| (row[0].take(), row[1].take().unwrap()))
}

/// Audit rows per event id, for every event id that has any.
async fn audit_rows_per_event(db: &Db) -> HashMap<String, i64> {
    let sql =
        "SELECT event_id, COUNT(*) FROM role_audit WHERE event_id IS NOT NULL GROUP BY event_id";
    rows(db, sql, &[])
        .await
        .into_iter()
        .map(|row| {
            (
                row[0].clone().unwrap(),
                row[1].as_ref().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Asserts that events `evt_<0>`..`evt_<n-1>` are each stored once and audited exactly once.
async fn assert_each_applied_once(db: &Db, n: usize, what: &str) {
    assert_eq!(
        inbox_count(db).await,
        n as i64,
        "{what}: one inbox row per event"
    );
    let per_event = audit_rows_per_event(db).await;
    assert_eq!(per_event.len(), n, "{what}: every event audited");
    for i in 0..n {
        let id = format!("evt_{i:04}");
        assert_eq!(
            per_event.get(&id),
            Some(&1),
            "{what}: {id} audited exactly once"
        );
        let (payload, outcome) = inbox_row(db, &id).await.unwrap();
        assert!(payload.is_some(), "{what}: {id} payload kept");
        assert_eq!(outcome, "applied", "{what}: {id} stored outcome");
    }
    assert_eq!(
        audit_count(db).await,
        n as i64,
        "{what}: no other audit rows"
    );
}

fn applied(report: &SyncReport) -> usize {
    report.outcomes.get("applied").copied().unwrap_or(0)
}

both! {
    async fn a_missed_webhook_is_healed_by_the_events_catch_up(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.script([page(vec![event("e2", "updated", "user_1", "admin", "active", 2)], None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!((report.skipped, report.pages, report.events, applied(&report)), (false, 1, 1, 1), "{report:?}");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str(), row.version), (Some("admin"), "active", v(2)));
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!(audit.len(), 2, "one row for the webhook, one for the catch-up");
        assert_eq!((audit[1].source.as_str(), audit[1].outcome.as_str(), audit[1].event_id.as_deref()),
            ("events", "applied", Some("e2")));
        assert_chain(&audit);
        let (payload, outcome) = inbox_row(&t.db, "e2").await.expect("the caught-up event is in the inbox");
        assert_eq!((payload.is_some(), outcome.as_str()), (true, "applied"));
        assert_eq!(cursor(&t.db).await.as_deref(), Some("e2"), "the cursor is the last event applied");
        let seen = &fake.requests()[0];
        assert_eq!((seen.path.as_str(), seen.authorization.as_deref()), ("/events", Some("Bearer sk_test")));
    }

    async fn an_event_delivered_by_webhook_and_then_by_sync_is_applied_once(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        let body = membership_event("e1", "updated", "user_1", "admin", "active", 1);
        assert_eq!(app.deliver(&body).await.1["outcome"], "applied");
        fake.script([page(vec![serde_json::from_slice(&body).unwrap()], None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!(report.outcomes.get("duplicate"), Some(&1), "sync answers duplicate: {report:?}");
        assert_eq!(report.outcomes.len(), 1, "{report:?}");
        assert_eq!((inbox_count(&t.db).await, audit_count(&t.db).await), (1, 1), "one inbox row, one audit row");
        assert_eq!(inbox_row(&t.db, "e1").await.unwrap().1, "applied", "the webhook's outcome stays");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("e1"), "a duplicate still moves the cursor");
    }

    async fn an_event_caught_up_by_sync_and_then_delivered_by_webhook_is_applied_once(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        let body = membership_event("e1", "updated", "user_1", "admin", "active", 1);
        fake.script([page(vec![serde_json::from_slice(&body).unwrap()], None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!(applied(&report), 1, "{report:?}");
        let (status, answer) = app.deliver(&body).await;
        assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("duplicate")), "{answer}");
        assert_eq!((inbox_count(&t.db).await, audit_count(&t.db).await), (1, 1), "one inbox row, one audit row");
        assert_eq!(audit_of(&t.db, "org_1", "user_1").await[0].source, "events");
    }

    async fn an_event_shown_late_is_applied_because_the_cursor_waits_for_the_settle_window(t) {
        let fake = FakeWorkos::start().await;
        let old = Duration::from_secs(3600);
        let young = Duration::from_secs(5);
        // Pass 1: evt_0002 (5 s old) is visible; evt_0001, older by a few seconds, not yet.
        fake.script([page(vec![event_created("evt_0000", "user_1", 1, old), event_created("evt_0002", "user_3", 1, young)], None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!(report.events, 2, "both visible events are applied: {report:?}");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0000"), "the cursor stops before the unsettled evt_0002");
        // Pass 2: evt_0001 has become visible.
        fake.script([page(vec![event_created("evt_0001", "user_2", 1, Duration::from_secs(10)), event_created("evt_0002", "user_3", 1, young)], None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!(query_of(&fake.requests()[1]).get("after").map(String::as_str), Some("evt_0000"), "read again from the settled cursor");
        assert_eq!(report.outcomes.get("applied"), Some(&1), "evt_0001 applied, evt_0002 a duplicate: {report:?}");
        assert!(membership(&t.db, "org_1", "user_2").await.is_some(), "the late event is not skipped");
        // A minute later both have settled: the cursor moves to the last.
        fake.script([page(vec![event_created("evt_0001", "user_2", 1, Duration::from_secs(10)), event_created("evt_0002", "user_3", 1, young)], None)]);
        let mut later = syncer(&t.db, &fake);
        later.clock = TestClock::at("2026-11-25T12:01:00.000Z");
        later.run_once().await.unwrap();
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0002"), "settled, the cursor moves on");
        assert_each_applied_once(&t.db, 3, "each event once").await;
    }

    async fn failed_passes_are_counted_and_readiness_reports_the_catch_up_failing(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        fake.always(Reply::status(401));
        let mut s = syncer(&t.db, &fake);
        s.metrics = app.state.metrics.clone();
        for pass in 1..=3 {
            assert!(s.run_once().await.is_err(), "pass {pass} fails");
            let (_, body) = app.request(axum::http::Request::get("/readyz").body(axum::body::Body::empty()).unwrap()).await;
            let expected = if pass < 3 { "ok" } else { "failing" };
            assert_eq!((body["status"].as_str(), body["catch_up"].as_str()), (Some("ready"), Some(expected)), "after {pass} failed passes");
        }
        let text = app.state.metrics.render();
        assert!(text.contains("rolesync_sync_failed_passes_total 3"), "{text}");
        fake.always(page(vec![], None));
        s.run_once().await.unwrap();
        let (_, body) = app.request(axum::http::Request::get("/readyz").body(axum::body::Body::empty()).unwrap()).await;
        assert_eq!(body["catch_up"], "ok", "one pass that works clears it");
    }

    async fn a_cursor_workos_refuses_falls_back_to_the_lookback_and_resyncs_the_stored_organizations(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        assert!(t.db.advance_cursor(STREAM, None, "evt_expired", now()).await.unwrap());
        fake.script([
            Reply::status(400),
            page(vec![api_membership("user_1", "admin", "active", &v(2).to_string())], None),
            page(vec![], None),
        ]);
        let s = syncer(&t.db, &fake);
        s.run_once().await.unwrap();
        let requests = fake.requests();
        assert_eq!(query_of(&requests[0]).get("after").map(String::as_str), Some("evt_expired"));
        assert_eq!(requests[1].path, "/organizations/org_1", "the stored organization is resynced");
        assert_eq!(requests[2].path, "/user_management/organization_memberships");
        let last = query_of(&requests[3]);
        assert!(last.contains_key("range_start") && !last.contains_key("after"), "then from the lookback: {last:?}");
        let one = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!(one.role_slug.as_deref(), Some("admin"), "healed by the resync");
        assert_eq!(audit_of(&t.db, "org_1", "user_1").await.last().unwrap().source, "resync");
        assert!(s.metrics.render().contains("rolesync_sync_cursor_resets_total 1"));
    }

    async fn the_cursor_survives_a_restart(t) {
        let fake = FakeWorkos::start().await;
        fake.script([page(created_events(0, 100), Some("evt_0099")), page(created_events(100, 5), None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!((report.pages, report.events, applied(&report)), (2, 105, 105), "{report:?}");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0104"), "the cursor is the last event id");
        let first = query_of(&fake.requests()[0]);
        assert_eq!(first.get("events").map(String::as_str), Some(EVENTS));
        assert_eq!(first.get("limit").map(String::as_str), Some("100"));
        assert_eq!(first.get("range_start").map(String::as_str), Some("2026-11-25T11:00:00.000000Z"),
            "the first ever request starts at now - lookback: {first:?}");
        assert!(!first.contains_key("after"), "no cursor yet: {first:?}");
        let second = query_of(&fake.requests()[1]);
        assert_eq!((second.get("after").map(String::as_str), second.contains_key("range_start")), (Some("evt_0099"), false),
            "the second page follows the cursor: {second:?}");

        // A restart: a new process with its own connections to the same database.
        let restarted = Db::connect(&t.url, 4).await.unwrap();
        fake.script([page(vec![], None)]);
        let report = syncer(&restarted, &fake).run_once().await.unwrap();
        assert_eq!((report.pages, report.events), (0, 0), "{report:?}");
        let third = query_of(&fake.requests()[2]);
        assert_eq!((third.get("after").map(String::as_str), third.contains_key("range_start")), (Some("evt_0104"), false),
            "after a restart the stored cursor is used: {third:?}");
        assert_eq!(cursor(&restarted).await.as_deref(), Some("evt_0104"), "an empty page leaves the cursor");
        assert_each_applied_once(&t.db, 105, "after the restart").await;
        restarted.close().await;
    }

    async fn a_crash_between_pages_resumes_from_the_last_committed_page(t) {
        let fake = FakeWorkos::start().await;
        let malformed = Reply { body: "{\"data\": [".into(), ..Reply::status(200) };
        fake.script([page(created_events(0, 100), Some("evt_0099")), malformed]);
        let failed = syncer(&t.db, &fake).run_once().await;
        assert!(failed.is_err(), "a malformed second page fails the pass: {failed:?}");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0099"), "page 1 is committed with its cursor");
        assert_each_applied_once(&t.db, 100, "after the failed pass").await;

        // WorkOS down: 500 with a Retry-After beyond the page deadline gives up at once.
        fake.script([Reply::status(500).header("retry-after", "120")]);
        let failed = syncer(&t.db, &fake).run_once().await;
        assert!(failed.is_err(), "a 500 fails the pass: {failed:?}");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0099"), "a failed fetch leaves the cursor");

        fake.script([page(created_events(100, 5), None)]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!((report.pages, applied(&report)), (1, 5), "only page 2 is applied: {report:?}");
        let seen = fake.requests();
        assert_eq!(seen.len(), 4);
        for (i, s) in seen.iter().enumerate().skip(1) {
            assert_eq!(query_of(s).get("after").map(String::as_str), Some("evt_0099"), "request {i} resumes from page 1's last id");
        }
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0104"));
        assert_each_applied_once(&t.db, 105, "after the resumed pass").await;
    }

    async fn a_rate_limit_between_pages_is_retried_within_the_pass(t) {
        let fake = FakeWorkos::start().await;
        fake.script([
            page(created_events(0, 100), Some("evt_0099")),
            Reply::status(429).header("retry-after", "0"),
            page(created_events(100, 5), None),
        ]);
        let report = syncer(&t.db, &fake).run_once().await.unwrap();
        assert_eq!((report.pages, report.events, applied(&report)), (2, 105, 105), "{report:?}");
        assert_eq!(fake.calls(), 3, "page 1, the 429, page 2 again");
        assert_eq!(query_of(&fake.requests()[2]).get("after").map(String::as_str), Some("evt_0099"), "the retry asks for the same page");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0104"));
        assert_each_applied_once(&t.db, 105, "after the rate limit").await;
    }

    async fn a_full_page_without_usable_events_fails_the_pass_instead_of_asking_again_forever(t) {
        let fake = FakeWorkos::start().await;
        let no_ids: Vec<Value> = (0..100).map(|i| serde_json::json!({"object": "event", "n": i})).collect();
        fake.always(page(no_ids, Some("cursor_x")));
        let pass = tokio::time::timeout(Duration::from_secs(10), syncer(&t.db, &fake).run_once()).await;
        let pass = pass.expect("the pass ends although the cursor cannot move");
        assert!(matches!(pass, Err(SyncError::Workos(WorkosError::Malformed(_)))), "{pass:?}");
        assert_eq!(fake.calls(), 1, "the page is not asked for again");
        assert_eq!((cursor(&t.db).await, inbox_count(&t.db).await), (None, 0));
    }

    async fn the_cursor_only_moves_from_the_value_a_syncer_read(t) {
        let advance = |old: Option<&'static str>, new: &'static str| t.db.advance_cursor(STREAM, old, new, now());
        assert!(advance(None, "a").await.unwrap(), "the first cursor is set");
        assert!(!advance(None, "b").await.unwrap(), "a second first-run loses");
        assert!(!advance(Some("x"), "b").await.unwrap(), "a stale cursor loses");
        assert!(advance(Some("a"), "c").await.unwrap(), "the current cursor moves");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("c"));
        // An operator clears the cursor to start over: the next first run takes it, once.
        exec(&t.db, "UPDATE sync_state SET cursor = NULL").await;
        assert!(advance(None, "d").await.unwrap(), "a cleared cursor is set again");
        assert!(!advance(None, "e").await.unwrap(), "and a second first-run loses");
        assert_eq!(cursor(&t.db).await.as_deref(), Some("d"));
    }

    async fn resync_removes_a_membership_gone_from_workos_and_a_dry_run_writes_nothing(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        app.deliver(&membership_event("e2", "created", "user_2", "member", "active", 1)).await;
        fake.always(page(vec![api_membership("user_1", "admin", "active", &v(2).to_string())], None));
        let before = (membership(&t.db, "org_1", "user_1").await, membership(&t.db, "org_1", "user_2").await);

        let changes = rolesync::resync::resync(&t.db, &workos(&fake), "org_1", true, now()).await.unwrap();
        let outcomes: HashMap<&str, Outcome> = changes.iter().map(|c| (c.observed.user_id.as_str(), c.outcome)).collect();
        assert_eq!(outcomes, HashMap::from([("user_1", Outcome::Applied), ("user_2", Outcome::Removed)]), "dry run outcomes");
        let stored_2 = changes.iter().find(|c| c.observed.user_id == "user_2").unwrap();
        assert_eq!(stored_2.stored.as_ref().and_then(|s| s.role_slug.as_deref()), Some("member"), "the change shows what is stored");
        assert_eq!(audit_count(&t.db).await, 2, "a dry run writes no audit row");
        let after = (membership(&t.db, "org_1", "user_1").await, membership(&t.db, "org_1", "user_2").await);
        assert_eq!(after, before, "a dry run changes no membership");
        assert_eq!(fake.requests()[0].path, "/organizations/org_1", "the organization is checked first");
        let query = query_of(&fake.requests()[1]);
        assert_eq!(fake.requests()[1].path, "/user_management/organization_memberships");
        assert_eq!((query.get("statuses").map(String::as_str), query.get("organization_id").map(String::as_str)),
            (Some("active,inactive,pending"), Some("org_1")), "every status is asked for: {query:?}");

        let changes = rolesync::resync::resync(&t.db, &workos(&fake), "org_1", false, now()).await.unwrap();
        let outcomes: HashMap<&str, Outcome> = changes.iter().map(|c| (c.observed.user_id.as_str(), c.outcome)).collect();
        assert_eq!(outcomes, HashMap::from([("user_1", Outcome::Applied), ("user_2", Outcome::Removed)]));
        let one = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((one.role_slug.as_deref(), one.status.as_str()), (Some("admin"), "active"));
        let two = membership(&t.db, "org_1", "user_2").await.unwrap();
        let below = rolesync::timestamp::Timestamp::from_micros(v(1).micros() - 1).unwrap();
        assert_eq!((two.role_slug.as_deref(), two.status.as_str(), two.version), (None, "deleted", below), "a tombstone versioned just below the state it removed");
        for user in ["user_1", "user_2"] {
            let audit = audit_of(&t.db, "org_1", user).await;
            assert_eq!((audit.len(), audit[1].source.as_str()), (2, "resync"), "{user}: one resync audit row");
            assert_chain(&audit);
        }
        assert_eq!(audit_of(&t.db, "org_1", "user_2").await[1].outcome, "removed");

        let again = rolesync::resync::resync(&t.db, &workos(&fake), "org_1", false, now()).await.unwrap();
        assert!(again.iter().all(|c| c.outcome == Outcome::Unchanged), "a second resync changes nothing: {again:?}");
        assert_eq!(audit_count(&t.db).await, 4, "and audits nothing");
    }

    async fn resync_skips_a_membership_it_cannot_store_and_heals_the_others(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        app.deliver(&membership_event("e2", "created", "user_2", "member", "active", 1)).await;
        fake.always(page(vec![
            api_membership("user_1", "admin", "active", &v(2).to_string()),
            api_membership("user_2", "admin", "active", "9999-12-31T23:59:59.999Z"),
        ], None));
        let changes = rolesync::resync::resync(&t.db, &workos(&fake), "org_1", false, now()).await.unwrap();
        let outcomes: HashMap<&str, Outcome> = changes.iter().map(|c| (c.observed.user_id.as_str(), c.outcome)).collect();
        assert_eq!(outcomes, HashMap::from([("user_1", Outcome::Applied)]), "the refused one is skipped, not removed");
        let two = membership(&t.db, "org_1", "user_2").await.unwrap();
        assert_eq!((two.role_slug.as_deref(), two.status.as_str()), (Some("member"), "active"), "left as stored");
    }

    async fn resync_against_an_environment_without_the_organization_changes_nothing(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        fake.organizations_unknown().always(page(vec![], None));
        let error = rolesync::resync::resync(&t.db, &workos(&fake), "org_1", false, now()).await.unwrap_err();
        assert!(error.to_string().contains("does not know organization"), "{error}");
        let one = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((one.role_slug.as_deref(), one.status.as_str()), (Some("admin"), "active"), "nothing removed");
        assert_eq!(audit_count(&t.db).await, 1);
    }

    async fn resync_never_removes_a_membership_stored_while_it_lists(t) {
        let app = Arc::new(TestApp::new(&t.db));
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        // WorkOS serves its list before user_2 exists there; user_2's webhook lands meanwhile.
        fake.always(page(vec![api_membership("user_1", "member", "active", &v(1).to_string())], None).delayed(Duration::from_millis(400)));
        let resync = tokio::spawn({
            let (db, workos) = (t.db.clone(), workos(&fake));
            async move { rolesync::resync::resync(&db, &workos, "org_1", false, now()).await.unwrap() }
        });
        while fake.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_, hook) = app.deliver(&membership_event("e2", "created", "user_2", "admin", "active", 2)).await;
        assert_eq!(hook["outcome"], "applied");
        let changes = resync.await.unwrap();
        assert!(changes.iter().all(|c| c.observed.user_id != "user_2"), "user_2 is not in the resync: {changes:?}");
        let two = membership(&t.db, "org_1", "user_2").await.unwrap();
        assert_eq!((two.role_slug.as_deref(), two.status.as_str()), (Some("admin"), "active"), "the webhook's row stays");
    }

    async fn replay_of_stored_events_applies_a_role_added_later(t) {
        let app = TestApp::new(&t.db);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        app.deliver(&membership_event("e2", "created", "user_2", "member", "active", 1)).await;
        for (id, user) in [("e3", "user_1"), ("e4", "user_2")] {
            let (_, answer) = app.deliver(&membership_event(id, "updated", user, "creator", "active", 2)).await;
            assert_eq!(answer["outcome"], "unknown_role", "{id}");
            let row = membership(&t.db, "org_1", user).await.unwrap();
            assert_eq!((row.role_slug.as_deref(), row.workos_role_slug.as_deref()), (Some("member"), Some("creator")), "{user}: the role is kept");
        }
        assert!(t.db.add_role("creator", now()).await.unwrap());
        let filter = StoredFilter { outcome: Some("unknown_role".into()), ..StoredFilter::default() };

        let done = rolesync::replay::replay_stored(&t.db, &filter, now()).await.unwrap();
        let summary: Vec<(&str, &str, &str)> = done.iter().map(|r| (r.event_id.as_str(), r.before.as_str(), r.after.as_str())).collect();
        assert_eq!(summary, [("e3", "unknown_role", "applied"), ("e4", "unknown_role", "applied")]);
        for (id, user) in [("e3", "user_1"), ("e4", "user_2")] {
            let row = membership(&t.db, "org_1", user).await.unwrap();
            assert_eq!(row.role_slug.as_deref(), Some("creator"), "{user}");
            let audit = audit_of(&t.db, "org_1", user).await;
            let outcomes: Vec<(&str, &str)> = audit.iter().map(|r| (r.source.as_str(), r.outcome.as_str())).collect();
            assert_eq!(outcomes, [("webhook", "applied"), ("webhook", "unknown_role"), ("replay", "applied")], "{user}");
            assert_eq!(audit[2].event_id.as_deref(), Some(id));
            assert_chain(&audit);
            assert_eq!(inbox_row(&t.db, id).await.unwrap().1, "applied", "{id}: the inbox records the new outcome");
        }

        let again = rolesync::replay::replay_stored(&t.db, &filter, now()).await.unwrap();
        assert!(again.is_empty(), "the filter no longer matches: {again:?}");
        assert_eq!(audit_count(&t.db).await, 6, "nothing re-applied");
    }

    async fn pruning_payloads_keeps_duplicates_detectable(t) {
        let app = TestApp::new(&t.db);
        let body = membership_event("e1", "updated", "user_1", "admin", "active", 1);
        assert_eq!(app.deliver(&body).await.1["outcome"], "applied");
        let future = Timestamp::from_millis(now().millis() + 86_400_000).unwrap();
        assert_eq!(t.db.prune_payloads(future).await.unwrap(), 1);
        assert_eq!(inbox_row(&t.db, "e1").await, Some((None, "applied".to_owned())), "the id and outcome stay, the payload goes");
        assert_eq!(t.db.prune_payloads(future).await.unwrap(), 0, "nothing left to prune");
        app.clock.advance_millis(60_000);
        let (status, answer) = app.deliver(&body).await;
        assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("duplicate")), "{answer}");
        assert_eq!(audit_count(&t.db).await, 1);
        let replayed = rolesync::replay::replay_stored(&t.db, &StoredFilter::default(), now()).await.unwrap();
        assert!(replayed.is_empty(), "an event without payload cannot be replayed: {replayed:?}");
        assert_eq!(t.db.pruned_events(&StoredFilter::default()).await.unwrap(), 1, "and it is counted as skipped");
        let other = StoredFilter { event_id: Some("e2".into()), ..StoredFilter::default() };
        assert_eq!(t.db.pruned_events(&other).await.unwrap(), 0, "under the same filter");
    }

    async fn pruning_ids_deletes_only_rows_older_than_the_cutoff(t) {
        let app = TestApp::new(&t.db);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        app.clock.advance_millis(2 * 3_600_000);
        app.deliver(&membership_event("e2", "updated", "user_1", "admin", "active", 2)).await;
        let cutoff = Timestamp::from_millis(now().millis() + 3_600_000).unwrap();
        assert_eq!(t.db.prune_ids(cutoff).await.unwrap(), 1, "only e1 is older than the cutoff");
        assert!(inbox_row(&t.db, "e1").await.is_none());
        assert_eq!(inbox_row(&t.db, "e2").await.map(|r| r.1), Some("applied".to_owned()), "the younger id stays");
        let (_, answer) = app.deliver(&membership_event("e2", "updated", "user_1", "admin", "active", 2)).await;
        assert_eq!(answer["outcome"], "duplicate", "the kept id still deduplicates");
        assert_eq!(audit_count(&t.db).await, 2, "audit rows are never pruned");
    }
}

/// Two syncers with their own connections, started together against a slow Events API.
async fn two_concurrent_passes(t: &TestDb) -> (SyncReport, SyncReport) {
    let fake = FakeWorkos::start().await;
    fake.always(page(created_events(0, 10), None).delayed(Duration::from_millis(500)));
    let other = Db::connect(&t.url, 8).await.unwrap();
    let (a, b) = (syncer(&t.db, &fake), syncer(&other, &fake));
    let (a, b) = tokio::join!(
        tokio::spawn(async move { a.run_once().await }),
        tokio::spawn(async move { b.run_once().await })
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_each_applied_once(&t.db, 10, "after two concurrent passes").await;
    assert_eq!(
        applied(&a) + applied(&b),
        10,
        "each event applied by one pass: {a:?} {b:?}"
    );
    assert_eq!(cursor(&t.db).await.as_deref(), Some("evt_0009"));
    other.close().await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_sync_passes_on_postgres_apply_each_event_once() {
    let t = TestDb::new(Backend::Postgres).await;
    let (a, b) = two_concurrent_passes(&t).await;
    assert!(
        a.skipped != b.skipped,
        "one pass holds the lease, the other skips: {a:?} {b:?}"
    );
    let lease = t.db.try_sync_lease().await.unwrap();
    assert!(lease.is_some(), "the lease is released after the pass");
    lease.unwrap().release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_sync_passes_on_sqlite_apply_each_event_once() {
    let t = TestDb::new(Backend::Sqlite).await;
    let (a, b) = two_concurrent_passes(&t).await;
    assert!(!a.skipped && !b.skipped, "SQLite has no lease: {a:?} {b:?}");
    assert!(
        a.pages == 0 || b.pages == 0,
        "the cursor check made the later commit a no-op: {a:?} {b:?}"
    );
}

#[test]
fn prune_refuses_to_delete_event_ids_younger_than_three_days() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rolesync.db").display());
    let migrated = Command::new(env!("CARGO_BIN_EXE_rolesync"))
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let prune = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rolesync"))
            .arg("prune")
            .args(args)
            .env_clear()
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let refused = prune(&["--ids-older-than", "1d"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "1d is refused: {stderr}");
    assert!(
        stderr.contains("3d"),
        "the message names the 3d minimum: {stderr}"
    );
    assert!(
        stderr.contains("--ids-older-than"),
        "the message names the flag: {stderr}"
    );

    let accepted = prune(&["--ids-older-than", "3d", "--payloads-older-than", "1d"]);
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        accepted.status.success(),
        "3d is accepted: {stdout} {}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(
        stdout.contains("0 payloads dropped") && stdout.contains("0 event ids deleted"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_pass_on_postgres_works_with_a_pool_of_one_connection() {
    let t = TestDb::with_connections(Backend::Postgres, 1).await;
    let fake = FakeWorkos::start().await;
    fake.script([page(created_events(0, 3), None)]);
    let report = syncer(&t.db, &fake).run_once().await;
    let report = report.expect("the lease does not hold the only pool connection");
    assert_eq!(applied(&report), 3, "{report:?}");
    assert_each_applied_once(&t.db, 3, "with a pool of one").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sync_pass_on_postgres_frees_the_lease() {
    let t = TestDb::new(Backend::Postgres).await;
    let fake = FakeWorkos::start().await;
    fake.always(page(created_events(0, 3), None).delayed(Duration::from_secs(5)));
    let s = syncer(&t.db, &fake);
    let pass = tokio::spawn(async move { s.run_once().await });
    while fake.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        t.db.try_sync_lease().await.unwrap().is_none(),
        "the running pass holds the lease"
    );
    pass.abort();
    assert!(pass.await.unwrap_err().is_cancelled());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let lease = loop {
        if let Some(lease) = t.db.try_sync_lease().await.unwrap() {
            break lease;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease of a cancelled pass is freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lease.release().await;
    assert_eq!(
        (cursor(&t.db).await, inbox_count(&t.db).await),
        (None, 0),
        "the cancelled pass wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_committing_the_same_event_during_a_sync_pass_on_postgres_does_not_fail_it() {
    let t = TestDb::new(Backend::Postgres).await;
    let fake = FakeWorkos::start().await;
    let body = membership_event("e1", "updated", "user_1", "admin", "active", 1);
    fake.script([page(vec![serde_json::from_slice(&body).unwrap()], None)]);
    // A webhook delivery of e1 in flight: stored and reconciled, not yet committed.
    let incoming = rolesync::ingest::Incoming::parse(
        &body,
        rolesync::reconcile::Source::Webhook,
        rolesync::timestamp::Timestamp::now(),
    )
    .unwrap();
    let mut webhook = t.db.begin_write().await.unwrap();
    let receipts = rolesync::ingest::deliver_batch_in(&mut webhook, &[incoming], now())
        .await
        .unwrap();
    assert_eq!(receipts[0].outcome, "applied");

    let s = syncer(&t.db, &fake);
    let pass = tokio::spawn(async move { s.run_once().await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = int(
            &t.db,
            "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory'",
            &[],
        )
        .await;
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sync pass waits for the membership lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    webhook.commit().await.unwrap();

    let report = pass.await.unwrap().expect("the pass survives the race");
    assert_eq!(report.outcomes.get("duplicate"), Some(&1), "{report:?}");
    assert_eq!(
        (inbox_count(&t.db).await, audit_count(&t.db).await),
        (1, 1),
        "applied once, by the webhook"
    );
    assert_eq!(inbox_row(&t.db, "e1").await.unwrap().1, "applied");
    assert_eq!(cursor(&t.db).await.as_deref(), Some("e1"));
}
