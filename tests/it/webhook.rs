//! The webhook receiver: signatures, deduplication, ordering, durability, fixtures and scenarios.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rolesync::db;
use rolesync::replay;
use rolesync::signature;
use serde_json::{json, Value};

use crate::support::{
    assert_chain, audit_count, audit_of, int, membership, membership_event, rows, strings, TestApp,
    TestDb, SECRET,
};

/// What, body, signature header, expected status and error code.
type RefusalCase = (
    &'static str,
    Vec<u8>,
    Option<String>,
    StatusCode,
    &'static str,
);

async fn inbox_count(t: &TestDb) -> i64 {
    t.db.event_count().await.unwrap()
}

async fn membership_count(t: &TestDb) -> usize {
    t.db.memberships(None).await.unwrap().len()
}

/// Asserts that a refused request stored nothing at all.
async fn assert_nothing_stored(t: &TestDb, what: &str) {
    assert_eq!(inbox_count(t).await, 0, "{what}: inbox must stay empty");
    assert_eq!(audit_count(&t.db).await, 0, "{what}: audit must stay empty");
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from("fixtures/workos").join(name)).unwrap()
}

both! {
    async fn a_signed_membership_event_is_applied_and_stored(t) {
        let app = TestApp::new(&t.db);
        let body = membership_event("event_1", "created", "user_1", "member", "active", 1);
        let (status, answer) = app.deliver(&body).await;
        assert_eq!((status, answer), (StatusCode::OK, json!({"event_id": "event_1", "outcome": "applied"})));
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str()), (Some("member"), "active"));
        let row = rows(&t.db, "SELECT payload, outcome, event_type FROM webhook_events WHERE event_id = 'event_1'", &[]).await;
        let [payload, outcome, kind] = [0, 1, 2].map(|i| row[0][i].clone().unwrap());
        assert_eq!(payload.as_bytes(), body.as_slice(), "the raw body is stored byte for byte");
        assert_eq!((outcome.as_str(), kind.as_str()), ("applied", "organization_membership.created"));
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!((audit.len(), audit[0].source.as_str(), audit[0].event_id.as_deref()), (1, "webhook", Some("event_1")));
    }

    async fn bad_signatures_are_refused_and_store_nothing(t) {
        let app = TestApp::new(&t.db);
        let body = membership_event("event_1", "created", "user_1", "member", "active", 1);
        let now = app.clock_millis();
        let good = signature::sign(&body, SECRET.as_bytes(), now);
        let digest = good.split("v1=").nth(1).unwrap().to_owned();
        let mut altered = body.clone();
        altered[10] ^= 1;
        let cases: Vec<RefusalCase> = vec![
            ("no header", body.clone(), None, StatusCode::BAD_REQUEST, "missing_signature"),
            ("empty header", body.clone(), Some(String::new()), StatusCode::BAD_REQUEST, "missing_signature"),
            ("garbage header", body.clone(), Some("garbage".into()), StatusCode::BAD_REQUEST, "malformed_signature"),
            ("non-numeric t", body.clone(), Some(format!("t=abc, v1={digest}")), StatusCode::BAD_REQUEST, "malformed_signature"),
            ("too old", body.clone(), Some(signature::sign(&body, SECRET.as_bytes(), now - 181_000)), StatusCode::UNAUTHORIZED, "timestamp_out_of_tolerance"),
            ("too far in the future", body.clone(), Some(signature::sign(&body, SECRET.as_bytes(), now + 181_000)), StatusCode::UNAUTHORIZED, "timestamp_out_of_tolerance"),
            ("one body byte changed", altered, Some(good.clone()), StatusCode::UNAUTHORIZED, "signature_mismatch"),
            ("wrong secret", body.clone(), Some(signature::sign(&body, b"other", now)), StatusCode::UNAUTHORIZED, "signature_mismatch"),
        ];
        for (what, body, header, status, code) in cases {
            let (got, answer) = app.post_webhook(&body, header.as_deref()).await;
            assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{what}: {answer}");
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: message");
            assert_nothing_stored(&t, what).await;
        }
        let not_text = axum::http::HeaderValue::from_bytes(format!("t={now}, v1=\u{e9}").as_bytes()).unwrap();
        let request = Request::post("/webhooks/workos").header("WorkOS-Signature", not_text).body(Body::from(body.clone())).unwrap();
        let (status, answer) = app.request(request).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_signature")), "a header that is not ASCII text: {answer}");
        assert_nothing_stored(&t, "non-ASCII header").await;
    }

    async fn signature_forms_and_rotated_secrets_are_accepted(t) {
        let app = TestApp::with_config(&t.db, |c| c.webhook_secret = Some("whsec_new,whsec_old".parse().unwrap()));
        let now = app.clock_millis();
        let emoji = membership_event("event_émoji_🎉", "created", "user_🎉", "member", "active", 1);
        let digest = |body: &[u8], secret: &str| hex::encode(signature::digest(secret.as_bytes(), &now.to_string(), body));
        let cases: Vec<(&str, Vec<u8>, String)> = {
            let b = |n: &str| membership_event(n, "created", n, "member", "active", 1);
            vec![
                ("comma-space form", b("e1"), format!("t={now}, v1={}", digest(&b("e1"), "whsec_new"))),
                ("no-space form", b("e2"), format!("t={now},v1={}", digest(&b("e2"), "whsec_new"))),
                ("several v1, the second right", b("e3"), format!("t={now}, v1={}, v1={}", "0".repeat(64), digest(&b("e3"), "whsec_new"))),
                ("the rotated (previous) secret", b("e4"), format!("t={now}, v1={}", digest(&b("e4"), "whsec_old"))),
                ("keys in another order", b("e5"), format!("v1={}, t={now}", digest(&b("e5"), "whsec_new"))),
                ("a body with emoji", emoji.clone(), format!("t={now}, v1={}", digest(&emoji, "whsec_new"))),
            ]
        };
        for (what, body, header) in cases {
            let (status, answer) = app.post_webhook(&body, Some(&header)).await;
            assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{what}: {answer}");
        }
    }

    async fn a_duplicate_delivery_changes_nothing(t) {
        let app = TestApp::new(&t.db);
        let body = membership_event("event_1", "updated", "user_1", "admin", "active", 1);
        assert_eq!(app.deliver(&body).await.1["outcome"], "applied");
        app.clock_advance(60_000);
        let (status, answer) = app.deliver(&body).await;
        assert_eq!((status, answer), (StatusCode::OK, json!({"event_id": "event_1", "outcome": "duplicate"})));
        assert_eq!((inbox_count(&t).await, audit_count(&t.db).await), (1, 1));
    }

    async fn twenty_concurrent_deliveries_of_one_event_apply_once(t) {
        let app = std::sync::Arc::new(TestApp::new(&t.db));
        let body = membership_event("event_1", "updated", "user_1", "admin", "active", 1);
        let tasks: Vec<_> = (0..20).map(|_| {
            let (app, body) = (app.clone(), body.clone());
            tokio::spawn(async move { app.deliver(&body).await })
        }).collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            let (status, answer) = task.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{answer}");
            outcomes.push(answer["outcome"].as_str().unwrap().to_owned());
        }
        outcomes.sort();
        assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
        assert_eq!(outcomes.iter().filter(|o| *o == "duplicate").count(), 19, "{outcomes:?}");
        assert_eq!((inbox_count(&t).await, audit_count(&t.db).await), (1, 1));
    }

    async fn a_full_queue_answers_503_overloaded_at_once_and_stores_nothing_for_it(t) {
        // Queues of one (PostgreSQL, two committers) or two (SQLite) deliveries; a second connection
        // holds the write lock, so each committer takes one batch and then waits inside it while
        // the rest arrive.
        let app = std::sync::Arc::new(TestApp::with_config(&t.db, |c| c.max_queued_deliveries = 2));
        let blocker = hold_write_lock(&t).await;
        let sent = 600;
        let bodies: Vec<Vec<u8>> = (0..sent)
            .map(|i| membership_event(&format!("evt_{i}"), "created", &format!("user_{i}"), "admin", "active", 1))
            .collect();
        let (done, mut answers) = tokio::sync::mpsc::unbounded_channel();
        for (i, body) in bodies.iter().enumerate() {
            let (app, body, done) = (app.clone(), body.clone(), done.clone());
            tokio::spawn(async move { done.send((i, app.exchange(app.signed_webhook(&body)).await)).unwrap() });
        }
        // Two committers (PostgreSQL) hold at most a batch each, and each queue one more.
        let most_accepted = 2 * rolesync::ingest::batcher::MAX_BATCH + 2;
        let mut refused = Vec::new();
        while refused.len() < sent - most_accepted {
            let (i, (status, headers, answer)) =
                tokio::time::timeout(std::time::Duration::from_secs(20), answers.recv())
                    .await
                    .expect("refusals come while the lock is held")
                    .unwrap();
            assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")), "{answer}");
            assert_eq!(headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
            refused.push(i);
        }
        release_write_lock(blocker).await;
        drop(done);
        while let Some((i, (status, _, answer))) = answers.recv().await {
            match status {
                StatusCode::OK => assert_eq!(answer["outcome"], "applied", "{answer}"),
                _ => {
                    assert_eq!(answer["error"], "overloaded", "{answer}");
                    refused.push(i);
                }
            }
        }
        let accepted = (sent - refused.len()) as i64;
        assert!(accepted >= 1, "the first delivery gets in");
        assert_eq!((inbox_count(&t).await, audit_count(&t.db).await), (accepted, accepted));
        // WorkOS retries what was refused; every one applies once.
        for i in refused {
            let (status, answer) = app.deliver(&bodies[i]).await;
            assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{answer}");
        }
        assert_eq!((inbox_count(&t).await, audit_count(&t.db).await), (sent as i64, sent as i64));
    }

    async fn a_membership_recreated_under_a_new_id_stores_the_new_id(t) {
        let app = TestApp::new(&t.db);
        let again = |body: Vec<u8>| String::from_utf8(body).unwrap().replace("om_user_1", "om_user_1_again").into_bytes();
        let first = membership_event("e1", "created", "user_1", "member", "active", 1);
        let deleted = membership_event("e2", "deleted", "user_1", "member", "active", 2);
        let recreated = again(membership_event("e3", "created", "user_1", "admin", "active", 3));
        let updated = again(membership_event("e4", "updated", "user_1", "member", "active", 4));
        let mut ids = Vec::new();
        for body in [&first, &deleted, &recreated, &updated] {
            let (status, answer) = app.deliver(body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            ids.push(membership(&t.db, "org_1", "user_1").await.unwrap().membership_id);
        }
        assert_eq!(ids, ["om_user_1", "om_user_1", "om_user_1_again", "om_user_1_again"]);
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str()), (Some("member"), "active"));
    }

    async fn out_of_order_updates_converge_on_the_newest(t) {
        let app = TestApp::new(&t.db);
        let newest = membership_event("e3", "updated", "user_1", "admin", "active", 3);
        let older = membership_event("e1", "updated", "user_1", "member", "pending", 1);
        let middle = membership_event("e2", "updated", "user_1", "member", "inactive", 2);
        let outcomes = [app.deliver(&newest).await.1, app.deliver(&older).await.1, app.deliver(&middle).await.1];
        let outcomes: Vec<&str> = outcomes.iter().map(|a| a["outcome"].as_str().unwrap()).collect();
        assert_eq!(outcomes, ["applied", "stale", "stale"]);
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str()), (Some("admin"), "active"));
        assert_chain(&audit_of(&t.db, "org_1", "user_1").await);
    }

    async fn a_late_older_update_never_resurrects_a_deleted_membership(t) {
        let app = TestApp::new(&t.db);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        let (_, removed) = app.deliver(&membership_event("e3", "deleted", "user_1", "member", "active", 3)).await;
        let (_, late) = app.deliver(&membership_event("e2", "updated", "user_1", "admin", "active", 2)).await;
        assert_eq!((removed["outcome"].as_str(), late["outcome"].as_str()), (Some("removed"), Some("stale")));
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug, row.status.as_str()), (None, "deleted"));
    }

    async fn an_unknown_role_keeps_the_stored_role(t) {
        let app = TestApp::new(&t.db);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        let (status, answer) = app.deliver(&membership_event("e2", "updated", "user_1", "superuser", "active", 2)).await;
        assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("unknown_role")));
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.workos_role_slug.as_deref()), (Some("member"), Some("superuser")));
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!(audit.last().unwrap().outcome, "unknown_role");
    }

    async fn other_event_types_are_stored_and_ignored(t) {
        let app = TestApp::new(&t.db);
        for name in ["user_updated.json", "role_created.json"] {
            let (status, answer) = app.deliver(&fixture(name)).await;
            assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "{name}");
        }
        let body = br#"{"id":"event_x","event":"dsync.user.created","data":{}}"#;
        assert_eq!(app.deliver(body).await.1["outcome"], "ignored");
        assert_eq!((inbox_count(&t).await, audit_count(&t.db).await), (3, 0));
    }

    async fn broken_json_and_missing_envelope_fields_are_refused(t) {
        let app = TestApp::new(&t.db);
        for body in [&b"{not json"[..], b"[]", br#"{"event":"x"}"#, br#"{"id":"e1"}"#, b"\xff\xfe"] {
            let (status, answer) = app.deliver(body).await;
            assert_eq!((status, answer["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_payload")), "{body:?}");
        }
        assert_nothing_stored(&t, "invalid payloads").await;
    }

    async fn a_membership_event_missing_a_field_is_stored_as_invalid(t) {
        let app = TestApp::new(&t.db);
        let body = br#"{"id":"event_bad","event":"organization_membership.updated","data":{"id":"om_1","organization_id":"org_1","status":"active","role":{"slug":"admin"},"updated_at":"2026-11-20T10:00:00.000Z"}}"#;
        let (status, answer) = app.deliver(body).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_event")));
        let outcome = strings(&t.db, "SELECT outcome FROM webhook_events WHERE event_id = 'event_bad'", &[]).await;
        assert_eq!(outcome, ["invalid"]);
        assert_eq!(audit_count(&t.db).await, 0);
        let (status, answer) = app.deliver(body).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_event")), "a retry gets the same answer");
        assert_eq!(int(&t.db, "SELECT COUNT(*) FROM webhook_events", &[]).await, 1, "stored once");
    }

    async fn ids_slugs_and_versions_no_workos_object_has_are_invalid_and_never_stored(t) {
        let app = TestApp::new(&t.db);
        let event = |id: &str, data: Value| serde_json::to_vec(&json!({"id": id, "event": "organization_membership.updated", "data": data})).unwrap();
        let data = |user: &str, slug: &str, updated_at: &str| json!({"id": "om_1", "organization_id": "org_1", "user_id": user, "status": "active", "role": {"slug": slug}, "updated_at": updated_at});
        let now = rolesync::timestamp::Timestamp::from_millis(app.clock_millis()).unwrap().to_string();
        let a_day_and_a_bit = rolesync::timestamp::Timestamp::from_millis(app.clock_millis() + 24 * 3600 * 1000 + 1000).unwrap().to_string();
        let cases = [
            ("e_nul", data("user\u{0}nul", "admin", &now), "`data.user_id`"),
            ("e_slug", data("user_1", &"s".repeat(100_000), &now), "`data.role.slug`"),
            ("e_future", data("user_1", "admin", "9999-12-31T23:59:59.999Z"), "`data.updated_at`"),
            ("e_ahead", data("user_1", "admin", &a_day_and_a_bit), "`data.updated_at`"),
        ];
        for (id, data, field) in cases {
            for attempt in ["first", "retry"] {
                let (status, answer) = app.deliver(&event(id, data.clone())).await;
                assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_event")), "{id} {attempt}: {answer}");
                assert!(answer["message"].as_str().unwrap().contains(field), "{id}: names {field}: {answer}");
            }
        }
        assert_eq!((membership_count(&t).await, audit_count(&t.db).await), (0, 0), "no membership, no audit row");
        let (status, answer) = app.deliver(&event("event\u{0}nul", data("user_1", "admin", &now))).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_payload")), "a NUL in the event id: {answer}");
        let (_, answer) = app.deliver(&event("e_ok", data("user_1", "admin", &now))).await;
        assert_eq!(answer["outcome"], "applied", "a version at now is taken");
    }

    async fn a_directory_deprovision_and_reprovision_are_audited_as_such(t) {
        let app = TestApp::new(&t.db);
        let event = |id: &str, role: &str, status: &str, second: u32, managed: bool| serde_json::to_vec(&json!({"id": id, "event": "organization_membership.updated",
            "data": {"id": "om_1", "organization_id": "org_1", "user_id": "user_1", "status": status, "role": {"slug": role},
                     "directory_managed": managed, "updated_at": format!("2026-11-20T10:00:{second:02}.000Z")}})).unwrap();
        app.deliver(&event("e1", "admin", "active", 1, true)).await;
        app.deliver(&event("e2", "member", "inactive", 2, true)).await;
        app.deliver(&event("e3", "admin", "active", 3, true)).await;
        app.deliver(&event("e4", "member", "inactive", 4, false)).await;
        let details: Vec<String> = audit_of(&t.db, "org_1", "user_1").await.into_iter().map(|r| r.detail).collect();
        assert!(details[1].starts_with("directory deprovision: role admin -> member, status active -> inactive"), "{details:?}");
        assert!(details[2].starts_with("directory reprovision: role member -> admin"), "{details:?}");
        assert!(!details[3].contains("directory"), "not directory-managed: a plain change: {details:?}");
    }

    async fn versions_within_one_millisecond_keep_their_order(t) {
        let app = TestApp::new(&t.db);
        let event = |id: &str, role: &str, updated_at: &str| serde_json::to_vec(&json!({"id": id, "event": "organization_membership.updated",
            "data": {"id": "om_1", "organization_id": "org_1", "user_id": "user_1", "status": "active", "role": {"slug": role}, "updated_at": updated_at}})).unwrap();
        assert_eq!(app.deliver(&event("e2", "admin", "2026-11-20T10:00:00.0009Z")).await.1["outcome"], "applied");
        assert_eq!(app.deliver(&event("e1", "member", "2026-11-20T10:00:00.0001Z")).await.1["outcome"], "stale", "the older one, by a fraction of a millisecond");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.version.to_string().as_str()), (Some("admin"), "2026-11-20T10:00:00.000900Z"));
    }

    async fn a_storage_outage_answer_says_when_to_retry(t) {
        let app = TestApp::new(&t.db);
        t.db.close().await;
        let (status, headers, answer) = app.exchange(app.signed_webhook(&membership_event("e1", "created", "user_1", "admin", "active", 1))).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("storage_unavailable")));
        assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some(rolesync::http::error::STORAGE_RETRY_AFTER));
    }

    async fn an_oversized_body_is_refused_before_it_is_read(t) {
        let app = TestApp::new(&t.db);
        let mut big = membership_event("e1", "created", "user_1", "member", "active", 1);
        big.extend(std::iter::repeat_n(b' ', rolesync::http::webhook::MAX_BODY_BYTES));
        let (status, answer) = app.deliver(&big).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));
        let header = signature::sign(&big, SECRET.as_bytes(), app.clock_millis());
        let request = Request::post("/webhooks/workos").header("WorkOS-Signature", header).body(chunked(big)).unwrap();
        let (status, _) = app.request(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "a streamed body without Content-Length");
        assert_nothing_stored(&t, "oversized").await;
    }

    async fn a_database_outage_answers_503_and_a_retry_applies(t) {
        let app = TestApp::new(&t.db);
        let body = membership_event("e1", "created", "user_1", "admin", "active", 1);
        t.db.close().await;
        let (status, answer) = app.deliver(&body).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("storage_unavailable")));
        let reopened = rolesync::db::Db::connect(&t.url, 4).await.unwrap();
        let app = TestApp::new(&reopened);
        assert_eq!(app.deliver(&body).await.1["outcome"], "applied", "WorkOS's retry applies");
        assert_eq!(reopened.event_count().await.unwrap(), 1);
        reopened.close().await;
    }

    async fn every_fixture_is_accepted(t) {
        let app = TestApp::new(&t.db);
        for d in replay::load(&[PathBuf::from("fixtures/workos")]).unwrap() {
            let (status, answer) = app.deliver(&d.body).await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", d.label);
        }
        assert_eq!(inbox_count(&t).await, 9);
    }

    async fn every_scenario_ends_in_its_expected_state(t) {
        let files = replay::load(&[PathBuf::from("fixtures/scenarios")]).unwrap();
        assert!(files.len() >= 7, "scenarios found");
        for path in std::fs::read_dir("fixtures/scenarios").unwrap() {
            let path = path.unwrap().path();
            let fresh = TestDb::new(t.db.backend()).await;
            run_scenario(&fresh, &path).await;
        }
    }
}

