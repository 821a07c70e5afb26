//! The login path against a real local HTTP server standing in for WorkOS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};

use crate::fake_workos::{api_membership, page, FakeWorkos, Reply};
use crate::support::{
    assert_chain, audit_count, audit_of, membership, membership_event, v, TestApp,
};

pub(crate) const TOKEN: &str = "login-token-for-tests";

fn login_app(db: &rolesync::db::Db, fake: &FakeWorkos, budget_ms: u64) -> TestApp {
    login_app_with(db, fake, |c| {
        c.login_budget_ms = budget_ms;
        c.login_refresh_secs = 0;
    })
}

/// A login-enabled app over `fake`, with further settings.
pub(crate) fn login_app_with(
    db: &rolesync::db::Db,
    fake: &FakeWorkos,
    adjust: impl FnOnce(&mut rolesync::config::Config),
) -> TestApp {
    let url = fake.url.clone();
    TestApp::with_config(db, move |c| {
        c.api_base_url = url.parse().unwrap();
        c.api_key = Some("sk_test_key".parse().unwrap());
        c.login_token = Some(TOKEN.parse().unwrap());
        adjust(c);
    })
}

impl TestApp {
    async fn login(&self, user: &str) -> (StatusCode, Value) {
        self.login_with(
            Some(TOKEN),
            json!({"user_id": user, "organization_id": "org_1"}).to_string(),
        )
        .await
    }

    pub(crate) async fn login_with(
        &self,
        token: Option<&str>,
        body: String,
    ) -> (StatusCode, Value) {
        let mut request = Request::post("/v1/reconcile").header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.request(request.body(Body::from(body)).unwrap()).await
    }
}

/// A login of a stored member while WorkOS answers every call 429 with `retry_after`, in a 500 ms
/// budget: the answer and how many calls WorkOS got.
async fn login_while_rate_limited(
    db: &rolesync::db::Db,
    retry_after: &str,
) -> (StatusCode, Value, usize) {
    let fake = FakeWorkos::start().await;
    let app = login_app(db, &fake, 500);
    app.deliver(&membership_event(
        "e1", "created", "user_1", "member", "active", 1,
    ))
    .await;
    fake.always(Reply::status(429).header("retry-after", retry_after));
    let (status, answer) = app.login("user_1").await;
    (status, answer, fake.calls())
}

pub(crate) fn found(user: &str, role: &str, status: &str, version: i64) -> Reply {
    page(
        vec![api_membership(user, role, status, &v(version).to_string())],
        None,
    )
}

