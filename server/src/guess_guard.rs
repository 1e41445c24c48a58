//! Guessing secrets: failed joins (a join token's secret, a node's key proof)
//! and failed operator authentications (a credential's secret, or a role that
//! does not allow the call) are counted, and logged and audited at a bounded
//! rate. A source (an IPv4 address, an IPv6 /64) that used up its allowance of
//! failed joins is refused unheard, so it can block only itself. A right
//! secret always gets in: a token's allowance is charged by wrong secrets, and
//! only answers further wrong ones with "too many failed joins", so nobody can
//! lock a token out by guessing at it (the secrets are long enough to need no
//! slowing to stay unguessable). Only failures count, so a provisioning run
//! joining hundreds of hosts with one token from one address is never slowed.
//! Operator calls are never refused unheard (see `grpc::admin`).

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
/// Sources' reports, all sources together, in one [`REPORT_EVERY`]; past
/// that the sources' failures are held back and told in one summary per
/// interval (source [`SUMMARY_SOURCE`]), so failures from many addresses
/// cannot grow the audit log (which is kept for good, hash chained) faster
/// than this.
pub const REPORTS_PER_INTERVAL: u32 = 10;
/// The source a summary report is told under.
pub const SUMMARY_SOURCE: &str = "*";
/// Sources and secrets tracked at once. When full, entries whose allowance has
/// come back are dropped; if none has, failures of new keys share one bucket
/// (which only answers failures: a new source is never refused unheard).
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
    Key::Source(crate::connections::source_of(ip))
}

/// A failure to report now (audit and log), with the failures it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source's address, or [`SUMMARY_SOURCE`] for a summary.
    pub source: String,
    /// Failures since the source's (or the summary's) last report.
    pub count: u64,
    /// For a summary: the sources' reports it stands for (0 otherwise).
    pub held_back: u64,
}

impl Report {
    /// Whether this is the summary of sources' reports held back.
    pub fn is_summary(&self) -> bool {
        self.held_back > 0
    }

    /// Logs this report and writes it to the audit log as `action`: a
    /// source's own with `target` (what the failure was against) and
    /// `detail_key: why`, both already bounded by the caller; a summary with
    /// the failures and the sources it stands for. `what` names the failures
    /// in the log line ("failed join").
    pub async fn tell(
        &self,
        audit: &crate::audit::AuditLog,
        action: crate::audit::Action,
        what: &str,
        target: &str,
        detail_key: &str,
        why: &str,
    ) {
        let (target, detail) = if self.is_summary() {
            tracing::warn!(
                failures = self.count,
                sources = self.held_back,
                "{what}s from many sources (their own reports held back this interval)"
            );
            let detail = serde_json::json!({ "failures": self.count, "sources": self.held_back });
            ("", detail)
        } else {
            tracing::warn!(source = %self.source, target, failures = self.count, "{what}: {why}");
            let mut detail = serde_json::json!({ "failures": self.count });
            detail[detail_key] = why.into();
            (target, detail)
        };
        let actor = format!("source:{}", self.source);
        if let Err(e) = audit.record(&actor, action, target, detail).await {
            tracing::error!("cannot audit a {what}: {e}");
        }
    }
}

/// What a failure comes to.
#[derive(Debug)]
#[must_use]
pub struct Failure {
    /// What to audit and log now, if anything.
    pub report: Option<Report>,
    /// The answer to give instead of the failure's own, when the secret (or
    /// the shared bucket of new sources) had used up its allowance.
    pub slowed: Option<Error>,
}

/// The global budget of sources' reports.
#[derive(Debug, Default)]
struct Reports {
    window_start: Option<Instant>,
    in_window: u32,
    held_failures: u64,
    held_reports: u64,
    summary_at: Option<Instant>,
}

