//! What a node's desired state offers: the patches released to it that it has
//! not finished, oldest first, as many as one message carries. A node with more
//! in flight gets the rest as the first ones finish, so no applicable patch
//! silently stops being offered.

use super::State;
use super::published::wants;
use crate::model::NodeRecord;
use crate::model::PatchRecord;

/// Most patches one desired state carries.
pub(super) const MAX_MANIFESTS_PER_STATE: usize = 64;
/// Most patches one desired state offers to download ahead (oldest first; the
/// rest follow as those are released).
const MAX_PREFETCH_PER_STATE: usize = 8;
/// Bytes of manifests and signatures one desired state carries, well under the
/// message limit.
const MANIFEST_BYTES_PER_STATE: usize = flotilla_proto::limits::MAX_MESSAGE_BYTES / 2;

/// The patches offered to one node now.
pub(super) struct Offer<'a> {
    /// In publish order.
    pub offered: Vec<&'a PatchRecord>,
    /// Released to the node and unfinished, but beyond what one state carries:
    /// offered as earlier ones finish.
    pub queued: Vec<&'a PatchRecord>,
}

impl State {
    /// Whether the node reported an outcome of the patch (its journal has it:
    /// offering it again would change nothing).
    fn finished_on(&self, patch_id: &str, node_id: &str) -> bool {
        self.phases
            .get(patch_id)
            .and_then(|p| p.get(node_id))
            .is_some_and(|n| n.phase.is_final())
    }

    pub(super) fn offer_for(&self, node: &NodeRecord) -> Offer<'_> {
        let now = time::OffsetDateTime::now_utc();
        let mut wanted: Vec<&PatchRecord> = self
            .patches
            .values()
            .filter(|(r, m)| {
                wants(node, m, now)
                    && self.released_to(&r.id, &node.group, &node.id)
                    && !self.finished_on(&r.id, &node.id)
            })
            .map(|(r, _)| r)
            .collect();
        wanted.sort_by_key(|r| r.seq);
        let mut budget = MANIFEST_BYTES_PER_STATE;
        let mut fits = 0;
        for r in wanted.iter().take(MAX_MANIFESTS_PER_STATE) {
            let size = r.manifest.len()
                + r.deltas.len()
                + r.signatures.iter().map(String::len).sum::<usize>();
            // The first always goes: a single patch is within the limits by itself.
            if fits > 0 && size > budget {
                break;
            }
            budget = budget.saturating_sub(size);
            fits += 1;
        }
        let queued = wanted.split_off(fits);
        Offer {
            offered: wanted,
            queued,
        }
    }

    /// Patches the node may download ahead of its install: targeted, not
    /// released to it yet, their rollout downloading ahead in its group, not
    /// finished there and not overtaken by a newer version; oldest first.
    pub(super) fn prefetch_for(&self, node: &NodeRecord) -> Vec<&PatchRecord> {
        let now = time::OffsetDateTime::now_utc();
        let mut ahead: Vec<&PatchRecord> = self
            .patches
            .values()
            .filter(|(r, m)| {
                self.may_download_ahead(&r.id, node)
                    && wants(node, m, now)
                    && !self.finished_on(&r.id, &node.id)
            })
            .map(|(r, _)| r)
            .collect();
        ahead.sort_by_key(|r| r.seq);
        ahead.truncate(MAX_PREFETCH_PER_STATE);
        ahead
    }

    /// Whether `patch_id`'s rollout lets this node download it ahead now.
    pub(super) fn may_download_ahead(&self, patch_id: &str, node: &NodeRecord) -> bool {
        let Some(r) = self.rollouts.get(patch_id) else {
            return false;
        };
        if r.is_released(&node.group, &node.id) || !self.downloads_ahead(r, &node.group) {
            return false;
        }
        self.newer_than(patch_id)
            .is_none_or(|newer| self.superseding(&newer, &node.group, &node.id).is_none())
    }

    /// The manifests a node's desired state offers to download ahead.
    pub(super) fn prefetched_manifests(&self, node: &NodeRecord) -> Vec<super::SignedManifest> {
        self.prefetch_for(node)
            .into_iter()
            .filter_map(|r| self.signed.get(&r.id).cloned())
            .collect()
    }

    /// The manifests a node's desired state carries.
    pub(super) fn offered_manifests(&self, node: &NodeRecord) -> Vec<super::SignedManifest> {
        self.offer_for(node)
            .offered
            .into_iter()
            .filter_map(|r| self.signed.get(&r.id).cloned())
            .collect()
    }

    /// Whether the node's session here was sent a desired state that lacks a
    /// patch offered to it now (one that was queued behind a full state).
    pub(super) fn offers_more(&self, node_id: &str) -> bool {
        let (Some(session), Some(node)) = (self.sessions.get(node_id), self.nodes.get(node_id))
        else {
            return false;
        };
        let sent = session.desired.borrow();
        self.offer_for(node)
            .offered
            .iter()
            .any(|r| !sent.manifests.iter().any(|m| m.id == r.id))
    }

    /// Whether `patch_id` is released to the node but waits behind a full
    /// desired state.
    pub(super) fn queued_for(&self, patch_id: &str, node: &NodeRecord) -> bool {
        self.offer_for(node).queued.iter().any(|r| r.id == patch_id)
    }
}
