//! How a node downloaded a patch's artifacts: attempts, why the failed ones
//! failed, and where the bytes came from. The agent keeps it in its journal and
//! sends it with every report; the server keeps the newest with the node's
//! patch state and shows it in patch status.

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::pb;

/// Failed attempts kept (the newest), so a download retried for days stays small.
pub const MAX_FAILURES: usize = 8;
/// Bytes of one failure's text kept.
pub const MAX_FAILURE_BYTES: usize = 512;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Download attempts in all (1: the first one went through).
    pub attempts: u32,
    /// Why attempts failed, oldest first (the newest [`MAX_FAILURES`]).
    pub failures: Vec<String>,
    /// Bytes received from the fleet's servers.
    pub server_bytes: u64,
    /// Bytes received from peers at the node's site.
    #[serde(default)]
    pub peer_bytes: u64,
    /// Of those bytes, how many were deltas.
    #[serde(default)]
    pub delta_bytes: u64,
}

impl Transfer {
    /// Counts a failed attempt, keeping its reason (clipped; the oldest dropped
    /// past [`MAX_FAILURES`]).
    pub fn failed(&mut self, why: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.noted(why);
    }

    /// Keeps a reason something did not go as it should (a delta that could
    /// not be used) without counting an attempt.
    pub fn noted(&mut self, why: &str) {
        if self.failures.len() >= MAX_FAILURES {
            self.failures.remove(0);
        }
        self.failures.push(limits::clip(why, MAX_FAILURE_BYTES));
    }

    /// Counts an attempt that went through.
    pub fn succeeded(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
    }

    /// Where the bytes came from, in a few words ("server 5.0 MiB", "peer 4.8
    /// MiB, server 0.2 MiB (delta)").
    pub fn sources(&self) -> String {
        let mut parts = Vec::new();
        if self.peer_bytes > 0 {
            parts.push(format!("peer {}", bytes(self.peer_bytes)));
        }
        if self.server_bytes > 0 || parts.is_empty() {
            parts.push(format!("server {}", bytes(self.server_bytes)));
        }
        let mut s = parts.join(", ");
        if self.delta_bytes > 0 {
            s.push_str(" (delta)");
        }
        s
    }

    /// What a peer sent, bounded as the agent bounds its own.
    pub fn from_proto(t: pb::Transfer) -> Self {
        let mut failures: Vec<String> = t
            .failures
            .iter()
            .rev()
            .take(MAX_FAILURES)
            .map(|f| limits::clip(f, MAX_FAILURE_BYTES))
            .collect();
        failures.reverse();
        Self {
            attempts: t.attempts,
            failures,
            server_bytes: t.server_bytes,
            peer_bytes: t.peer_bytes,
            delta_bytes: t.delta_bytes,
        }
    }

    pub fn to_proto(&self) -> pb::Transfer {
        pb::Transfer {
            attempts: self.attempts,
            failures: self.failures.clone(),
            server_bytes: self.server_bytes,
            peer_bytes: self.peer_bytes,
            delta_bytes: self.delta_bytes,
        }
    }
}

/// A byte count for people: B, KiB, MiB or GiB with one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_bounded_and_counted() {
        let mut t = Transfer::default();
        for i in 0..20 {
            t.failed(&format!("attempt {i}: {}", "x".repeat(2000)));
        }
        t.succeeded();
        assert_eq!(t.attempts, 21);
        assert_eq!(t.failures.len(), MAX_FAILURES);
        assert!(
            t.failures[0].starts_with("attempt 12"),
            "{:?}",
            t.failures[0]
        );
        assert!(t.failures.iter().all(|f| f.len() <= MAX_FAILURE_BYTES + 64));
    }

    #[test]
    fn a_peers_transfer_is_bounded_like_our_own() {
        let t = Transfer::from_proto(pb::Transfer {
            attempts: 3,
            failures: (0..100)
                .map(|i| format!("f{i} {}", "y".repeat(5000)))
                .collect(),
            server_bytes: 10,
            peer_bytes: 0,
            delta_bytes: 0,
        });
        assert_eq!(t.failures.len(), MAX_FAILURES);
        assert!(t.failures[MAX_FAILURES - 1].starts_with("f99"));
        assert!(t.failures.iter().all(|f| f.len() <= MAX_FAILURE_BYTES + 64));
    }

    #[test]
    fn sources_name_where_the_bytes_came_from() {
        let mut t = Transfer {
            server_bytes: 5 * 1024 * 1024,
            ..Transfer::default()
        };
        assert_eq!(t.sources(), "server 5.0 MiB");
        t.peer_bytes = 2048;
        t.delta_bytes = 2048;
        assert_eq!(t.sources(), "peer 2.0 KiB, server 5.0 MiB (delta)");
        assert_eq!(Transfer::default().sources(), "server 0 B");
    }
}
