//! What a simulator run measured, as JSON (`--json`) or as lines for people, each
//! next to the goal it is judged against.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::fleet::JoinStats;
use crate::procstat::ProcSample;
use crate::stats::{Summary, ms};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub agents: usize,
    /// Agents with an identity, run.
    pub running: usize,
    pub shared_channel: bool,
    pub servers: Vec<String>,
    pub cores: usize,
    pub load_start: String,
    pub load_end: String,
    pub join: JoinStats,
    pub connect: Option<ConnectReport>,
    pub idle: Option<IdleReport>,
    pub patch: Option<PatchReport>,
    pub reconnect: Option<ReconnectReport>,
    /// Agents whose run ended with an error (the server refused them, or their state broke).
    pub gave_up: usize,
    pub gave_up_samples: Vec<String>,
    /// Why sessions ended or failed to open, with counts.
    pub session_reasons: BTreeMap<String, u64>,
    /// The simulator process at the end.
    pub sim: Option<ProcSample>,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectReport {
    pub start_rate_per_s: f64,
    pub connected: usize,
    pub all_connected: bool,
    /// From starting the first session to all open.
    pub secs: f64,
    pub refused_attempts: usize,
    pub failed_attempts: usize,
    /// The server when the simulator started (before enrolment), before any
    /// session, and after all were open and settled.
    pub server_at_start: Option<ProcSample>,
    pub server_before: Option<ProcSample>,
    pub server_connected: Option<ProcSample>,
    pub server_rss_per_agent_kib: Option<f64>,
    /// The same from the simulator's start: with the node records enrolment added
    /// (equal to the above when every identity was cached).
    pub server_rss_per_agent_with_join_kib: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct IdleReport {
    pub secs: f64,
    pub heartbeat_ms: u32,
    /// Heartbeats the fleet sent in the window (sessions × window / interval).
    pub heartbeats: f64,
    pub server_start: Option<ProcSample>,
    pub server_end: Option<ProcSample>,
    /// The server's CPU time over the window: clock ticks (10 ms steps, exited
    /// threads included), and schedstat when no thread came or went.
    pub server_cpu_ms: Option<f64>,
    pub server_sched_ms: Option<f64>,
    pub server_cpu_pct_of_core: Option<f64>,
    pub server_rss_per_agent_kib: Option<f64>,
    /// Bytes the server caused to be written to storage over the window.
    pub server_io_write_bytes: Option<u64>,
    pub db_bytes_start: Option<u64>,
    pub db_bytes_end: Option<u64>,
    pub sessions_ended: usize,
    pub sim_cpu_pct_of_core: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct PatchReport {
    pub manifest_id: String,
    pub published_at_ms: i64,
    /// How long the publish command ran (when the simulator ran it).
    pub publish_cmd_ms: Option<i64>,
    pub publish_output: String,
    pub targeted: usize,
    pub committed: usize,
    /// Committed and acknowledged by the server.
    pub settled: usize,
    pub not_committed: Vec<String>,
    /// Every time from the publish (`published_at_ms`). Notified: the agent's
    /// session got the desired state carrying the patch; received: its pipeline
    /// had journaled it (one flushed write later, after queueing for the
    /// simulator's threads).
    pub notified: Option<Summary>,
    pub received: Option<Summary>,
    pub downloaded: Option<Summary>,
    pub committed_agent: Option<Summary>,
    pub committed_acked: Option<Summary>,
    /// Notified, from the first agent notified: the fan-out's own spread.
    pub notified_spread: Option<Summary>,
    /// Agents notified per second, first to last notified.
    pub deliveries_per_s: Option<f64>,
    pub wall_ms: i64,
    pub server_cpu_ms: Option<u64>,
    pub server_io_write_bytes: Option<u64>,
    pub server_after: Option<ProcSample>,
    pub sim_cpu_ms: Option<u64>,
    /// Outbox reports about other manifests, and ones the watcher could not read.
    pub other_reports: u64,
    pub undecodable_reports: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct ReconnectReport {
    /// The first session that ended after the simulator was ready for the restart.
    pub dropped_at_ms: Option<i64>,
    /// When the new server process started (from /proc).
    pub server_started_at_ms: Option<i64>,
    pub all_back: bool,
    pub back: usize,
    pub secs_from_drop: Option<f64>,
    pub secs_from_server_start: Option<f64>,
    pub peak_connects_per_s: usize,
    pub refused_attempts: usize,
    /// Attempts that reached the server (or timed out) and still failed.
    pub failed_attempts: usize,
    pub handshake_failure_pct: f64,
    /// Agents that needed more than one attempt.
    pub agents_retried: usize,
    pub server: Option<ProcSample>,
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("n/a".into(), f)
}

fn summary(s: &Option<Summary>) -> String {
    opt(s.as_ref(), Summary::line)
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

impl Report {
    /// The report as lines for people.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(
            w,
            "flotilla-sim: {} agents ({} run), {} connection per agent, {} cores, load {} → {}",
            self.agents,
            self.running,
            if self.shared_channel {
                "one shared"
            } else {
                "separate report/download"
            },
            self.cores,
            self.load_start,
            self.load_end
        );
        let j = &self.join;
        let _ = writeln!(
            w,
            "join: {} cached, {} enrolled, {} failed in {:.1} s{}",
            j.cached,
            j.enrolled,
            j.failed,
            j.secs,
            if j.errors.is_empty() {
                String::new()
            } else {
                format!(" (first: {})", j.errors[0])
            }
        );
        if let Some(c) = &self.connect {
            let _ = writeln!(
                w,
                "connect: {} of {} open in {:.2} s (started {}/s); {} refused, {} failed attempts",
                c.connected,
                self.running,
                c.secs,
                c.start_rate_per_s,
                c.refused_attempts,
                c.failed_attempts
            );
            if let Some(s) = &c.server_connected {
                let _ = writeln!(
                    w,
                    "  server with all connected: RSS {} ({} threads); per agent {} (goal ≤ 40 KiB), \
                     {} counting enrolment",
                    kib(s.rss_kib),
                    s.threads,
                    opt(c.server_rss_per_agent_kib, |v| format!("{v:.1} KiB")),
                    opt(c.server_rss_per_agent_with_join_kib, |v| format!(
                        "{v:.1} KiB"
                    ))
                );
            }
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(
                w,
                "idle {:.0} s (heartbeat {} ms, {:.0} heartbeats): server CPU {} = {} of a core \
                 (goal ≤ 25 %); RSS per agent {}; {} sessions ended",
                i.secs,
                i.heartbeat_ms,
                i.heartbeats,
                opt(i.server_cpu_ms, |v| format!("{v:.0} ms")),
                opt(i.server_cpu_pct_of_core, |v| format!("{v:.2} %")),
                opt(i.server_rss_per_agent_kib, |v| format!("{v:.1} KiB")),
                i.sessions_ended
            );
            let _ = writeln!(
                w,
                "  server storage writes {}; db {} → {} bytes; simulator CPU {} of a core",
                opt(i.server_io_write_bytes, |v| format!("{v} bytes")),
                opt(i.db_bytes_start, |v| v.to_string()),
                opt(i.db_bytes_end, |v| v.to_string()),
                opt(i.sim_cpu_pct_of_core, |v| format!("{v:.2} %"))
            );
        }
        if let Some(p) = &self.patch {
            let _ = writeln!(
                w,
                "patch {}: {} of {} committed ({} acknowledged) in {}; publish command {}",
                p.manifest_id,
                p.committed,
                p.targeted,
                p.settled,
                ms(p.wall_ms),
                opt(p.publish_cmd_ms, ms)
            );
            let _ = writeln!(
                w,
                "  publish → notified   {} (goal p99 < 1 s)",
                summary(&p.notified)
            );
            let _ = writeln!(w, "  publish → received   {}", summary(&p.received));
            let _ = writeln!(w, "  publish → downloaded {}", summary(&p.downloaded));
            let _ = writeln!(
                w,
                "  publish → committed  {} (goal p99 < 5 s)",
                summary(&p.committed_agent)
            );
            let _ = writeln!(w, "  … server acknowledged {}", summary(&p.committed_acked));
            let _ = writeln!(
                w,
                "  fan-out spread {}; {} deliveries/s (goal ≥ 20000)",
                summary(&p.notified_spread),
                opt(p.deliveries_per_s, |v| format!("{v:.0}"))
            );
            let _ = writeln!(
                w,
                "  CPU during the patch: server {}, simulator {}; server storage writes {}",
                opt(p.server_cpu_ms, |v| ms(v as i64)),
                opt(p.sim_cpu_ms, |v| ms(v as i64)),
                opt(p.server_io_write_bytes, |v| format!("{v} bytes"))
            );
            for line in p.not_committed.iter().take(5) {
                let _ = writeln!(w, "  not committed: {line}");
            }
        }
        if let Some(r) = &self.reconnect {
            let _ = writeln!(
                w,
                "reconnect: {} of {} back; {} from the first drop, {} from the new server's start \
                 (goal all within 30 s)",
                r.back,
                self.running,
                opt(r.secs_from_drop, |v| format!("{v:.2} s")),
                opt(r.secs_from_server_start, |v| format!("{v:.2} s"))
            );
            let _ = writeln!(
                w,
                "  peak {} connects/s; {} refused (server down), {} failed after reaching it = \
                 {:.2} % (goal < 1 %); {} agents retried",
                r.peak_connects_per_s,
                r.refused_attempts,
                r.failed_attempts,
                r.handshake_failure_pct,
                r.agents_retried
            );
            if let Some(s) = &r.server {
                let _ = writeln!(
                    w,
                    "  new server when all were back: CPU {} since start, RSS {} (peak {})",
                    ms(s.cpu_ms as i64),
                    kib(s.rss_kib),
                    kib(s.hwm_kib)
                );
            }
        }
        let _ = writeln!(w, "agents that gave up: {} (goal 0)", self.gave_up);
        for g in self.gave_up_samples.iter().take(3) {
            let _ = writeln!(w, "  {g}");
        }
        if let Some(s) = &self.sim {
            let _ = writeln!(
                w,
                "simulator: RSS {} ({} threads), CPU {}",
                kib(s.rss_kib),
                s.threads,
                ms(s.cpu_ms as i64)
            );
        }
        if !self.session_reasons.is_empty() {
            let _ = writeln!(w, "session ends and failures, by reason:");
            for (reason, n) in &self.session_reasons {
                let _ = writeln!(w, "  {n:>7}  {reason}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_goals_and_missing_parts() {
        let r = Report {
            agents: 10,
            running: 10,
            shared_channel: true,
            patch: Some(PatchReport {
                manifest_id: "p".into(),
                targeted: 10,
                committed: 9,
                notified: Summary::of(&[100, 200]),
                not_committed: vec!["agent 3: failed: download failed".into()],
                ..PatchReport::default()
            }),
            ..Report::default()
        };
        let text = r.text();
        assert!(text.contains("9 of 10 committed"), "{text}");
        assert!(
            text.contains("publish → notified   n=2 p50 100 ms"),
            "{text}"
        );
        assert!(text.contains("publish → committed  n/a"), "{text}");
        assert!(text.contains("not committed: agent 3"), "{text}");
        assert!(!text.contains("reconnect:"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["patch"]["notified"]["p99_ms"], 200);
        assert!(json["reconnect"].is_null());
    }
}