impl Reports {
    /// A source's report that is due: itself while the interval's budget
    /// lasts, else held back for the summary (returned when one is due).
    fn take(&mut self, now: Instant, source: String, count: u64) -> Option<Report> {
        if self
            .window_start
            .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY)
        {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < REPORTS_PER_INTERVAL {
            self.in_window += 1;
            return Some(Report {
                source,
                count,
                held_back: 0,
            });
        }
        self.held_failures += count;
        self.held_reports += 1;
        if self
            .summary_at
            .is_some_and(|at| now.duration_since(at) < REPORT_EVERY)
        {
            return None;
        }
        self.summary_at = Some(now);
        Some(Report {
            source: SUMMARY_SOURCE.to_string(),
            count: std::mem::take(&mut self.held_failures),
            held_back: std::mem::take(&mut self.held_reports),
        })
    }
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<Key, Bucket>,
    reports: Reports,
    /// When a full table was last swept for idle entries.
    swept_at: Option<Instant>,
}

/// One server's limiter of one kind of guess.
#[derive(Debug)]
pub struct GuessGuard {
    /// What fails, in messages: "joins", "authentications".
    what: &'static str,
    /// What the secret is, in messages: "join token", "credential".
    secret: &'static str,
    /// The Prometheus counter of failures.
    failures_metric: &'static str,
    /// The counter of refusals; None for a guard that never refuses
    /// (operator calls: see `grpc::admin`).
    refused_metric: Option<&'static str>,
    state: Mutex<State>,
    failed: AtomicU64,
    refused: AtomicU64,
}

impl GuessGuard {
    /// Failed joins, by source and join token.
    pub fn joins() -> Self {
        Self::new(
            "joins",
            "join token",
            "flotilla_join_failures_total",
            Some("flotilla_join_refused_total"),
        )
    }

    /// Failed operator authentications, by source and credential: counted
    /// and reported, never refused.
    pub fn authentications() -> Self {
        Self::new(
            "authentications",
            "credential",
            "flotilla_auth_failures_total",
            None,
        )
    }

    fn new(
        what: &'static str,
        secret: &'static str,
        failures_metric: &'static str,
        refused_metric: Option<&'static str>,
    ) -> Self {
        Self {
            what,
            secret,
            failures_metric,
            refused_metric,
            state: Mutex::default(),
            failed: AtomicU64::default(),
            refused: AtomicU64::default(),
        }
    }

    fn refuse(&self, whence: String, wait: Duration) -> Error {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(name) = self.refused_metric {
            metrics::counter!(name).increment(1);
        }
        Error::ResourceExhausted(format!(
            "too many failed {} {whence}; retry in {}s",
            self.what,
            wait.as_secs().max(1)
        ))
    }

