//! An in-process stand-in for the WorkOS API: `GET /user_management/organization_memberships` answers
//! the membership of the bench user it names, always the same, after a fixed delay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::workload::{
    membership_id, org_id, ts, user_id, user_index, BASE_MS, PREFILL_VERSION_MS,
};

/// The API key rolesync is given and the fake expects.
pub const API_KEY: &str = "sk_bench";

/// The fake's counters.
#[derive(Debug, Default)]
pub struct Fake {
    delay: Duration,
    pub calls: AtomicUsize,
    /// Requests without `Authorization: Bearer sk_bench`.
    pub bad_auth: AtomicUsize,
    /// Requests naming no bench membership (answered with an empty list).
    pub strangers: AtomicUsize,
    /// Requests to any other path (answered 404).
    pub other: AtomicUsize,
    /// Requests for the key set (`GET /sso/jwks/{client_id}`), answered at once.
    pub jwks_calls: AtomicUsize,
    jwks: Option<Value>,
    /// How long each call was actually held (the timer rounds the delay up), microseconds.
    pub held_us: Mutex<Vec<i64>>,
    /// The hold of the latest call for each bench user, microseconds.
    pub held_by_user: Mutex<HashMap<usize, i64>>,
}

impl Fake {
    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

/// The role WorkOS holds for bench user `i`.
pub fn role_of(i: usize) -> &'static str {
    if i % 4 == 0 {
        "admin"
    } else {
        "member"
    }
}

/// The version WorkOS holds for bench user `i`.
pub fn version_of(i: usize) -> i64 {
    BASE_MS + i as i64
}

/// Serves on 127.0.0.1:0 on a thread and runtime of its own (WorkOS is another server: sharing the
/// load generator's thread, its answers would wait behind the logins' and count as rolesync's time);
/// returns the base URL and the counters. `jwks`, when given, is served for every client id.
pub async fn start(delay: Duration, jwks: Option<Value>) -> Result<(String, Arc<Fake>)> {
    let fake = Arc::new(Fake {
        delay,
        jwks,
        ..Fake::default()
    });
    let router = Router::new()
        .route("/user_management/organization_memberships", get(list))
        .route("/sso/jwks/{client_id}", get(key_set))
        .fallback(other)
        .with_state(fake.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("stand-in-workos".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router).await
            })
        })?;
    Ok((url, fake))
}

async fn list(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Value> {
    fake.calls.fetch_add(1, Ordering::Relaxed);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {API_KEY}")) {
        fake.bad_auth.fetch_add(1, Ordering::Relaxed);
    }
    let started = tokio::time::Instant::now();
    tokio::time::sleep(fake.delay).await;
    let held = started.elapsed().as_micros() as i64;
    fake.held_us.lock().expect("not poisoned").push(held);
    let member = query
        .get("user_id")
        .and_then(|u| user_index(u))
        .filter(|&i| query.get("organization_id") == Some(&org_id(i)));
    if let Some(i) = member {
        fake.held_by_user
            .lock()
            .expect("not poisoned")
            .insert(i, held);
    }
    let data = match member {
        Some(i) => vec![membership(i)],
        None => {
            fake.strangers.fetch_add(1, Ordering::Relaxed);
            vec![]
        }
    };
    Json(json!({"object": "list", "data": data, "list_metadata": {"before": null, "after": null}}))
}

async fn key_set(State(fake): State<Arc<Fake>>) -> Result<Json<Value>, StatusCode> {
    fake.jwks_calls.fetch_add(1, Ordering::Relaxed);
    fake.jwks.clone().map(Json).ok_or(StatusCode::NOT_FOUND)
}

async fn other(State(fake): State<Arc<Fake>>) -> StatusCode {
    fake.other.fetch_add(1, Ordering::Relaxed);
    StatusCode::NOT_FOUND
}

fn membership(i: usize) -> Value {
    json!({
        "object": "organization_membership",
        "id": membership_id(i),
        "user_id": user_id(i),
        "organization_id": org_id(i),
        "organization_name": "Bench org",
        "status": "active",
        "role": {"slug": role_of(i)},
        "roles": [{"slug": role_of(i)}],
        "custom_attributes": {},
        "created_at": ts(PREFILL_VERSION_MS),
        "updated_at": ts(version_of(i)),
    })
}
