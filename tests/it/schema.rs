//! rolesync in a schema of its own inside the app's PostgreSQL database
//! (`?options=-c%20search_path%3Drolesync`), beside the app's own `roles` table.

use rolesync::db::Backend;
use serde_json::{json, Value};

use crate::fake_workos::{api_membership, page, FakeWorkos, Reply};
use crate::process::{post_webhook, run, Server};
use crate::support::{exec, int, membership_event, rows, strings, v, TestDb};

const API_KEY: &str = "sk_test_schema";
const LOGIN_TOKEN: &str = "login_token_schema";
/// README's "may this user open /studio" query, as the app runs it.
const STUDIO_QUERY: &str = "SELECT EXISTS (
  SELECT 1 FROM rolesync.memberships
   WHERE organization_id = $1 AND user_id = $2
     AND status = 'active' AND role_slug IN ('admin')
) AS allowed";

/// Runs the binary off the runtime's threads (the fake WorkOS answers on them); asserts exit 0.
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = run(&args, &envs);
        assert_eq!(code, 0, "rolesync {args:?} failed: {err}");
        out
    })
    .await
    .unwrap()
}

async fn tables(t: &TestDb) -> Vec<(String, String)> {
    let sql = "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema IN ('public', 'rolesync') ORDER BY 1, 2";
    rows(&t.db, sql, &[])
        .await
        .into_iter()
        .map(|mut r| (r[0].take().unwrap(), r[1].take().unwrap()))
        .collect()
}

async fn role_of(t: &TestDb, user: &str) -> Option<String> {
    let sql = "SELECT role_slug FROM rolesync.memberships WHERE user_id = $1";
    let mut found = rows(&t.db, sql, &[user]).await;
    assert_eq!(found.len(), 1, "{user}: one row");
    found[0].remove(0)
}

fn events_page(events: Vec<Vec<u8>>) -> Reply {
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_slice(e).unwrap())
        .collect();
    Reply::json(
        json!({"object": "list", "data": data, "list_metadata": {"before": null, "after": null}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_and_the_service_work_in_a_schema_beside_the_apps_own_roles_table() {
    every_command_in_schema_rolesync("-c%20search_path%3Drolesync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_that_falls_back_to_public_still_puts_every_table_in_schema_rolesync() {
    every_command_in_schema_rolesync("-c%20search_path%3Drolesync%2Cpublic").await;
}

/// `options` is the URL's percent-encoded `options` parameter.
async fn every_command_in_schema_rolesync(options: &str) {
    let t = TestDb::unmigrated(Backend::Postgres, 2).await;
    for sql in [
        "CREATE TABLE roles (id SERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        "INSERT INTO roles (name) VALUES ('owner'), ('editor')",
    ] {
        exec(&t.db, sql).await;
    }
    let url = format!("{}?options={options}", t.url);
    let fake = FakeWorkos::start().await;
    let envs = [
        ("DATABASE_URL", url.as_str()),
        ("WORKOS_API_KEY", API_KEY),
        ("WORKOS_API_BASE_URL", fake.url.as_str()),
    ];

    cli(&["migrate"], &envs).await;
    cli(&["migrate"], &envs).await;
    assert_eq!(
        cli(&["roles", "add", "creator"], &envs).await,
        "creator: added\n"
    );
    assert_eq!(
        cli(&["roles", "list"], &envs).await,
        "admin\ncreator\nmember\n"
    );

    fake.script([page(
        vec![api_membership(
            "user_2",
            "member",
            "active",
            &v(0).to_string(),
        )],
        None,
    )]);
    let server = Server::start(
        &url,
        &[
            ("WORKOS_API_KEY", API_KEY.into()),
            ("WORKOS_API_BASE_URL", fake.url.clone()),
            ("ROLESYNC_LOGIN_TOKEN", LOGIN_TOKEN.into()),
            ("ROLESYNC_SYNC_INTERVAL_SECS", "0".into()),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let created = membership_event("e1", "created", "user_1", "admin", "active", 1);
    assert_eq!(
        post_webhook(&client, &server.base, created).await,
        Some(200),
        "webhook"
    );
    let login: Value = client
        .post(format!("{}/v1/reconcile", server.base))
        .bearer_auth(LOGIN_TOKEN)
        .json(&json!({"user_id": "user_2", "organization_id": "org_1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&login["role"], &login["source"]),
        (&json!("member"), &json!("workos")),
        "{login}"
    );
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "ready: every migration is found in the schema"
    );
    server.terminate();
    assert!(server.finish().0, "serve exits 0");
    assert_eq!(
        role_of(&t, "user_1").await.as_deref(),
        Some("admin"),
        "the webhook wrote to rolesync.memberships"
    );

    fake.script([events_page(vec![membership_event(
        "e2", "updated", "user_1", "creator", "active", 2,
    )])]);
    cli(&["sync"], &envs).await;
    assert_eq!(
        role_of(&t, "user_1").await.as_deref(),
        Some("creator"),
        "sync"
    );

    fake.script([page(
        vec![
            api_membership("user_1", "creator", "active", &v(2).to_string()),
            api_membership("user_2", "admin", "active", &v(10).to_string()),
        ],
        None,
    )]);
    cli(&["resync", "--org", "org_1"], &envs).await;
    assert_eq!(
        role_of(&t, "user_2").await.as_deref(),
        Some("admin"),
        "resync"
    );

    fake.script([page(
        vec![api_membership(
            "user_1",
            "member",
            "active",
            &v(20).to_string(),
        )],
        None,
    )]);
    cli(&["reconcile", "--user", "user_1", "--org", "org_1"], &envs).await;
    assert_eq!(
        role_of(&t, "user_1").await.as_deref(),
        Some("member"),
        "reconcile"
    );

    cli(&["replay", "--stored"], &envs).await;
    cli(&["prune", "--payloads-older-than", "30d"], &envs).await;
    let audit = cli(&["audit", "--org", "org_1"], &envs).await;
    for source in ["webhook", "login", "events", "resync", "cli"] {
        assert!(
            audit.contains(source),
            "audit shows a {source} row:\n{audit}"
        );
    }

    let rolesync_tables = [
        "_sqlx_migrations",
        "membership_roles",
        "memberships",
        "refetch_queue",
        "role_audit",
        "roles",
        "sync_state",
        "webhook_events",
    ];
    let mut expected = vec![("public".to_owned(), "roles".to_owned())];
    expected.extend(rolesync_tables.map(|name| ("rolesync".to_owned(), name.to_owned())));
    assert_eq!(
        tables(&t).await,
        expected,
        "rolesync's tables, and only they, are in its schema"
    );
    for (user, expected) in [("user_2", true), ("user_1", false)] {
        let allowed = int(&t.db, STUDIO_QUERY, &["org_1", user]).await == 1;
        assert_eq!(
            allowed, expected,
            "README's /studio query, from the app's search path, for {user}"
        );
    }
    let app_roles = strings(&t.db, "SELECT name FROM public.roles ORDER BY id", &[]).await;
    assert_eq!(
        app_roles,
        ["owner", "editor"],
        "the app's own roles table is untouched"
    );
}
