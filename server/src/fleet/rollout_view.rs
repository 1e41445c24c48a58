//! How a rollout looks from outside: its progress per group and wave, and why
//! a targeted node does not have the patch yet.

use std::collections::BTreeSet;

use flotilla_proto::manifest::Severity;

use super::rollouts::{progress_of, schedule_of};
use super::{Fleet, State};
use crate::rollout::plan::{self, GroupView, Progress, Waiting};
use crate::rollout::policy::PolicySpec;
use crate::rollout::record::RolloutState;

/// A rollout's state and its progress per group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutInfo {
    pub patch_id: String,
    pub state: RolloutState,
    /// Why it is paused or aborted.
    pub reason: String,
    pub emergency: bool,
    pub force: bool,
    /// The policy given at publish (groups' defaults fill what it leaves unset).
    pub policy: PolicySpec,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub groups: Vec<RolloutGroup>,
    /// Failed, rolled back or rejected nodes over the whole rollout.
    pub failures: u32,
    /// Aborted with rollback of the nodes that committed.
    pub rollback: bool,
    pub component: String,
    pub version: String,
    pub severity: Severity,
}

/// A rollout's progress in one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutGroup {
    pub group: String,
    /// The wave being released (0-based) and how many there are.
    pub wave: u32,
    pub waves: u32,
    /// Nodes the patch targets in the group, and how many of them have it.
    pub targeted: u32,
    pub released: u32,
    pub committed: u32,
    pub failed: u32,
    /// Released and not finished.
    pub applying: u32,
    /// What the group waits for ("" when nodes are being started).
    pub waiting_for: String,
    /// Unix ms when the bake of the finished wave ends (0: not baking).
    pub bake_until_ms: i64,
    /// Online nodes of the group applying nothing, and the capacity guard's floor.
    pub in_service: u32,
    pub min_in_service: u32,
    pub waves_progress: Vec<WaveProgress>,
    /// The lowest in_service recorded while this rollout ran.
    pub lowest_in_service: u32,
    /// Unix ms when the group's window next opens, while it is closed and
    /// holds this rollout (0 otherwise).
    pub window_opens_at_ms: i64,
}

/// One wave: its cumulative size, start and end (unix ms, 0: not yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveProgress {
    pub index: u32,
    pub size: u32,
    pub started_at_ms: i64,
    pub done_at_ms: i64,
}

/// When `g`'s maintenance window next opens, while it is closed (0 otherwise).
fn window_opens_at_ms(g: &crate::model::GroupRecord) -> i64 {
    let now = crate::model::now_ms() / 1000;
    match schedule_of(Some(g)) {
        Some(s) if !s.is_open(now) => s.next_change(now).map_or(0, |t| t * 1000),
        _ => 0,
    }
}

/// A rollout's state without its progress.
#[derive(Debug, Clone)]
pub struct RolloutBrief {
    pub patch_id: String,
    pub state: RolloutState,
    pub reason: String,
    pub component: String,
    pub version: String,
}

impl Fleet {
    /// Every rollout's state, without progress: no node is visited, so it
    /// is cheap enough to ask every second.
    pub async fn rollout_briefs(&self) -> Vec<RolloutBrief> {
        let st = self.state.lock().await;
        st.rollouts
            .iter()
            .filter_map(|(id, r)| {
                let (_, m) = st.patches.get(id)?;
                Some(RolloutBrief {
                    patch_id: id.clone(),
                    state: r.state,
                    reason: r.reason.clone(),
                    component: m.component.clone(),
                    version: m.version.clone(),
                })
            })
            .collect()
    }

    /// One rollout's state and progress per group.
    pub async fn rollout_info(&self, id: &str) -> Option<RolloutInfo> {
        let st = self.state.lock().await;
        self.rollout_info_locked(&st, id)
    }

