//! The live fleet: node and group records cached in memory, open sessions and their
//! liveness, and the reconciler that assigns roles and pushes each node's desired
//! state the moment it changes. Liveness lives here only: heartbeats never write
//! to the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::membership::{self, Member, Policy};
use crate::model::PatchRecord;
use crate::model::{GroupRecord, NodeRecord, NodeStatus, Role, keys, now_secs};
use crate::replica::{Held, Leadership};
use crate::store::{Db, Revision};

mod apply;
mod desired;
mod groups;
mod offer;
mod order;
mod placement;
mod published;
mod quiet;
mod rollout_commands;
mod rollout_view;
mod rollouts;
pub mod search;
mod sites;
mod view;

pub use desired::{Desired, SignedManifest};
use flotilla_proto::manifest::Manifest;
pub use groups::{GroupConfig, GroupSettings, GroupStatus};
pub use published::PatchInfo;
pub use rollout_view::{RolloutBrief, RolloutGroup, RolloutInfo, WaveProgress};
use rollouts::PhaseNote;
pub use rollouts::RolloutRequest;
pub use sites::{ServingAgent, SitePeer, SiteView};
use view::Known;

use crate::rollout::plan::Waiting;
use crate::rollout::record::RolloutRecord;

/// Wake-ups of the reconciler within this are taken in one pass.
const RECONCILE_COALESCE: Duration = Duration::from_millis(10);

/// Timing of liveness and roles.
#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// How long an active node may be offline before a standby replaces it.
    pub offline_grace: Duration,
    /// After a server start, how long nobody is declared lost.
    pub startup_grace: Duration,
}

/// A node's open session, as the fleet tracks it.
struct Session {
    id: u64,
    desired: watch::Sender<Desired>,
    cancel: CancellationToken,
}

/// What a newly opened session gets.
pub struct SessionGrant {
    pub id: u64,
    pub desired: watch::Receiver<Desired>,
    /// Cancelled when the node is revoked or a newer session replaces this one.
    pub cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeRecord>,
    groups: BTreeMap<String, GroupRecord>,
    /// Deleted groups' last revisions: a group made again goes on from there.
    retired_groups: HashMap<String, u64>,
    sessions: HashMap<String, Session>,
    /// When each node seen since start went offline. Nodes never seen since the
    /// server started count as offline since the start.
    offline_since: HashMap<String, Instant>,
    last_seen: HashMap<String, i64>,
    published: HashMap<String, GroupStatus>,
    /// Published patches with their parsed manifests, by id.
    patches: BTreeMap<String, (PatchRecord, Manifest)>,
    /// Each published patch as desired states carry it: the manifest's bytes
    /// are shared by every node's state, not copied into each.
    signed: HashMap<String, SignedManifest>,
    /// The size of each delta file a published patch's delta index lists, by
    /// digest: artifacts too, to fetch from another replica and to serve.
    delta_sizes: HashMap<String, u64>,
    /// Each patch's rollout, by patch id.
    rollouts: BTreeMap<String, RolloutRecord>,
    /// Patch id -> node id -> the last phase the node reported.
    phases: HashMap<String, HashMap<String, PhaseNote>>,
    /// Patch id -> group -> what the group waited for at the last step.
    waiting: HashMap<String, BTreeMap<String, Waiting>>,
    /// Patch id -> what its rollout waits for while another step would change nothing.
    quiet: HashMap<String, quiet::Quiet>,
    /// Patch id -> progress changes of its nodes noted so far: a step that
    /// was being written meanwhile does not settle quiet (see `quiet`).
    noted: HashMap<String, u64>,
    /// Held key of another replica -> the nodes whose sessions it holds.
    remote: HashMap<String, Vec<String>>,
    /// Node -> how many of those keys list it: online on another replica.
    remote_count: HashMap<String, u32>,
    /// The trust policy's versions, by version.
    trust: BTreeMap<u64, flotilla_proto::trust::SignedPolicy>,
    /// Group -> the accepted nodes that listen for site peers (see `sites`).
    site_capable: HashMap<String, std::collections::BTreeSet<String>>,
    /// The stored bytes of the node, group and rollout records above, by key:
    /// what this replica's writes expect (see `view`).
    known: HashMap<String, Known>,
}

