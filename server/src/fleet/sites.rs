//! Sites: the nodes of a group that share a place (and its uplink), told
//! apart by the value of the group's site label (`site` unless the group
//! sets another); which agent serves a site's artifacts to the others, and
//! what a serving agent may hand a peer.

use std::collections::BTreeMap;

use super::{Fleet, State};
use crate::error::{Error, Result};
use crate::model::{DEFAULT_SITE_LABEL, NodeRecord, NodeStatus};

/// Most site peers a node is told of: the serving agent, then fallbacks.
pub const MAX_SITE_PEERS: usize = 3;

/// An agent that may serve its site's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePeer {
    pub node_id: String,
    /// https://IP:PORT of its site service.
    pub url: String,
}

/// The agent serving a site, as `flotilla sites` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingAgent {
    pub node_id: String,
    pub url: String,
    /// Its operator marked it (else the server chose it).
    pub marked: bool,
    pub cache_files: u32,
    pub cache_bytes: u64,
}

/// One site as `flotilla sites` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteView {
    pub group: String,
    /// The label whose value names it, and that value.
    pub label: String,
    pub site: String,
    /// Accepted nodes, and those online now.
    pub nodes: u32,
    pub online: u32,
    pub serving: Option<ServingAgent>,
}

impl State {
    /// A node's site as `group/site`, None when it has no site label.
    pub(super) fn site_key(&self, node: &NodeRecord) -> Option<String> {
        let label = self
            .groups
            .get(&node.group)
            .map_or(DEFAULT_SITE_LABEL, |g| g.site_label());
        node.labels
            .get(label)
            .map(|site| format!("{}/{site}", node.group))
    }
}

impl Fleet {
    /// Node `node_id`'s site as `group/site` (None: unknown node, or no site).
    pub async fn site_of(&self, node_id: &str) -> Option<String> {
        let st = self.state.lock().await;
        st.nodes.get(node_id).and_then(|n| st.site_key(n))
    }

    /// Every site (of one group, or all), by group then site.
    pub async fn sites(&self, group: Option<&str>) -> Vec<SiteView> {
        let st = self.state.lock().await;
        let mut sites: BTreeMap<(String, String), SiteView> = BTreeMap::new();
        for n in st.nodes.values() {
            if n.status != NodeStatus::Accepted || group.is_some_and(|g| g != n.group) {
                continue;
            }
            let label = st
                .groups
                .get(&n.group)
                .map_or(DEFAULT_SITE_LABEL, |g| g.site_label());
            let Some(site) = n.labels.get(label) else {
                continue;
            };
            let v = sites
                .entry((n.group.clone(), site.clone()))
                .or_insert_with(|| SiteView {
                    group: n.group.clone(),
                    label: label.to_string(),
                    site: site.clone(),
                    nodes: 0,
                    online: 0,
                    serving: None,
                });
            v.nodes += 1;
            if st.online(&n.id) {
                v.online += 1;
            }
        }
        let mut sites: Vec<SiteView> = sites.into_values().collect();
        for v in &mut sites {
            let key = format!("{}/{}", v.group, v.site);
            v.serving = st.site_servers(&key).first().map(|n| ServingAgent {
                node_id: n.id.clone(),
                url: n.facts.site_url.clone(),
                marked: n.facts.serve_site,
                cache_files: n.facts.site_cache_files,
                cache_bytes: n.facts.site_cache_bytes,
            });
        }
        sites
    }

    /// Whether `node_id` is the agent serving its site now.
    pub async fn serves_its_site(&self, node_id: &str) -> bool {
        let st = self.state.lock().await;
        st.nodes
            .get(node_id)
            .and_then(|n| st.site_key(n))
            .and_then(|site| st.site_servers(&site).first().map(|s| s.id == node_id))
            .unwrap_or(false)
    }

