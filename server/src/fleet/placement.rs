//! Where a node sits, as an operator changes it without a re-join: its labels
//! and its group. The node's desired state follows at once, and its revision
//! keeps growing across a move between groups.

use std::collections::BTreeMap;

use super::Fleet;
use crate::error::{Error, Result};
use crate::model::{NodeRecord, NodeStatus, Role, keys};

impl super::State {
    /// The revision `node` takes when it changes, into group `to`: its
    /// desired-state revision is its own plus its group's (plus fleet-wide
    /// counters), so a group that counts less is made up for, and it grows.
    pub(super) fn next_revision(&self, node: &NodeRecord, to: &str) -> u64 {
        let rev = |g: &str| self.groups.get(g).map_or(0, |g| g.revision);
        (node.revision + rev(&node.group) + 1)
            .saturating_sub(rev(to))
            .max(node.revision + 1)
    }
}

impl Fleet {
    /// Sets the labels in `set` (a value replaces the one there) and removes
    /// those named in `remove`.
    pub async fn set_node_labels(
        &self,
        node_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<NodeRecord> {
        let group = self
            .mutate(false, |st| {
                let mut node = Self::live_node(st, node_id)?;
                let mut labels = node.labels.clone();
                for k in remove {
                    labels.remove(k);
                }
                labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                flotilla_proto::limits::check_labels(labels.iter())
                    .map_err(|e| Error::InvalidArgument(format!("invalid labels: {e}")))?;
                if labels == node.labels {
                    return Ok((Vec::new(), node.group));
                }
                node.labels = labels;
                node.revision += 1;
                Ok((vec![st.write(keys::node(node_id), &node)], node.group))
            })
            .await?;
        // Rollouts spread by labels look again.
        self.reconcile(&group).await?;
        self.stored_node(node_id).await
    }

    /// Moves a node to another existing group. It starts there as a standby
    /// (the group's role assignment takes it from there) and its desired-state
    /// revision goes on growing, whatever the two groups' revisions.
    pub async fn move_node(&self, node_id: &str, to: &str) -> Result<NodeRecord> {
        let from = self
            .mutate(false, |st| {
                let mut node = Self::live_node(st, node_id)?;
                Self::require_group(st, to)?;
                if node.group == to {
                    return Ok((Vec::new(), node.group));
                }
                let from = node.group.clone();
                node.revision = st.next_revision(&node, to);
                node.group = to.to_string();
                node.role = Role::Standby;
                Ok((vec![st.write(keys::node(node_id), &node)], from))
            })
            .await?;
        self.reconcile(&from).await?;
        self.reconcile(to).await?;
        self.stored_node(node_id).await
    }

    /// A node an operator may still place: known, not revoked or rejected.
    fn live_node(st: &super::State, node_id: &str) -> Result<NodeRecord> {
        let node = st
            .nodes
            .get(node_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("node {node_id} not found")))?;
        match node.status {
            NodeStatus::Pending | NodeStatus::Accepted => Ok(node),
            s => Err(Error::FailedPrecondition(format!(
                "node {node_id} is {}; it cannot be changed",
                s.as_str()
            ))),
        }
    }
}
