//! One simulator run, phase by phase: enrol, connect everyone, let the fleet idle,
//! publish a patch and time it on every agent, then wait for the server to be
//! restarted and time the reconnection. Every wait has a deadline.
//!
//! A script that drives the server (to restart it, or to trace it) follows the
//! phases through a marks file: one `<phase> <unix-ms>` line as each begins.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use flotilla_agent::patch::journal::Phase;
use tokio::time::Instant;

use crate::fleet::{Fleet, FleetConfig, Kind, unix_ms};
use crate::procstat::{self, ProcSample, Target};
use crate::report::{ConnectReport, IdleReport, PatchReport, ReconnectReport, Report};
use crate::stats::{Summary, peak_in_window, rate_per_s};
use crate::watch::PatchWatch;

/// What to do after the fleet is up.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Sessions started per second (0: all at once).
    pub start_rate: f64,
    pub connect_timeout: Duration,
    /// Pause after all are connected, before measuring.
    pub settle: Duration,
    pub idle: Duration,
    pub server: Option<Target>,
    pub server_data_dir: Option<PathBuf>,
    pub publish_cmd: Option<String>,
    pub published_at_ms: Option<i64>,
    pub manifest_id: Option<String>,
    pub patch_timeout: Duration,
    /// Between the `patch-start` mark and the publish (a tracer attaches).
    pub publish_delay: Duration,
    pub restart: bool,
    pub restart_wait: Duration,
    pub reconnect_timeout: Duration,
    pub marks: Option<PathBuf>,
}

impl Scenario {
    /// Appends `<phase> <unix-ms>` to the marks file, if any.
    fn mark(&self, phase: &str) {
        tracing::info!(phase, "phase");
        let Some(path) = &self.marks else { return };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{phase} {}", unix_ms()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the marks file");
        }
    }

    fn server(&self) -> Option<ProcSample> {
        self.server.as_ref().and_then(Target::sample)
    }

    fn db_bytes(&self) -> Option<u64> {
        self.server_data_dir
            .as_ref()
            .map(|d| procstat::dir_size(&d.join("db")).0)
    }
}

fn me() -> Option<ProcSample> {
    procstat::sample(std::process::id())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// RSS growth per agent between two samples, in KiB.
fn per_agent_kib(before: &Option<ProcSample>, after: &Option<ProcSample>, n: usize) -> Option<f64> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    (n > 0 && b.pid == a.pid).then(|| (a.rss_kib as f64 - b.rss_kib as f64) / n as f64)
}

