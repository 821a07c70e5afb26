//! Around every route: a request id and span, latency metrics, the inbound per-address limiter
//! (before any signature work) and a request timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::Instrument;

use super::state::AppState;
use crate::metrics::RouteLabels;

/// Header carrying the request id, taken from the caller when present and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The outermost layer of the routes that do work.
pub async fn around(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = method_label(request.method());
    let span = tracing::info_span!("request", request_id = %request_id, %method, %route,
        event_id = tracing::field::Empty, organization_id = tracing::field::Empty,
        user_id = tracing::field::Empty, outcome = tracing::field::Empty, status = tracing::field::Empty);
    let mut response = async {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let client = app.inbound.client_address(peer, request.headers());
        if let Err(wait) = app.inbound.check(client) {
            app.metrics.limited("inbound");
            return too_many_requests(wait);
        }
        match tokio::time::timeout(app.inbound.timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => timed_out(),
        }
    }
    .instrument(span.clone())
    .await;
    let status = response.status().as_u16();
    span.record("status", status);
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| tracing::debug!(status, elapsed_ms, "request finished"));
    let labels = RouteLabels {
        route,
        method: method.to_owned(),
        status: status.to_string(),
    };
    app.metrics
        .request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
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

/// The caller's request id when it is short and printable, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:016x}", fastrand::u64(..)), str::to_owned)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_kept_or_made() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID, "has space".parse().unwrap());
        assert_eq!(
            request_id(&headers).len(),
            16,
            "an unprintable id is replaced"
        );
    }
}
