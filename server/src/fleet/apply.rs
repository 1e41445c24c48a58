//! Applying stored records to the fleet's view, whichever way they come:
//! this replica's own commits (from the store's answer) and every replica's
//! writes from the store's feed. A record is applied only when newer than
//! what the view has of it, so the two ways meet in revision order; applying
//! one tells whoever it concerns (sessions held here, group watchers,
//! rollout watchers) and wakes the reconciler and rollout controller as
//! needed. Also: another replica's held nodes (online here too).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use flotilla_proto::manifest::Manifest;
use flotilla_proto::phase::Phase;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::rollouts::PhaseNote;
use super::view::{Effects, Known};
use super::{Fleet, State};
use crate::error::Result;
use crate::model::{GroupRecord, NodePatchRecord, NodeRecord, NodeStatus, PatchRecord, keys};
use crate::replica::{HELD, HeldRecord, held_owner};
use crate::rollout::record::{self as rollout_record, RolloutRecord, RolloutState};
use crate::store::{Feed, FeedItem, Revision};

/// Feed items applied under one taking of the fleet's lock, at most.
const FOLLOW_BATCH: usize = 256;

/// Whether the view follows `key`.
pub(super) fn followed(key: &str) -> bool {
    [
        keys::NODES,
        keys::GROUPS,
        keys::PATCHES,
        rollout_record::PREFIX,
        keys::PATCH_STATES,
        HELD,
        crate::trust::PREFIX,
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

/// Keys whose last bytes the view keeps for compare-and-swap.
fn tracked(key: &str) -> bool {
    key.starts_with(keys::NODES)
        || key.starts_with(keys::GROUPS)
        || key.starts_with(rollout_record::PREFIX)
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes)
        .inspect_err(
            |e| tracing::error!(%key, error = %e, "stored record does not decode; skipped"),
        )
        .ok()
}

impl Fleet {
    /// Publishes the status of each group that what was applied changed,
    /// once (a burst of node records costs one count per group, not one per
    /// node). Called before the lock is let go.
    pub(super) fn publish_statuses(&self, st: &mut State, fx: &mut Effects) {
        for g in std::mem::take(&mut fx.statuses) {
            self.publish_status(st, &g);
        }
    }

    /// Applies `key`'s value (None: deleted) as of `revision`, unless the view
    /// already has it from then or later.
    pub(super) fn apply(
        &self,
        st: &mut State,
        key: &str,
        value: Option<&[u8]>,
        revision: Revision,
        fx: &mut Effects,
    ) {
        if tracked(key) {
            if let Some(k) = st.known.get_mut(key) {
                if k.revision >= revision {
                    return;
                }
                if k.bytes.as_deref() == value {
                    k.revision = revision;
                    return;
                }
            }
            st.known.insert(
                key.to_string(),
                Known {
                    revision,
                    bytes: value.map(Arc::from),
                },
            );
        }
        if key.starts_with(HELD) {
            self.apply_held(st, key, value, fx);
            return;
        }
        let Some(value) = value else {
            // Records are marked, never deleted; a deletion made by hand
            // leaves the view as it was until the next start.
            return;
        };
        if key.starts_with(keys::NODES) {
            if let Some(n) = decode::<NodeRecord>(key, value) {
                self.apply_node(st, n, fx);
            }
        } else if key.starts_with(keys::GROUPS) {
            if let Some(g) = decode::<GroupRecord>(key, value) {
                self.apply_group(st, g, fx);
            }
        } else if key.starts_with(rollout_record::PREFIX) {
            if let Some(r) = decode::<RolloutRecord>(key, value) {
                self.apply_rollout(st, r, fx);
            }
        } else if key.starts_with(crate::trust::PREFIX) {
            if let Some(r) = decode::<crate::trust::PolicyRecord>(key, value) {
                self.apply_trust(st, r);
            }
        } else if key.starts_with(keys::PATCHES) {
            if let Some(p) = decode::<PatchRecord>(key, value) {
                self.apply_patch(st, p, fx);
            }
        } else if let Some(rest) = key.strip_prefix(keys::PATCH_STATES)
            && let Some((patch, _)) = rest.split_once('/')
            && let Some(r) = decode::<NodePatchRecord>(key, value)
        {
            // Stored names are always a phase's; one that is not counts as
            // no progress, as a node that only received the patch.
            let note = PhaseNote {
                phase: Phase::parse(&r.phase).unwrap_or(Phase::Received),
                error: r.error,
                at_ms: r.updated_at_ms,
            };
            self.apply_phase(st, patch, &r.node_id, note, fx);
        }
    }

    fn apply_node(&self, st: &mut State, node: NodeRecord, fx: &mut Effects) {
        let id = node.id.clone();
        let old = st.nodes.insert(id.clone(), node);
        st.index_site_server(old.as_ref().map(|o| o.group.as_str()), &id);
        let new = &st.nodes[&id];
        let moved = old.as_ref().is_none_or(|o| {
            o.group != new.group
                || o.status != new.status
                || o.role != new.role
                || o.labels != new.labels
        });
        if !moved {
            // Facts, certificate or installed versions: the node's desired
            // state changes only with its revision.
            if old.is_some_and(|o| o.revision != st.nodes[&id].revision) {
                self.push(st, &id);
            }
            return;
        }
        fx.changed = true;
        let group = new.group.clone();
        if matches!(new.status, NodeStatus::Revoked | NodeStatus::Rejected)
            && let Some(session) = st.sessions.remove(&id)
        {
            // Wherever it was revoked, the session this replica holds ends.
            session.cancel.cancel();
            self.held.remove(&id);
            st.offline_since.insert(id.clone(), Instant::now());
        }
        if let Some(o) = old
            && o.group != group
        {
            fx.statuses.insert(o.group);
        }
        fx.statuses.insert(group);
        self.push(st, &id);
    }

    /// Another replica's held nodes changed (None: its lease ran out): the
    /// nodes it let go are offline from now unless held elsewhere.
    fn apply_held(&self, st: &mut State, key: &str, value: Option<&[u8]>, fx: &mut Effects) {
        if held_owner(key) == Some(self.leadership().id()) {
            return;
        }
        let nodes = value
            .and_then(|v| decode::<HeldRecord>(key, v))
            .map(|r| r.nodes)
            .unwrap_or_default();
        let old = if nodes.is_empty() {
            st.remote.remove(key)
        } else {
            st.remote.insert(key.to_string(), nodes.clone())
        }
        .unwrap_or_default();
        let before: HashSet<&String> = old.iter().collect();
        let after: HashSet<&String> = nodes.iter().collect();
        let (now, now_secs) = (Instant::now(), crate::model::now_secs());
        let mut groups = BTreeSet::new();
        for n in before.difference(&after) {
            if let Some(c) = st.remote_count.get_mut(*n) {
                *c -= 1;
                if *c == 0 {
                    st.remote_count.remove(*n);
                }
            }
            if !st.online(n) {
                st.offline_since.insert(n.to_string(), now);
                st.last_seen.insert(n.to_string(), now_secs);
            }
            groups.extend(st.nodes.get(*n).map(|x| x.group.clone()));
        }
        for n in after.difference(&before) {
            *st.remote_count.entry(n.to_string()).or_default() += 1;
            st.offline_since.remove(*n);
            st.last_seen.insert(n.to_string(), now_secs);
            groups.extend(st.nodes.get(*n).map(|x| x.group.clone()));
        }
        if !groups.is_empty() {
            fx.changed = true;
            for g in groups {
                fx.statuses.insert(g);
            }
        }
    }

    fn apply_group(&self, st: &mut State, g: GroupRecord, fx: &mut Effects) {
        fx.changed = true;
        fx.groups = true;
        let name = g.name.clone();
        if g.deleted {
            st.groups.remove(&name);
            st.published.remove(&name);
            st.retired_groups.insert(name, g.revision);
            return;
        }
        st.retired_groups.remove(&name);
        st.groups.insert(name.clone(), g);
        fx.statuses.insert(name.clone());
        let ids: Vec<String> = st
            .nodes
            .values()
            .filter(|n| n.group == name)
            .map(|n| n.id.clone())
            .collect();
        for id in ids {
            self.push(st, &id);
        }
    }

    fn apply_patch(&self, st: &mut State, record: PatchRecord, fx: &mut Effects) {
        if st.patches.contains_key(&record.id) {
            return;
        }
        match Manifest::parse(record.manifest.as_bytes()) {
            Ok(m) => {
                fx.rollout_wake = true;
                let id = record.id.clone();
                st.add_published(record, m);
                // Its rollout may have come first (one transaction).
                self.tell_targeted(st, &id, false);
            }
            Err(e) => {
                tracing::error!(patch = %record.id, error = %e, "stored patch does not parse; skipped")
            }
        }
    }

    fn apply_rollout(&self, st: &mut State, r: RolloutRecord, fx: &mut Effects) {
        let id = r.patch_id.clone();
        let old = st.rollouts.insert(id.clone(), r);
        let new = &st.rollouts[&id];
        // Who must hear of it: every released node when what it means for
        // them changed (abort, rollback), else the newly released, and when
        // an aborted rollout rolls back, those that committed since.
        let everyone = old
            .as_ref()
            .is_none_or(|o| o.state != new.state || o.rollback != new.rollback);
        let undo = new.state == RolloutState::Aborted
            && new.rollback
            && old.as_ref().is_some_and(|o| o.revision != new.revision);
        let phases = st.phases.get(&id);
        let committed = |n: &str| {
            phases
                .and_then(|p| p.get(n))
                .is_some_and(|x| matches!(x.phase, Phase::Committed | Phase::Reverting))
        };
        let tell: Vec<String> = new
            .groups
            .iter()
            .flat_map(|(g, p)| {
                let before = old.as_ref().and_then(|o| o.groups.get(g));
                p.released.iter().filter(move |n| {
                    everyone
                        || before.is_none_or(|b| !b.released.contains(*n))
                        || (undo && committed(n))
                })
            })
            .cloned()
            .collect();
        // Nodes not released yet may download ahead, or must stop: a new
        // rollout tells those it lets download ahead, one whose state changed
        // every node it targets.
        if everyone {
            self.tell_targeted(st, &id, old.is_some());
        }
        // Another step may now change something.
        st.quiet.remove(&id);
        if !new.state.releases() {
            st.waiting.remove(&id);
        }
        for n in &tell {
            self.push(st, n);
        }
        fx.rollout_wake = true;
        fx.rollouts.insert(id);
    }

    /// Pushes the desired state of the nodes patch `id` targets that may
    /// download it ahead (`all`: every node it targets).
    fn tell_targeted(&self, st: &State, id: &str, all: bool) {
        let Some((_, m)) = st.patches.get(id) else {
            return;
        };
        let now = time::OffsetDateTime::now_utc();
        let tell: Vec<&str> = st
            .nodes
            .values()
            .filter(|n| super::published::wants(n, m, now) && (all || st.may_download_ahead(id, n)))
            .map(|n| n.id.as_str())
            .collect();
        for n in tell {
            self.push(st, n);
        }
    }

    /// Records a node's phase of a patch (unless the view has a newer report);
    /// returns the phase it replaced, or None when nothing changed.
    pub(super) fn apply_phase(
        &self,
        st: &mut State,
        patch_id: &str,
        node_id: &str,
        note: PhaseNote,
        fx: &mut Effects,
    ) -> Option<Option<Phase>> {
        let phases = st.phases.entry(patch_id.to_string()).or_default();
        if let Some(cur) = phases.get(node_id)
            && (cur.at_ms > note.at_ms || (cur.at_ms == note.at_ms && cur.phase == note.phase))
        {
            return None;
        }
        let phase = note.phase;
        let before = phases.insert(node_id.to_string(), note).map(|n| n.phase);
        let (from, to) = (
            super::rollouts::progress_of_phase(before),
            super::rollouts::progress_of_phase(Some(phase)),
        );
        // Phases between release and outcome change nothing a step looks at.
        if from != to {
            if st.note_progress(node_id, patch_id, from, to) {
                fx.rollout_wake = true;
            }
            // Progress (applying, done, failed) is what `rollout watch` shows.
            fx.rollouts.insert(patch_id.to_string());
        }
        Some(before)
    }

    /// Reads every record the view follows, as of one revision.
    pub(super) async fn read_view(&self) -> Result<Revision> {
        let mut entries = Vec::new();
        let revision = self
            .db
            .raw()
            .visit_snapshot("", &mut |k, v, _| {
                if followed(k) {
                    entries.push((k.to_string(), v.to_vec()));
                }
                Ok(())
            })
            .await?;
        let mut fx = Effects::default();
        let mut st = self.state.lock().await;
        // Patches before the patch states and rollouts that refer to them.
        entries.sort_by_key(|(k, _)| !k.starts_with(keys::PATCHES));
        for (k, v) in &entries {
            self.apply(&mut st, k, Some(v), revision, &mut fx);
        }
        self.publish_statuses(&mut st, &mut fx);
        Ok(revision)
    }

    /// Keeps the view current with every replica's writes, from `after` on.
    pub async fn run_follower(self: Arc<Self>, shutdown: CancellationToken) {
        let mut feed = Feed::after(self.db.raw().clone(), "", self.loaded_at);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = feed.next() => item,
            };
            let mut fx = Effects::default();
            {
                let mut st = self.state.lock().await;
                self.apply_item(&mut st, first, &mut fx);
                // What else has arrived meanwhile goes in under the same lock.
                for _ in 0..FOLLOW_BATCH {
                    match feed.next().now_or_never() {
                        Some(item) => self.apply_item(&mut st, item, &mut fx),
                        None => break,
                    }
                }
                self.publish_statuses(&mut st, &mut fx);
            }
            self.fire(fx);
        }
    }

    fn apply_item(&self, st: &mut State, item: FeedItem, fx: &mut Effects) {
        match item {
            FeedItem::Change(change) => {
                for event in &change.events {
                    let (key, value) = match event {
                        crate::store::Event::Put { key, value } => (key, Some(&value[..])),
                        crate::store::Event::Delete { key } => (key, None),
                    };
                    if followed(key) {
                        self.apply(st, key, value, change.revision, fx);
                    }
                }
            }
            FeedItem::Reset { revision, entries } => {
                let mut entries: Vec<_> =
                    entries.into_iter().filter(|(k, _)| followed(k)).collect();
                let present: HashSet<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
                let gone: Vec<String> = st
                    .known
                    .keys()
                    .chain(st.remote.keys())
                    .filter(|k| !present.contains(k.as_str()))
                    .cloned()
                    .collect();
                drop(present);
                entries.sort_by_key(|(k, _)| !k.starts_with(keys::PATCHES));
                for (k, v) in &entries {
                    self.apply(st, k, Some(v), revision, fx);
                }
                for k in gone {
                    self.apply(st, &k, None, revision, fx);
                }
            }
        }
    }
}