impl TestApp {
    fn clock_millis(&self) -> i64 {
        use rolesync::timestamp::Clock;
        self.clock.now().millis()
    }

    fn clock_advance(&self, ms: i64) {
        self.clock.advance_millis(ms);
    }
}

/// The body as a stream of 64 KiB chunks, sent without a Content-Length.
fn chunked(bytes: Vec<u8>) -> Body {
    let parts: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    Body::from_stream(tokio_stream::iter(parts))
}

async fn run_scenario(t: &TestDb, path: &std::path::Path) {
    let name = path.display().to_string();
    let scenario: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let app = TestApp::new(&t.db);
    let mut outcomes = Vec::new();
    for event in scenario["deliveries"].as_array().unwrap() {
        let (status, answer) = app.deliver(&serde_json::to_vec(event).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{name}: {answer}");
        outcomes.push(answer["outcome"].clone());
    }
    let expect = &scenario["expect"];
    assert_eq!(
        Value::Array(outcomes),
        expect["outcomes"],
        "{name}: outcomes"
    );
    let rows = t.db.memberships(None).await.unwrap();
    let rows: Vec<Value> = rows.iter().map(|r| json!({
        "organization_id": r.organization_id, "user_id": r.user_id, "membership_id": r.membership_id,
        "role_slug": r.role_slug, "workos_role_slug": r.workos_role_slug, "status": r.status,
        "version": r.version.to_string(),
    })).collect();
    assert_eq!(
        Value::Array(rows),
        expect["memberships"],
        "{name}: memberships"
    );
    let mut audit = t.db.audit(None, None, i64::MAX).await.unwrap();
    audit.reverse();
    let audit: Vec<Value> = audit.iter().map(|r| json!({
        "event_id": r.event_id, "outcome": r.outcome, "workos_role_slug": r.workos_role_slug,
        "old_role": r.old_role, "new_role": r.new_role, "old_status": r.old_status, "new_status": r.new_status,
    })).collect();
    assert_eq!(Value::Array(audit), expect["audit"], "{name}: audit");
}

both! {
    async fn one_batch_dedupes_orders_and_classifies_every_delivery(t) {
        use rolesync::reconcile::Source;
        use rolesync::ingest::{deliver_batch, Incoming};
        let parse = |body: Vec<u8>| Incoming::parse(&body, Source::Webhook, rolesync::timestamp::Timestamp::now()).unwrap();
        let batch = vec![
            parse(membership_event("e1", "created", "user_1", "member", "active", 1)),
            parse(membership_event("e1", "created", "user_1", "member", "active", 1)),
            parse(br#"{"id":"e2","event":"user.updated","data":{}}"#.to_vec()),
            parse(membership_event("e3", "updated", "user_1", "admin", "active", 3)),
            parse(membership_event("e4", "updated", "user_1", "member", "inactive", 2)),
            parse(br#"{"id":"e5","event":"organization_membership.updated","data":{"id":"om_1"}}"#.to_vec()),
            parse(membership_event("e6", "created", "user_2", "creator", "active", 1)),
        ];
        let receipts = deliver_batch(&t.db, &batch, rolesync::timestamp::Timestamp::now()).await.unwrap();
        let outcomes: Vec<&str> = receipts.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(outcomes, ["applied", "duplicate", "ignored", "applied", "stale", "invalid", "unknown_role"]);
        let again = deliver_batch(&t.db, &batch[..1], rolesync::timestamp::Timestamp::now()).await.unwrap();
        assert_eq!(again[0].outcome, "duplicate", "committed ids are duplicates in later batches");
        assert_eq!(inbox_count(&t).await, 6);
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        let kinds: Vec<&str> = audit.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(kinds, ["applied", "applied", "stale"]);
        assert_chain(&audit);
        let stored = rows(&t.db, "SELECT event_id, outcome FROM webhook_events ORDER BY event_id", &[]).await;
        let stored: Vec<(&str, &str)> = stored.iter().map(|r| (r[0].as_deref().unwrap(), r[1].as_deref().unwrap())).collect();
        assert_eq!(stored, [("e1", "applied"), ("e2", "ignored"), ("e3", "applied"), ("e4", "stale"), ("e5", "invalid"), ("e6", "unknown_role")]);
    }
}

/// A connection of its own that holds what every writer needs: SQLite's write lock, or on
/// PostgreSQL an exclusive lock on `memberships` (which every batch reads).
/// (A second process is modelled by a `Db` of its own: on SQLite its `BEGIN IMMEDIATE` takes the
/// database's write lock, which this process's writer turn does not cover.)
async fn hold_write_lock(t: &TestDb) -> (db::Db, db::WriteTx<'static>) {
    let other = db::Db::connect(&t.url, 1).await.unwrap();
    let mut tx = other.begin_write().await.unwrap();
    if t.db.backend() == db::Backend::Postgres {
        tx.execute("LOCK TABLE memberships IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
    }
    (other, tx)
}

async fn release_write_lock((other, tx): (db::Db, db::WriteTx<'static>)) {
    tx.rollback().await;
    other.close().await;
}
