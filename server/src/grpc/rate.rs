//! Per-node call rates at the gRPC edge: a node that floods the server with
//! reports, renewals or sessions is slowed down (ResourceExhausted, which
//! agents retry with backoff) without slowing the rest of the fleet.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::Error;

/// Reports one node may send per second, sustained. An agent sends a handful
/// per patch (the outbox sends only the newest of each patch's queued ones).
pub const REPORTS_PER_SEC: u32 = 10;
/// Reports one node may send back to back: enough for a node back from a long
/// time offline with every queued outcome of a busy week.
pub const REPORT_BURST: u32 = 120;
/// Renewals one node may ask for back to back.
pub const RENEWAL_BURST: u32 = 5;
/// Sessions one node may open back to back, then one each [`SESSION_EVERY`]:
/// a replica's restart makes each agent reconnect once, a bad network a few
/// times a minute (a session that ends quickly grows the agent's backoff).
pub const SESSION_BURST: u32 = 30;
pub const SESSION_EVERY: Duration = Duration::from_secs(2);
/// Checks between sweeps of nodes whose bucket is full again, so the table
/// holds only recently active nodes.
const SWEEP_EVERY: u64 = 4096;

/// A token bucket per node id. Only authenticated, known nodes are checked, so
/// the table is bounded by the fleet, and swept as it goes.
pub struct NodeRate {
    what: &'static str,
    /// The sustained rate, in words ("10 per second").
    limit: String,
    limiter: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl std::fmt::Debug for NodeRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRate")
            .field("what", &self.what)
            .field("limit", &self.limit)
            .field("nodes", &self.limiter.len())
            .finish()
    }
}

impl NodeRate {
    /// `what` names the calls in the refusal ("reports").
    pub fn new(what: &'static str, per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_quota(
            what,
            format!("{per_sec} per second"),
            Quota::per_second(per_sec).allow_burst(burst),
        )
    }

    /// `burst` calls back to back, then one each `period`.
    pub fn every(what: &'static str, period: Duration, burst: NonZeroU32) -> Self {
        let quota = Quota::with_period(period)
            .expect("a period above zero")
            .allow_burst(burst);
        Self::with_quota(
            what,
            format!("one every {}", humantime::format_duration(period)),
            quota,
        )
    }

    fn with_quota(what: &'static str, limit: String, quota: Quota) -> Self {
        Self {
            what,
            limit,
            limiter: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// The limits certificate renewals get, for certificates that live
    /// `lifetime`: an agent renews once in two thirds of one, and retries a
    /// renewal whose answer it lost; more is a node making the server sign,
    /// store and audit in a loop.
    pub fn renewals(lifetime: Duration) -> Self {
        let period = (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        Self::every(
            "certificate renewals",
            period,
            NonZeroU32::new(RENEWAL_BURST).expect("non-zero"),
        )
    }

    /// The limits session opens get: an agent reconnects with backoff, so
    /// more is a node making the server store its facts in a loop.
    pub fn sessions() -> Self {
        Self::every(
            "sessions",
            SESSION_EVERY,
            NonZeroU32::new(SESSION_BURST).expect("non-zero"),
        )
    }

    /// The limits reports get.
    pub fn reports() -> Self {
        Self::new(
            "reports",
            NonZeroU32::new(REPORTS_PER_SEC).expect("non-zero"),
            NonZeroU32::new(REPORT_BURST).expect("non-zero"),
        )
    }

    /// Takes one call of `node_id`, or refuses it with how fast it may call.
    pub fn check(&self, node_id: &str) -> Result<(), Error> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&node_id.to_string()).map_err(|_| {
            Error::ResourceExhausted(format!(
                "node {node_id} sends {} faster than {}; retry later",
                self.what, self.limit
            ))
        })
    }

    /// Nodes in the table now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_taken_then_refused_per_node() {
        let rate = NodeRate::new(
            "reports",
            NonZeroU32::new(1).unwrap(),
            NonZeroU32::new(5).unwrap(),
        );
        for _ in 0..5 {
            rate.check("node-a").unwrap();
        }
        let err = rate.check("node-a").unwrap_err().to_string();
        assert!(
            err.contains("node node-a sends reports faster than 1 per second"),
            "{err}"
        );
        // Another node has its own bucket.
        rate.check("node-b").unwrap();
        assert_eq!(rate.tracked(), 2);
    }

    #[test]
    fn renewals_take_a_burst_then_one_each_tenth_of_a_lifetime_capped_at_an_hour() {
        // Default 30-day certificates: an agent renews once in 20 days, and
        // a few retries of a renewal that failed fit in the burst.
        let rate = NodeRate::renewals(Duration::from_secs(30 * 86_400));
        for _ in 0..RENEWAL_BURST {
            rate.check("node-a").unwrap();
        }
        let err = rate.check("node-a").unwrap_err().to_string();
        assert!(
            err.contains("node node-a sends certificate renewals faster than one every 1h"),
            "{err}"
        );
        // Test-sized certificates are not held back past their renewal.
        let short = NodeRate::renewals(Duration::from_secs(6));
        assert_eq!(short.limit, "one every 1s");
    }
}
