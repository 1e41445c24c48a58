//! Sites: the nodes of a group that share a place (and its uplink), told
//! apart by the value of the group's site label (`site` unless the group
//! sets another).

use std::collections::BTreeMap;

use super::{Fleet, State};
use crate::model::{DEFAULT_SITE_LABEL, NodeRecord, NodeStatus};

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
                });
            v.nodes += 1;
            if st.online(&n.id) {
                v.online += 1;
            }
        }
        sites.into_values().collect()
    }
}
