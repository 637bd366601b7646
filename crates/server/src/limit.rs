//! Rate limits per client address and per signed-in user: token buckets (governor's GCRA),
//! refused with 429 `RATE_LIMITED` and `Retry-After`. Health and metrics are not limited, so
//! probes and scrapers keep working when a client is throttled.
//!
//! The client address is the connection's peer, unless the peer is one of
//! `limits.trusted_proxies`: then it is the nearest address in `X-Forwarded-For` (read from
//! the right, as each proxy appends the address it heard from) that is not itself a trusted
//! proxy. The header's other entries could be written by anyone and are never believed.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::app::App;
use crate::auth::Caller;
use crate::config::LimitsConfig;
use crate::error::ApiError;

/// Requests between two sweeps that forget the buckets of clients gone quiet, which bounds
/// the limiters' memory by the clients active in a sweep's time.
pub const SWEEP_EVERY_REQUESTS: u64 = 10_000;
/// Entries of `limits.trusted_proxies`.
pub const TRUSTED_PROXIES_MAX: usize = 256;
/// `X-Forwarded-For` entries read, from the right; a longer chain is cut there.
pub const FORWARDED_FOR_ENTRIES_MAX: usize = 16;
/// The header naming the addresses a request was forwarded for.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// An IP network: an address and a prefix length (a single address has the full length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// `10.0.0.5`, `10.0.0.0/8`, `::1` or `fd00::/8`; `None` when it is neither.
    pub fn parse(text: &str) -> Option<Network> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let address: IpAddr = address.parse().ok()?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().ok().filter(|p| *p <= bits)?,
            None => bits,
        };
        Some(Network { address, prefix })
    }

    /// Whether `ip` is in the network (an IPv4 address mapped into IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let masked = |bits: u128, width: u32| {
            let shift = width - u32::from(self.prefix);
            if shift >= 128 { 0 } else { bits >> shift }
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), 32) == masked(u128::from(u32::from(ip)), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128) == masked(u128::from(ip), 128)
            }
            _ => false,
        }
    }
}

/// The address a request is counted against: the peer, or, when the peer is a trusted
/// proxy, the nearest untrusted address `forwarded_for` names.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Network]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for entry in header.rsplit(',').take(FORWARDED_FOR_ENTRIES_MAX) {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            // Not an address: nothing to its left can be believed.
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// The limiters of one server.
pub struct RateLimits {
    trusted_proxies: Vec<Network>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_user: Option<DefaultKeyedRateLimiter<u64>>,
    clock: DefaultClock,
    requests: AtomicU64,
}

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

impl RateLimits {
    /// Limiters for the configured rates (a zero rate: none).
    pub fn new(limits: &LimitsConfig) -> RateLimits {
        RateLimits {
            // Validated with the configuration; an entry that does not parse trusts nothing.
            trusted_proxies: limits
                .trusted_proxies
                .iter()
                .filter_map(|p| Network::parse(p))
                .collect(),
            per_ip: quota(limits.ip_requests_per_s, limits.ip_burst).map(RateLimiter::keyed),
            per_user: quota(limits.user_requests_per_s, limits.user_burst).map(RateLimiter::keyed),
            clock: DefaultClock::default(),
            requests: AtomicU64::new(0),
        }
    }

    fn refuse(
        &self,
        who: &str,
        earliest: governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> ApiError {
        let wait = earliest.wait_time_from(self.clock.now());
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!("too many requests from this {who}; retry after the Retry-After seconds"),
        );
        error.retry_after_s = Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        error
    }

    /// Counts a request of `ip` and, when signed in, of `user`; refuses it when either is
    /// over its rate.
    pub fn check(&self, ip: Option<IpAddr>, user: Option<u64>) -> Result<(), ApiError> {
        if self.requests.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY_REQUESTS
            == SWEEP_EVERY_REQUESTS - 1
        {
            if let Some(limiter) = &self.per_ip {
                limiter.retain_recent();
            }
            if let Some(limiter) = &self.per_user {
                limiter.retain_recent();
            }
        }
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter
                .check_key(&ip)
                .map_err(|earliest| self.refuse("address", earliest))?;
        }
        if let (Some(limiter), Some(user)) = (&self.per_user, user) {
            limiter
                .check_key(&user)
                .map_err(|earliest| self.refuse("user", earliest))?;
        }
        Ok(())
    }
}

/// Counts a request against its client address and, once authenticated, its user: refused
/// when either is over its rate. Health and metrics are exempt.
pub fn check_request(app: &App, request: &Request) -> Result<(), ApiError> {
    let path = request.uri().path();
    if path.starts_with("/health/") || path == "/metrics" {
        return Ok(());
    }
    let forwarded_for = request
        .headers()
        .get(FORWARDED_FOR_HEADER)
        .and_then(|v| v.to_str().ok());
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| client_address(info.0.ip(), forwarded_for, &app.rate_limits.trusted_proxies));
    let user = request.extensions().get::<Caller>().map(|c| c.user);
    app.rate_limits.check(ip, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let net = Network::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.200.3.4")));
        assert!(net.contains(ip("::ffff:10.1.1.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("fd00::1")));
        let one = Network::parse("192.168.1.7").unwrap();
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "proxy.local",
            "10.0.0/8",
            "10.0.0.0/x",
        ] {
            assert_eq!(Network::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_a_trusted_peer_is_believed_about_the_client() {
        let trusted = [Network::parse("10.0.0.0/8").unwrap()];
        let client = |peer: &str, header: Option<&str>| client_address(ip(peer), header, &trusted);
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            client("203.0.113.9", Some("198.51.100.1")),
            ip("203.0.113.9")
        );
        // Through one trusted proxy, or two; a forged entry further left is not reached.
        assert_eq!(client("10.0.0.2", Some("198.51.100.1")), ip("198.51.100.1"));
        assert_eq!(
            client("10.0.0.2", Some("1.2.3.4, 198.51.100.1, 10.9.9.9")),
            ip("198.51.100.1")
        );
        // No header, or garbage next to the proxy: the proxy itself.
        assert_eq!(client("10.0.0.2", None), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.2", Some("nonsense")), ip("10.0.0.2"));
        // Only trusted proxies in the chain: the leftmost of them.
        assert_eq!(client("10.0.0.2", Some("10.1.1.1")), ip("10.1.1.1"));
        // A chain longer than the bound is read only that far.
        let long = std::iter::repeat_n("10.1.1.1", FORWARDED_FOR_ENTRIES_MAX + 4)
            .collect::<Vec<_>>()
            .join(", ");
        let header = format!("198.51.100.1, {long}");
        assert_eq!(client("10.0.0.2", Some(&header)), ip("10.1.1.1"));
    }
}
