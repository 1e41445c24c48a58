//! Finding nodes for the dashboard: filtered, sorted and paged under the
//! fleet's lock, so a page of a 10k-node fleet copies only the rows it shows;
//! and the sites and phases of one patch's nodes in one look.

use std::collections::{BTreeMap, HashMap};

use flotilla_proto::phase::Phase;

use super::Fleet;
use crate::model::{NodeRecord, NodeStatus, Role};

/// Which nodes a list shows. Every filter given must hold.
#[derive(Debug, Clone, Default)]
pub struct NodeQuery {
    /// Found in the node's id, hostname, or any label key or value
    /// (case-insensitive).
    pub text: String,
    pub group: Option<String>,
    /// `key` (the node has the label) or `key=value`.
    pub label: Option<(String, Option<String>)>,
    pub state: Option<NodeState>,
    /// With `phase`: the phase of this patch (None: of any patch).
    pub patch: Option<String>,
    /// The node's last reported phase (`none`: never reported).
    pub phase: Option<PhaseFilter>,
    pub offset: usize,
    pub limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseFilter {
    Is(Phase),
    /// No report (of that patch, or of any).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Online,
    Offline,
    Active,
    Standby,
    Pending,
    Rejected,
    Revoked,
}

impl NodeState {
    pub const ALL: [NodeState; 7] = [
        NodeState::Online,
        NodeState::Offline,
        NodeState::Active,
        NodeState::Standby,
        NodeState::Pending,
        NodeState::Rejected,
        NodeState::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Active => "active",
            Self::Standby => "standby",
            Self::Pending => "pending",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    fn holds(self, n: &NodeRecord, online: bool) -> bool {
        let accepted = n.status == NodeStatus::Accepted;
        match self {
            Self::Online => online,
            Self::Offline => !online && accepted,
            Self::Active => accepted && n.role == Role::Active,
            Self::Standby => accepted && n.role == Role::Standby,
            Self::Pending => n.status == NodeStatus::Pending,
            Self::Rejected => n.status == NodeStatus::Rejected,
            Self::Revoked => n.status == NodeStatus::Revoked,
        }
    }
}

/// One node as a list shows it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub node: NodeRecord,
    pub online: bool,
    pub last_seen: i64,
    /// Its last phase of the queried patch (or its newest report of any).
    pub phase: Option<(Phase, String)>,
}

#[derive(Debug, Clone)]
pub struct NodePage {
    /// Nodes matching the query, of which `rows` is the page asked for.
    pub total: usize,
    pub rows: Vec<NodeRow>,
}

/// A patch's nodes counted by site and phase.
#[derive(Debug, Clone, Default)]
pub struct SiteProgress {
    /// `group/site` (or `group` alone for nodes without a site label) ->
    /// phase name (`none` for no report) -> nodes.
    pub sites: BTreeMap<String, BTreeMap<String, u32>>,
}

fn matches_text(n: &NodeRecord, needle: &str) -> bool {
    let has = |s: &str| s.to_lowercase().contains(needle);
    needle.is_empty()
        || has(&n.id)
        || has(&n.facts.hostname)
        || n.labels.iter().any(|(k, v)| has(k) || has(v))
}

impl Fleet {
    /// The page of nodes `q` asks for, sorted by group then id.
    pub async fn find_nodes(&self, q: &NodeQuery) -> NodePage {
        let needle = q.text.trim().to_lowercase();
        let st = self.state.lock().await;
        let phase_of = |id: &str| -> Option<(Phase, String, i64)> {
            match &q.patch {
                Some(p) => st
                    .phases
                    .get(p)
                    .and_then(|m| m.get(id))
                    .map(|n| (n.phase, p.clone(), n.at_ms)),
                None => st
                    .phases
                    .iter()
                    .filter_map(|(p, m)| m.get(id).map(|n| (n.phase, p.clone(), n.at_ms)))
                    .max_by_key(|(_, _, at)| *at),
            }
        };
        let phase_holds = |id: &str| -> bool {
            match (q.phase, &q.patch) {
                (None, _) => true,
                (Some(PhaseFilter::None), _) => phase_of(id).is_none(),
                (Some(PhaseFilter::Is(want)), Some(_)) => {
                    phase_of(id).is_some_and(|(p, _, _)| p == want)
                }
                // Any patch in that phase (a node with a failed patch).
                (Some(PhaseFilter::Is(want)), None) => st
                    .phases
                    .values()
                    .any(|m| m.get(id).is_some_and(|n| n.phase == want)),
            }
        };
        let mut found: Vec<&NodeRecord> = st
            .nodes
            .values()
            .filter(|n| q.group.as_deref().is_none_or(|g| g == n.group))
            .filter(|n| match &q.label {
                None => true,
                Some((k, None)) => n.labels.contains_key(k),
                Some((k, Some(v))) => n.labels.get(k) == Some(v),
            })
            .filter(|n| q.state.is_none_or(|s| s.holds(n, st.online(&n.id))))
            .filter(|n| matches_text(n, &needle))
            .filter(|n| phase_holds(&n.id))
            .collect();
        found.sort_unstable_by(|a, b| a.group.cmp(&b.group).then(a.id.cmp(&b.id)));
        let total = found.len();
        let rows = found
            .into_iter()
            .skip(q.offset)
            .take(q.limit)
            .map(|n| NodeRow {
                online: st.online(&n.id),
                last_seen: st.last_seen.get(&n.id).copied().unwrap_or(n.last_seen),
                phase: phase_of(&n.id).map(|(p, patch, _)| (p, patch)),
                node: n.clone(),
            })
            .collect();
        NodePage { total, rows }
    }

    /// The nodes of `groups` counted by site and by their phase of `patch`.
    pub async fn site_progress(&self, patch: &str, groups: &[String]) -> SiteProgress {
        let st = self.state.lock().await;
        let empty = HashMap::new();
        let phases = st.phases.get(patch).unwrap_or(&empty);
        let mut out = SiteProgress::default();
        for n in st.nodes.values() {
            if n.status != NodeStatus::Accepted || !groups.contains(&n.group) {
                continue;
            }
            let site = st.site_key(n).unwrap_or_else(|| n.group.clone());
            let phase = phases.get(&n.id).map_or("none", |p| p.phase.as_str());
            *out.sites
                .entry(site)
                .or_default()
                .entry(phase.to_string())
                .or_default() += 1;
        }
        out
    }
}
