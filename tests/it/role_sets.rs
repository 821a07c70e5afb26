//! Role sets (WorkOS's multiple roles): `membership_roles` kept in step with `memberships`, the
//! unknown-role guard per slug, the sets in answers and audit rows, and their convergence after
//! `roles add`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rolesync::db::Db;
use rolesync::db::StoredFilter;
use rolesync::timestamp::Timestamp;
use serde_json::{json, Value};

use crate::fake_workos::{api_membership, page, FakeWorkos};
use crate::support::{assert_chain, audit_count, audit_of, membership, v, TestApp};

const TOKEN: &str = "login-token-for-tests";

fn now() -> Timestamp {
    Timestamp::parse("2026-11-25T12:00:00.000Z").unwrap()
}

/// A membership event of `org_1`/`user` whose primary role is `role` and whose set is `roles`.
fn set_event(
    id: &str,
    kind: &str,
    role: &str,
    roles: &[&str],
    status: &str,
    version: i64,
) -> Vec<u8> {
    let roles: Vec<Value> = roles.iter().map(|s| json!({"slug": s})).collect();
    serde_json::to_vec(&json!({
        "object": "event", "id": id, "event": format!("organization_membership.{kind}"),
        "data": {"object": "organization_membership", "id": "om_user_1", "user_id": "user_1",
            "organization_id": "org_1", "status": status, "role": {"slug": role}, "roles": roles,
            "created_at": v(0).to_string(), "updated_at": v(version).to_string()},
        "created_at": v(version).to_string()
    }))
    .unwrap()
}

/// The slugs `membership_roles` holds for `org_1`/`user_1`, as the web app reads them.
async fn held(db: &Db) -> Vec<String> {
    db.roles_of("org_1", "user_1").await.unwrap()
}

