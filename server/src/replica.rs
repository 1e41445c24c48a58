//! This server as one replica of its fleet: its registration in the store
//! (`replicas/<id>`, under a lease of its own, with its address and how many
//! sessions it holds), the nodes whose sessions it holds (`held/<id>/<n>`,
//! under the same lease: written when they change, at most once a renewal,
//! so a dead replica's nodes read as offline when its lease runs out), and
//! the election of the one leader that runs the fleet's singletons (the
//! rollout controller, role assignment).
//!
//! The leader is whoever holds `leader/current` (under its lease). A leader's
//! singleton writes are **fenced**: a transaction that also checks the key
//! still names it, so a replica that was paused or cut off past its lease, and
//! still believes it leads, has its writes refused rather than applied twice.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Condition, Db, Event, FeedItem, LeaseId, Op, Store, StoreError};

pub mod init;

pub const REPLICAS: &str = "replicas/";
pub const LEADER_PREFIX: &str = "leader/";
pub const LEADER: &str = "leader/current";
/// How long a replica that stopped renewing stays registered (and leads).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// `held/<replica>/<chunk>`: the nodes a replica holds sessions of.
pub const HELD: &str = "held/";
/// Most node ids one held key carries (well under etcd's request limit);
/// one transaction carries every chunk.
const HELD_CHUNK: usize = 8192;

/// The nodes whose agent sessions this replica holds, as the fleet keeps them.
#[derive(Default)]
pub struct Held {
    nodes: std::sync::Mutex<BTreeSet<String>>,
    /// Grows on every change: the replica writes when it moved.
    version: AtomicU64,
}

impl Held {
    pub fn insert(&self, node: &str) {
        if self.nodes.lock().expect("held").insert(node.to_string()) {
            self.version.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn remove(&self, node: &str) {
        if self.nodes.lock().expect("held").remove(node) {
            self.version.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.nodes.lock().expect("held").len() as u64
    }

    /// The nodes held now, unless they are still those of version `seen`.
    fn changed_since(&self, seen: Option<u64>) -> Option<(u64, Vec<String>)> {
        let nodes = self.nodes.lock().expect("held");
        let version = self.version.load(Ordering::Relaxed);
        (seen != Some(version)).then(|| (version, nodes.iter().cloned().collect()))
    }
}

/// One chunk of a replica's held nodes, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub nodes: Vec<String>,
}

fn held_key(replica: &str, chunk: usize) -> String {
    format!("{HELD}{replica}/{chunk:04}")
}

/// The replica a held key belongs to.
pub fn held_owner(key: &str) -> Option<&str> {
    key.strip_prefix(HELD)?.split_once('/').map(|(r, _)| r)
}

/// What a replica says of itself in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    /// The address agents and operators reach it on.
    pub url: String,
    pub host: String,
    pub pid: u32,
    pub started_at_ms: i64,
    /// Agent sessions it holds.
    pub sessions: u64,
    pub version: String,
}

/// Whether this replica leads, and the condition that fences its writes.
#[derive(Clone)]
pub struct Leadership {
    id: String,
    leading: watch::Receiver<bool>,
    /// For [`Leadership::sole`]: the sender nobody changes, kept alive.
    _sole: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until this replica leads.
    pub async fn acquired(&mut self) {
        let _ = self.leading.wait_for(|l| *l).await;
    }

    /// Waits until it no longer does.
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|l| !*l).await;
    }

    /// The replica this is ("" for [`Leadership::sole`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What a fenced write also checks: the leader key still names this
    /// replica. None for [`Leadership::sole`], which has no key.
    pub fn fence(&self) -> Option<Condition> {
        self._sole
            .is_none()
            .then(|| Condition::Equals(LEADER.into(), self.id.as_bytes().to_vec()))
    }

    /// A leadership that always leads, for a fleet without replicas (tests
    /// of the fleet alone).
    pub fn sole() -> Self {
        let (tx, leading) = watch::channel(true);
        Self {
            id: String::new(),
            leading,
            _sole: Some(Arc::new(tx)),
        }
    }
}

/// This replica.
pub struct Replica {
    db: Db,
    record: ReplicaRecord,
    held: Arc<Held>,
    leading: watch::Sender<bool>,
}

