//! A real HTTP server standing in for the WorkOS API: scripted replies, recorded requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn json(body: Value) -> Self {
        Self {
            status: 200,
            body: body.to_string(),
            headers: vec![],
            delay: Duration::ZERO,
        }
    }
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: "upstream error".into(),
            headers: vec![],
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Reply>,
    fallback: Option<Reply>,
    seen: Vec<Seen>,
    /// `GET /organizations/{id}` answers 404 (an API key of another environment), else 200.
    organizations_unknown: bool,
    /// The answer to `GET /sso/jwks/{client_id}` (404 when unset), apart from the script.
    jwks: Option<Reply>,
}

/// The running fake; dropped with the test's runtime.
#[derive(Clone)]
pub struct FakeWorkos {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeWorkos {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, inner }
    }

    /// Replies given in order, one per request.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) -> &Self {
        self.inner.lock().unwrap().script.extend(replies);
        self
    }

    /// The reply once the script is used up.
    pub fn always(&self, reply: Reply) -> &Self {
        self.inner.lock().unwrap().fallback = Some(reply);
        self
    }

    /// Answers every `GET /organizations/{id}` 404, as an environment that does not hold them.
    pub fn organizations_unknown(&self) -> &Self {
        self.inner.lock().unwrap().organizations_unknown = true;
        self
    }

    /// Answers every `GET /sso/jwks/{client_id}` with `reply` from now on.
    pub fn jwks(&self, reply: Reply) -> &Self {
        self.inner.lock().unwrap().jwks = Some(reply);
        self
    }

    /// Requests for the key set.
    pub fn jwks_calls(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.starts_with("/sso/jwks/"))
            .count()
    }

    /// Requests other than for the key set (memberships, organizations).
    pub fn api_calls(&self) -> usize {
        self.calls() - self.jwks_calls()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    pub fn calls(&self) -> usize {
        self.inner.lock().unwrap().seen.len()
    }
}

async fn answer(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let reply = {
        let mut inner = inner.lock().unwrap();
        inner.seen.push(Seen {
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or("").to_owned(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        // Organizations are answered apart from the script, which holds the memberships pages.
        if request.uri().path().starts_with("/sso/jwks/") {
            inner.jwks.clone().unwrap_or_else(|| Reply::status(404))
        } else if let Some(id) = request.uri().path().strip_prefix("/organizations/") {
            match inner.organizations_unknown {
                true => Reply::status(404),
                false => Reply::json(json!({"object": "organization", "id": id, "name": "Acme"})),
            }
        } else {
            let next = inner.script.pop_front();
            next.or_else(|| inner.fallback.clone())
                .unwrap_or_else(|| Reply::status(500))
        }
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    response
        .headers_mut()
        .insert("x-request-id", "req_fake".parse().unwrap());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// A membership object as the API returns it.
pub fn api_membership(user: &str, role: &str, status: &str, updated_at: &str) -> Value {
    json!({
        "object": "organization_membership",
        "id": format!("om_{user}"),
        "user_id": user,
        "organization_id": "org_1",
        "organization_name": "Acme",
        "status": status,
        "role": {"slug": role},
        "roles": [{"slug": role}],
        "custom_attributes": {},
        "created_at": "2026-11-01T00:00:00.000Z",
        "updated_at": updated_at,
        "user": {"object": "user", "id": user, "email": "a@example.com"},
        "some_future_field": {"nested": true}
    })
}

/// A list page.
pub fn page(memberships: Vec<Value>, after: Option<&str>) -> Reply {
    Reply::json(json!({
        "object": "list",
        "data": memberships,
        "list_metadata": {"before": null, "after": after}
    }))
}
