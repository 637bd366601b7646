//! Rate limits per client address and per signed-in user: token buckets (governor's GCRA),
//! refused with 429 `RATE_LIMITED` and `Retry-After`. Health and metrics are not limited, so
//! probes and scrapers keep working when a client is throttled.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::app::App;
use crate::auth::Caller;
use crate::config::LimitsConfig;
use crate::error::ApiError;

/// Requests between two sweeps that forget the buckets of clients gone quiet, which bounds
/// the limiters' memory by the clients active in a sweep's time.
pub const SWEEP_EVERY_REQUESTS: u64 = 10_000;

/// The limiters of one server.
pub struct RateLimits {
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

/// The layer: runs after authentication, so it knows the user.
pub async fn rate_limit(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request.uri().path();
    let exempt = path.starts_with("/health/") || path == "/metrics";
    if !exempt {
        let ip = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        let user = request.extensions().get::<Caller>().map(|c| c.user);
        app.rate_limits.check(ip, user)?;
    }
    Ok(next.run(request).await)
}
