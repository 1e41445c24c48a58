//! The simulated fleet: N real agents of the agent library (session, pipeline,
//! fetcher, journal, outbox) in one process. Each has its own identity and state
//! (a namespace `a<i>` of one shared sled database, and a directory of its own),
//! applies patches with the no-op executor, and, unless told otherwise, sends its
//! reports and downloads over its session's connection.
//!
//! One database, not one per agent: every sled database holds file descriptors
//! and buffers of its own, which 10k agents cannot afford next to their sockets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_agent::embed::{Observer, SessionEvent, SharedChannel};
use flotilla_agent::install::Executor;
use flotilla_agent::{JoinError, JoinOptions, RunOptions, Store};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Distinct failure reasons kept with their counts; the rest are summed.
const MAX_REASONS: usize = 32;
/// Join attempts per agent when the server does not answer (overloaded).
const JOIN_ATTEMPTS: u32 = 3;

/// Unix time in ms: every time the simulator records is on this clock, so it
/// compares with the publish time and with the agents' report stamps.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What the fleet needs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Agent i prefers the (i mod K)-th, then the next ones in turn.
    pub servers: Vec<String>,
    pub state_dir: PathBuf,
    pub agents: usize,
    pub token: Option<String>,
    pub trusted_keys: Vec<String>,
    pub trust_threshold: u32,
    pub join_concurrency: usize,
    pub join_timeout: Duration,
    /// Reports and downloads over the session's connection.
    pub shared_channel: bool,
    pub max_backoff: Duration,
    /// Loopback source addresses the sessions are spread over (1: the system's choice).
    pub source_addresses: u8,
}

/// How a session event went, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Opened,
    Ended,
    /// Failed to open: nothing listened (the server is down).
    Refused,
    /// Failed to open after reaching the server, or timed out: a failed handshake
    /// or session request.
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub at_ms: i64,
    pub agent: u32,
    pub kind: Kind,
}

/// Session events of every agent, as the observers report them.
#[derive(Debug, Default)]
pub struct Tracker {
    pub connected: AtomicUsize,
    open: Vec<AtomicBool>,
    events: Mutex<Vec<Event>>,
    reasons: Mutex<BTreeMap<String, u64>>,
    /// Agents whose `run` returned (refused by the server, or broken state).
    pub gave_up: Mutex<Vec<(u32, String)>>,
    /// The manifest whose arrival is timed, and when each agent's session first
    /// got a desired state carrying it (Unix ms; 0 = not yet).
    watched: RwLock<Option<String>>,
    notified: Vec<AtomicI64>,
}

impl Tracker {
    fn new(agents: usize) -> Self {
        Self {
            open: (0..agents).map(|_| AtomicBool::new(false)).collect(),
            notified: (0..agents).map(|_| AtomicI64::new(0)).collect(),
            ..Self::default()
        }
    }

    /// Records one event of agent `agent` (its observer calls this).
    pub fn note(&self, agent: u32, event: SessionEvent<'_>) {
        let kind = match event {
            SessionEvent::Opened => {
                if !self.open[agent as usize].swap(true, Ordering::SeqCst) {
                    self.connected.fetch_add(1, Ordering::SeqCst);
                }
                Kind::Opened
            }
            SessionEvent::Ended { reason } => {
                if self.open[agent as usize].swap(false, Ordering::SeqCst) {
                    self.connected.fetch_sub(1, Ordering::SeqCst);
                }
                self.count_reason("ended", reason);
                Kind::Ended
            }
            SessionEvent::Failed { reason } => {
                self.count_reason("failed", reason);
                if reason.to_ascii_lowercase().contains("connection refused") {
                    Kind::Refused
                } else {
                    Kind::Failed
                }
            }
            SessionEvent::Desired { manifests, .. } => {
                let watched = self.watched.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(id) = watched.as_deref()
                    && manifests.iter().any(|m| m.id == id)
                {
                    // Only the first arrival counts.
                    let _ = self.notified[agent as usize].compare_exchange(
                        0,
                        unix_ms(),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                return;
            }
        };
        let e = Event {
            at_ms: unix_ms(),
            agent,
            kind,
        };
        lock(&self.events).push(e);
    }

    fn count_reason(&self, what: &str, reason: &str) {
        let mut reasons = lock(&self.reasons);
        let mut key: String = format!("{what}: {reason}").chars().take(160).collect();
        if !reasons.contains_key(&key) && reasons.len() >= MAX_REASONS {
            key = format!("{what}: (other reasons)");
        }
        *reasons.entry(key).or_default() += 1;
    }

    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::SeqCst)
    }

