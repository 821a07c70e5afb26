//! The inbound per-address limiter and the client address it keys on.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;

/// The inbound limiter: off unless `ROLESYNC_RATE_LIMIT_PER_IP` is set.
pub struct Inbound {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Vec<IpAddr>,
    pub timeout: Duration,
    checks: AtomicU64,
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
            trusted_proxies: config
                .trusted_proxy
                .iter()
                .map(|ip| canonical(*ip))
                .collect(),
            timeout: Duration::from_secs(config.request_timeout_secs.max(1)),
            checks: AtomicU64::new(0),
        }
    }

    /// The client address: the peer, or when the peer is a trusted proxy, the rightmost
    /// `X-Forwarded-For` hop that is not itself a trusted proxy. Hops are read with or without a
    /// port or brackets, IPv4-mapped IPv6 addresses as IPv4. A hop that cannot be read ends the walk
    /// and counts as the client, keyed by the proxy that sent it: the forgeable hops to its left
    /// are never believed.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical(peer?);
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let mut hops: Vec<&str> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return Some(peer);
            };
            hops.extend(value.split(','));
        }
        for hop in hops.into_iter().rev() {
            match parse_hop(hop) {
                Some(ip) if self.trusted_proxies.contains(&ip) => continue,
                Some(ip) => return Some(ip),
                None => return Some(peer),
            }
        }
        Some(peer)
    }

    /// `Err(wait)` when the client is over its rate. Every 4,096 checks, keys whose bucket is full
    /// again are dropped, so the map holds only recently active addresses.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let (Some(limiter), Some(client)) = (&self.limiter, client) else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Addresses the limiter holds a bucket for.
    pub fn tracked_addresses(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// How many limiter checks pass between two prunings of its key map.
const PRUNE_EVERY: u64 = 4096;

/// An address as one key: IPv4-mapped IPv6 (`::ffff:127.0.0.1`, how a `[::]` listener sees an IPv4
/// peer) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` hop: `1.2.3.4`, `1.2.3.4:5555`, `2001:db8::5`, `[2001:db8::5]` or
/// `[2001:db8::5]:5555`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .map(canonical)
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
    fn forwarded_hops_are_read_with_ports_brackets_and_mapped_addresses_and_an_unreadable_one_is_the_client(
    ) {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let cases = [
            (
                "6.6.6.6, 1.2.3.5:5555",
                "1.2.3.5",
                "an IPv4 hop with a port",
            ),
            (
                "6.6.6.6, [2001:db8::5]",
                "2001:db8::5",
                "a bracketed IPv6 hop",
            ),
            (
                "6.6.6.6, [2001:db8::5]:443",
                "2001:db8::5",
                "a bracketed IPv6 hop with a port",
            ),
            ("6.6.6.6, ::ffff:1.2.3.4", "1.2.3.4", "an IPv4-mapped hop"),
            (
                "6.6.6.6, unknown",
                "10.0.0.1",
                "an unreadable hop: the proxy's key, never the forgeable 6.6.6.6",
            ),
            (
                "6.6.6.6, , 1.2.3.4",
                "1.2.3.4",
                "the rightmost hop is read first",
            ),
            (
                "6.6.6.6, 1.2.3.4, garbage",
                "10.0.0.1",
                "garbage to the right of a good hop",
            ),
        ];
        for (forwarded, expected, what) in cases {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", forwarded.parse().unwrap());
            let got = inbound(&["10.0.0.1"]).client_address(Some(peer), &headers);
            assert_eq!(got.unwrap().to_string(), expected, "{what}");
        }
        let mapped_peer: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        let got = inbound(&["10.0.0.1"]).client_address(Some(mapped_peer), &headers);
        assert_eq!(
            got.unwrap().to_string(),
            "1.2.3.4",
            "a proxy seen through a [::] listener is still trusted"
        );
    }

    #[test]
    fn the_limiter_forgets_addresses_whose_bucket_is_full_again() {
        let mut config = Config::with_database("sqlite://x.db").unwrap();
        config.rate_limit_per_ip = 1000;
        config.rate_limit_burst = 1;
        let inbound = Inbound::new(&config);
        for i in 0..(PRUNE_EVERY - 1) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
            inbound.check(Some(ip)).unwrap();
        }
        assert_eq!(inbound.tracked_addresses(), PRUNE_EVERY as usize - 1);
        // At 1,000 per second with a burst of one, every bucket is full again after a few ms.
        std::thread::sleep(Duration::from_millis(20));
        inbound.check(Some("192.0.2.1".parse().unwrap())).unwrap();
        assert!(
            inbound.tracked_addresses() <= 1,
            "pruned to {}",
            inbound.tracked_addresses()
        );
    }
}