impl State {
    /// Whether the node holds a session, here or on another replica.
    fn online(&self, node_id: &str) -> bool {
        self.sessions.contains_key(node_id) || self.remote_count.contains_key(node_id)
    }

    fn add_published(&mut self, record: PatchRecord, manifest: Manifest) {
        let signed = SignedManifest {
            id: record.id.clone(),
            manifest: record.manifest.clone().into_bytes().into(),
            signatures: record.signatures.clone(),
            deltas: record.deltas.clone().into_bytes().into(),
        };
        if !record.deltas.is_empty() {
            // Checked at publish; a record that no longer parses offers no
            // delta files to fetch (the agents fall back to full artifacts).
            match flotilla_proto::delta::DeltaIndex::parse(record.deltas.as_bytes()) {
                Ok(index) => {
                    for d in index.deltas {
                        self.delta_sizes.insert(d.sha256, d.size);
                    }
                }
                Err(e) => {
                    tracing::error!(patch = %record.id, error = %e, "stored delta index does not parse")
                }
            }
        }
        self.signed.insert(record.id.clone(), signed);
        self.patches.insert(record.id.clone(), (record, manifest));
    }

    /// The fleet's patch revision: the highest publish sequence. Part of every
    /// node's desired-state revision.
    fn patch_revision(&self) -> u64 {
        self.patches.values().map(|(r, _)| r.seq).max().unwrap_or(0)
    }
}

/// The live fleet. One per server process.
pub struct Fleet {
    db: Db,
    cfg: FleetConfig,
    started: Instant,
    state: Mutex<State>,
    wake: Notify,
    group_events: broadcast::Sender<GroupStatus>,
    next_session: AtomicU64,
    /// Wakes the rollout controller.
    rollout_wake: Notify,
    /// Set when nodes come, go or change: completed rollouts look again.
    membership_changed: AtomicBool,
    rollout_events: broadcast::Sender<String>,
    /// The nodes whose sessions this server holds, as its replica records them.
    held: Arc<Held>,
    /// Whether this server leads the fleet's singletons (role assignment, the
    /// rollout controller), and the fence of their writes.
    leadership: std::sync::RwLock<Leadership>,
    /// The store revision the view was first read at: the follower goes on from it.
    loaded_at: Revision,
    /// Since when this server leads (None: it does not). The startup grace
    /// counts from then: a replica that takes over from a dead leader
    /// declares nobody lost while the dead one's agents reconnect.
    leading_since: std::sync::Mutex<Option<Instant>>,
    /// One role assignment at a time in this replica: assignments of one
    /// group racing each other (a burst of joins) would only conflict.
    assigning: Mutex<()>,
}

impl Fleet {
    /// Loads every node, group, patch, rollout and patch state from the
    /// store; `run_follower` keeps them current from then on.
    pub async fn load(db: Db, cfg: FleetConfig) -> Result<Arc<Self>> {
        let (group_events, _) = broadcast::channel(1024);
        let (rollout_events, _) = broadcast::channel(4096);
        let mut fleet = Self {
            db,
            cfg,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            group_events,
            next_session: AtomicU64::new(1),
            rollout_wake: Notify::new(),
            membership_changed: AtomicBool::new(true),
            rollout_events,
            held: Arc::new(Held::default()),
            leadership: std::sync::RwLock::new(Leadership::sole()),
            loaded_at: 0,
            leading_since: std::sync::Mutex::new(None),
            assigning: Mutex::new(()),
        };
        fleet.loaded_at = fleet.read_view().await?;
        Ok(Arc::new(fleet))
    }

    /// The nodes whose sessions this server holds, kept current.
    pub fn held(&self) -> Arc<Held> {
        self.held.clone()
    }

    /// Leads (or not) as `leadership` says, from now on; without it, this
    /// fleet leads alone.
    pub fn lead_with(&self, leadership: Leadership) {
        *self.leadership.write().expect("leadership") = leadership;
        self.wake.notify_one();
        self.rollout_wake.notify_one();
    }

    fn leadership(&self) -> Leadership {
        self.leadership.read().expect("leadership").clone()
    }

    /// Whether this replica leads (runs the fleet's singletons).
    pub fn is_leading(&self) -> bool {
        self.leadership().is_leading()
    }