/// Runs the whole scenario and reports what it measured.
pub async fn run(cfg: FleetConfig, sc: Scenario) -> anyhow::Result<Report> {
    let mut report = Report {
        agents: cfg.agents,
        shared_channel: cfg.shared_channel,
        servers: cfg.servers.clone(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_start: load(),
        ..Report::default()
    };
    let server_at_start = sc.server();
    let mut fleet = Fleet::open(cfg)?;
    // Subscribed before any agent runs, so no report is missed.
    let watch = PatchWatch::start(&fleet.db).context("cannot watch the agents' outboxes")?;
    report.join = fleet.enrol().await?;
    report.running = fleet.runnable();
    let n = report.running;
    sc.mark("joined");

    let server_before = sc.server();
    let started = Instant::now();
    let started_ms = unix_ms();
    fleet.start(sc.start_rate).await;
    let connected_at = fleet.wait_connected(n, started + sc.connect_timeout).await;
    let connect_events = fleet.tracker.events_since(started_ms);
    sc.mark(if connected_at.is_some() {
        "connected"
    } else {
        "connect-timeout"
    });
    tokio::time::sleep(sc.settle).await;
    let server_connected = sc.server();
    report.connect = Some(ConnectReport {
        start_rate_per_s: sc.start_rate,
        connected: fleet.tracker.connected(),
        all_connected: connected_at.is_some(),
        secs: (connected_at.unwrap_or_else(unix_ms) - started_ms) as f64 / 1000.0,
        refused_attempts: connect_events
            .iter()
            .filter(|e| e.kind == Kind::Refused)
            .count(),
        failed_attempts: connect_events
            .iter()
            .filter(|e| e.kind == Kind::Failed)
            .count(),
        server_rss_per_agent_kib: per_agent_kib(&server_before, &server_connected, n),
        server_rss_per_agent_with_join_kib: per_agent_kib(&server_at_start, &server_connected, n),
        server_at_start,
        server_before: server_before.clone(),
        server_connected,
    });

    if !sc.idle.is_zero() {
        report.idle = Some(idle(&sc, &fleet, &server_before, n).await);
    }
    if let Some(id) = &sc.manifest_id {
        watch.track(id);
        fleet.tracker.watch_manifest(id);
        report.patch = Some(patch(&sc, &fleet, &watch, id, n).await);
    }
    if sc.restart {
        report.reconnect = Some(reconnect(&sc, &fleet, n).await);
    }
    sc.mark("done");
    report.session_reasons = fleet.tracker.reasons();
    {
        let gave_up = fleet
            .tracker
            .gave_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        report.gave_up = gave_up.len();
        report.gave_up_samples = gave_up
            .iter()
            .take(5)
            .map(|(i, e)| format!("agent {i}: {e}"))
            .collect();
    }
    report.sim = me();
    report.load_end = load();
    drop(watch);
    fleet.stop(Duration::from_secs(30)).await;
    Ok(report)
}

async fn idle(sc: &Scenario, fleet: &Fleet, before: &Option<ProcSample>, n: usize) -> IdleReport {
    let heartbeat_ms = fleet.heartbeat_ms();
    sc.mark(&format!("idle-start {}", sc.idle.as_secs()));
    let t0 = unix_ms();
    let (s0, db0, me0) = (sc.server(), sc.db_bytes(), me());
    tokio::time::sleep(sc.idle).await;
    let (s1, db1, me1) = (sc.server(), sc.db_bytes(), me());
    let secs = (unix_ms() - t0) as f64 / 1000.0;
    sc.mark("idle-end");
    let ended = fleet
        .tracker
        .events_since(t0)
        .iter()
        .filter(|e| e.kind == Kind::Ended)
        .count();
    let (cpu_ms, sched_ms) = cpu_between(&s0, &s1);
    let (sim_cpu, _) = cpu_between(&me0, &me1);
    IdleReport {
        secs,
        heartbeat_ms,
        heartbeats: n as f64 * secs * 1000.0 / f64::from(heartbeat_ms.max(1)),
        server_cpu_ms: cpu_ms,
        server_sched_ms: sched_ms,
        server_cpu_pct_of_core: cpu_ms.map(|c| c / (secs * 10.0)),
        server_rss_per_agent_kib: per_agent_kib(before, &s1, n),
        server_io_write_bytes: match (&s0, &s1) {
            (Some(a), Some(b)) if a.pid == b.pid => {
                Some(b.io_write_bytes.saturating_sub(a.io_write_bytes))
            }
            _ => None,
        },
        db_bytes_start: db0,
        db_bytes_end: db1,
        sessions_ended: ended,
        sim_cpu_pct_of_core: sim_cpu.map(|c| c / (secs * 10.0)),
        server_start: s0,
        server_end: s1,
    }
}

/// CPU time between two samples of one process, in ms: from the clock ticks
/// (which count exited threads too), and from schedstat (finer, but summed over
/// live threads only, so given only when no thread came or went).
fn cpu_between(a: &Option<ProcSample>, b: &Option<ProcSample>) -> (Option<f64>, Option<f64>) {
    match (a, b) {
        (Some(a), Some(b)) if a.pid == b.pid => {
            let ticks = b.cpu_ms.saturating_sub(a.cpu_ms) as f64;
            let sched = (a.threads == b.threads && b.sched_ns >= a.sched_ns)
                .then(|| (b.sched_ns - a.sched_ns) as f64 / 1e6);
            (Some(ticks), sched)
        }
        _ => (None, None),
    }
}

/// Runs the publish command (bounded in time): (its run time, its output tail).
async fn publish(cmd: &str, timeout: Duration) -> (i64, String) {
    let t0 = unix_ms();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(timeout, child).await {
        Err(_) => format!("the publish command did not finish within {timeout:?}"),
        Ok(Err(e)) => format!("cannot run the publish command: {e}"),
        Ok(Ok(o)) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("{}: {tail}", o.status)
        }
    };
    (unix_ms() - t0, out)
}

