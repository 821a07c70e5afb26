//! Around every route that does work: a request id and span and a request timeout (tower-http),
//! the inbound per-address limiter (before any signature work) and latency metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tower::util::MapRequestLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::state::AppState;
use crate::metrics::RouteLabels;

/// Header carrying the request id, taken from the caller when present and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The layers of the routes that do work, outermost first: a caller's unusable request id
/// dropped, a request id set (tower-http) and echoed, the request span (tower-http's trace), the
/// limiter and metrics ([`around`]), and the request timeout (tower-http).
pub fn layered(router: Router<Arc<AppState>>, state: Arc<AppState>) -> Router<Arc<AppState>> {
    let timeout = state.inbound.timeout;
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(state, around))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(finished)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(FreshId))
        .layer(MapRequestLayer::new(drop_unusable_request_id))
}

/// A fresh request id: 16 hex digits.
#[derive(Clone, Copy)]
struct FreshId;

impl MakeRequestId for FreshId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = format!("{:016x}", fastrand::u64(..));
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// Keeps the caller's request id only when it is short and printable, so that a fresh one is made.
/// A plain function (tower's `MapRequest`): an axum middleware would box a future per request.
fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
        });
    if !usable {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// The `request` span every log line of a request carries.
fn request_span<B>(request: &axum::http::Request<B>) -> Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", request_id = %request_id, method = %method_label(request.method()),
        route = %route_label(request), event_id = tracing::field::Empty,
        organization_id = tracing::field::Empty, user_id = tracing::field::Empty,
        outcome = tracing::field::Empty, status = tracing::field::Empty)
}

fn finished<B>(response: &axum::http::Response<B>, latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    span.record("status", status);
    let elapsed_ms = latency.as_secs_f64() * 1000.0;
    span.in_scope(|| tracing::debug!(status, elapsed_ms, "request finished"));
}

/// The matched route, or `unmatched`.
fn route_label<B>(request: &axum::http::Request<B>) -> &str {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
}

/// The inbound limiter, before any signature work, and the latency metrics; a request the timeout
/// layer cut off gets its JSON answer here.
pub async fn around(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_label(&request).to_owned();
    let method = method_label(request.method());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client = app.inbound.client_address(peer, request.headers());
    let response = match app.inbound.check(client) {
        Err(wait) => {
            app.metrics.limited("inbound");
            too_many_requests(wait)
        }
        Ok(()) => {
            let response = next.run(request).await;
            // Every answer of rolesync's own is JSON; a bare 503 is the timeout layer's.
            let bare = response.headers().get(header::CONTENT_TYPE).is_none();
            match response.status() == StatusCode::SERVICE_UNAVAILABLE && bare {
                true => timed_out(),
                false => response,
            }
        }
    };
    let labels = RouteLabels {
        route,
        method: method.to_owned(),
        status: response.status().as_u16().to_string(),
    };
    app.metrics
        .request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as a metrics and log label: one of the methods HTTP defines, else `other`. Any
/// client can send any token as a method (hyper accepts 100 KB ones), and every distinct label is a
/// time series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&Method; 9] = [
        &Method::GET,
        &Method::POST,
        &Method::PUT,
        &Method::DELETE,
        &Method::HEAD,
        &Method::OPTIONS,
        &Method::PATCH,
        &Method::CONNECT,
        &Method::TRACE,
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method)
        .map_or("other", |known| known.as_str())
}

fn too_many_requests(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let body = json!({"error": "rate_limited", "message": "too many requests from this address"});
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(seconds.max(1)));
    response
}

fn timed_out() -> Response {
    tracing::warn!("request timed out");
    let body = json!({"error": "request_timeout", "message": "the request took too long; retry"});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