    /// Every rollout, newest first.
    pub async fn rollout_infos(&self) -> Vec<RolloutInfo> {
        let st = self.state.lock().await;
        let mut out: Vec<RolloutInfo> = st
            .rollouts
            .keys()
            .filter_map(|id| self.rollout_info_locked(&st, id))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.started_at_ms));
        out
    }

    pub(super) fn rollout_info_locked(&self, st: &State, id: &str) -> Option<RolloutInfo> {
        let r = st.rollouts.get(id)?;
        let (_, m) = st.patches.get(id)?;
        let targets = st.targets_by_group(id);
        let load = st.load();
        let phases = st.phases.get(id);
        let waiting = st.waiting.get(id);
        let mut groups = Vec::new();
        let mut failures = 0;
        let names: BTreeSet<&String> = targets.keys().chain(r.groups.keys()).collect();
        for group in names {
            let ids = targets.get(group).map(Vec::as_slice).unwrap_or(&[]);
            let pos = r.groups.get(group).cloned().unwrap_or_default();
            let policy = st.policy_for(r, group);
            let g = st.groups.get(group);
            let (mut committed, mut failed, mut applying) = (0, 0, 0);
            for n in &pos.released {
                match progress_of(phases.and_then(|p| p.get(n))) {
                    // Finished without failing: a newer version overtook it.
                    Progress::Committed | Progress::Superseded => committed += 1,
                    Progress::Failed => failed += 1,
                    Progress::Applying => applying += 1,
                }
            }
            failures += failed;
            let sizes = plan::wave_sizes(&policy, ids.len());
            let wait = match r.state {
                RolloutState::Paused => "paused".to_string(),
                RolloutState::Aborted => "aborted".to_string(),
                _ => waiting
                    .and_then(|w| w.get(group))
                    .map_or("", |w| w.as_str())
                    .to_string(),
            };
            let bake_until_ms = match waiting.and_then(|w| w.get(group)) {
                Some(Waiting::Bake(t)) => *t,
                _ => 0,
            };
            let view = GroupView {
                desired: g.and_then(|g| g.desired),
                max_unavailable: g.map_or(1, |g| g.max_unavailable),
                in_service: load.in_service(group),
                window_open: true,
            };
            groups.push(RolloutGroup {
                group: group.clone(),
                wave: pos.wave as u32,
                waves: sizes.len() as u32,
                targeted: ids.len() as u32,
                released: pos.released.len() as u32,
                committed,
                failed,
                applying,
                waiting_for: wait,
                bake_until_ms,
                in_service: view.in_service,
                min_in_service: if r.force { 0 } else { view.min_in_service() },
                waves_progress: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, size)| WaveProgress {
                        index: i as u32,
                        size: *size as u32,
                        started_at_ms: pos.wave_started_ms.get(&i).copied().unwrap_or(0),
                        done_at_ms: pos.wave_done_ms.get(&i).copied().unwrap_or(0),
                    })
                    .collect(),
                lowest_in_service: pos.lowest_in_service.unwrap_or(view.in_service),
                window_opens_at_ms: if r.emergency {
                    0
                } else {
                    g.map_or(0, window_opens_at_ms)
                },
            });
        }
        Some(RolloutInfo {
            patch_id: r.patch_id.clone(),
            state: r.state,
            reason: r.reason.clone(),
            emergency: r.emergency,
            force: r.force,
            policy: r.policy.clone(),
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
            groups,
            failures,
            rollback: r.rollback,
            component: m.component.clone(),
            version: m.version.clone(),
            severity: m.severity,
        })
    }

    /// Why a targeted node does not have a patch yet, as patch status shows it,
    /// with the detail patch status shows as its error (for "superseded": by what).
    pub(super) fn wait_reason(
        st: &State,
        patch_id: &str,
        group: &str,
        node: &str,
    ) -> (String, String) {
        let Some(r) = st.rollouts.get(patch_id) else {
            return ("waiting".into(), String::new());
        };
        match r.state {
            RolloutState::Aborted => return ("not started (aborted)".into(), String::new()),
            RolloutState::Paused => return ("waiting (paused)".into(), String::new()),
            _ => {}
        }
        let released = r.is_released(group, node);
        if !released
            && let Some(newer) = st.newer_than(patch_id)
            && let Some(by) = st.superseding(&newer, group, node)
        {
            let detail = format!(
                "superseded: {} {by} is installed or on its way, newer than {}",
                newer.component, newer.version
            );
            return ("superseded".into(), detail);
        }
        Self::still_waiting(st, patch_id, group, node, released)
    }

    fn still_waiting(
        st: &State,
        patch_id: &str,
        group: &str,
        node: &str,
        released: bool,
    ) -> (String, String) {
        let reason = |r: String| (r, String::new());
        if !st.online(node) {
            return reason("waiting (offline)".into());
        }
        if released {
            if let Some(n) = st.nodes.get(node)
                && st.queued_for(patch_id, n)
            {
                return reason(format!(
                    "waiting (behind {} patches in flight)",
                    super::offer::MAX_MANIFESTS_PER_STATE
                ));
            }
            return reason("waiting".into());
        }
        if let Some(other) = st.busy_with(patch_id, group, node) {
            return reason(format!("waiting (busy with {other})"));
        }
        match st.waiting.get(patch_id).and_then(|w| w.get(group)) {
            Some(Waiting::Window) => {
                let opens = st.groups.get(group).map_or(0, window_opens_at_ms);
                let detail = if opens > 0 {
                    format!(
                        "the maintenance window opens at {}",
                        flotilla_proto::when::unix_secs(opens / 1000)
                    )
                } else {
                    String::new()
                };
                ("waiting for window".into(), detail)
            }
            Some(Waiting::Capacity) => reason("waiting for capacity".into()),
            _ => reason("waiting for wave".into()),
        }
    }
}
