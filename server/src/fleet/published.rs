//! The published patches as the live fleet sees them: storing a verified patch
//! with its rollout, and which nodes a patch targets.

use flotilla_proto::manifest::{Manifest, NodeTarget};
use flotilla_proto::phase::Phase;

use super::{Fleet, RolloutRequest, State};
use crate::error::{Error, Result};
use crate::model::PatchRecord;
use crate::model::{NodeRecord, NodeStatus, keys, now_ms, now_secs};
use crate::rollout::record::{self as rollout_record, RolloutRecord, RolloutState};

fn target_of(n: &NodeRecord) -> NodeTarget {
    NodeTarget {
        group: n.group.clone(),
        labels: n.labels.clone(),
        os: n.facts.os.clone(),
        arch: n.facts.arch.clone(),
    }
}

/// Whether a patch is meant for a node now: accepted, targeted, not expired.
pub(super) fn wants(n: &NodeRecord, m: &Manifest, now: time::OffsetDateTime) -> bool {
    m.expires_at > now && targets(n, m)
}

/// Whether a patch targets a node, expired or not: an accepted node it was
/// (or is) meant for.
pub(super) fn targets(n: &NodeRecord, m: &Manifest) -> bool {
    n.status == NodeStatus::Accepted
        && (ignores_targets() || flotilla_proto::manifest::check_target(m, &target_of(n)).is_ok())
}

/// TEST-ONLY fault injection (cargo feature `fault-injection`, never in a
/// shipped build): with `FLOTILLA_FAULT_IGNORE_TARGETS=1` the server offers
/// every patch to every node, as a compromised server could, so the tests see
/// each agent's own target check refuse it.
#[cfg(feature = "fault-injection")]
fn ignores_targets() -> bool {
    static IGNORE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IGNORE.get_or_init(|| std::env::var("FLOTILLA_FAULT_IGNORE_TARGETS").is_ok_and(|v| v == "1"))
}

#[cfg(not(feature = "fault-injection"))]
fn ignores_targets() -> bool {
    false
}

impl Fleet {
    /// Stores a verified patch with its rollout and takes the rollout's first
    /// step: the nodes it releases are told at once.
    pub async fn add_patch(
        &self,
        manifest: String,
        signatures: Vec<String>,
        deltas: String,
        publisher: &str,
        parsed: Manifest,
        rollout: RolloutRequest,
    ) -> Result<PatchRecord> {
        let stored = self
            .mutate(false, |st| {
                if let Some((existing, _)) = st.patches.get(&parsed.id) {
                    if existing.manifest == manifest {
                        // Publishing the same signed bytes again is a no-op
                        // (the delta index of the first publish stays).
                        return Ok((Vec::new(), (existing.clone(), false)));
                    }
                    return Err(Error::FailedPrecondition(format!(
                        "a different patch with id {} is already published; give the new one its own id",
                        parsed.id
                    )));
                }
                let record = PatchRecord {
                    id: parsed.id.clone(),
                    seq: st.patch_revision() + 1,
                    manifest: manifest.clone(),
                    signatures: signatures.clone(),
                    published_at: now_secs(),
                    published_by: publisher.to_string(),
                    deltas: deltas.clone(),
                };
                let rollout = RolloutRecord::new(
                    &record.id,
                    rollout.policy.clone(),
                    rollout.emergency,
                    rollout.force,
                    now_ms(),
                );
                // One transaction: a patch is never without its rollout, so it
                // is never released to everyone; its number is its own.
                let writes = vec![
                    st.write(rollout_record::key(&record.id), &rollout),
                    State::create(keys::patch_seq(record.seq), &record.id),
                    State::create(keys::patch(&record.id), &record),
                ];
                Ok((writes, (record, true)))
            })
            .await?;
        let (record, new) = stored;
        if !new {
            return Ok(record);
        }
        {
            let st = self.state.lock().await;
            let now = time::OffsetDateTime::now_utc();
            let targeted = st.nodes.values().filter(|n| wants(n, &parsed, now)).count();
            tracing::info!(patch = %record.id, targeted, emergency = rollout.emergency, "patch published");
        }
        // Its first step at once, where this server leads (else the leader's
        // controller takes it).
        if self.leadership().is_leading() {
            self.step_rollouts(vec![record.id.clone()]).await;
        }
        self.rollout_wake.notify_one();
        Ok(record)
    }