    /// Accepted nodes offline for `grace` or longer: (id, group, for how long).
    /// A node not seen since this replica started counts from the start.
    pub async fn offline_past(&self, grace: Duration) -> Vec<(String, String, Duration)> {
        let st = self.state.lock().await;
        let now = Instant::now();
        st.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Accepted && !st.online(&n.id))
            .filter_map(|n| {
                let since = st.offline_since.get(&n.id).copied().unwrap_or(self.started);
                let d = now.saturating_duration_since(since);
                (d >= grace).then(|| (n.id.clone(), n.group.clone(), d))
            })
            .collect()
    }

    /// Wakes the reconciler and the rollout controller after a change.
    fn changed(&self) {
        self.wake.notify_one();
        self.membership_changed.store(true, Ordering::Relaxed);
        self.rollout_wake.notify_one();
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// Registers a node's new session, replacing (and ending) an older one.
    pub async fn open_session(&self, node_id: &str) -> Result<SessionGrant> {
        let mut st = self.state.lock().await;
        let node = st
            .nodes
            .get(node_id)
            .ok_or_else(|| Error::PermissionDenied(format!("node {node_id} is not known")))?;
        match node.status {
            NodeStatus::Revoked => {
                return Err(Error::PermissionDenied(format!(
                    "node {node_id} has been revoked"
                )));
            }
            NodeStatus::Rejected => {
                return Err(Error::PermissionDenied(format!(
                    "node {node_id} was rejected by an operator"
                )));
            }
            NodeStatus::Pending | NodeStatus::Accepted => {}
        }
        let desired = self.desired_of(&st, node);
        let (tx, rx) = watch::channel(desired);
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        if let Some(old) = st.sessions.insert(
            node_id.to_string(),
            Session {
                id,
                desired: tx,
                cancel: cancel.clone(),
            },
        ) {
            old.cancel.cancel();
        }
        self.held.insert(node_id);
        st.offline_since.remove(node_id);
        st.last_seen.insert(node_id.to_string(), now_secs());
        drop(st);
        self.changed();
        Ok(SessionGrant {
            id,
            desired: rx,
            cancel,
        })
    }

    /// Records the end of a session (if it is still the node's current one).
    pub async fn close_session(&self, node_id: &str, session_id: u64) {
        let mut st = self.state.lock().await;
        if st.sessions.get(node_id).is_some_and(|s| s.id == session_id) {
            st.sessions.remove(node_id);
            self.held.remove(node_id);
            st.offline_since.insert(node_id.to_string(), Instant::now());
            st.last_seen.insert(node_id.to_string(), now_secs());
            drop(st);
            self.changed();
        }
    }

    /// Updates a node's facts if the agent reports new ones.
    pub async fn update_facts(&self, node_id: &str, facts: crate::model::Facts) -> Result<()> {
        self.mutate(false, |st| {
            let writes = match st.nodes.get(node_id) {
                Some(node) if node.facts != facts => {
                    let mut node = node.clone();
                    node.facts = facts.clone();
                    vec![st.write(keys::node(node_id), &node)]
                }
                _ => Vec::new(),
            };
            Ok((writes, ()))
        })
        .await
    }

    /// The node bound to a machine id, if any.
    pub async fn node_by_machine(&self, machine_id: &str) -> Result<Option<NodeRecord>> {
        let Some(id) = self.db.get::<String>(&keys::machine(machine_id)).await? else {
            return Ok(None);
        };
        Ok(self.state.lock().await.nodes.get(&id).cloned())
    }

    /// Stores a node record (new or re-joined) and reconciles its group;
    /// with `bind_machine`, its machine id names it from now on.
    pub async fn save_node(&self, node: NodeRecord, bind_machine: bool) -> Result<NodeRecord> {
        self.mutate(false, |st| {
            let mut node = node.clone();
            if let Some(old) = st.nodes.get(&node.id) {
                // A re-join into another group keeps its agent's revision growing.
                node.revision = node.revision.max(st.next_revision(old, &node.group));
            }
            let mut writes = Vec::new();
            if !st.groups.contains_key(&node.group) {
                writes.push(st.new_group(GroupRecord::unmanaged(&node.group)));
            }
            writes.push(st.write(keys::node(&node.id), &node));
            if bind_machine {
                writes.push(State::overwrite(
                    keys::machine(&node.facts.machine_id),
                    &node.id,
                ));
            }
            Ok((writes, ()))
        })
        .await?;
        self.reconcile(&node.group).await?;
        self.stored_node(&node.id).await
    }

    /// The node's record as the view has it now.
    async fn stored_node(&self, node_id: &str) -> Result<NodeRecord> {
        self.state
            .lock()
            .await
            .nodes
            .get(node_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {node_id} not found")))
    }

    /// Records a node's renewed certificate.
    pub async fn set_certificate(&self, node_id: &str, cert: &crate::ca::IssuedCert) -> Result<()> {
        let (serial, not_after) = (cert.serial_hex.as_str(), cert.not_after);
        self.mutate(false, |st| {
            let mut node = st
                .nodes
                .get(node_id)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("node {node_id} not found")))?;
            if node.cert_serial == serial {
                return Ok((Vec::new(), ()));
            }
            node.prev_cert_serial = std::mem::replace(&mut node.cert_serial, serial.to_string());
            node.cert_not_after = not_after;
            node.public_key = cert.public_key_hex.clone();
            Ok((vec![st.write(keys::node(node_id), &node)], ()))
        })
        .await
    }

    /// Whether a node presenting the certificate with `serial` may hold a session
    /// or make a call: it must be known, neither revoked nor rejected, and the
    /// certificate its current one (or the one just before a renewal).
    pub async fn check_node_allowed(&self, node_id: &str, serial: &str) -> Result<NodeRecord> {
        let st = self.state.lock().await;
        let node = st
            .nodes
            .get(node_id)
            .ok_or_else(|| Error::PermissionDenied(format!("node {node_id} is not known")))?;
        if serial != node.cert_serial
            && (node.prev_cert_serial.is_empty() || serial != node.prev_cert_serial)
        {
            return Err(Error::Unauthenticated(format!(
                "this certificate of node {node_id} has been replaced (the node joined again or renewed); it is no longer accepted"
            )));
        }
        match node.status {
            NodeStatus::Revoked => Err(Error::PermissionDenied(format!(
                "node {node_id} has been revoked"
            ))),
            NodeStatus::Rejected => Err(Error::PermissionDenied(format!(
                "node {node_id} was rejected by an operator"
            ))),
            _ => Ok(node.clone()),
        }
    }

    /// Changes a node's status (accept, reject, revoke). Rejecting or revoking ends
    /// its session at once (on whichever replica holds it).
    pub async fn set_node_status(&self, node_id: &str, to: NodeStatus) -> Result<NodeRecord> {
        let group = self
            .mutate(false, |st| {
                let mut node = st
                    .nodes
                    .get(node_id)
                    .cloned()
                    .ok_or_else(|| Error::NotFound(format!("node {node_id} not found")))?;
                let allowed = match (node.status, to) {
                    (NodeStatus::Pending, NodeStatus::Accepted | NodeStatus::Rejected) => true,
                    (NodeStatus::Pending | NodeStatus::Accepted, NodeStatus::Revoked) => true,
                    (from, to) => from == to,
                };
                if !allowed {
                    return Err(Error::FailedPrecondition(format!(
                        "node {node_id} is {}; it cannot become {}",
                        node.status.as_str(),
                        to.as_str()
                    )));
                }
                if node.status == to {
                    return Ok((Vec::new(), node.group));
                }
                node.status = to;
                node.role = Role::Standby;
                node.revision += 1;
                Ok((vec![st.write(keys::node(node_id), &node)], node.group))
            })
            .await?;
        self.reconcile(&group).await?;
        self.stored_node(node_id).await
    }

    /// Node records with their online state and last-seen time.
    pub async fn nodes(&self, group: Option<&str>) -> Result<Vec<(NodeRecord, bool, i64)>> {
        let st = self.state.lock().await;
        if let Some(g) = group {
            Self::require_group(&st, g)?;
        }
        let mut out: Vec<_> = st
            .nodes
            .values()
            .filter(|n| group.is_none_or(|g| g == n.group))
            .map(|n| {
                (
                    n.clone(),
                    st.online(&n.id),
                    st.last_seen.get(&n.id).copied().unwrap_or(n.last_seen),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.group.cmp(&b.0.group).then(a.0.id.cmp(&b.0.id)));
        Ok(out)
    }

    pub async fn node(&self, id: &str) -> Option<(NodeRecord, bool, i64)> {
        let st = self.state.lock().await;
        st.nodes.get(id).map(|n| {
            (
                n.clone(),
                st.online(id),
                st.last_seen.get(id).copied().unwrap_or(n.last_seen),
            )
        })
    }

    /// Assigns roles in one group where this replica leads, stores the changes
    /// (fenced; the nodes hear of them as they apply), and publishes the
    /// group's status.
    async fn reconcile(&self, name: &str) -> Result<()> {
        let _one = self.assigning.lock().await;
        self.mutate(true, |st| Ok((self.assign_roles(st, name), ())))
            .await
    }

    /// The role changes one group needs now (none unless this replica leads).
    fn assign_roles(&self, st: &mut State, name: &str) -> Vec<view::Write> {
        self.publish_status(st, name);
        let Some(since) = self.leading_since() else {
            // Roles are the leader's to assign.
            return Vec::new();
        };
        let now = Instant::now();
        let members: Vec<Member> = st
            .nodes
            .values()
            .filter(|n| n.group == name && n.status == NodeStatus::Accepted)
            .map(|n| {
                let online = st.online(&n.id);
                let since = st.offline_since.get(&n.id).copied().unwrap_or(self.started);
                Member {
                    id: n.id.clone(),
                    role: n.role,
                    joined_at: n.joined_at,
                    online,
                    offline_for: (!online).then(|| now.saturating_duration_since(since)),
                }
            })
            .collect();
        let desired = st.groups.get(name).and_then(|g| g.desired);
        let policy = Policy {
            grace: self.cfg.offline_grace,
            starting: now.saturating_duration_since(since) < self.cfg.startup_grace,
        };
        let assignment = membership::assign_roles(desired, &members, policy);
        if let Some(hold) = assignment.held {
            let lost = members.iter().any(|m| {
                m.role == Role::Active && m.offline_for.is_some_and(|d| d >= self.cfg.offline_grace)
            });
            if lost {
                tracing::warn!(group = name, ?hold, "not replacing lost active nodes yet");
            }
        }
        let mut writes = Vec::new();
        for (id, role) in assignment.changes {
            let Some(mut node) = st.nodes.get(&id).cloned() else {
                continue;
            };
            tracing::info!(node = %id, group = name, from = ?node.role, to = ?role, "role change");
            node.role = role;
            node.revision += 1;
            writes.push(st.write(keys::node(&id), &node));
        }
        writes
    }

    /// Reconciles every group: on wake-ups, and when the next grace period ends.
    pub async fn run_reconciler(self: Arc<Self>, shutdown: CancellationToken) {
        let mut leadership = self.leadership();
        loop {
            let pass_started = Instant::now();
            let names: Vec<String> = self.state.lock().await.groups.keys().cloned().collect();
            for name in names {
                if let Err(e) = self.reconcile(&name).await {
                    tracing::error!(group = %name, error = %e, "reconcile failed");
                }
            }
            let next = self.next_deadline(&*self.state.lock().await);
            let pass = pass_started.elapsed();
            let sleep = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let leading = leadership.is_leading();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                // Taking the lead means assigning roles at once.
                _ = leadership.acquired(), if !leading => {}
            }
            leadership = self.leadership();
            // In a reconnect storm every session opening wakes this: passes
            // over a large fleet leave twice their time to the sessions.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECONCILE_COALESCE.max(pass * 2)) => {}
            }
        }
    }

    /// Since when this server leads, or None; noted the first time it is
    /// asked after leading began.
    fn leading_since(&self) -> Option<Instant> {
        let mut since = self.leading_since.lock().expect("leading since");
        if self.leadership().is_leading() {
            Some(*since.get_or_insert_with(Instant::now))
        } else {
            *since = None;
            None
        }
    }

    /// When an offline active node's grace ends, or the startup grace does.
    fn next_deadline(&self, st: &State) -> Option<Instant> {
        let now = Instant::now();
        let startup_end = self.leading_since().unwrap_or(self.started) + self.cfg.startup_grace;
        let mut next: Option<Instant> = (startup_end > now).then_some(startup_end);
        for n in st.nodes.values() {
            if n.status == NodeStatus::Accepted && n.role == Role::Active && !st.online(&n.id) {
                let since = st.offline_since.get(&n.id).copied().unwrap_or(self.started);
                // A little past the deadline so the check sees it expired.
                let at = since + self.cfg.offline_grace + Duration::from_millis(10);
                if at > now {
                    next = Some(next.map_or(at, |x| x.min(at)));
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests;