    /// May the agent `server_id` (the caller, already checked to be an
    /// allowed node) hand artifact `sha256` to its site peer `peer_id`? Yes,
    /// with the artifact's size, when the peer is an accepted node at the
    /// caller's site and the artifact (or a delta of one) belongs to a patch
    /// offered to the peer now, to install or to download ahead.
    pub async fn authorize_site_peer(
        &self,
        server_id: &str,
        peer_id: &str,
        sha256: &str,
    ) -> Result<u64> {
        let st = self.state.lock().await;
        let peer = st
            .nodes
            .get(peer_id)
            .filter(|n| n.status == NodeStatus::Accepted)
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "{peer_id} is not an accepted node of this fleet (unknown, pending, rejected or revoked)"
                ))
            })?;
        let server_site = st.nodes.get(server_id).and_then(|n| st.site_key(n));
        let peer_site = st.site_key(peer);
        if server_site.is_none() || server_site != peer_site {
            return Err(Error::PermissionDenied(format!(
                "{peer_id} is not at the site of {server_id} ({} against {})",
                peer_site.as_deref().unwrap_or("no site"),
                server_site.as_deref().unwrap_or("no site"),
            )));
        }
        let offered = st
            .offer_for(peer)
            .offered
            .into_iter()
            .chain(st.prefetch_for(peer))
            .map(|r| r.id.clone())
            .collect::<Vec<_>>();
        let mut indexes = Vec::new();
        for id in &offered {
            if let Some((_, m)) = st.patches.get(id)
                && let Some(a) = m.artifacts.iter().find(|a| a.sha256 == sha256)
            {
                return Ok(a.size);
            }
            if let Some(s) = st.signed.get(id)
                && !s.deltas.is_empty()
            {
                indexes.push(s.deltas.clone());
            }
        }
        // Delta indexes are parsed with the fleet's lock let go: every
        // session, report and offer waits on it.
        drop(st);
        for deltas in indexes {
            if let Ok(index) = flotilla_proto::delta::DeltaIndex::parse(&deltas)
                && let Some(d) = index.deltas.iter().find(|d| d.sha256 == sha256)
            {
                return Ok(d.size);
            }
        }
        Err(Error::PermissionDenied(format!(
            "artifact {sha256} belongs to no patch offered to {peer_id} now"
        )))
    }
}

impl State {
    /// Indexes node `node_id`'s ability to serve its site, as its record
    /// stands now (`old_group`: its group before): agents that listen for
    /// peers, by group.
    pub(super) fn index_site_server(&mut self, old_group: Option<&str>, node_id: &str) {
        if let Some(g) = old_group
            && let Some(ids) = self.site_capable.get_mut(g)
        {
            ids.remove(node_id);
            if ids.is_empty() {
                self.site_capable.remove(g);
            }
        }
        if let Some(n) = self.nodes.get(node_id)
            && n.status == NodeStatus::Accepted
            && !n.facts.site_url.is_empty()
        {
            let group = n.group.clone();
            self.site_capable
                .entry(group)
                .or_default()
                .insert(node_id.to_string());
        }
    }

    /// The agents that may serve site `site` (`group/value`), best first:
    /// online, accepted, listening for peers; those their operator marked
    /// before the others, then the longest enrolled (so the choice is the
    /// same on every replica and stays while the chosen agent does).
    pub(super) fn site_servers(&self, site: &str) -> Vec<&NodeRecord> {
        let Some((group, _)) = site.split_once('/') else {
            return Vec::new();
        };
        let mut found: Vec<&NodeRecord> = self
            .site_capable
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|id| self.nodes.get(id))
            .filter(|n| {
                n.status == NodeStatus::Accepted
                    && !n.facts.site_url.is_empty()
                    && self.online(&n.id)
                    && self.site_key(n).as_deref() == Some(site)
            })
            .collect();
        found.sort_by(|a, b| {
            (!a.facts.serve_site, a.enrolled_at, &a.id).cmp(&(
                !b.facts.serve_site,
                b.enrolled_at,
                &b.id,
            ))
        });
        found
    }

    /// The site peers `node` is told of: its site's serving agents but
    /// itself, best first. None when it serves the site itself: its
    /// downloads fill the site's cache from the servers.
    pub(super) fn site_peers_for(&self, node: &NodeRecord) -> Vec<SitePeer> {
        let Some(site) = self.site_key(node) else {
            return Vec::new();
        };
        let servers = self.site_servers(&site);
        if servers.first().is_some_and(|s| s.id == node.id) {
            return Vec::new();
        }
        servers
            .into_iter()
            .filter(|s| s.id != node.id)
            .take(MAX_SITE_PEERS)
            .map(|s| SitePeer {
                node_id: s.id.clone(),
                url: s.facts.site_url.clone(),
            })
            .collect()
    }
}
