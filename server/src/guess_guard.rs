//! Guessing secrets: failed joins (a join token's secret) are slowed per source
//! address and per token; they and failed operator authentications (a
//! credential's secret, or a role that does not allow the call) are counted,
//! and logged and audited at a bounded rate. Only failures count, so a
//! provisioning run joining hundreds of hosts with one token from one address
//! is never slowed. Operator calls are never slowed (see `grpc::admin`): a
//! right secret always gets in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Failures taken back to back from one source or against one secret...
pub const FAILURE_BURST: f64 = 10.0;
/// ...and how fast that allowance comes back (one every two seconds).
pub const FAILURES_PER_SEC: f64 = 0.5;
/// At most one audit entry and one log line per source in this time, carrying
/// the count of failures since the last.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Sources and secrets tracked at once. When full, entries whose allowance has
/// come back are dropped; if none has, failures from new keys share one bucket.
const MAX_TRACKED: usize = 100_000;

/// One key's failure allowance and what it has not yet reported.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    reported_at: Option<Instant>,
    unreported: u64,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Self {
            tokens: FAILURE_BURST,
            last: now,
            reported_at: None,
            unreported: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.duration_since(self.last).as_secs_f64() * FAILURES_PER_SEC;
        self.tokens = (self.tokens + gained).min(FAILURE_BURST);
        self.last = now;
    }

    /// How long until another failure is allowed (None: now).
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / FAILURES_PER_SEC))
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= FAILURE_BURST && self.unreported == 0
    }
}

/// What a source or secret is tracked by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// IPv4 addresses one by one; IPv6 by /64, what one host usually holds.
    Source(IpAddr),
    /// A join token's or a credential's id.
    Secret(String),
    /// Every new key while the table is full.
    Overflow,
}

fn source_key(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            Key::Source(IpAddr::V6(net))
        }
        IpAddr::V6(v6) => Key::Source(IpAddr::V4(v6.to_ipv4_mapped().expect("mapped"))),
        v4 => Key::Source(v4),
    }
}

/// A failure to report now (audit and log), with the failures it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub source: String,
    pub count: u64,
}

/// One server's limiter of one kind of guess.
#[derive(Debug)]
pub struct GuessGuard {
    /// What fails, in messages: "joins", "authentications".
    what: &'static str,
    /// What the secret is, in messages: "join token", "credential".
    secret: &'static str,
    buckets: Mutex<HashMap<Key, Bucket>>,
    failed: AtomicU64,
    refused: AtomicU64,
}

impl GuessGuard {
    /// Failed joins, by source and join token.
    pub fn joins() -> Self {
        Self::new("joins", "join token")
    }

    /// Failed operator authentications, by source and credential.
    pub fn authentications() -> Self {
        Self::new("authentications", "credential")
    }

    fn new(what: &'static str, secret: &'static str) -> Self {
        Self {
            what,
            secret,
            buckets: Mutex::default(),
            failed: AtomicU64::default(),
            refused: AtomicU64::default(),
        }
    }

