//! Shared test helpers: a fresh real database per test on each backend, a settable clock, a signed
//! webhook client over the real router, and audit-chain checks.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use rolesync::config::Config;
use rolesync::db::{self, AuditRow, Backend, Db};
use rolesync::http::{build_router, AppState};
use rolesync::reconcile::{Membership, Observation, Source};
use rolesync::signature;
use rolesync::timestamp::{Clock, Timestamp};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use tower::ServiceExt;

pub const SECRET: &str = "whsec_test_secret";

/// The server the PostgreSQL tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("ROLESYNC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, migrated database that is deleted when dropped.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Postgres(String),
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        Self::with_connections(backend, 8).await
    }

    pub async fn with_connections(backend: Backend, connections: u32) -> Self {
        let t = Self::unmigrated(backend, connections).await;
        t.db.migrate().await.expect("migrate");
        t
    }

    /// A fresh database with no table of rolesync's in it.
    pub async fn unmigrated(backend: Backend, connections: u32) -> Self {
        let (url, cleanup) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("rolesync.db").display());
                (url, Cleanup::Dir(dir))
            }
            Backend::Postgres => {
                let name = format!(
                    "rolesync_test_{}_{}_{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed),
                    fastrand::u32(..)
                );
                let admin = postgres_admin_url();
                let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL at {admin} is required for the postgres tests: {e}")
                });
                conn.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create database");
                let base = admin.rsplit_once('/').expect("admin URL has a database").0;
                (format!("{base}/{name}"), Cleanup::Postgres(name))
            }
        };
        let db = Db::connect(&url, connections).await.expect("connect");
        Self { db, url, cleanup }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::Postgres(name) = &self.cleanup {
            let name = name.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&postgres_admin_url()).await {
                        let _ = conn
                            .execute(
                                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                            )
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL: `both! { async fn name(db) { ... } }`.
#[macro_export]
macro_rules! both {
    ($(async fn $name:ident($db:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $db = $crate::support::TestDb::new(rolesync::db::Backend::Sqlite).await;
                $body
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let $db = $crate::support::TestDb::new(rolesync::db::Backend::Postgres).await;
                $body
            }
        }
    )*};
}

/// A clock tests set by hand.
#[derive(Debug)]
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn at(ts: &str) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(Timestamp::parse(ts).unwrap().millis())))
    }
    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst)).unwrap()
    }
}

/// `2026-11-20T10:00:00.000Z` plus `n` seconds, as a version.
pub fn v(n: i64) -> Timestamp {
    Timestamp::from_millis(1_795_168_800_000 + n * 1000).unwrap()
}

/// An observation of `org_1`/`user_1`.
pub fn obs(version: i64, role: Option<&str>, status: &str, deleted: bool) -> Observation {
    Observation {
        organization_id: "org_1".into(),
        user_id: "user_1".into(),
        membership_id: "om_1".into(),
        role_slug: role.map(str::to_owned),
        role_slugs: role.map(str::to_owned).into_iter().collect(),
        roles_reported: true,
        status: status.into(),
        deleted,
        inferred: false,
        directory_managed: false,
        version: v(version),
        source: Source::Cli,
        event_id: None,
    }
}

pub async fn membership(db: &Db, org: &str, user: &str) -> Option<Membership> {
    db.membership(org, user).await.unwrap()
}