/// This machine's name, as replicas and the etcd hold name their holder.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Replica {
    /// A new replica id: the host, the process and a random part.
    pub fn new_id() -> String {
        format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        )
    }

    /// Registers this replica as `id` and starts campaigning; both go on until
    /// `shutdown`, when the lease is revoked (another replica leads at once).
    /// `held` is the nodes it holds sessions of, written when they change.
    pub fn start(
        db: Db,
        id: String,
        url: String,
        held: Arc<Held>,
        shutdown: CancellationToken,
    ) -> (Leadership, tokio::task::JoinHandle<()>) {
        let record = ReplicaRecord {
            id: id.clone(),
            url,
            host: hostname(),
            pid: std::process::id(),
            started_at_ms: crate::model::now_ms(),
            sessions: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let (leading, rx) = watch::channel(false);
        let me = Arc::new(Self {
            db,
            record,
            held,
            leading,
        });
        let task = tokio::spawn(me.run(shutdown));
        let leadership = Leadership {
            id,
            leading: rx,
            _sole: None,
        };
        (leadership, task)
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.db.raw()
    }

    fn set_leading(&self, now: bool) {
        let was = self.leading.send_replace(now);
        if was != now {
            if now {
                tracing::info!(replica = %self.record.id, "this replica leads");
            } else {
                tracing::warn!(replica = %self.record.id, "this replica no longer leads");
            }
        }
    }

    async fn register(&self, lease: LeaseId, sessions: u64) -> Result<(), StoreError> {
        let record = ReplicaRecord {
            sessions,
            ..self.record.clone()
        };
        let value = serde_json::to_vec(&record).expect("records serialise");
        let key = format!("{REPLICAS}{}", self.record.id);
        self.store()
            .txn(
                vec![],
                vec![Op::Put {
                    key,
                    value,
                    lease: Some(lease),
                }],
            )
            .await
            .map(drop)
    }

    /// Stores the nodes held now, under the lease, in as many chunks as they
    /// need (and deletes the chunks of a longer list before). Returns how
    /// many chunks it wrote.
    async fn write_held(
        &self,
        lease: LeaseId,
        nodes: &[String],
        before: usize,
    ) -> Result<usize, StoreError> {
        let chunks: Vec<&[String]> = nodes.chunks(HELD_CHUNK).collect();
        let mut ops: Vec<Op> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| Op::Put {
                key: held_key(&self.record.id, i),
                value: serde_json::to_vec(&HeldRecord { nodes: c.to_vec() })
                    .expect("records serialise"),
                lease: Some(lease),
            })
            .collect();
        ops.extend((chunks.len()..before).map(|i| Op::Delete(held_key(&self.record.id, i))));
        if !ops.is_empty() {
            self.store().txn(vec![], ops).await?;
        }
        Ok(chunks.len())
    }

    /// Takes the leader key if nobody holds it; whether this replica leads.
    async fn campaign(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let id = self.record.id.as_bytes().to_vec();
        let took = self
            .store()
            .txn(
                vec![Condition::Absent(LEADER.into())],
                vec![Op::Put {
                    key: LEADER.into(),
                    value: id.clone(),
                    lease: Some(lease),
                }],
            )
            .await?;
        if took.is_some() {
            return Ok(true);
        }
        Ok(self.store().get(LEADER).await?.is_some_and(|v| v == id))
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut leader_feed = crate::store::Feed::new(self.store().clone(), LEADER_PREFIX);
        let mut retry = Duration::from_millis(100);
        'incarnation: loop {
            self.set_leading(false);
            let lease = match self.store().grant_lease(LEASE_TTL).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register this replica; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(LEASE_TTL);
                    continue;
                }
            };
            retry = Duration::from_millis(100);
            let mut registered: Option<u64> = None;
            // The held nodes' version last written, and its chunk count.
            let mut held_written: Option<u64> = None;
            let mut held_chunks = 0;
            // When the lease was last renewed, counted from before the request
            // was sent: the lease outlives that by LEASE_TTL at least.
            let mut renewed = Instant::now();
            loop {
                let sent = Instant::now();
                // A renewal that does not answer within a third of the lease
                // counts as failed: the replica steps down in time, not after
                // the store client's own (longer) timeout.
                let renewal =
                    tokio::time::timeout(LEASE_TTL / 3, self.store().keep_alive(lease)).await;
                match renewal {
                    Ok(Ok(true)) => renewed = sent,
                    Ok(Ok(false)) => {
                        tracing::warn!(replica = %self.record.id, "this replica's lease ran out; registering again");
                        continue 'incarnation;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew this replica's lease"),
                    Err(_) => tracing::warn!("renewing this replica's lease took too long"),
                }
                // Not sure of the lease any more: stop leading before it can
                // have run out (fencing refuses any write after that anyway).
                if renewed.elapsed() >= LEASE_TTL * 2 / 3 {
                    self.set_leading(false);
                }
                if let Some((version, nodes)) = self.held.changed_since(held_written) {
                    match self.write_held(lease, &nodes, held_chunks).await {
                        Ok(n) => {
                            held_chunks = n;
                            held_written = Some(version);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot record the sessions this replica holds")
                        }
                    }
                }
                let sessions = self.held.count();
                if registered != Some(sessions) && self.register(lease, sessions).await.is_ok() {
                    registered = Some(sessions);
                }
                if renewed.elapsed() < LEASE_TTL * 2 / 3 {
                    match self.campaign(lease).await {
                        Ok(leads) => self.set_leading(leads),
                        Err(e) => tracing::warn!(error = %e, "cannot reach the store to campaign"),
                    }
                }
                // Renew every third of the TTL; campaign at once when the
                // leader key goes.
                let tick = tokio::time::sleep(LEASE_TTL / 3);
                tokio::pin!(tick);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            self.set_leading(false);
                            // The leader key and the registration go with it.
                            let _ = self.store().revoke(lease).await;
                            return;
                        }
                        _ = &mut tick => break,
                        item = leader_feed.next() => {
                            let gone = match item {
                                FeedItem::Reset { entries, .. } => entries.is_empty(),
                                FeedItem::Change(c) => c
                                    .events
                                    .iter()
                                    .any(|e| matches!(e, Event::Delete { .. })),
                            };
                            if gone {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every registered replica, with whether it leads.
pub async fn list(db: &Db) -> Result<Vec<(ReplicaRecord, bool)>, StoreError> {
    let leader = db
        .raw()
        .get(LEADER)
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let replicas: Vec<ReplicaRecord> = db.list(REPLICAS).await?;
    Ok(replicas
        .into_iter()
        .map(|r| {
            let leads = leader.as_deref() == Some(r.id.as_str());
            (r, leads)
        })
        .collect())
}

#[cfg(test)]
mod tests;
