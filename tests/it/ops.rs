//! Operations: health, readiness, metrics after real traffic, request ids and the inbound limiter.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;

use crate::fake_workos::{api_membership, page, FakeWorkos};
use crate::support::{membership_event, TestApp, SECRET};

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// The value of one sample line of the exposition, 0 when absent.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

pub(crate) async fn exposition(app: &TestApp) -> String {
    let response = rolesync::http::build_router(app.state.clone())
        .oneshot_text(get("/metrics"))
        .await;
    response
}

trait OneshotText {
    async fn oneshot_text(self, request: Request<Body>) -> String;
}

impl OneshotText for axum::Router {
    async fn oneshot_text(self, request: Request<Body>) -> String {
        use tower::ServiceExt;
        let response = self.oneshot(request).await.unwrap();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}

#[tokio::test]
async fn distinct_methods_and_paths_from_any_client_leave_the_exposition_bounded() {
    let t = crate::support::TestDb::new(rolesync::db::Backend::Sqlite).await;
    let app = TestApp::new(&t.db);
    let send = |method: &str, path: String| {
        let request = Request::builder()
            .method(axum::http::Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        app.exchange(request)
    };
    send("GET", "/v1/memberships/o/u".into()).await;
    let baseline = exposition(&app).await.len();
    for i in 0..500 {
        let method = format!("M{i}{}", "X".repeat(1000));
        let (status, _, answer) = send(&method, "/webhooks/workos".into()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
            "an unknown method on a route"
        );
        let (status, _, answer) = send(&method, format!("/nowhere/{i}/{}", "p".repeat(1000))).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "an unknown path"
        );
        send("DELETE", format!("/v1/memberships/o{i}/u{i}")).await;
    }
    let text = exposition(&app).await;
    assert!(
        text.len() < baseline + 20_000,
        "the exposition grew from {baseline} to {} bytes",
        text.len()
    );
    assert!(
        text.contains(r#"method="other""#),
        "unknown methods are counted as other"
    );
    assert!(
        text.contains(r#"route="unmatched""#),
        "unknown paths are counted as unmatched"
    );
    assert!(
        text.contains(r#"route="/webhooks/workos",method="other",status="405""#),
        "a 405 on a route is counted: {}",
        text.lines()
            .filter(|l| l.contains("405"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !text.contains("XXXX") && !text.contains("pppp"),
        "no label holds what the client sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_deleted_while_serving_is_never_recreated_and_answers_503() {
    let t = crate::support::TestDb::new(rolesync::db::Backend::Sqlite).await;
    let app = TestApp::new(&t.db);
    let (status, _) = app
        .deliver(&membership_event(
            "e1", "created", "user_1", "admin", "active", 1,
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let file = t.url.strip_prefix("sqlite://").unwrap().to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{file}{suffix}"));
    }
    for i in 0..3 {
        let (status, answer) = app
            .deliver(&membership_event(
                &format!("e{}", i + 2),
                "updated",
                "user_1",
                "member",
                "active",
                i + 2,
            ))
            .await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("storage_unavailable")),
            "delivery {i}: {answer}"
        );
    }
    let (status, body) = app.request(get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("gone since start-up"),
        "{body}"
    );
    assert!(
        !std::path::Path::new(&file).exists(),
        "no empty database was created at the path"
    );
}

/// A transaction of another process that holds what rolesync's writes need.
enum Blocker {
    Sqlite(rusqlite::Connection),
    Postgres(sqlx::PgConnection),
}

/// Makes every insert into `table` fail (`on`) or work again, as a full disk or a lock would.
async fn fail_inserts(db: &rolesync::db::Db, table: &str, on: bool) {
    let statements: Vec<String> = match (db.backend(), on) {
        (rolesync::db::Backend::Sqlite, true) => vec![format!("CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END")],
        (rolesync::db::Backend::Sqlite, false) => vec![format!("DROP TRIGGER fail_{table}")],
        (rolesync::db::Backend::Postgres, true) => vec![
            "CREATE OR REPLACE FUNCTION fail_insert() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'simulated write failure'; END $$ LANGUAGE plpgsql".into(),
            format!("CREATE TRIGGER fail_{table} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION fail_insert()"),
        ],
        (rolesync::db::Backend::Postgres, false) => vec![format!("DROP TRIGGER fail_{table} ON {table}")],
    };
    for sql in statements {
        crate::support::exec(db, &sql).await;
    }
}

both! {
    async fn readiness_follows_consecutive_write_failures_and_recovers_after_a_success(t) {
        let app = TestApp::new(&t.db);
        fail_inserts(&t.db, "role_audit", true).await;
        fail_inserts(&t.db, "sync_state", true).await;
        for i in 0..rolesync::db::WRITE_FAILURES_NOT_READY as i64 {
            let (status, _) = app.deliver(&membership_event(&format!("e{i}"), "created", &format!("user_{i}"), "admin", "active", 1)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "write {i} fails");
            if i + 1 < rolesync::db::WRITE_FAILURES_NOT_READY as i64 {
                assert_eq!(app.request(get("/readyz")).await.0, StatusCode::OK, "ready after {} failures", i + 1);
            }
        }
        let (status, body) = app.request(get("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not ready after consecutive write failures: {body}");
        assert!(body["reason"].as_str().unwrap().contains("writes failed in a row"), "{body}");
        fail_inserts(&t.db, "role_audit", false).await;
        fail_inserts(&t.db, "sync_state", false).await;
        assert_eq!(app.request(get("/readyz")).await.0, StatusCode::OK, "ready again once a write commits");
        let (status, _) = app.deliver(&membership_event("e9", "created", "user_9", "admin", "active", 1)).await;
        assert_eq!(status, StatusCode::OK);
    }

    async fn readiness_fails_while_a_write_waits_on_a_lock_held_elsewhere(t) {
        let app = Arc::new(TestApp::new(&t.db));
        // Another process's transaction holds the write lock (SQLite) or the audit table (PostgreSQL).
        let blocker = match t.db.backend() {
            rolesync::db::Backend::Sqlite => {
                let conn = rusqlite::Connection::open(t.url.strip_prefix("sqlite://").unwrap()).unwrap();
                conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
                Blocker::Sqlite(conn)
            }
            rolesync::db::Backend::Postgres => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&t.url).await.unwrap();
                sqlx::raw_sql("BEGIN; LOCK TABLE role_audit IN ACCESS EXCLUSIVE MODE").execute(&mut conn).await.unwrap();
                Blocker::Postgres(conn)
            }
        };
        let sender = app.clone();
        let delivery = tokio::spawn(async move {
            sender.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await
        });
        tokio::time::sleep(rolesync::db::STALLED_WRITE + std::time::Duration::from_millis(1500)).await;
        let (status, body) = app.request(get("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["reason"].as_str().unwrap().contains("has waited"), "{body}");
        match blocker {
            Blocker::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            Blocker::Postgres(mut conn) => { sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap(); }
        }
        let (status, answer) = delivery.await.unwrap();
        assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("applied")), "the waiting write commits once the lock is gone");
        assert_eq!(app.request(get("/readyz")).await.0, StatusCode::OK, "ready again");
    }

    async fn health_and_readiness_report_the_database(t) {
        let app = TestApp::new(&t.db);
        assert_eq!(app.request(get("/healthz")).await.0, StatusCode::OK);
        assert_eq!(app.request(get("/readyz")).await, (StatusCode::OK, json!({"status": "ready", "catch_up": "ok"})));
        t.db.close().await;
        let (status, body) = app.request(get("/readyz")).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready")));
        assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert_eq!(app.request(get("/healthz")).await.0, StatusCode::OK, "the process is still up");
    }

    async fn metrics_count_real_traffic(t) {
        let fake = FakeWorkos::start().await;
        fake.always(page(vec![api_membership("user_9", "admin", "active", "2026-11-20T10:00:00.000Z")], None));
        let url = fake.url.clone();
        let app = TestApp::with_config(&t.db, move |c| {
            c.webhook_secret = Some(format!("whsec_new,{SECRET}").parse().unwrap());
            c.api_base_url = url.parse().unwrap();
            c.api_key = Some("sk_test".parse().unwrap());
            c.login_token = Some("tok".parse().unwrap());
            c.login_refresh_secs = 0;
        });
        let body = membership_event("e1", "created", "user_1", "member", "active", 1);
        app.deliver(&body).await;
        app.deliver(&body).await;
        app.deliver(&membership_event("e2", "updated", "user_1", "member", "active", 0)).await;
        app.post_webhook(&body, Some("t=1, v1=00")).await;
        app.post_webhook(&body, Some(&format!("t={}, v1={}", 1_795_000_000_000_i64, "0".repeat(64)))).await;
        let login = Request::post("/v1/reconcile").header("authorization", "Bearer tok")
            .body(Body::from(json!({"user_id": "user_9", "organization_id": "org_1"}).to_string())).unwrap();
        assert_eq!(app.request(login).await.0, StatusCode::OK);
        let text = exposition(&app).await;
        let expected = [
            ("rolesync_webhook_deliveries_total{outcome=\"applied\"}", 1.0),
            ("rolesync_webhook_deliveries_total{outcome=\"duplicate\"}", 1.0),
            ("rolesync_webhook_deliveries_total{outcome=\"stale\"}", 1.0),
            ("rolesync_webhook_deliveries_total{outcome=\"malformed_signature\"}", 1.0),
            ("rolesync_webhook_deliveries_total{outcome=\"timestamp_out_of_tolerance\"}", 1.0),
            ("rolesync_signature_failures_total{reason=\"malformed_signature\"}", 1.0),
            ("rolesync_signature_failures_total{reason=\"timestamp_out_of_tolerance\"}", 1.0),
            ("rolesync_signature_secret_total{position=\"1\"}", 3.0),
            ("rolesync_login_answers_total{outcome=\"applied\",source=\"workos\"}", 1.0),
            ("rolesync_workos_requests_total{status_class=\"2xx\"}", 1.0),
            ("rolesync_http_request_duration_seconds_count{route=\"/webhooks/workos\",method=\"POST\",status=\"200\"}", 3.0),
            ("rolesync_http_request_duration_seconds_count{route=\"/v1/reconcile\",method=\"POST\",status=\"200\"}", 1.0),
        ];
        for (series, value) in expected {
            assert_eq!(sample(&text, series), value, "{series} in\n{text}");
        }
        assert!(sample(&text, "rolesync_reconcile_duration_seconds_count") >= 1.0, "{text}");
    }

    async fn request_ids_are_echoed_or_made(t) {
        let app = TestApp::new(&t.db);
        let router = rolesync::http::build_router(app.state.clone());
        use tower::ServiceExt;
        let with_id = Request::post("/webhooks/workos").header("x-request-id", "abc-123").body(Body::empty()).unwrap();
        let response = router.clone().oneshot(with_id).await.unwrap();
        assert_eq!(response.headers()["x-request-id"], "abc-123");
        let response = router.clone().oneshot(Request::post("/webhooks/workos").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.headers()["x-request-id"].len(), 16, "a fresh id");
        for unusable in ["has space".to_owned(), "x".repeat(129)] {
            let request = Request::post("/webhooks/workos").header("x-request-id", unusable.as_str()).body(Body::empty()).unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.headers()["x-request-id"].len(), 16, "{unusable:?} is replaced by a fresh id");
        }
        let missing = router.oneshot(Request::get("/nowhere").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(missing.headers()["x-request-id"].len(), 16, "an unmatched path gets one too");
    }

    async fn the_inbound_limiter_answers_429_with_retry_after(t) {
        let app = TestApp::with_config(&t.db, |c| {
            c.rate_limit_per_ip = 1;
            c.rate_limit_burst = 2;
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = app.state.clone();
        tokio::spawn(rolesync::server::serve(listener, state, std::future::pending(), std::time::Duration::from_secs(1)));
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = client.post(format!("{base}/webhooks/workos")).body("{}").send().await.unwrap();
            statuses.push((r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned())));
        }
        assert_eq!(statuses[0].0, 400, "within the burst: signature checked");
        assert_eq!(statuses[1].0, 400);
        assert_eq!(statuses[2], (429, Some("1".to_owned())), "over the rate: refused before signature work");
        assert_eq!(client.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "health checks are never limited");
        let text = exposition(&app).await;
        assert_eq!(sample(&text, "rolesync_limiter_rejections_total{limiter=\"inbound\"}"), 1.0);
        assert_eq!(sample(&text, "rolesync_signature_failures_total{reason=\"missing_signature\"}"), 2.0);
        let _ = Arc::strong_count(&app.state);
    }
}

/// A burst of new connections waits in the kernel's accept queue instead of being dropped (a dropped
/// SYN costs its sender a second before it tries again): tokio's own `bind` would queue 1,024.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_queues_a_burst_of_connections_beyond_1024() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        somaxconn >= 2048,
        "net.core.somaxconn is {somaxconn}: the kernel would cap any backlog below this test's burst"
    );
    let listener = rolesync::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    // Nothing accepts: every connection stays in the queue.
    let mut held = Vec::new();
    for i in 0..1_500 {
        let connect = tokio::net::TcpStream::connect(addr);
        let stream = tokio::time::timeout(std::time::Duration::from_millis(500), connect)
            .await
            .unwrap_or_else(|_| panic!("connection {i} was dropped, not queued"))
            .unwrap();
        held.push(stream);
    }
    drop(listener);
}