async fn patch(
    sc: &Scenario,
    fleet: &Fleet,
    watch: &PatchWatch,
    id: &str,
    n: usize,
) -> PatchReport {
    let (s0, me0) = (sc.server(), me());
    sc.mark("patch-start");
    tokio::time::sleep(sc.publish_delay).await;
    let mut r = PatchReport {
        manifest_id: id.to_string(),
        targeted: n,
        published_at_ms: sc.published_at_ms.unwrap_or_else(unix_ms),
        ..PatchReport::default()
    };
    let deadline = Instant::now() + sc.patch_timeout;
    if let Some(cmd) = &sc.publish_cmd {
        let (took, out) = publish(cmd, sc.patch_timeout).await;
        r.publish_cmd_ms = Some(took);
        r.publish_output = out;
    }
    // Polled every 100 ms until every agent's outcome is acknowledged.
    while Instant::now() < deadline && watch.progress().0 < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.wall_ms = unix_ms() - r.published_at_ms;
    sc.mark("patch-end");
    let (s1, me1) = (sc.server(), me());
    let agents = watch.snapshot();
    let since = |t: Option<i64>| t.map(|t| t - r.published_at_ms);
    let times = |f: &dyn Fn(&crate::watch::AgentPatch) -> Option<i64>| -> Vec<i64> {
        agents.values().filter_map(|a| since(f(a))).collect()
    };
    r.received = Summary::of(&times(&|a| a.reached(Phase::Received)));
    let notified: Vec<i64> = fleet
        .tracker
        .notified()
        .into_iter()
        .map(|(_, t)| t - r.published_at_ms)
        .collect();
    r.notified = Summary::of(&notified);
    r.downloaded = Summary::of(&times(&|a| a.reached(Phase::Downloaded)));
    r.committed_agent = Summary::of(&times(&|a| a.reached(Phase::Committed)));
    r.committed_acked = Summary::of(&times(&|a| a.acked(Phase::Committed)));
    if let Some(first) = notified.iter().min() {
        let spread: Vec<i64> = notified.iter().map(|t| t - first).collect();
        r.notified_spread = Summary::of(&spread);
    }
    r.deliveries_per_s = rate_per_s(&notified);
    r.committed = agents
        .values()
        .filter(|a| a.outcome == Some(Phase::Committed))
        .count();
    r.settled = agents
        .values()
        .filter(|a| a.outcome == Some(Phase::Committed) && a.settled())
        .count();
    let mut not: Vec<String> = agents
        .iter()
        .filter(|(_, a)| a.outcome != Some(Phase::Committed))
        .map(|(i, a)| match a.outcome {
            Some(p) => format!("agent {i}: {}: {}", p.as_str(), a.error),
            None => format!("agent {i}: no outcome yet"),
        })
        .take(20)
        .collect();
    if agents.len() < n {
        not.push(format!(
            "{} agents never reported the patch",
            n - agents.len()
        ));
    }
    r.not_committed = not;
    if let (Some(a), Some(b)) = (&s0, &s1)
        && a.pid == b.pid
    {
        r.server_cpu_ms = Some(b.cpu_ms.saturating_sub(a.cpu_ms));
        r.server_io_write_bytes = Some(b.io_write_bytes.saturating_sub(a.io_write_bytes));
    }
    if let (Some(a), Some(b)) = (&me0, &me1) {
        r.sim_cpu_ms = Some(b.cpu_ms.saturating_sub(a.cpu_ms));
    }
    r.server_after = s1;
    (r.other_reports, r.undecodable_reports) = watch.ignored();
    r
}