    /// Refuses an attempt from `source` with the secret `id` while either
    /// has used up its failure allowance.
    pub fn admit(&self, source: Option<IpAddr>, id: &str) -> Result<(), Error> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("guess guard lock");
        let keys = [source.map(source_key), Some(Key::Secret(id.to_string()))];
        for key in keys.into_iter().flatten() {
            let key = if buckets.contains_key(&key) {
                key
            } else if buckets.contains_key(&Key::Overflow) && buckets.len() >= MAX_TRACKED {
                Key::Overflow
            } else {
                continue;
            };
            if let Some(wait) = buckets.get_mut(&key).and_then(|b| b.wait(now)) {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let whence = match &key {
                    Key::Source(ip) => format!("from {ip}"),
                    Key::Secret(id) => format!("with {} {id}", self.secret),
                    Key::Overflow => "from new addresses".to_string(),
                };
                return Err(Error::ResourceExhausted(format!(
                    "too many failed {} {whence}; retry in {}s",
                    self.what,
                    wait.as_secs().max(1)
                )));
            }
        }
        Ok(())
    }

    /// Counts a failure (a wrong secret or an unknown id). Returns what to
    /// audit and log now: the first failure of a source, then at most one report
    /// per source every [`REPORT_EVERY`] with the count since the last.
    pub fn failed(&self, source: Option<IpAddr>, id: Option<&str>) -> Option<Report> {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("guess guard lock");
        let source_key = source.map(source_key).unwrap_or(Key::Overflow);
        let mut keys = vec![source_key.clone()];
        keys.extend(id.map(|t| Key::Secret(t.to_string())));
        let mut report = None;
        for key in keys {
            let key = if buckets.contains_key(&key) || make_room(&mut buckets, now) {
                key
            } else {
                Key::Overflow
            };
            let b = buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::new(now));
            b.refill(now);
            b.tokens = (b.tokens - 1.0).max(0.0);
            if key == source_key || key == Key::Overflow {
                b.unreported += 1;
                let due = b
                    .reported_at
                    .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
                if due && report.is_none() {
                    report = Some(Report {
                        source: source.map_or_else(|| "unknown".into(), |ip| ip.to_string()),
                        count: b.unreported,
                    });
                    b.reported_at = Some(now);
                    b.unreported = 0;
                }
            }
        }
        report
    }

    /// Failures since the server started.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Attempts refused for too many failures since the server started.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Frees a place for a new key if the table is full; false if it cannot.
fn make_room(buckets: &mut HashMap<Key, Bucket>, now: Instant) -> bool {
    if buckets.len() < MAX_TRACKED {
        return true;
    }
    buckets.retain(|k, b| *k == Key::Overflow || !b.is_idle(now));
    buckets.len() < MAX_TRACKED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn failures_beyond_the_burst_are_refused_per_source_and_per_token() {
        let g = GuessGuard::joins();
        for _ in 0..FAILURE_BURST as usize {
            g.admit(ip("10.0.0.1"), "tok1").unwrap();
            g.failed(ip("10.0.0.1"), Some("tok1"));
        }
        let err = g.admit(ip("10.0.0.1"), "tok2").unwrap_err().to_string();
        assert!(err.contains("too many failed joins from 10.0.0.1"), "{err}");
        // Another address, but the same token: guessing it is slowed too.
        let err = g.admit(ip("10.0.0.2"), "tok1").unwrap_err().to_string();
        assert!(err.contains("with join token tok1"), "{err}");
        // Another address with another token is not affected.
        g.admit(ip("10.0.0.2"), "tok2").unwrap();
        assert_eq!(g.failures(), 10);
        assert_eq!(g.refusals(), 2);
    }

    #[test]
    fn authentications_are_counted_apart_and_named_so() {
        let g = GuessGuard::authentications();
        for _ in 0..FAILURE_BURST as usize {
            g.failed(ip("10.0.0.1"), Some("cred000001"));
        }
        let err = g
            .admit(ip("10.0.0.7"), "cred000001")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("too many failed authentications with credential cred000001"),
            "{err}"
        );
        // Joins from that address are another guard's business.
        GuessGuard::joins().admit(ip("10.0.0.1"), "tok").unwrap();
    }

    #[test]
    fn ipv6_sources_count_by_64() {
        let g = GuessGuard::joins();
        for i in 0..FAILURE_BURST as usize {
            g.failed(ip(&format!("2001:db8:1:2::{i:x}")), None);
        }
        assert!(g.admit(ip("2001:db8:1:2:ffff::1"), "t").is_err());
        g.admit(ip("2001:db8:1:3::1"), "t").unwrap();
    }

    #[test]
    fn reports_come_once_per_source_and_interval_with_the_count() {
        let g = GuessGuard::joins();
        let first = g
            .failed(ip("10.0.0.1"), None)
            .expect("the first is reported");
        assert_eq!(first.count, 1);
        for _ in 0..50 {
            assert_eq!(g.failed(ip("10.0.0.1"), None), None);
        }
        // Another source is reported on its own.
        assert!(g.failed(ip("10.0.0.9"), None).is_some());
    }
}