/// Runs SQL (any statements, no parameters) on the test's database.
pub async fn exec(db: &Db, sql: &str) {
    db.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The rows of one statement with `$1`, `$2`, ... parameters, each column as text (`None` for
/// NULL; integers and booleans as digits, times as rolesync renders them).
pub async fn rows(db: &Db, sql: &str, params: &[&str]) -> Vec<Vec<Option<String>>> {
    let params: Vec<db::Value> = params.iter().map(|p| db::Value::from(*p)).collect();
    db.rows(sql, &params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| row.iter().map(db::Value::text).collect())
        .collect()
}

/// The first column of every row of one statement (NULL as an empty string).
pub async fn strings(db: &Db, sql: &str, params: &[&str]) -> Vec<String> {
    rows(db, sql, params)
        .await
        .into_iter()
        .map(|mut row| row.swap_remove(0).unwrap_or_default())
        .collect()
}

/// The one integer a statement answers (a count).
pub async fn int(db: &Db, sql: &str, params: &[&str]) -> i64 {
    let answer = strings(db, sql, params).await;
    assert_eq!(answer.len(), 1, "{sql}: one row");
    answer[0]
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: {answer:?}"))
}

/// Audit rows of one membership, oldest first.
pub async fn audit_of(db: &Db, org: &str, user: &str) -> Vec<AuditRow> {
    let mut rows = db.audit(Some(org), Some(user), i64::MAX).await.unwrap();
    rows.reverse();
    rows
}

pub async fn audit_count(db: &Db) -> i64 {
    int(db, "SELECT COUNT(*) FROM role_audit", &[]).await
}

/// Each row's old role and status equal the previous row's new ones; the first starts from nothing
/// unless `first_from` says otherwise.
pub fn assert_chain(rows: &[AuditRow]) {
    let mut prev: (Option<String>, Option<String>) = (None, None);
    for r in rows {
        assert_eq!(
            (&r.old_role, &r.old_status),
            (&prev.0, &prev.1),
            "audit chain broken at row {r:?}"
        );
        prev = (r.new_role.clone(), r.new_status.clone());
    }
}

/// The real router over a test database, with a settable clock and one webhook secret.
pub struct TestApp {
    pub state: Arc<AppState>,
    pub clock: Arc<TestClock>,
}

impl TestApp {
    pub fn new(db: &Db) -> Self {
        Self::with_config(db, |_| {})
    }

    pub fn with_config(db: &Db, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::with_database("sqlite://unused.db").unwrap();
        config.webhook_secret = Some(SECRET.parse().unwrap());
        adjust(&mut config);
        let clock = TestClock::at("2026-11-25T12:00:00.000Z");
        let state = AppState::with_clock(&config, db.clone(), clock.clone());
        Self {
            state: Arc::new(state),
            clock,
        }
    }

    /// Sends a request through the router; returns status and JSON body (Null when not JSON).
    pub async fn request(&self, request: Request<Body>) -> (StatusCode, Value) {
        let (status, _, body) = self.exchange(request).await;
        (status, body)
    }

    /// [`Self::request`], with the answer's headers.
    pub async fn exchange(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = build_router(self.state.clone())
            .oneshot(request)
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Posts a body signed with the test secret at the clock's time.
    pub async fn deliver(&self, body: &[u8]) -> (StatusCode, Value) {
        self.request(self.signed_webhook(body)).await
    }

    /// The webhook request [`Self::deliver`] sends.
    pub fn signed_webhook(&self, body: &[u8]) -> Request<Body> {
        let header = signature::sign(body, SECRET.as_bytes(), self.clock.now().millis());
        webhook_request(body, Some(&header))
    }

    pub async fn post_webhook(&self, body: &[u8], signature: Option<&str>) -> (StatusCode, Value) {
        self.request(webhook_request(body, signature)).await
    }
}

fn webhook_request(body: &[u8], signature: Option<&str>) -> Request<Body> {
    let mut builder = Request::post("/webhooks/workos").header("content-type", "application/json");
    if let Some(sig) = signature {
        builder = builder.header("WorkOS-Signature", sig);
    }
    builder.body(Body::from(body.to_vec())).unwrap()
}

/// A membership event body.
pub fn membership_event(
    id: &str,
    kind: &str,
    user: &str,
    role: &str,
    status: &str,
    version: i64,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "object": "event",
        "id": id,
        "event": format!("organization_membership.{kind}"),
        "data": {
            "object": "organization_membership",
            "id": format!("om_{user}"),
            "user_id": user,
            "organization_id": "org_1",
            "status": status,
            "role": {"slug": role},
            "roles": [{"slug": role}],
            "custom_attributes": {},
            "created_at": v(0).to_string(),
            "updated_at": v(version).to_string(),
        },
        "created_at": v(version).to_string(),
        "context": {}
    }))
    .unwrap()
}