    /// Whether `node_id` may report `phase` on `patch_id`: only an accepted
    /// node, only about a patch that exists and was offered to it, and only
    /// as far as it was offered. Released to it by the patch's rollout (in
    /// any group it was in), or, for a patch without one, targeted at it:
    /// any phase. Only offered to download ahead of its release (or reported
    /// on before, not released since): the phases a download can reach
    /// ([`may_report_ahead`]). Anything else would be false evidence in
    /// patch status, installed versions, rollout progress and compliance.
    /// Returns when the node last enrolled (unix seconds).
    pub async fn check_report(&self, node_id: &str, patch_id: &str, phase: Phase) -> Result<i64> {
        let st = self.state.lock().await;
        let node = st
            .nodes
            .get(node_id)
            .ok_or_else(|| Error::PermissionDenied(format!("node {node_id} is not known")))?;
        if node.status != NodeStatus::Accepted {
            return Err(Error::PermissionDenied(format!(
                "node {node_id} is {}: only accepted nodes report on patches",
                node.status.as_str()
            )));
        }
        let (_, m) = st
            .patches
            .get(patch_id)
            .ok_or_else(|| Error::NotFound(format!("no patch with id {patch_id}")))?;
        let reported_before = st
            .phases
            .get(patch_id)
            .is_some_and(|p| p.contains_key(node_id));
        let targeted = || flotilla_proto::manifest::check_target(m, &target_of(node)).is_ok();
        let (released, ahead) = match st.rollouts.get(patch_id) {
            Some(r) => (
                r.groups.values().any(|g| g.released.contains(node_id)),
                st.may_download_ahead(patch_id, node) && targeted(),
            ),
            None => (targeted(), false),
        };
        if released || (reported_before && !st.rollouts.contains_key(patch_id)) {
            return Ok(node.enrolled_at);
        }
        if !(ahead || reported_before) {
            return Err(Error::FailedPrecondition(format!(
                "patch {patch_id} was never offered to node {node_id}"
            )));
        }
        if !may_report_ahead(phase) {
            return Err(Error::FailedPrecondition(format!(
                "patch {patch_id} was offered to node {node_id} only to download ahead of its \
                 release: it cannot be {phase} there"
            )));
        }
        Ok(node.enrolled_at)
    }

    /// Nodes (id, group, (why it waits, detail), released to it) a patch
    /// targets now.
    pub async fn targeted_nodes(
        &self,
        patch_id: &str,
    ) -> Vec<(String, String, (String, String), bool)> {
        let st = self.state.lock().await;
        let Some((_, m)) = st.patches.get(patch_id) else {
            return Vec::new();
        };
        let now = time::OffsetDateTime::now_utc();
        if m.expires_at <= now {
            // Expired: the nodes it targeted that never took it missed it.
            let missed = (
                "missed".to_string(),
                format!(
                    "the patch expired at {} before this node took it: publish a new one",
                    flotilla_proto::when::unix_secs(m.expires_at.unix_timestamp())
                ),
            );
            return st
                .nodes
                .values()
                .filter(|n| targets(n, m))
                .map(|n| (n.id.clone(), n.group.clone(), missed.clone(), false))
                .collect();
        }
        st.nodes
            .values()
            .filter(|n| wants(n, m, now))
            .map(|n| {
                (
                    n.id.clone(),
                    n.group.clone(),
                    Fleet::wait_reason(&st, patch_id, &n.group, &n.id),
                    st.released_to(patch_id, &n.group, &n.id),
                )
            })
            .collect()
    }

    /// The size of artifact `sha256` as a published manifest (or its delta
    /// index, for a delta file) gives it: the artifacts a replica may fetch
    /// from another (None: no patch has it).
    pub async fn artifact_size(&self, sha256: &str) -> Option<u64> {
        let st = self.state.lock().await;
        st.patches
            .values()
            .flat_map(|(_, m)| &m.artifacts)
            .find(|a| a.sha256 == sha256)
            .map(|a| a.size)
            .or_else(|| st.delta_sizes.get(sha256).copied())
    }

    /// Summary of one patch.
    pub async fn patch_info(&self, id: &str) -> Option<PatchInfo> {
        let st = self.state.lock().await;
        let (r, m) = st.patches.get(id)?;
        let now = time::OffsetDateTime::now_utc();
        let targeted = st.nodes.values().filter(|n| wants(n, m, now)).count() as u32;
        Some(patch_info(r, m, targeted, st.rollouts.get(id)))
    }

    /// Summaries of every patch, newest first.
    pub async fn patch_infos(&self) -> Vec<PatchInfo> {
        let st = self.state.lock().await;
        let now = time::OffsetDateTime::now_utc();
        let mut out: Vec<(u64, PatchInfo)> = st
            .patches
            .values()
            .map(|(r, m)| {
                let targeted = st.nodes.values().filter(|n| wants(n, m, now)).count() as u32;
                (r.seq, patch_info(r, m, targeted, st.rollouts.get(&r.id)))
            })
            .collect();
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        out.into_iter().map(|(_, i)| i).collect()
    }
}

/// The phases a node may report on a patch it was offered only to download
/// ahead of its install's release: up to Downloaded, and the ends a download
/// or its verification can come to.
pub fn may_report_ahead(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Received
            | Phase::Verified
            | Phase::Downloaded
            | Phase::Failed
            | Phase::Rejected
            | Phase::Superseded
    )
}

/// A published patch: its record and manifest, with how many nodes it
/// targets now and its rollout's state.
#[derive(Debug, Clone)]
pub struct PatchInfo {
    pub record: PatchRecord,
    pub manifest: Manifest,
    pub targeted: u32,
    pub emergency: bool,
    /// None for a patch stored before rollouts existed.
    pub rollout_state: Option<RolloutState>,
}

fn patch_info(
    rec: &PatchRecord,
    m: &Manifest,
    targeted: u32,
    rollout: Option<&RolloutRecord>,
) -> PatchInfo {
    PatchInfo {
        record: rec.clone(),
        manifest: m.clone(),
        targeted,
        emergency: rollout.is_some_and(|r| r.emergency),
        rollout_state: rollout.map(|r| r.state),
    }
}