async fn reconnect(sc: &Scenario, fleet: &Fleet, n: usize) -> ReconnectReport {
    let ready = unix_ms();
    sc.mark("restart");
    let mut r = ReconnectReport::default();
    // The server goes away: the first session that ends.
    let wait_drop = Instant::now() + sc.restart_wait;
    while Instant::now() < wait_drop {
        let dropped = fleet
            .tracker
            .events_since(ready)
            .iter()
            .find(|e| e.kind == Kind::Ended)
            .map(|e| e.at_ms);
        if dropped.is_some() {
            r.dropped_at_ms = dropped;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(dropped) = r.dropped_at_ms else {
        tracing::warn!(
            "no session ended within {:?}: was the server restarted?",
            sc.restart_wait
        );
        return r;
    };
    // Give every session time to notice, then wait for all to be back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back_at = fleet
        .wait_connected(n, Instant::now() + sc.reconnect_timeout)
        .await;
    sc.mark(if back_at.is_some() {
        "reconnected"
    } else {
        "reconnect-timeout"
    });
    let events = fleet.tracker.events_since(dropped);
    let opened: Vec<i64> = events
        .iter()
        .filter(|e| e.kind == Kind::Opened)
        .map(|e| e.at_ms)
        .collect();
    r.all_back = back_at.is_some();
    r.back = fleet.tracker.connected();
    r.server = sc.server();
    r.server_started_at_ms = r.server.as_ref().map(|s| s.started_unix_ms);
    let last = back_at.or_else(|| opened.iter().max().copied());
    r.secs_from_drop = last
        .filter(|_| r.all_back)
        .map(|t| (t - dropped) as f64 / 1000.0);
    r.secs_from_server_start = match (last, r.server_started_at_ms) {
        (Some(t), Some(s)) if r.all_back && s > 0 => Some((t - s) as f64 / 1000.0),
        _ => None,
    };
    r.peak_connects_per_s = peak_in_window(&opened, 1000);
    let retried: std::collections::HashSet<u32> = events
        .iter()
        .filter(|e| matches!(e.kind, Kind::Refused | Kind::Failed))
        .map(|e| e.agent)
        .collect();
    r.agents_retried = retried.len();
    r.refused_attempts = events.iter().filter(|e| e.kind == Kind::Refused).count();
    r.failed_attempts = events.iter().filter(|e| e.kind == Kind::Failed).count();
    let reached = opened.len() + r.failed_attempts;
    r.handshake_failure_pct = if reached == 0 {
        0.0
    } else {
        100.0 * r.failed_attempts as f64 / reached as f64
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, rss: u64) -> Option<ProcSample> {
        Some(ProcSample {
            pid,
            rss_kib: rss,
            ..ProcSample::default()
        })
    }

    #[test]
    fn memory_per_agent_needs_the_same_process() {
        assert_eq!(
            per_agent_kib(&sample(1, 1000), &sample(1, 5000), 100),
            Some(40.0)
        );
        assert_eq!(per_agent_kib(&sample(1, 1000), &sample(2, 5000), 100), None);
        assert_eq!(per_agent_kib(&sample(1, 1000), &None, 100), None);
        assert_eq!(per_agent_kib(&sample(1, 1000), &sample(1, 5000), 0), None);
    }

    #[test]
    fn cpu_counts_exited_threads_and_schedstat_only_a_stable_set() {
        let at = |cpu_ms, sched_ns, threads| {
            Some(ProcSample {
                pid: 1,
                cpu_ms,
                sched_ns,
                threads,
                ..ProcSample::default()
            })
        };
        // A thread with 2 s of CPU exited: schedstat went down, ticks did not.
        assert_eq!(
            cpu_between(&at(5000, 5_000_000_000, 13), &at(5200, 3_100_000_000, 11)),
            (Some(200.0), None)
        );
        assert_eq!(
            cpu_between(&at(5000, 5_000_000_000, 11), &at(5200, 5_204_000_000, 11)),
            (Some(200.0), Some(204.0))
        );
        assert_eq!(cpu_between(&at(1, 1, 1), &None), (None, None));
    }

    #[tokio::test]
    async fn the_publish_command_is_timed_and_bounded() {
        let (took, out) = publish("echo published", Duration::from_secs(10)).await;
        assert!(took >= 0);
        assert!(out.ends_with("published"), "{out}");
        let (_, out) = publish("sleep 5", Duration::from_millis(100)).await;
        assert!(out.contains("did not finish"), "{out}");
    }

    #[test]
    fn marks_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let sc = Scenario {
            start_rate: 0.0,
            connect_timeout: Duration::ZERO,
            settle: Duration::ZERO,
            idle: Duration::ZERO,
            server: None,
            server_data_dir: None,
            publish_cmd: None,
            published_at_ms: None,
            manifest_id: None,
            patch_timeout: Duration::ZERO,
            publish_delay: Duration::ZERO,
            restart: false,
            restart_wait: Duration::ZERO,
            reconnect_timeout: Duration::ZERO,
            marks: Some(dir.path().join("marks")),
        };
        sc.mark("joined");
        sc.mark("idle-start 60");
        let text = std::fs::read_to_string(dir.path().join("marks")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("idle-start 60 "));
    }
}