    /// Refuses an attempt from `source` while that source has used up its
    /// failure allowance. Nothing else refuses an attempt unheard: not the
    /// secret's allowance (a right secret always gets in), nor the shared
    /// bucket of sources not tracked (a new source pays for nobody else).
    pub fn admit(&self, source: Option<IpAddr>) -> Result<(), Error> {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Error> {
        let (Some(ip), Some(_)) = (source, self.refused_metric) else {
            return Ok(());
        };
        let key = source_key(ip);
        let wait = {
            let mut st = self.state.lock().expect("guess guard lock");
            st.buckets.get_mut(&key).and_then(|b| b.wait(now))
        };
        match (wait, key) {
            (Some(wait), Key::Source(net)) => Err(self.refuse(format!("from {net}"), wait)),
            _ => Ok(()),
        }
    }

    /// Counts a failure (a wrong secret or an unknown id) against its source
    /// and its secret `id` (only ids that exist: made-up ones would only fill
    /// the table). Says what to audit and log now: the first failure of a
    /// source, then at most one report per source every [`REPORT_EVERY`] with
    /// the count since the last, within [`REPORTS_PER_INTERVAL`] for all
    /// sources together and a summary beyond. And, when the secret had used
    /// up its allowance, the answer to give instead.
    pub fn failed(&self, source: Option<IpAddr>, id: Option<&str>) -> Failure {
        self.failed_at(source, id, Instant::now())
    }

    fn failed_at(&self, source: Option<IpAddr>, id: Option<&str>, now: Instant) -> Failure {
        self.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(self.failures_metric).increment(1);
        let mut st = self.state.lock().expect("guess guard lock");
        let State {
            buckets,
            reports,
            swept_at,
        } = &mut *st;
        let source_key = source.map(source_key).unwrap_or(Key::Overflow);
        let mut keys = vec![source_key.clone()];
        keys.extend(id.map(|t| Key::Secret(t.to_string())));
        let mut report = None;
        let mut slowed = None;
        for key in keys {
            let key = if buckets.contains_key(&key) || make_room(buckets, swept_at, now) {
                key
            } else {
                Key::Overflow
            };
            let b = buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::new(now));
            // A source over its allowance was refused unheard by `admit`;
            // a secret's, or the shared bucket's, answers this failure.
            if let Some(wait) = b.wait(now)
                && slowed.is_none()
                && self.refused_metric.is_some()
            {
                match &key {
                    Key::Secret(id) => slowed = Some((format!("with {} {id}", self.secret), wait)),
                    Key::Overflow => slowed = Some(("from new addresses".to_string(), wait)),
                    Key::Source(_) => {}
                }
            }
            b.tokens = (b.tokens - 1.0).max(0.0);
            if key == source_key || key == Key::Overflow {
                b.unreported += 1;
                let due = b
                    .reported_at
                    .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
                if due && report.is_none() {
                    let count = std::mem::take(&mut b.unreported);
                    b.reported_at = Some(now);
                    let source = source.map_or_else(|| "unknown".into(), |ip| ip.to_string());
                    report = reports.take(now, source, count);
                }
            }
        }
        drop(st);
        Failure {
            report,
            slowed: slowed.map(|(whence, wait)| self.refuse(whence, wait)),
        }
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
/// A full table is swept at most every [`SWEEP_EVERY`]: while a flood keeps
/// it full, every failure would otherwise pay for a scan of all of it.
fn make_room(
    buckets: &mut HashMap<Key, Bucket>,
    swept_at: &mut Option<Instant>,
    now: Instant,
) -> bool {
    if buckets.len() < MAX_TRACKED {
        return true;
    }
    if swept_at.is_some_and(|at| now.duration_since(at) < SWEEP_EVERY) {
        return false;
    }
    *swept_at = Some(now);
    buckets.retain(|k, b| *k == Key::Overflow || !b.is_idle(now));
    buckets.len() < MAX_TRACKED
}

/// See [`make_room`].
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_source_over_its_allowance_is_refused_unheard() {
        let g = GuessGuard::joins();
        for _ in 0..FAILURE_BURST as usize {
            g.admit(ip("10.0.0.1")).unwrap();
            let _ = g.failed(ip("10.0.0.1"), Some("tok1"));
        }
        let err = g.admit(ip("10.0.0.1")).unwrap_err().to_string();
        assert!(err.contains("too many failed joins from 10.0.0.1"), "{err}");
        // Other sources are not: neither the token's allowance nor anyone
        // else's failures refuse them before their secret is checked.
        g.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(g.failures(), 10);
        assert_eq!(g.refusals(), 1);
    }

    #[test]
    fn a_token_over_its_allowance_slows_wrong_secrets_only() {
        let g = GuessGuard::joins();
        // Wrong secrets for tok1 from many addresses, each within its own
        // allowance.
        for i in 0..FAILURE_BURST as usize {
            let f = g.failed(ip(&format!("10.0.1.{i}")), Some("tok1"));
            assert!(f.slowed.is_none(), "failure {i} is within the allowance");
        }
        // The right secret from anywhere is admitted (the caller checks it
        // and joins): guessing at a token cannot lock it out.
        g.admit(ip("10.0.2.1")).unwrap();
        // A further wrong secret is answered "too many".
        let f = g.failed(ip("10.0.2.1"), Some("tok1"));
        let err = f.slowed.expect("over the token's allowance").to_string();
        assert!(
            err.contains("too many failed joins with join token tok1"),
            "{err}"
        );
        // Another token is not affected.
        assert!(g.failed(ip("10.0.2.1"), Some("tok2")).slowed.is_none());
        assert_eq!(g.refusals(), 1);
    }

    #[test]
    fn authentications_are_counted_never_refused() {
        let g = GuessGuard::authentications();
        for _ in 0..3 * FAILURE_BURST as usize {
            let f = g.failed(ip("10.0.0.1"), Some("cred000001"));
            assert!(f.slowed.is_none());
        }
        g.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(g.failures(), 30);
        assert_eq!(g.refusals(), 0);
        // Joins from that address are another guard's business.
        GuessGuard::joins().admit(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn ipv6_sources_count_by_64() {
        let g = GuessGuard::joins();
        for i in 0..FAILURE_BURST as usize {
            let _ = g.failed(ip(&format!("2001:db8:1:2::{i:x}")), None);
        }
        let err = g.admit(ip("2001:db8:1:2:ffff::1")).unwrap_err().to_string();
        assert!(err.contains("from 2001:db8:1:2::"), "{err}");
        g.admit(ip("2001:db8:1:3::1")).unwrap();
    }

    #[test]
    fn reports_come_once_per_source_and_interval_with_the_count() {
        let g = GuessGuard::joins();
        let first = g
            .failed(ip("10.0.0.1"), None)
            .report
            .expect("the first is reported");
        assert_eq!(first.count, 1);
        assert!(!first.is_summary());
        for _ in 0..50 {
            assert_eq!(g.failed(ip("10.0.0.1"), None).report, None);
        }
        // Another source is reported on its own.
        assert!(g.failed(ip("10.0.0.9"), None).report.is_some());
    }

    #[test]
    fn reports_from_many_sources_are_capped_then_summarised() {
        let g = GuessGuard::joins();
        let now = Instant::now();
        // Each a source of its own (a /64 each), as many as an attacker
        // with a large IPv6 range could bring.
        let source = |i: u32| ip(&format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff));
        let reports: Vec<Report> = (0..1000)
            .filter_map(|i| g.failed_at(source(i), None, now).report)
            .collect();
        let (summaries, own): (Vec<_>, Vec<_>) = reports.iter().partition(|r| r.is_summary());
        assert_eq!(own.len(), REPORTS_PER_INTERVAL as usize, "{reports:?}");
        assert_eq!(summaries.len(), 1, "one summary per interval: {reports:?}");
        // The summary came with the first report held back; the others wait
        // for the next interval's.
        assert_eq!(summaries[0].source, SUMMARY_SOURCE);
        assert_eq!((summaries[0].count, summaries[0].held_back), (1, 1));
        assert_eq!(g.failures(), 1000);
        // An interval later: a new budget, then a summary of everything held
        // back since the last.
        let later = now + REPORT_EVERY;
        let reports: Vec<Report> = (1000..1000 + REPORTS_PER_INTERVAL + 1)
            .filter_map(|i| g.failed_at(source(i), None, later).report)
            .collect();
        let held = 1000 - REPORTS_PER_INTERVAL as u64 - 1 + 1;
        assert_eq!(
            reports.len(),
            REPORTS_PER_INTERVAL as usize + 1,
            "{reports:?}"
        );
        let last = reports.last().unwrap();
        assert!(last.is_summary(), "{last:?}");
        assert_eq!((last.count, last.held_back), (held, held));
    }

    #[test]
    fn a_full_table_refuses_no_new_source_unheard() {
        let g = GuessGuard::joins();
        // One instant throughout: no allowance comes back meanwhile.
        let now = Instant::now();
        // Fill the table with sources whose allowance has not come back.
        for i in 0..MAX_TRACKED as u32 {
            let _ = g.failed_at(Some(IpAddr::V4(std::net::Ipv4Addr::from(i + 1))), None, now);
        }
        // New sources share one bucket, and use it up...
        let mut slowed = 0;
        for i in 0..2 * FAILURE_BURST as u32 {
            let source = Some(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            g.admit_at(source, now)
                .expect("a new source is never refused unheard");
            slowed += usize::from(g.failed_at(source, None, now).slowed.is_some());
        }
        assert_eq!(slowed, FAILURE_BURST as usize);
        // ...which only answers failures: yet another new source (with the
        // right secret, say) is let in.
        g.admit_at(Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 9, 9))), now)
            .unwrap();
    }
}
