//! Role changes that arrive without a role: group, role and directory events queue a refetch,
//! answered `refetch_queued` at once; the worker fetches from the WorkOS stand-in and reconciles
//! with source `refetch`.

use std::sync::Arc;
use std::time::Duration;

use rolesync::db::Db;
use rolesync::metrics::Metrics;
use rolesync::refetch::{Pass, Refetcher};
use rolesync::sync::Syncer;
use rolesync::timestamp::Timestamp;
use rolesync::workos::WorkosClient;
use serde_json::{json, Value};

use crate::fake_workos::{api_membership, page, FakeWorkos, Reply};
use crate::process::{post_signed, post_webhook, Server};
use crate::support::{assert_chain, audit_of, membership, membership_event, v, TestApp, TestClock};

const NOW: &str = "2026-11-25T12:00:00.000Z";

fn refetcher(app: &TestApp, fake: &FakeWorkos) -> Refetcher {
    let metrics = Arc::new(Metrics::new());
    Refetcher {
        db: app.state.db.clone(),
        workos: WorkosClient::new(&fake.url, Some("sk_test".parse().unwrap()), metrics.clone()),
        clock: app.clock.clone(),
        metrics,
        budget: None,
        lease: Duration::from_secs(60),
    }
}

fn event(id: &str, kind: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"object": "event", "id": id, "event": kind, "data": data,
        "created_at": "2026-11-25T11:59:59.000Z"}),
    )
    .unwrap()
}

fn group_event(id: &str, kind: &str, membership_id: &str) -> Vec<u8> {
    event(
        id,
        kind,
        json!({"group_id": "group_1", "organization_membership_id": membership_id}),
    )
}

/// `user_1`'s membership as the API answers it, with a role set.
fn answer(role: &str, roles: &[&str], version: i64) -> Reply {
    let mut m = api_membership("user_1", role, "active", &v(version).to_string());
    m["roles"] = roles.iter().map(|s| json!({"slug": s})).collect();
    Reply::json(m)
}

async fn queue(db: &Db) -> Vec<String> {
    let far = i64::MAX;
    db.refetch_due(far, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.target)
        .collect()
}

/// The paths of the membership fetches the stand-in saw.
fn fetches(fake: &FakeWorkos) -> Vec<String> {
    fake.requests()
        .into_iter()
        .map(|s| s.path)
        .filter(|p| p.starts_with("/user_management/organization_memberships/"))
        .collect()
}

