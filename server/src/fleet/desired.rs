//! What each node is told: its desired state (role, group count, the patches
//! released to it, rollbacks), built from the view and pushed the moment it
//! changes.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::trust::SignedPolicy;

use super::{Fleet, State};
use crate::model::{NodeRecord, NodeStatus, Role};

/// A published patch as desired states carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    pub id: String,
    /// The manifest JSON, byte for byte as signed; shared by every node's state.
    pub manifest: Bytes,
    /// minisign signatures (.minisig text), one per signer.
    pub signatures: Vec<String>,
    /// The delta index published with it (`deltas.json`), exactly as sent;
    /// empty when none. Untrusted by the agents, so sent as it is.
    pub deltas: Bytes,
}

/// One node's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Only grows (see the invariants in ARCHITECTURE.md).
    pub revision: u64,
    pub node_id: String,
    pub group: String,
    /// The group's desired count; None when it has none (every node active).
    pub desired_count: Option<u32>,
    pub status: NodeStatus,
    pub role: Role,
    pub heartbeat_interval: Duration,
    pub manifests: Vec<SignedManifest>,
    /// Patches to download ahead of their install.
    pub prefetch: Vec<SignedManifest>,
    pub labels: BTreeMap<String, String>,
    /// Committed patches to undo (their rollouts were aborted with rollback).
    pub rollback: Vec<String>,
    /// Trust policy versions newer than the one the node holds, oldest first.
    pub trust: Vec<SignedPolicy>,
    /// The site's agents that may serve it artifacts, best first (not part
    /// of the revision).
    pub site_peers: Vec<super::SitePeer>,
    /// When it was made (for the push latency metric).
    pub made_at: MadeAt,
}

/// When a desired state was made: not part of what a node is told, so every
/// stamp equals every other.
#[derive(Debug, Clone, Copy)]
pub struct MadeAt(pub std::time::Instant);

impl PartialEq for MadeAt {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for MadeAt {}

impl State {
    /// The newest trust policy version: part of every desired-state revision
    /// (versions only grow).
    pub(super) fn trust_version(&self) -> u64 {
        self.trust.keys().next_back().copied().unwrap_or(0)
    }
}

impl Fleet {
    /// A trust policy version the view did not have: every session hears of it.
    pub(super) fn apply_trust(&self, st: &mut State, record: crate::trust::PolicyRecord) {
        if st.trust.contains_key(&record.version) {
            return;
        }
        st.trust.insert(record.version, record.signed());
        let held: Vec<String> = st.sessions.keys().cloned().collect();
        for id in held {
            self.push(st, &id);
        }
    }

    pub(super) fn desired_of(&self, st: &State, node: &NodeRecord) -> Desired {
        let group = st.groups.get(&node.group);
        Desired {
            revision: node.revision
                + group.map_or(0, |g| g.revision)
                + st.patch_revision()
                + st.rollout_revision()
                + st.trust_version(),
            node_id: node.id.clone(),
            group: node.group.clone(),
            desired_count: group.and_then(|g| g.desired),
            status: node.status,
            role: node.role,
            heartbeat_interval: self.cfg.heartbeat_interval,
            manifests: st.offered_manifests(node),
            prefetch: st.prefetched_manifests(node),
            labels: node.labels.clone(),
            rollback: st.rollbacks_for(&node.group, &node.id),
            trust: st
                .trust
                .range(node.facts.trust_version + 1..)
                .take(flotilla_proto::trust::MAX_CHAIN)
                .map(|(_, p)| p.clone())
                .collect(),
            site_peers: st.site_peers_for(node),
            made_at: MadeAt(std::time::Instant::now()),
        }
    }

    /// Sends a node its current desired state if it has a session.
    pub(super) fn push(&self, st: &State, node_id: &str) {
        if let (Some(session), Some(node)) = (st.sessions.get(node_id), st.nodes.get(node_id)) {
            let desired = self.desired_of(st, node);
            session.desired.send_if_modified(|cur| {
                if cur.revision < desired.revision {
                    *cur = desired;
                    true
                } else {
                    false
                }
            });
        }
    }
}