both! {
    async fn a_role_changed_in_workos_is_healed_at_login(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.script([found("user_1", "admin", "active", 2)]);
        let (status, answer) = app.login("user_1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer, json!({"user_id": "user_1", "organization_id": "org_1", "role": "admin",
            "roles": ["admin"], "status": "active", "outcome": "applied", "source": "workos"}));
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!((audit.len(), audit[1].source.as_str()), (2, "login"));
        let seen = &fake.requests()[0];
        assert_eq!(seen.path, "/user_management/organization_memberships");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer sk_test_key"));
        assert!(seen.query.contains("user_id=user_1") && seen.query.contains("organization_id=org_1"), "{}", seen.query);
    }

    async fn an_unknown_slug_keeps_the_stored_role_and_audits_once(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.always(found("user_1", "creator", "active", 2));
        let (_, first) = app.login("user_1").await;
        let (_, second) = app.login("user_1").await;
        assert_eq!((first["outcome"].as_str(), first["role"].as_str()), (Some("unknown_role"), Some("member")));
        assert_eq!(second["outcome"], "unchanged");
        let refused = audit_of(&t.db, "org_1", "user_1").await.iter().filter(|r| r.outcome == "unknown_role").count();
        assert_eq!(refused, 1);
    }

    async fn an_inactive_membership_is_seen_because_statuses_are_asked_for(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        fake.script([found("user_1", "member", "inactive", 2)]);
        let (_, answer) = app.login("user_1").await;
        assert_eq!(answer["status"], "inactive");
        let query = &fake.requests()[0].query;
        assert!(query.contains("statuses=active%2Cinactive%2Cpending") || query.contains("statuses=active,inactive,pending"), "{query}");
    }

    async fn a_membership_absent_from_workos_is_removed(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        fake.script([page(vec![], None)]);
        let (_, answer) = app.login("user_1").await;
        assert_eq!((answer["outcome"].as_str(), answer["role"].clone(), answer["status"].as_str()), (Some("removed"), Value::Null, Some("deleted")));
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        let below = rolesync::timestamp::Timestamp::from_micros(v(1).micros() - 1).unwrap();
        assert_eq!((row.role_slug, row.version), (None, below), "versioned just below the state it removed");
        let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/user_management/organization_memberships", "/organizations/org_1"], "absence is checked against the organization");
    }

    async fn a_deletion_inferred_from_an_empty_answer_is_outranked_by_the_next_sighting(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 5)).await;
        fake.script([page(vec![], None), found("user_1", "admin", "active", 5)]);
        assert_eq!(app.login("user_1").await.1["outcome"], "removed", "an empty answer");
        let (_, healed) = app.login("user_1").await;
        assert_eq!((healed["outcome"].as_str(), healed["role"].as_str(), healed["status"].as_str()), (Some("applied"), Some("admin"), Some("active")), "the live membership at its own, older-than-now version restores it");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        let outcomes: Vec<&str> = audit.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(outcomes, ["applied", "removed", "applied"], "each change audited once");
        // The same restore through the other paths: a retried webhook of the live state.
        fake.script([page(vec![], None)]);
        assert_eq!(app.login("user_1").await.1["outcome"], "removed");
        let (_, receipt) = app.deliver(&membership_event("e1-retry", "updated", "user_1", "admin", "active", 5)).await;
        assert_eq!(receipt["outcome"], "applied", "a webhook of the live state restores it too");
        let (_, older) = app.deliver(&membership_event("e0", "updated", "user_1", "member", "active", 4)).await;
        assert_eq!(older["outcome"], "stale", "an older state stays stale");
    }

    async fn a_login_of_a_membership_neither_stored_nor_in_workos_writes_nothing(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        fake.always(page(vec![], None));
        let (status, answer) = app.login("user 1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((answer["outcome"].as_str(), answer["role"].clone(), answer["status"].clone()), (Some("unchanged"), Value::Null, Value::Null), "{answer}");
        assert!(membership(&t.db, "org_1", "user 1").await.is_none(), "no tombstone");
        assert_eq!(audit_count(&t.db).await, 0, "no audit row");
    }

    async fn a_request_over_the_request_timeout_is_answered_503_request_timeout_in_json(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app_with(&t.db, &fake, |c| {
            c.login_budget_ms = 10_000;
            c.request_timeout_secs = 1;
        });
        fake.always(found("user_1", "admin", "active", 1).delayed(Duration::from_secs(4)));
        let started = Instant::now();
        let (status, answer) = app.login("user_1").await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("request_timeout")), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3), "cut at the timeout: {:?}", started.elapsed());
    }

    async fn a_login_against_an_environment_without_the_organization_changes_nothing(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 5)).await;
        fake.organizations_unknown().always(page(vec![], None));
        let before = membership(&t.db, "org_1", "user_1").await.unwrap();
        for _ in 0..2 {
            let (status, answer) = app.login("user_1").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!((answer["source"].as_str(), answer["role"].as_str(), answer["workos_error"].as_str()), (Some("database"), Some("admin"), Some("unknown_organization")), "{answer}");
        }
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap(), before, "nothing written");
        assert_eq!(audit_count(&t.db).await, 1);
    }

    async fn the_membership_on_the_second_page_is_found(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        let other = api_membership("user_other", "member", "active", &v(1).to_string());
        fake.script([page(vec![other], Some("cursor_2")), found("user_1", "admin", "active", 3)]);
        let (_, answer) = app.login("user_1").await;
        assert_eq!(answer["role"], "admin");
        assert!(fake.requests()[1].query.contains("after=cursor_2"), "second request follows the cursor");
    }

    async fn rate_limits_are_retried_with_and_without_retry_after(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 3000);
        fake.script([Reply::status(429).header("retry-after", "1"), Reply::status(429), found("user_1", "admin", "active", 1)]);
        let started = Instant::now();
        let (_, answer) = app.login("user_1").await;
        assert_eq!((answer["source"].as_str(), answer["role"].as_str()), (Some("workos"), Some("admin")), "{answer}");
        assert_eq!(fake.calls(), 3);
        assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
    }

    async fn a_server_error_then_success_within_the_budget_heals(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        fake.script([Reply::status(500), Reply::status(503), found("user_1", "member", "active", 1)]);
        let (_, answer) = app.login("user_1").await;
        assert_eq!((answer["source"].as_str(), answer["outcome"].as_str()), (Some("workos"), Some("applied")));
    }

    async fn a_retry_after_beyond_the_budget_answers_from_the_database(t) {
        for after in ["30".to_owned(), u64::MAX.to_string()] {
            let (status, answer, calls) = login_while_rate_limited(&t.db, &after).await;
            assert_eq!((status, answer["source"].as_str(), answer["workos_error"].as_str()), (StatusCode::OK, Some("database"), Some("rate_limited")), "Retry-After {after}");
            assert_eq!(calls, 1, "a Retry-After beyond the budget is not waited for: {after}");
        }
    }

    async fn a_retry_after_of_zero_still_backs_off(t) {
        let (status, answer, calls) = login_while_rate_limited(&t.db, "0").await;
        assert_eq!((status, answer["source"].as_str()), (StatusCode::OK, Some("database")), "{answer}");
        // The budget may run out during the last attempt instead of before it.
        let error = answer["workos_error"].as_str();
        assert!(matches!(error, Some("rate_limited" | "timeout")), "{answer}");
        // Backoff from 50 ms with full jitter fits a handful of attempts in 500 ms; asking again
        // at once would make hundreds.
        assert!((2..20).contains(&calls), "{calls} calls in the budget");
    }

    async fn workos_slower_than_the_budget_answers_from_the_database_in_time(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 300);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.always(found("user_1", "admin", "active", 2).delayed(Duration::from_secs(5)));
        let started = Instant::now();
        let (status, answer) = app.login("user_1").await;
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer, json!({"user_id": "user_1", "organization_id": "org_1", "role": "member", "roles": ["member"],
            "status": "active", "outcome": null, "source": "database", "workos_error": "timeout"}));
        assert!(elapsed < Duration::from_millis(400), "answered after {elapsed:?}, budget 300 ms");
        assert_eq!(audit_count(&t.db).await, 1, "nothing written on fallback");
    }

    async fn an_unauthorized_api_key_is_not_retried(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.always(Reply::status(401));
        let (_, answer) = app.login("user_1").await;
        assert_eq!((answer["source"].as_str(), answer["workos_error"].as_str()), (Some("database"), Some("unauthorized")));
        assert_eq!(fake.calls(), 1);
    }

    async fn malformed_json_from_workos_falls_back_to_the_database(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "member", "active", 1)).await;
        fake.always(Reply { body: "{\"data\": [".into(), ..Reply::status(200) });
        let (_, answer) = app.login("user_1").await;
        assert_eq!((answer["source"].as_str(), answer["workos_error"].as_str()), (Some("database"), Some("malformed_response")));
    }

    async fn no_answer_from_workos_and_no_stored_row_is_503(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 200);
        fake.always(Reply::status(500));
        let (status, answer) = app.login("user_1").await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("workos_unavailable")));
    }

    async fn forty_concurrent_logins_of_one_user_make_one_workos_call(t) {
        let fake = FakeWorkos::start().await;
        let app = Arc::new(login_app(&t.db, &fake, 1500));
        fake.always(found("user_1", "admin", "active", 1).delayed(Duration::from_millis(300)));
        let tasks: Vec<_> = (0..40).map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.login("user_1").await })
        }).collect();
        for task in tasks {
            let (status, answer) = task.await.unwrap();
            assert_eq!((status, answer["role"].as_str()), (StatusCode::OK, Some("admin")), "{answer}");
        }
        assert_eq!(fake.calls(), 1, "one WorkOS call");
        assert!(audit_count(&t.db).await <= 1);
    }

    async fn a_second_login_within_the_refresh_period_answers_from_the_database(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app_with(&t.db, &fake, |_| {});
        fake.always(found("user_1", "admin", "active", 1));
        let (_, first) = app.login("user_1").await;
        let (_, second) = app.login("user_1").await;
        assert_eq!((first["source"].as_str(), second["source"].as_str()), (Some("workos"), Some("database")));
        assert_eq!(second["role"], "admin");
        assert_eq!(fake.calls(), 1);
    }

    async fn an_older_webhook_after_a_login_is_stale(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        fake.script([found("user_1", "admin", "active", 5)]);
        app.login("user_1").await;
        let (_, answer) = app.deliver(&membership_event("e1", "updated", "user_1", "member", "active", 3)).await;
        assert_eq!(answer["outcome"], "stale");
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap().role_slug.as_deref(), Some("admin"));
    }

    async fn a_webhook_and_a_login_at_the_same_moment_leave_a_consistent_chain(t) {
        let fake = FakeWorkos::start().await;
        let app = Arc::new(login_app(&t.db, &fake, 1500));
        fake.always(found("user_1", "admin", "active", 4));
        for round in 0..10 {
            let body = membership_event(&format!("e{round}"), "updated", "user_1", "member", "inactive", 2 + round);
            let (a, b) = (app.clone(), app.clone());
            let (w, l) = tokio::join!(tokio::spawn(async move { a.deliver(&body).await }), tokio::spawn(async move { b.login("user_1").await }));
            assert_eq!((w.unwrap().0, l.unwrap().0), (StatusCode::OK, StatusCode::OK));
        }
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str(), row.version), (Some("member"), "inactive", v(11)), "newest version wins");
        assert_chain(&audit_of(&t.db, "org_1", "user_1").await);
    }

    async fn a_webhook_during_the_fetch_is_kept_and_the_login_answers_what_it_read(t) {
        // The login reads the stored row while WorkOS answers; a newer webhook lands in between.
        let fake = FakeWorkos::start().await;
        let app = Arc::new(login_app(&t.db, &fake, 1500));
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 3)).await;
        fake.script([found("user_1", "admin", "active", 3).delayed(Duration::from_millis(800))]);
        let login = tokio::spawn({
            let app = app.clone();
            async move { app.login("user_1").await }
        });
        while fake.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The read runs beside the fetch; on PostgreSQL (a ping and a query on a pooled
        // connection) it could still be under way when the fetch starts, and a webhook committed
        // before it would order the login after the webhook. Give it time while WorkOS holds on.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, hook) = app.deliver(&membership_event("e2", "updated", "user_1", "member", "active", 5)).await;
        assert_eq!(hook["outcome"], "applied");
        let (status, answer) = login.await.unwrap();
        assert_eq!((status, answer["outcome"].as_str(), answer["role"].as_str()), (StatusCode::OK, Some("unchanged"), Some("admin")), "ordered before the webhook: {answer}");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.version), (Some("member"), v(5)), "the newer webhook stays");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!(audit.len(), 2, "created and the webhook's change; the login wrote nothing");
        assert_chain(&audit);
    }

    async fn a_login_sent_after_a_webhook_that_joins_an_earlier_fetch_answers_the_webhook_s_role(t) {
        // Login A reads v3 and waits for WorkOS; webhook v5 commits; login B, sent after the
        // webhook's answer, joins A's fetch. A is ordered at its read; B must not be. WorkOS holds
        // 3 s, so that B joins in time on a slow machine (it waits 200 ms and one webhook).
        let fake = FakeWorkos::start().await;
        let app = Arc::new(login_app(&t.db, &fake, 6000));
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 3)).await;
        fake.script([found("user_1", "admin", "active", 3).delayed(Duration::from_secs(3))]);
        let spawn_login = || {
            let app = app.clone();
            tokio::spawn(async move { app.login("user_1").await })
        };
        let first = spawn_login();
        while fake.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // As above: let A's read finish while WorkOS holds on.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, hook) = app.deliver(&membership_event("e2", "updated", "user_1", "member", "active", 5)).await;
        assert_eq!(hook["outcome"], "applied");
        let (status, second) = spawn_login().await.unwrap();
        let (_, first) = first.await.unwrap();
        assert_eq!(fake.calls(), 1, "the second login joined the first one's fetch");
        assert_eq!(first["role"], "admin", "ordered before the webhook: {first}");
        assert_eq!((status, second["role"].as_str(), second["status"].as_str()), (StatusCode::OK, Some("member"), Some("active")), "sent after the webhook's answer: {second}");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.version), (Some("member"), v(5)), "the newer webhook stays");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert_eq!(audit.len(), 2, "created and the webhook's change; neither login wrote: {audit:?}");
        assert_chain(&audit);
    }

    async fn the_login_endpoint_checks_its_token_and_body(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        let good = json!({"user_id": "user_1", "organization_id": "org_1"}).to_string();
        let cases = [
            (None, good.clone(), StatusCode::UNAUTHORIZED, "unauthorized", ""),
            (Some("wrong"), good.clone(), StatusCode::UNAUTHORIZED, "unauthorized", ""),
            (Some(TOKEN), "not json".to_owned(), StatusCode::BAD_REQUEST, "invalid_request", ""),
            (Some(TOKEN), json!({"organization_id": "org_1"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request", "user_id"),
            (Some(TOKEN), json!({"user_id": "u", "organization_id": 5}).to_string(), StatusCode::BAD_REQUEST, "invalid_request", "organization_id"),
            (Some(TOKEN), json!({"user_id": "u".repeat(300), "organization_id": "org_1"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request", "1 to 255 characters"),
            (Some(TOKEN), json!({"user_id": "u\u{0}nul", "organization_id": "org_1"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request", "control characters"),
        ];
        for (token, body, status, code, field) in cases {
            let (got, answer) = app.login_with(token, body.clone()).await;
            assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{body}");
            assert!(answer["message"].as_str().unwrap().contains(field), "{answer} names {field}");
        }
        assert_eq!(fake.calls(), 0);
        let disabled = TestApp::new(&t.db);
        let (status, answer) = disabled.login("user_1").await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("login_disabled")));
    }

    async fn the_stored_membership_can_be_read_back(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        app.deliver(&membership_event("e1", "created", "user_1", "admin", "active", 1)).await;
        let get = |token: &str| Request::get("/v1/memberships/org_1/user_1").header("authorization", format!("Bearer {token}")).body(Body::empty()).unwrap();
        let (status, row) = app.request(get(TOKEN)).await;
        assert_eq!((status, row["role_slug"].as_str(), row["version"].as_str()), (StatusCode::OK, Some("admin"), Some(v(1).to_string().as_str())));
        assert_eq!(app.request(get("nope")).await.0, StatusCode::UNAUTHORIZED);
        for path in ["/v1/memberships/org_1/user_x", "/v1/memberships/org_1/u%00nul", "/v1/memberships/org_1/u%0Anl", "/v1/memberships/org_1/%FF"] {
            let missing = Request::get(path).header("authorization", format!("Bearer {TOKEN}")).body(Body::empty()).unwrap();
            let (status, answer) = app.request(missing).await;
            assert_eq!((status, answer["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{path}");
        }
        let unauthorized = Request::get("/v1/memberships/org_1/%FF").body(Body::empty()).unwrap();
        assert_eq!(app.request(unauthorized).await.0, StatusCode::UNAUTHORIZED, "the token is checked before the path");
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let get = Request::get("/v1/memberships/org_1/user_1").header("authorization", format!("{scheme} {TOKEN}")).body(Body::empty()).unwrap();
            assert_eq!(app.request(get).await.0, StatusCode::OK, "the scheme {scheme:?} is case-insensitive");
        }
    }
}

both! {
    async fn a_login_that_changes_nothing_writes_nothing(t) {
        let fake = FakeWorkos::start().await;
        let app = login_app(&t.db, &fake, 1500);
        fake.always(found("user_1", "admin", "active", 3));
        assert_eq!(app.login("user_1").await.1["outcome"], "applied");
        let before = membership(&t.db, "org_1", "user_1").await.unwrap();
        app.clock.advance_millis(60_000);
        let (_, again) = app.login("user_1").await;
        assert_eq!((again["outcome"].as_str(), again["source"].as_str()), (Some("unchanged"), Some("workos")));
        assert_eq!(membership(&t.db, "org_1", "user_1").await.unwrap(), before, "the row, updated_at included, is untouched");
        assert_eq!(audit_count(&t.db).await, 1);
    }
}