    /// Events at or after `since_ms`, in the order recorded.
    pub fn events_since(&self, since_ms: i64) -> Vec<Event> {
        lock(&self.events)
            .iter()
            .filter(|e| e.at_ms >= since_ms)
            .copied()
            .collect()
    }

    pub fn reasons(&self) -> BTreeMap<String, u64> {
        lock(&self.reasons).clone()
    }

    /// Times the arrival of manifest `id` at every agent's session from now on.
    pub fn watch_manifest(&self, id: &str) {
        *self.watched.write().unwrap_or_else(PoisonError::into_inner) = Some(id.to_string());
    }

    /// When each agent's session first got the watched manifest: (agent, Unix ms).
    pub fn notified(&self) -> Vec<(u32, i64)> {
        self.notified
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let t = t.load(Ordering::SeqCst);
                (t > 0).then_some((i as u32, t))
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only records: a panic elsewhere leaves them readable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How enrolment went.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct JoinStats {
    /// Agents whose identity was already in the state directory.
    pub cached: usize,
    pub enrolled: usize,
    pub failed: usize,
    pub secs: f64,
    /// The first few errors.
    pub errors: Vec<String>,
}

/// The running fleet.
pub struct Fleet {
    cfg: FleetConfig,
    /// Kept open for the fleet's lifetime; also where the patch watcher listens.
    pub db: sled::Db,
    stores: Vec<Option<Store>>,
    pub tracker: Arc<Tracker>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

fn agent_dir(state_dir: &Path, i: usize) -> PathBuf {
    state_dir.join("agents").join(format!("a{i}"))
}

/// Agent `i`'s source address when the fleet is spread over `count` loopback
/// addresses (127.0.0.1 up), or None (the system's choice) for one.
fn source_address(i: usize, count: u8) -> Option<std::net::IpAddr> {
    (count > 1)
        .then(|| std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(count)) as u8).into())
}

/// The shared database: flushed only when an agent flushes (as a real agent's),
/// with a cache sized for many agents' records.
pub fn open_db(state_dir: &Path) -> anyhow::Result<sled::Db> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    sled::Config::new()
        .path(state_dir.join("db"))
        .flush_every_ms(None)
        .cache_capacity(256 << 20)
        .open()
        .with_context(|| format!("cannot open the shared database in {}", state_dir.display()))
}

impl Fleet {
    /// Agent `i`'s servers: the (i mod K)-th first, then the others in turn.
    fn servers_of(&self, i: usize) -> Vec<String> {
        let s = &self.cfg.servers;
        (0..s.len()).map(|k| s[(i + k) % s.len()].clone()).collect()
    }

    /// Opens every agent's store (identities already there are reused).
    pub fn open(cfg: FleetConfig) -> anyhow::Result<Self> {
        let db = open_db(&cfg.state_dir)?;
        let mut stores = Vec::with_capacity(cfg.agents);
        for i in 0..cfg.agents {
            let store = Store::open_shared(&db, &format!("a{i}"), &agent_dir(&cfg.state_dir, i))
                .with_context(|| format!("cannot open agent {i}'s store"))?;
            stores.push(Some(store));
        }
        Ok(Self {
            tracker: Arc::new(Tracker::new(cfg.agents)),
            stop: watch::channel(false).0,
            tasks: JoinSet::new(),
            cfg,
            db,
            stores,
        })
    }

