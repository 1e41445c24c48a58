//! Times each agent's patch from its own outbox: every step the pipeline takes is
//! queued there as a report stamped with the time of the step (Received right
//! after the offer arrived, …, Committed), and removed once the server has
//! acknowledged it. A thread subscribed to the shared outbox tree sees both, for
//! every agent, without a hook in the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use flotilla_agent::patch::journal::Phase;
use flotilla_agent::patch::outbox::Report;

use crate::fleet::unix_ms;

/// One agent's steps with the watched manifest.
#[derive(Debug, Clone, Default)]
pub struct AgentPatch {
    /// When each phase was reached (the report's stamp, Unix ms), by
    /// `Phase::ALL` index.
    pub reached: [Option<i64>; Phase::ALL.len()],
    /// When the server acknowledged each phase's report (seen by the watcher).
    pub acked: [Option<i64>; Phase::ALL.len()],
    /// The final phase, once reached.
    pub outcome: Option<Phase>,
    pub error: String,
}

impl AgentPatch {
    pub fn reached(&self, phase: Phase) -> Option<i64> {
        self.reached[index(phase)]
    }

    pub fn acked(&self, phase: Phase) -> Option<i64> {
        self.acked[index(phase)]
    }

    /// Final, and the server has the final report.
    pub fn settled(&self) -> bool {
        self.outcome.is_some_and(|p| self.acked(p).is_some())
    }
}

fn index(phase: Phase) -> usize {
    Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0)
}

#[derive(Debug, Default)]
struct State {
    manifest_id: Option<String>,
    agents: HashMap<u32, AgentPatch>,
    /// Outbox keys of the watched manifest's reports not yet acknowledged.
    queued: HashMap<Vec<u8>, (u32, Phase)>,
    /// Reports about other manifests.
    others: u64,
    undecodable: u64,
}

/// What the watcher thread saw.
pub struct PatchWatch {
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The agent of an outbox key `a<i>/<8-byte sequence number>`.
pub fn agent_of(key: &[u8]) -> Option<u32> {
    let ns = key.get(..key.len().checked_sub(9)?)?;
    if key.get(ns.len()) != Some(&b'/') {
        return None;
    }
    std::str::from_utf8(ns.strip_prefix(b"a")?)
        .ok()?
        .parse()
        .ok()
}

impl State {
    fn insert(&mut self, key: &[u8], value: &[u8]) {
        let Ok(report) = serde_json::from_slice::<Report>(value) else {
            self.undecodable += 1;
            return;
        };
        let (Some(agent), Some(watched)) = (agent_of(key), self.manifest_id.as_deref()) else {
            self.others += 1;
            return;
        };
        if report.manifest_id != watched {
            self.others += 1;
            return;
        }
        let a = self.agents.entry(agent).or_default();
        let i = index(report.phase);
        // The first report of a phase counts (a resumed step may report again).
        a.reached[i].get_or_insert(report.at_unix_ms);
        if report.phase.is_final() && a.outcome.is_none() {
            a.outcome = Some(report.phase);
            a.error = report.error;
        }
        self.queued.insert(key.to_vec(), (agent, report.phase));
    }

    fn remove(&mut self, key: &[u8], now_ms: i64) {
        if let Some((agent, phase)) = self.queued.remove(key) {
            let a = self.agents.entry(agent).or_default();
            a.acked[index(phase)].get_or_insert(now_ms);
        }
    }
}

impl PatchWatch {
    /// Subscribes to the shared outbox tree of `db` and starts the watcher thread.
    ///
    /// The thread blocks on sled's iterator, which ends when the database closes.
    /// Not `next_timeout`: in sled 0.34 it reports a slow event as disconnected
    /// and never gets past a reservation whose write was retried (a lost
    /// compare-and-swap), so it would stall for good; the iterator skips those.
    pub fn start(db: &sled::Db) -> anyhow::Result<Self> {
        let sub = db.open_tree("outbox")?.watch_prefix(Vec::new());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::Builder::new()
            .name("outbox-watch".into())
            .spawn(move || {
                for event in sub {
                    match event {
                        sled::Event::Insert { key, value } => lock(&st).insert(&key, &value),
                        sled::Event::Remove { key } => lock(&st).remove(&key, unix_ms()),
                    }
                }
            })?;
        Ok(Self { state })
    }

    /// Watches reports about `manifest_id` from now on.
    pub fn track(&self, manifest_id: &str) {
        lock(&self.state).manifest_id = Some(manifest_id.to_string());
    }

    /// Each agent's steps so far.
    pub fn snapshot(&self) -> HashMap<u32, AgentPatch> {
        lock(&self.state).agents.clone()
    }

    /// (settled agents, agents with an outcome): cheap enough to poll.
    pub fn progress(&self) -> (usize, usize) {
        let s = lock(&self.state);
        let settled = s.agents.values().filter(|a| a.settled()).count();
        let decided = s.agents.values().filter(|a| a.outcome.is_some()).count();
        (settled, decided)
    }

    /// (reports about other manifests, undecodable reports).
    pub fn ignored(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.others, s.undecodable)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(agent: u32, seq: u64) -> Vec<u8> {
        let mut k = format!("a{agent}/").into_bytes();
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    fn report(id: &str, phase: Phase, at: i64) -> Vec<u8> {
        let mut r = Report::new(id, phase, "", "");
        r.at_unix_ms = at;
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn keys_name_their_agent() {
        assert_eq!(agent_of(&key(7, 1)), Some(7));
        assert_eq!(agent_of(&key(12345, u64::MAX)), Some(12345));
        assert_eq!(agent_of(b"a7/short"), None);
        assert_eq!(agent_of(b"x"), None);
        let mut bad = b"b7/".to_vec();
        bad.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(agent_of(&bad), None);
    }

    #[test]
    fn steps_and_acknowledgements_are_timed_per_agent() {
        let mut s = State {
            manifest_id: Some("p".into()),
            ..State::default()
        };
        s.insert(&key(1, 1), &report("p", Phase::Received, 100));
        s.insert(&key(1, 2), &report("p", Phase::Committed, 300));
        s.insert(&key(2, 1), &report("other", Phase::Received, 100));
        s.insert(&key(2, 2), b"not json");
        assert!(!s.agents[&1].settled());
        s.remove(&key(1, 2), 350);
        s.remove(&key(9, 9), 400);
        let a = &s.agents[&1];
        assert_eq!(a.reached(Phase::Received), Some(100));
        assert_eq!(a.reached(Phase::Committed), Some(300));
        assert_eq!(a.acked(Phase::Committed), Some(350));
        assert_eq!(a.acked(Phase::Received), None);
        assert_eq!(a.outcome, Some(Phase::Committed));
        assert!(a.settled());
        assert_eq!((s.others, s.undecodable), (1, 1));
    }

    #[test]
    fn the_watcher_sees_a_shared_outbox() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let w = PatchWatch::start(&db).unwrap();
        w.track("p");
        let store = flotilla_agent::Store::open_shared(
            &db,
            "a3",
            &tempfile::tempdir().unwrap().path().join("a3"),
        )
        .unwrap();
        let outbox =
            flotilla_agent::patch::outbox::Outbox::open(store.tree("outbox").unwrap()).unwrap();
        outbox
            .push(Report::new("p", Phase::Committed, "", ""))
            .unwrap();
        for (seq, _) in outbox.pending().unwrap() {
            outbox.ack(seq).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while w.progress() != (1, 1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(w.progress(), (1, 1));
        assert!(w.snapshot()[&3].acked(Phase::Committed).is_some());
    }
}
