//! Per-node call rates at the gRPC edge: a node that floods the server with
//! reports is slowed down (ResourceExhausted, which agents retry with backoff)
//! without slowing the rest of the fleet.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::Error;

/// Reports one node may send per second, sustained. An agent sends a handful
/// per patch (the outbox sends only the newest of each patch's queued ones).
pub const REPORTS_PER_SEC: u32 = 10;
/// Reports one node may send back to back: enough for a node back from a long
/// time offline with every queued outcome of a busy week.
pub const REPORT_BURST: u32 = 120;
/// Checks between sweeps of nodes whose bucket is full again, so the table
/// holds only recently active nodes.
const SWEEP_EVERY: u64 = 4096;

/// A token bucket per node id. Only authenticated, known nodes are checked, so
/// the table is bounded by the fleet, and swept as it goes.
pub struct NodeRate {
    what: &'static str,
    per_sec: u32,
    limiter: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl std::fmt::Debug for NodeRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRate")
            .field("what", &self.what)
            .field("per_sec", &self.per_sec)
            .field("nodes", &self.limiter.len())
            .finish()
    }
}

impl NodeRate {
    /// `what` names the calls in the refusal ("reports").
    pub fn new(what: &'static str, per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            what,
            per_sec: per_sec.get(),
            limiter: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
            checks: AtomicU64::new(0),
        }
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
                "node {node_id} sends {} faster than {} per second; retry later",
                self.what, self.per_sec
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
}