    /// Enrols every agent without an identity, `join_concurrency` at a time. An
    /// agent that cannot join is left out of the run (and counted).
    pub async fn enrol(&mut self) -> anyhow::Result<JoinStats> {
        let started = Instant::now();
        let deadline = started + self.cfg.join_timeout;
        let mut stats = JoinStats::default();
        let mut pending = Vec::new();
        for (i, store) in self.stores.iter().enumerate() {
            let Some(store) = store else { continue };
            if store.identity()?.is_some() {
                stats.cached += 1;
            } else {
                pending.push((i, store.clone()));
            }
        }
        if !pending.is_empty() && self.cfg.token.is_none() {
            bail!(
                "{} agents have no identity in {}: pass --token (from `flotilla token create \
                 --group G --max-uses N`)",
                pending.len(),
                self.cfg.state_dir.display()
            );
        }
        let mut queue = pending.into_iter();
        let mut running = JoinSet::new();
        loop {
            while running.len() < self.cfg.join_concurrency.max(1) {
                let Some((i, store)) = queue.next() else {
                    break;
                };
                let opts = JoinOptions {
                    servers: self.servers_of(i),
                    token: self.cfg.token.clone().unwrap_or_default(),
                    labels: BTreeMap::new(),
                    machine_id: Some(format!("sim-{i}")),
                    state_dir: agent_dir(&self.cfg.state_dir, i),
                    trusted_keys: self.cfg.trusted_keys.clone(),
                    trust_threshold: self.cfg.trust_threshold,
                    again: false,
                };
                running.spawn(async move { (i, join_one(&store, opts).await) });
            }
            let next = match tokio::time::timeout_at(deadline, running.join_next()).await {
                Err(_) => bail!(
                    "enrolment did not finish within {:?} ({} enrolled so far)",
                    self.cfg.join_timeout,
                    stats.enrolled
                ),
                Ok(None) => break,
                Ok(Some(next)) => next,
            };
            match next {
                Ok((_, Ok(()))) => stats.enrolled += 1,
                Ok((i, Err(e))) => {
                    stats.failed += 1;
                    if stats.errors.len() < 5 {
                        stats.errors.push(format!("agent {i}: {e}"));
                    }
                    self.stores[i] = None;
                }
                Err(e) => bail!("a join task failed: {e}"),
            }
            let done = stats.enrolled + stats.failed;
            if done > 0 && done % 1000 == 0 {
                tracing::info!(done, "enrolling");
            }
        }
        stats.secs = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// The heartbeat interval the server gave (held by the first agent that has
    /// one); the agent's default before any.
    pub fn heartbeat_ms(&self) -> u32 {
        self.stores
            .iter()
            .flatten()
            .find_map(|s| s.desired().ok().flatten())
            .map_or(flotilla_agent::state::DEFAULT_HEARTBEAT_MS, |d| {
                d.heartbeat_interval_ms
            })
    }

    /// Every agent with an identity: (index, store).
    pub fn stores(&self) -> impl Iterator<Item = (usize, &Store)> {
        self.stores
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// Agents with an identity (the ones `start` runs).
    pub fn runnable(&self) -> usize {
        self.stores.iter().flatten().count()
    }

    /// Starts every runnable agent's session, `rate` per second (0: all at once),
    /// the way a fleet comes up rather than all in one instant.
    pub async fn start(&mut self, rate: f64) {
        let t0 = Instant::now();
        let mut started = 0usize;
        for (i, store) in self.stores.iter().enumerate() {
            let Some(store) = store.clone() else { continue };
            if rate > 0.0 {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(started as f64 / rate)).await;
            }
            started += 1;
            let tracker = self.tracker.clone();
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let observer = Observer::new(move |e| tracker.note(index, e));
            let opts = RunOptions {
                servers: self.servers_of(i),
                max_backoff: self.cfg.max_backoff,
                root: agent_dir(&self.cfg.state_dir, i).join("root"),
                executor: Executor::NoOp,
                observer: Some(observer),
                shared_channel: self.cfg.shared_channel.then(SharedChannel::new),
                source_address: source_address(i, self.cfg.source_addresses),
                ..RunOptions::new(agent_dir(&self.cfg.state_dir, i))
            };
            let mut stop = self.stop.subscribe();
            let tracker = self.tracker.clone();
            self.tasks.spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = flotilla_agent::run_with(store, opts, shutdown).await {
                    tracing::warn!(agent = index, error = %e, "agent gave up");
                    lock(&tracker.gave_up).push((index, e.to_string()));
                }
            });
        }
    }

    /// Waits (polling every 50 ms, until `deadline`) for `n` open sessions.
    /// Returns when that was seen, or `None`.
    pub async fn wait_connected(&self, n: usize, deadline: Instant) -> Option<i64> {
        loop {
            if self.tracker.connected() >= n {
                return Some(unix_ms());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every agent, waiting at most `within` for them to finish.
    pub async fn stop(mut self, within: Duration) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + within;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {}
        self.tasks.abort_all();
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "cannot flush the shared database");
        }
    }
}