async fn get(app: &TestApp) -> Value {
    let request = Request::get("/v1/memberships/org_1/user_1")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = app.request(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn app(db: &Db) -> TestApp {
    TestApp::with_config(db, |c| c.login_token = Some(TOKEN.parse().unwrap()))
}

/// (old_roles, new_roles, outcome) of each audit row.
type SetChange = (Option<Vec<String>>, Option<Vec<String>>, String);

async fn set_changes(db: &Db) -> Vec<SetChange> {
    audit_of(db, "org_1", "user_1")
        .await
        .into_iter()
        .map(|r| (r.old_roles.0, r.new_roles.0, r.outcome))
        .collect()
}

fn slugs(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

both! {
    async fn a_role_set_is_applied_reduced_and_emptied(t) {
        let app = app(&t.db);
        let (status, answer) = app.deliver(&set_event("e1", "created", "member", &["member", "admin"], "active", 1)).await;
        assert_eq!((status, answer["outcome"].as_str()), (StatusCode::OK, Some("applied")));
        assert_eq!(held(&t.db).await, ["admin", "member"]);
        let body = get(&app).await;
        assert_eq!((body["role_slug"].clone(), body["roles"].clone()), (json!("member"), json!(["admin", "member"])), "{body}");

        let (_, answer) = app.deliver(&set_event("e2", "updated", "member", &["member"], "active", 2)).await;
        assert_eq!(answer["outcome"], "applied", "the set shrinks with the primary role unchanged");
        assert_eq!(held(&t.db).await, ["member"]);

        // A duplicate and an older version change nothing.
        let (_, answer) = app.deliver(&set_event("e2", "updated", "member", &["member"], "active", 2)).await;
        assert_eq!(answer["outcome"], "duplicate");
        let (_, answer) = app.deliver(&set_event("e1b", "updated", "member", &["member", "admin"], "active", 1)).await;
        assert_eq!(answer["outcome"], "stale");
        assert_eq!(held(&t.db).await, ["member"], "an older set does not come back");
        // (A late repeat of a version the trail holds writes no audit row.)

        let (_, answer) = app.deliver(&set_event("e3", "deleted", "member", &["member"], "active", 3)).await;
        assert_eq!(answer["outcome"], "removed");
        assert!(held(&t.db).await.is_empty(), "a deleted membership holds no role");
        assert_eq!(get(&app).await["roles"], json!([]));

        assert_eq!(set_changes(&t.db).await, [
            (None, slugs(&["admin", "member"]), "applied".into()),
            (slugs(&["admin", "member"]), slugs(&["member"]), "applied".into()),
            (slugs(&["member"]), slugs(&[]), "removed".into()),
        ]);
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert!(audit[1].detail.contains("roles [admin, member] -> [member]"), "{}", audit[1].detail);
        assert_chain(&audit);
    }

    async fn a_mixed_set_applies_its_known_slugs_and_audits_the_unknown_one(t) {
        let app = app(&t.db);
        app.deliver(&set_event("e1", "created", "member", &["member"], "active", 1)).await;
        let (_, answer) = app.deliver(&set_event("e2", "updated", "member", &["member", "admin", "creator"], "active", 2)).await;
        assert_eq!(answer["outcome"], "unknown_role", "the refusal is the outcome");
        assert_eq!(held(&t.db).await, ["admin", "member"], "known slugs are applied, the unknown one never stored");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!(row.role_slug.as_deref(), Some("member"));
        assert_eq!(row.workos_role_slugs, ["admin", "creator", "member"], "what WorkOS reported is on record");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert!(audit[1].detail.contains(r#"role "creator" is not a known role"#), "{}", audit[1].detail);
        assert_eq!((audit[1].old_roles.0.clone(), audit[1].new_roles.0.clone()), (slugs(&["member"]), slugs(&["admin", "member"])));

        // The same state again (another event id): nothing new to record.
        let (_, answer) = app.deliver(&set_event("e2b", "updated", "member", &["member", "admin", "creator"], "active", 2)).await;
        assert_eq!(answer["outcome"], "unchanged");
        assert_eq!(audit_count(&t.db).await, 2);

        // Once the app knows the role, replaying the refused events converges the set.
        assert!(t.db.add_role("creator", now()).await.unwrap());
        let filter = StoredFilter { outcome: Some("unknown_role".into()), ..StoredFilter::default() };
        let done = rolesync::replay::replay_stored(&t.db, &filter, now()).await.unwrap();
        assert_eq!(done.iter().map(|r| r.after.as_str()).collect::<Vec<_>>(), ["applied"]);
        assert_eq!(held(&t.db).await, ["admin", "creator", "member"]);
        assert_eq!(audit_count(&t.db).await, 3, "one row for the one real change");
    }

    async fn an_all_unknown_set_takes_nothing_away(t) {
        let app = app(&t.db);
        app.deliver(&set_event("e1", "created", "admin", &["admin", "member"], "active", 1)).await;
        let (_, answer) = app.deliver(&set_event("e2", "updated", "creator", &["creator", "owner"], "active", 2)).await;
        assert_eq!(answer["outcome"], "unknown_role");
        assert_eq!(held(&t.db).await, ["admin", "member"], "no downgrade");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!(row.role_slug.as_deref(), Some("admin"), "the primary role is kept");
        let audit = audit_of(&t.db, "org_1", "user_1").await;
        assert!(audit[1].detail.starts_with(r#"roles "creator", "owner" are not known roles; kept admin"#), "{}", audit[1].detail);
        assert_eq!(audit[1].new_roles.0, slugs(&["admin", "member"]));

        // Nor does an unknown set activate an inactive membership (no escalation).
        app.deliver(&set_event("e3", "updated", "admin", &["admin"], "inactive", 3)).await;
        let (_, answer) = app.deliver(&set_event("e4", "updated", "creator", &["creator"], "active", 4)).await;
        assert_eq!(answer["outcome"], "unknown_role");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.role_slug.as_deref(), row.status.as_str()), (Some("admin"), "inactive"));
        assert_eq!(held(&t.db).await, ["admin"]);
    }

    async fn the_next_login_converges_a_role_set(t) {
        let fake = FakeWorkos::start().await;
        let url = fake.url.clone();
        let app = TestApp::with_config(&t.db, move |c| {
            c.api_base_url = url.parse().unwrap();
            c.api_key = Some("sk_test_key".parse().unwrap());
            c.login_token = Some(TOKEN.parse().unwrap());
            c.login_refresh_secs = 0;
        });
        app.deliver(&set_event("e1", "created", "member", &["member", "creator"], "active", 1)).await;
        assert_eq!(held(&t.db).await, ["member"]);
        assert!(t.db.add_role("creator", now()).await.unwrap());
        let mut reply = api_membership("user_1", "member", "active", &v(1).to_string());
        reply["roles"] = json!([{"slug": "member"}, {"slug": "creator"}]);
        fake.script([page(vec![reply], None)]);
        let login = Request::post("/v1/reconcile")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(json!({"user_id": "user_1", "organization_id": "org_1"}).to_string()))
            .unwrap();
        let (status, answer) = app.request(login).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!((answer["outcome"].clone(), answer["role"].clone(), answer["roles"].clone()),
            (json!("applied"), json!("member"), json!(["creator", "member"])), "{answer}");
        assert_eq!(held(&t.db).await, ["creator", "member"]);
    }

    async fn an_unknown_primary_role_stays_in_the_set_it_heads(t) {
        let app = app(&t.db);
        app.deliver(&set_event("e1", "created", "member", &["member"], "active", 1)).await;
        let (_, answer) = app.deliver(&set_event("e2", "updated", "creator", &["creator", "admin"], "active", 2)).await;
        assert_eq!(answer["outcome"], "unknown_role");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!(row.role_slug.as_deref(), Some("member"), "an unknown slug never changes the primary role");
        assert_eq!(held(&t.db).await, ["admin", "member"], "the kept primary role stays one of the set");
    }

    async fn a_mangled_role_entry_is_refused_and_changes_nothing(t) {
        let app = app(&t.db);
        app.deliver(&set_event("e1", "created", "member", &["member", "admin"], "active", 1)).await;
        for (id, roles) in [("e2", json!([{}])), ("e3", json!([{"slug": ""}])), ("e4", json!([{"slug": 7}])), ("e5", json!("admin"))] {
            let body = serde_json::to_vec(&json!({"id": id, "event": "organization_membership.updated",
                "data": {"object": "organization_membership", "id": "om_user_1", "user_id": "user_1",
                "organization_id": "org_1", "status": "active", "role": {"slug": "member"}, "roles": roles,
                "updated_at": v(2).to_string()}})).unwrap();
            let (status, answer) = app.deliver(&body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{id}: {answer}");
        }
        assert_eq!(held(&t.db).await, ["admin", "member"]);
        assert_eq!(audit_count(&t.db).await, 1);
    }

    async fn a_webhook_without_roles_keeps_a_stored_set_and_queues_a_refetch(t) {
        let app = app(&t.db);
        app.deliver(&set_event("e1", "created", "member", &["member", "admin"], "active", 1)).await;
        // A later webhook that leaves `roles` out (a status change): the set is not taken as `[member]`.
        let body = serde_json::to_vec(&json!({"id": "e2", "event": "organization_membership.updated",
            "data": {"object": "organization_membership", "id": "om_user_1", "user_id": "user_1",
            "organization_id": "org_1", "status": "inactive", "role": {"slug": "member"},
            "updated_at": v(2).to_string()}})).unwrap();
        let (_, answer) = app.deliver(&body).await;
        assert_eq!(answer["outcome"], "applied");
        let row = membership(&t.db, "org_1", "user_1").await.unwrap();
        assert_eq!((row.status.as_str(), row.role_slugs.clone()), ("inactive", vec!["admin".to_owned(), "member".to_owned()]));
        let queued = t.db.refetch_due(i64::MAX, 10).await.unwrap();
        assert_eq!(queued.iter().map(|q| (q.target.as_str(), q.event_id.as_str(), q.reason.as_str())).collect::<Vec<_>>(),
            [("om_user_1", "e2", "roles_absent")], "a refetch learns the set");
        // A single-role membership (its set is its primary role) takes a payload without roles as is.
        let single = serde_json::to_vec(&json!({"id": "e3", "event": "organization_membership.created",
            "data": {"object": "organization_membership", "id": "om_user_2", "user_id": "user_2",
            "organization_id": "org_1", "status": "active", "role": {"slug": "member"}, "updated_at": v(1).to_string()}})).unwrap();
        app.deliver(&single).await;
        assert_eq!(t.db.refetch_due(i64::MAX, 10).await.unwrap().len(), 1, "no refetch for a single role");
    }
}
