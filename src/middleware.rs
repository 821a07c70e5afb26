//! Around every route: a request id and span, latency metrics, the inbound per-address limiter
//! (before any signature work) and a request timeout.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use tracing::Instrument;

use crate::app::AppState;
use crate::config::Config;
use crate::metrics::RouteLabels;

/// Header carrying the request id, taken from the caller when present and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The inbound limiter: off unless `ROLESYNC_RATE_LIMIT_PER_IP` is set.
pub struct Inbound {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Vec<IpAddr>,
    pub timeout: Duration,
}

impl Inbound {
    /// From settings.
    pub fn new(config: &Config) -> Self {
        let limiter = NonZeroU32::new(config.rate_limit_per_ip).map(|rate| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            trusted_proxies: config.trusted_proxy.clone(),
            timeout: Duration::from_secs(config.request_timeout_secs.max(1)),
        }
    }

    /// The client address: the peer, or when the peer is a trusted proxy, the rightmost
    /// `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        let hops: Vec<IpAddr> = forwarded
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse().ok())
            .collect();
        Some(
            hops.into_iter()
                .rev()
                .find(|ip| !self.trusted_proxies.contains(ip))
                .unwrap_or(peer),
        )
    }

    /// `Err(wait)` when the client is over its rate.
    fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let (Some(limiter), Some(client)) = (&self.limiter, client) else {
            return Ok(());
        };
        limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

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

    fn inbound(trusted: &[&str]) -> Inbound {
        let mut config = Config::with_database("sqlite://x.db").unwrap();
        config.trusted_proxy = trusted.iter().map(|t| t.parse().unwrap()).collect();
        Inbound::new(&config)
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.2".parse().unwrap(),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let cases = [
            (
                vec![],
                "10.0.0.1",
                "untrusted peer: its own address, never the header",
            ),
            (
                vec!["10.0.0.1"],
                "10.0.0.2",
                "one trusted proxy: the rightmost hop",
            ),
            (
                vec!["10.0.0.1", "10.0.0.2"],
                "1.2.3.4",
                "two trusted proxies: the first untrusted hop from the right",
            ),
        ];
        for (trusted, expected, what) in cases {
            let got = inbound(&trusted)
                .client_address(Some(peer), &headers)
                .unwrap();
            assert_eq!(got.to_string(), expected, "{what}");
        }
    }

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