/// One join, retried a few times while the server does not answer.
async fn join_one(store: &Store, opts: JoinOptions) -> Result<(), JoinError> {
    let mut attempt = 1;
    loop {
        match flotilla_agent::join_with(store, opts.clone()).await {
            Ok(_) => return Ok(()),
            Err(JoinError::Unreachable(_)) if attempt < JOIN_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_counts_open_sessions_once() {
        let t = Tracker::new(2);
        t.note(0, SessionEvent::Opened);
        t.note(0, SessionEvent::Opened);
        t.note(1, SessionEvent::Opened);
        assert_eq!(t.connected(), 2);
        t.note(1, SessionEvent::Ended { reason: "gone" });
        t.note(1, SessionEvent::Ended { reason: "gone" });
        assert_eq!(t.connected(), 1);
        t.note(
            1,
            SessionEvent::Failed {
                reason: "https://x: transport error: Connection refused (os error 111)",
            },
        );
        t.note(
            1,
            SessionEvent::Failed {
                reason: "tls handshake eof",
            },
        );
        let kinds: Vec<Kind> = t.events_since(0).iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Opened,
                Kind::Opened,
                Kind::Opened,
                Kind::Ended,
                Kind::Ended,
                Kind::Refused,
                Kind::Failed
            ]
        );
        assert_eq!(t.reasons()["ended: gone"], 2);
    }

    #[test]
    fn the_first_arrival_of_the_watched_manifest_is_timed() {
        let t = Tracker::new(3);
        let m = |id: &str| flotilla_proto::pb::SignedManifest {
            id: id.into(),
            ..Default::default()
        };
        let (p, other) = ([m("p")], [m("q")]);
        // Not watched yet: nothing timed.
        t.note(
            0,
            SessionEvent::Desired {
                revision: 1,
                manifests: &p,
            },
        );
        t.watch_manifest("p");
        t.note(
            1,
            SessionEvent::Desired {
                revision: 1,
                manifests: &other,
            },
        );
        t.note(
            2,
            SessionEvent::Desired {
                revision: 2,
                manifests: &p,
            },
        );
        let first = t.notified();
        std::thread::sleep(Duration::from_millis(5));
        t.note(
            2,
            SessionEvent::Desired {
                revision: 3,
                manifests: &p,
            },
        );
        assert_eq!(first.len(), 1);
        assert_eq!(t.notified(), first);
        assert_eq!(first[0].0, 2);
        // Desired states are not session events.
        assert!(t.events_since(0).is_empty());
    }

    #[test]
    fn failure_reasons_are_bounded() {
        let t = Tracker::new(1);
        for i in 0..(MAX_REASONS + 10) {
            t.note(
                0,
                SessionEvent::Failed {
                    reason: &format!("reason {i}"),
                },
            );
        }
        let reasons = t.reasons();
        assert_eq!(reasons.len(), MAX_REASONS + 1);
        assert_eq!(reasons["failed: (other reasons)"], 10);
    }

    #[test]
    fn agents_go_round_the_source_addresses() {
        assert_eq!(source_address(5, 1), None);
        let at = |i| source_address(i, 3).unwrap().to_string();
        assert_eq!(
            [at(0), at(1), at(2), at(3)],
            ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
        );
    }

    #[tokio::test]
    async fn agents_without_identity_need_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = Fleet::open(FleetConfig {
            servers: vec!["https://127.0.0.1:1".into()],
            state_dir: dir.path().to_path_buf(),
            agents: 3,
            token: None,
            trusted_keys: Vec::new(),
            trust_threshold: 1,
            join_concurrency: 2,
            join_timeout: Duration::from_secs(5),
            shared_channel: true,
            max_backoff: Duration::from_secs(1),
            source_addresses: 1,
        })
        .unwrap();
        assert_eq!(fleet.runnable(), 3);
        let err = fleet.enrol().await.unwrap_err().to_string();
        assert!(err.contains("--token"), "{err}");
        assert!(dir.path().join("agents/a2").is_dir());
    }
}
