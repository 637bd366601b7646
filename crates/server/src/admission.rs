//! Admission by priority class: under overload the server sheds the least important requests
//! first, at once, with 503 `OVERLOADED` and `Retry-After`, instead of queueing them all and
//! collapsing.
//!
//! Every request belongs to one [`Class`]: cancels are critical (they lower risk and load),
//! placing and changing orders and the external workers' reports are high, queries are
//! normal, and reports and listings for operators are low. One counter holds the requests in
//! flight; a request is admitted while that count is below its class's share of
//! `limits.requests_in_flight_max` ([`Class::share_percent`]). So as load rises, low requests
//! are refused first, then normal, then high, and cancels keep a reserve of their own. Health
//! and metrics are critical: probes and scrapers keep answering when the server is busiest.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::Request;
use axum::http::Method;

use crate::app::App;
use crate::error::ApiError;

/// How much a request matters when the server is at capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Reports and operator listings: shed first.
    Low,
    /// Queries.
    Normal,
    /// Placing and modifying orders; workers reporting on their jobs.
    High,
    /// Cancels, health and metrics: shed last.
    Critical,
}

impl Class {
    /// The share of `requests_in_flight_max`, in percent, below which a request of this class
    /// is admitted.
    pub const fn share_percent(self) -> usize {
        match self {
            Class::Low => 50,
            Class::Normal => 75,
            Class::High => 90,
            Class::Critical => 100,
        }
    }

    /// Its name in metrics and errors.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Low => "low",
            Class::Normal => "normal",
            Class::High => "high",
            Class::Critical => "critical",
        }
    }

    /// The class of a request, by method and path.
    pub fn of(method: &Method, path: &str) -> Class {
        // No pattern below has more than six fixed segments: a longer path keeps its first
        // seven, which tell it apart from all of them, without a list allocated per request.
        let mut parts = [""; 7];
        let mut count = 0;
        for segment in path.trim_end_matches('/').split('/') {
            if count == parts.len() {
                count += 1;
                break;
            }
            parts[count] = segment;
            count += 1;
        }
        let segments = &parts[..count.min(parts.len())];
        match (method, segments) {
            (_, ["", "health", ..] | ["", "metrics"]) => Class::Critical,
            (&Method::DELETE, ["", "api", "v1", "orders"] | ["", "api", "v1", "orders", _]) => {
                Class::Critical
            }
            (&Method::POST, ["", "api", "v1", "orders"])
            | (&Method::PATCH, ["", "api", "v1", "orders", _]) => Class::High,
            (
                &Method::POST,
                [
                    "",
                    "api",
                    "v1",
                    "jobs",
                    _,
                    "heartbeat" | "progress" | "complete" | "fail" | "release",
                ],
            ) => Class::High,
            (&Method::GET, ["", "api", "v1", "admin", ..])
            | (&Method::GET, ["", "api", "v1", "queues", ..])
            | (&Method::GET, ["", "api", "v1", "failures", ..])
            | (&Method::GET, ["", "api", "v1", "markets", _, "candles"])
            | (&Method::GET, ["", "api", "v1", "openapi.json" | "docs"]) => Class::Low,
            _ => Class::Normal,
        }
    }
}

/// The requests in flight, shared by every class.
#[derive(Debug, Default)]
pub struct InFlightRequests {
    count: AtomicUsize,
}

/// One admitted request; leaving it frees its place.
pub struct Admitted<'a> {
    count: &'a AtomicUsize,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("agora_http_requests_in_flight").decrement(1.0);
    }
}

impl InFlightRequests {
    /// Admits a request of `class` when the count is below its share of `max`.
    pub fn admit(&self, class: Class, max: usize) -> Option<Admitted<'_>> {
        let allowed = (max.saturating_mul(class.share_percent()) / 100).max(1);
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!("agora_http_requests_in_flight").increment(1.0);
        Some(Admitted { count: &self.count })
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Admits a request by its class, or refuses it with 503 `OVERLOADED`, to be answered at
/// once. The place is held until the returned [`Admitted`] is dropped.
pub fn admit<'a>(app: &'a App, request: &Request) -> Result<Admitted<'a>, ApiError> {
    let class = Class::of(request.method(), request.uri().path());
    let max = app.config.limits.requests_in_flight_max;
    app.requests.admit(class, max).ok_or_else(|| {
        metrics::counter!("agora_http_shed_total", "class" => class.as_str()).increment(1);
        ApiError::unavailable(
            "OVERLOADED",
            format!(
                "the server is at capacity for {} priority requests; retry shortly",
                class.as_str()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classed_by_what_they_do() {
        let cases = [
            (Method::DELETE, "/api/v1/orders/7", Class::Critical),
            (Method::DELETE, "/api/v1/orders", Class::Critical),
            (Method::GET, "/health/ready", Class::Critical),
            (Method::GET, "/metrics", Class::Critical),
            (Method::POST, "/api/v1/orders", Class::High),
            (Method::PATCH, "/api/v1/orders/7", Class::High),
            (Method::POST, "/api/v1/jobs/3/complete", Class::High),
            (Method::GET, "/api/v1/orders/7", Class::Normal),
            (Method::GET, "/api/v1/markets/BTC-USDT/depth", Class::Normal),
            (Method::POST, "/api/v1/admin/deposits", Class::Normal),
            (Method::GET, "/api/v1/admin/users", Class::Low),
            (Method::GET, "/api/v1/queues/default/dead", Class::Low),
            (Method::GET, "/api/v1/markets/BTC-USDT/candles", Class::Low),
            (Method::GET, "/api/v1/failures/summary", Class::Low),
            (Method::POST, "/api/v1/jobs/3/complete/", Class::High),
            (Method::POST, "/api/v1/jobs/3/complete/x", Class::Normal),
            (Method::POST, "/api/v1/jobs/3/complete/x/y/z", Class::Normal),
            (Method::GET, "/api/v1/admin/users/1/2/3/4/5", Class::Low),
            (Method::GET, "/health/live/a/b/c/d/e/f/g", Class::Critical),
        ];
        for (method, path, class) in cases {
            assert_eq!(Class::of(&method, path), class, "{method} {path}");
        }
    }

    #[test]
    fn lower_classes_are_refused_first_and_places_come_back() {
        let requests = InFlightRequests::default();
        let max = 20;
        let mut held = Vec::new();
        // Low fills to half of the capacity, then is refused.
        while let Some(admitted) = requests.admit(Class::Low, max) {
            held.push(admitted);
        }
        assert_eq!(requests.count(), 10);
        for (class, ceiling) in [
            (Class::Normal, 15),
            (Class::High, 18),
            (Class::Critical, 20),
        ] {
            while let Some(admitted) = requests.admit(class, max) {
                held.push(admitted);
            }
            assert_eq!(requests.count(), ceiling, "{class:?}");
            assert!(requests.admit(Class::Low, max).is_none());
        }
        held.truncate(9);
        assert_eq!(requests.count(), 9);
        assert!(requests.admit(Class::Low, max).is_some());
    }
}