both! {
    async fn a_group_event_queues_one_refetch_that_heals_with_source_refetch(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        // Two signals for one membership (a role given through two groups).
        for id in ["g1", "g2"] {
            let (status, answer) = app.deliver(&group_event(id, "group.member_added", "om_user_1")).await;
            assert_eq!((status.as_u16(), answer["outcome"].as_str()), (200, Some("refetch_queued")), "{id}: {answer}");
        }
        let (_, again) = app.deliver(&group_event("g1", "group.member_added", "om_user_1")).await;
        assert_eq!(again["outcome"], "duplicate");
        assert_eq!(queue(&t.db).await, ["om_user_1"]);
        assert_eq!(fake.calls(), 0, "the webhook answer never waits on WorkOS");

        fake.script([answer("admin", &["admin"], 2)]);
        let worker = refetcher(&app, &fake);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 1, deferred: 0 });
        assert_eq!(fetches(&fake), ["/user_management/organization_memberships/om_user_1"], "two signals, one fetch");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!(row.role_slug.as_deref(), Some("admin"));
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        let last = audit.last().unwrap();
        assert_eq!((last.source.as_str(), last.outcome.as_str(), last.event_id.as_deref()), ("refetch", "applied", Some("g2")));
        assert_chain(&audit);
        assert!(queue(&t.db).await.is_empty(), "done rows leave the queue");
        assert_eq!(worker.run_once().await.unwrap(), Pass::default(), "nothing left to fetch");
        assert_eq!(worker.metrics.refetch_queue_depth.get(), 0);
    }

    async fn a_membership_the_api_no_longer_has_is_removed(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        app.deliver(&group_event("g1", "group.member_removed", "om_user_1")).await;
        fake.script([Reply::status(404)]);
        refetcher(&app, &fake).run_once().await.unwrap();
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.status.as_str(), row.role_slug.as_deref()), ("deleted", None));
        let last = audit_of(&t.db, "org_1", "user_1").await.pop().unwrap();
        assert_eq!((last.source.as_str(), last.outcome.as_str()), ("refetch", "removed"));
    }

    async fn a_failed_refetch_is_retried_with_backoff_and_counted(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&group_event("g1", "group.member_added", "om_user_1")).await;
        fake.script([Reply::status(400)]);
        let worker = refetcher(&app, &fake);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 0, deferred: 1 });
        assert_eq!(queue(&t.db).await, ["om_user_1"], "kept for another attempt");
        assert_eq!(worker.run_once().await.unwrap(), Pass::default(), "not due before its backoff");
        assert_eq!(worker.metrics.refetch_queue_depth.get(), 1);
        app.clock.advance_millis(5_000);
        assert!(worker.metrics.render().contains("rolesync_refetch_attempts_total{outcome=\"failed\"} 1"), "{}", worker.metrics.render());
        fake.script([answer("member", &["member"], 1)]);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 1, deferred: 0 });
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap().role_slug.as_deref(), Some("member"), "a membership first seen through a refetch is stored");
    }

    async fn a_deleted_role_falls_back_to_the_default_role_under_single_roles(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        assert!(t.db.add_role("editor", Timestamp::parse(NOW).unwrap()).await.unwrap());
        app.deliver(&membership_event("e1", "created", "user_1", "editor", "active", 1)).await;
        app.deliver(&membership_event("e2", "created", "user_2", "member", "active", 1)).await;
        let (_, answer_body) = app.deliver(&event("r1", "role.deleted", json!({"object": "role", "slug": "editor"}))).await;
        assert_eq!(answer_body["outcome"], "refetch_queued");
        assert_eq!(queue(&t.db).await, ["om_user_1"], "only the holders of the role");

        // WorkOS moves the holders asynchronously: first still the deleted role, then the default.
        fake.script([answer("editor", &["editor"], 1)]);
        let worker = refetcher(&app, &fake);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 0, deferred: 1 });
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap().role_slug.as_deref(), Some("editor"), "not yet moved");
        app.clock.advance_millis(5_000);
        fake.script([answer("member", &["member"], 2)]);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 1, deferred: 0 });
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.role_slugs.clone()), (Some("member"), vec!["member".to_owned()]));
        assert_eq!(membership(&t.db, "org_1", "user_2").await.unwrap().version, v(1), "user_2 untouched");
        assert_eq!(fetches(&fake).len(), 2);
    }

    async fn a_deleted_role_leaves_the_set_under_multiple_roles(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        assert!(t.db.add_role("editor", Timestamp::parse(NOW).unwrap()).await.unwrap());
        let created = event("e1", "organization_membership.created", json!({"object": "organization_membership",
            "id": "om_user_1", "user_id": "user_1", "organization_id": "org_1", "status": "active",
            "role": {"slug": "member"}, "roles": [{"slug": "member"}, {"slug": "editor"}],
            "created_at": v(0).to_string(), "updated_at": v(1).to_string()}));
        app.deliver(&created).await;
        assert_eq!(t.db.roles_of("org_1", "user_1").await.unwrap(), ["editor", "member"]);
        app.deliver(&event("r1", "organization_role.deleted", json!({"object": "role", "slug": "editor", "organization_id": "org_1"}))).await;
        assert_eq!(queue(&t.db).await, ["om_user_1"], "a holder through its set");
        fake.script([answer("member", &["member"], 2)]);
        refetcher(&app, &fake).run_once().await.unwrap();
        assert_eq!(t.db.roles_of("org_1", "user_1").await.unwrap(), ["member"]);
        let last = audit_of(&t.db, "org_1", "user_1").await.pop().unwrap();
        assert_eq!((last.source.as_str(), last.event_id.as_deref()), ("refetch", Some("r1")));
        assert!(last.detail.contains("roles [editor, member] -> [member]"), "{}", last.detail);
    }

    async fn a_directory_event_resyncs_its_organization(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let (_, body) = app.deliver(&event("d1", "dsync.user.updated", json!({"object": "directory_user",
            "id": "directory_user_1", "directory_id": "directory_1", "organization_id": "org_1", "state": "inactive"}))).await;
        assert_eq!(body["outcome"], "refetch_queued");
        assert_eq!(queue(&t.db).await, ["org:org_1"]);
        let mut deprovisioned = api_membership("user_1", "member", "inactive", &v(2).to_string());
        deprovisioned["directory_managed"] = json!(true);
        fake.script([page(vec![deprovisioned], None)]);
        refetcher(&app, &fake).run_once().await.unwrap();
        let last = audit_of(&t.db, "org_1", "user_1").await.pop().unwrap();
        assert_eq!((last.source.as_str(), last.outcome.as_str(), last.event_id.as_deref()), ("refetch", "applied", Some("d1")));
        assert!(last.detail.starts_with("directory deprovision"), "{}", last.detail);
    }

    async fn events_that_name_nothing_to_fetch_are_invalid_and_queue_nothing(t) {
        let app = TestApp::new(&t.db);
        let (status, body) = app.deliver(&event("g1", "group.member_added", json!({"group_id": "group_1"}))).await;
        assert_eq!(status.as_u16(), 422, "{body}");
        let (status, _) = app.deliver(&event("r1", "role.deleted", json!({"object": "role"}))).await;
        assert_eq!(status.as_u16(), 422);
        let (status, body) = app.deliver(&event("x1", "group.created", json!({"id": "group_1"}))).await;
        assert_eq!((status.as_u16(), body["outcome"].as_str()), (200, Some("ignored")));
        assert!(queue(&t.db).await.is_empty());
    }

    async fn the_events_api_catch_up_feeds_the_same_queue(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        let metrics = Arc::new(Metrics::new());
        let syncer = Syncer {
            db: t.db.clone(),
            workos: WorkosClient::new(&fake.url, Some("sk_test".parse().unwrap()), metrics.clone()),
            clock: TestClock::at(NOW),
            metrics,
            lookback: Duration::from_secs(3600),
            settle: Duration::from_secs(30),
        };
        let listed: Value = serde_json::from_slice(&group_event("evt_g1", "group.member_added", "om_user_1")).unwrap();
        fake.script([page(vec![listed], None)]);
        syncer.run_once().await.unwrap();
        let asked = &fake.requests()[0].query;
        assert!(asked.contains("group.member_added"), "the catch-up asks for group events: {asked}");
        assert_eq!(queue(&t.db).await, ["om_user_1"]);
        fake.script([answer("admin", &["admin"], 1)]);
        refetcher(&app, &fake).run_once().await.unwrap();
        let last = audit_of(&t.db, "org_1", "user_1").await.pop().unwrap();
        assert_eq!((last.source.as_str(), last.event_id.as_deref()), ("refetch", Some("evt_g1")));
    }

    async fn a_queued_refetch_survives_a_sigkill_of_the_server(t) {
        let fake = FakeWorkos::start().await;
        // The first server claims the row and hangs in the fetch.
        fake.always(answer("admin", &["admin"], 2).delayed(Duration::from_secs(60)));
        let envs = [
            ("WORKOS_API_KEY", "sk_test_refetch".to_owned()),
            ("WORKOS_API_BASE_URL", fake.url.clone()),
            ("ROLESYNC_REFETCH_LEASE_SECS", "1".to_owned()),
            ("ROLESYNC_SYNC_INTERVAL_SECS", "0".to_owned()),
        ];
        let mut server = Server::start(&t.url, &envs).await;
        let client = reqwest::Client::new();
        let created = membership_event("e1", "created", "user_1", "member", "active", 1);
        assert_eq!(post_webhook(&client, &server.base, created).await, Some(200));
        let response = post_signed(&client, &server.base, group_event("g1", "group.member_added", "om_user_1")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.json::<Value>().await.unwrap()["outcome"], "refetch_queued");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while fetches(&fake).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the worker never fetched");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.kill();
        assert_eq!(queue(&t.db).await, ["om_user_1"], "the row outlives the process");

        fake.always(answer("admin", &["admin"], 2));
        let server = Server::start(&t.url, &envs).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let row = membership(&t.db, "org_1", "user_1").await.unwrap();
            if row.role_slug.as_deref() == Some("admin") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the refetch never ran after the restart: {row:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.terminate();
        let (_, logs) = server.finish();
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        let refetched: Vec<_> = audit.iter().filter(|r| r.source == "refetch").collect();
        assert_eq!(refetched.len(), 1, "one audit row for the one change: {audit:?}");
        assert_eq!(refetched[0].event_id.as_deref(), Some("g1"));
        assert!(queue(&t.db).await.is_empty(), "{logs}");
        assert!(!logs.contains("sk_test_refetch"), "the API key is never logged");
    }

    async fn a_role_held_by_two_rows_of_one_membership_id_queues_it_once(t) {
        let app = TestApp::new(&t.db);
        // Two stored rows with one WorkOS membership id (nothing in WorkOS's contract forbids it).
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        let mut other: Value = serde_json::from_slice(&membership_event("e2", "created", "user_2", "member", "active", 1)).unwrap();
        other["data"]["id"] = json!("om_user_1");
        app.deliver(&serde_json::to_vec(&other).unwrap()).await;
        let (status, body) = app.deliver(&event("r1", "organization_role.updated", json!({"slug": "member", "organization_id": "org_1"}))).await;
        assert_eq!((status.as_u16(), body["outcome"].as_str()), (200, Some("refetch_queued")), "{body}");
        assert_eq!(queue(&t.db).await, ["om_user_1"]);
    }

    async fn a_membership_id_that_names_an_organization_target_is_refused(t) {
        let app = TestApp::new(&t.db);
        let (status, _) = app.deliver(&group_event("g1", "group.member_added", "org:org_1")).await;
        assert_eq!(status.as_u16(), 422);
        assert!(queue(&t.db).await.is_empty());
    }

    async fn a_row_failing_for_ever_is_abandoned_and_counted(t) {
        let app = TestApp::new(&t.db);
        let fake = FakeWorkos::start().await;
        app.deliver(&group_event("g1", "group.member_added", "om_user_1")).await;
        t.db.execute("UPDATE refetch_queue SET attempts = 15").await.unwrap();
        fake.script([Reply::status(400)]);
        let worker = refetcher(&app, &fake);
        assert_eq!(worker.run_once().await.unwrap(), Pass { done: 0, deferred: 1 });
        assert!(queue(&t.db).await.is_empty(), "dropped after its last attempt");
        assert!(worker.metrics.render().contains("rolesync_refetch_attempts_total{outcome=\"abandoned\"} 1"));
    }

    async fn without_an_api_key_the_queue_is_measured_and_left_alone(t) {
        let app = TestApp::new(&t.db);
        app.deliver(&group_event("g1", "group.member_added", "om_user_1")).await;
        let metrics = Arc::new(Metrics::new());
        let worker = Refetcher {
            db: t.db.clone(),
            workos: WorkosClient::new("http://127.0.0.1:9", None, metrics.clone()),
            clock: app.clock.clone(),
            metrics,
            budget: None,
            lease: Duration::from_secs(60),
        };
        app.clock.advance_millis(90_000);
        assert_eq!(worker.run_once().await.unwrap(), Pass::default());
        assert_eq!(worker.metrics.refetch_queue_depth.get(), 1);
        assert_eq!(worker.metrics.refetch_queue_oldest_seconds.get(), 90);
        assert_eq!(queue(&t.db).await, ["om_user_1"]);
    }
}
