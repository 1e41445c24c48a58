//! Quiet rollouts: those whose last step left every group waiting only for its
//! released nodes to finish, a timer, or nodes to come back. Until one of
//! those happens another step would change nothing, so the controller skips
//! them, and a report only counts down what the group waits for instead of
//! costing a pass over the fleet (at 10,000 nodes most reports of a patch).

use std::collections::{BTreeMap, HashMap};

use super::State;
use super::published::wants;
use super::rollouts::progress_of;
use crate::rollout::plan::{Progress, Waiting};

/// What a quiet rollout waits for.
#[derive(Debug, Default)]
pub(super) struct Quiet {
    /// Group -> its released nodes still applying (groups waiting for their wave).
    unfinished: HashMap<String, u32>,
    /// The next moment something changes by itself (bake end, window), unix ms.
    pub until: Option<i64>,
}

impl Quiet {
    pub fn due(&self, now_ms: i64) -> bool {
        self.until.is_some_and(|t| t <= now_ms)
    }
}

impl State {
    /// After a step of `patch_id`'s rollout: marks it quiet when nothing but
    /// the nodes it waits for, a timer or the fleet's membership can move it.
    /// A step that released nodes, or a group held back by capacity, is not.
    ///
    /// `seen` is how many progress changes of the patch were noted when the
    /// step was planned: one noted since (while the step was being written)
    /// found no quiet entry to count down, so the rollout is left to step
    /// again rather than wait for reports that already came.
    pub(super) fn settle_after_step(
        &mut self,
        patch_id: &str,
        released_now: bool,
        waiting: &BTreeMap<String, Waiting>,
        until: Option<i64>,
        seen: u64,
    ) {
        let quiet = !released_now
            && self.noted_changes(patch_id) == seen
            && waiting.values().all(|w| {
                matches!(
                    w,
                    Waiting::Wave
                        | Waiting::Bake(_)
                        | Waiting::Window
                        | Waiting::Busy
                        | Waiting::Offline
                        | Waiting::Done
                )
            });
        if !quiet {
            self.quiet.remove(patch_id);
            return;
        }
        let phases = self.phases.get(patch_id);
        let mut unfinished = HashMap::new();
        if let Some(r) = self.rollouts.get(patch_id) {
            for (group, w) in waiting {
                if *w != Waiting::Wave {
                    continue;
                }
                let Some(pos) = r.groups.get(group) else {
                    continue;
                };
                let n = pos
                    .released
                    .iter()
                    .filter(|id| progress_of(phases.and_then(|p| p.get(*id))) == Progress::Applying)
                    .count();
                unfinished.insert(group.clone(), n as u32);
            }
        }
        self.quiet
            .insert(patch_id.to_string(), Quiet { unfinished, until });
    }

    /// A node's progress of `patch_id` went from `from` to `to`. Counts down
    /// the quiet rollouts that wait for it; true when some rollout needs a
    /// step now: this patch's is not quiet, a group's last node finished,
    /// anything else than a success, or another rollout may have been holding
    /// this node back as busy.
    pub(super) fn note_progress(
        &mut self,
        node_id: &str,
        patch_id: &str,
        from: Progress,
        to: Progress,
    ) -> bool {
        *self.noted.entry(patch_id.to_string()).or_default() += 1;
        let Some(node) = self.nodes.get(node_id) else {
            return true;
        };
        let group = node.group.as_str();
        let mut wake = false;
        let released = self
            .rollouts
            .get(patch_id)
            .is_some_and(|r| r.is_released(group, node_id));
        match self.quiet.get_mut(patch_id) {
            None => wake = true,
            Some(_) if !released => {}
            Some(q) => {
                let counted = from == Progress::Applying
                    && to == Progress::Committed
                    && q.unfinished.get(group).is_some_and(|n| *n > 1);
                if counted {
                    if let Some(n) = q.unfinished.get_mut(group) {
                        *n -= 1;
                    }
                } else {
                    self.quiet.remove(patch_id);
                    wake = true;
                }
            }
        }
        let now = time::OffsetDateTime::now_utc();
        let held: Vec<String> = self
            .quiet
            .keys()
            .filter(|id| id.as_str() != patch_id)
            .filter(|id| match (self.rollouts.get(*id), self.patches.get(*id)) {
                (Some(r), Some((_, m))) => !r.is_released(group, node_id) && wants(node, m, now),
                _ => true,
            })
            .cloned()
            .collect();
        for id in held {
            self.quiet.remove(&id);
            *self.noted.entry(id).or_default() += 1;
            wake = true;
        }
        wake
    }

    /// Progress changes noted of `patch_id`'s nodes so far (see
    /// [`State::settle_after_step`]).
    pub(super) fn noted_changes(&self, patch_id: &str) -> u64 {
        self.noted.get(patch_id).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::rollouts::PhaseNote;
    use crate::model::{NodeRecord, NodeStatus, Role};
    use crate::rollout::policy::PolicySpec;
    use crate::rollout::record::RolloutRecord;
    use flotilla_proto::phase::Phase;

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            group: "g".into(),
            status: NodeStatus::Accepted,
            role: Role::Active,
            facts: Default::default(),
            labels: Default::default(),
            joined_at: 0,
            token_id: String::new(),
            cert_serial: String::new(),
            cert_not_after: 0,
            public_key: String::new(),
            enrolled_at: 0,
            prev_cert_serial: String::new(),
            revision: 0,
            last_seen: 0,
            installed: Default::default(),
        }
    }

    /// Three nodes released by patch p, all applying; the step waits for the wave.
    fn waiting_wave() -> State {
        let mut st = State::default();
        let mut r = RolloutRecord::new("p", PolicySpec::default(), true, false, 0);
        let pos = r.groups.entry("g".into()).or_default();
        for id in ["a", "b", "c", "d"] {
            st.nodes.insert(id.into(), node(id));
        }
        for id in ["a", "b", "c"] {
            pos.released.insert(id.into());
        }
        st.rollouts.insert("p".into(), r);
        let waiting = BTreeMap::from([("g".to_string(), Waiting::Wave)]);
        st.settle_after_step("p", false, &waiting, None, 0);
        st
    }

    fn commit(st: &mut State, id: &str) -> bool {
        st.phases.entry("p".into()).or_default().insert(
            id.into(),
            PhaseNote {
                phase: Phase::Committed,
                error: String::new(),
                at_ms: 0,
            },
        );
        st.note_progress(id, "p", Progress::Applying, Progress::Committed)
    }

    #[test]
    fn successes_count_down_and_the_last_one_wakes() {
        let mut st = waiting_wave();
        assert_eq!(st.quiet["p"].unfinished["g"], 3);
        assert!(!commit(&mut st, "a"));
        assert!(!commit(&mut st, "b"));
        assert!(st.quiet.contains_key("p"));
        assert!(
            commit(&mut st, "c"),
            "the wave's last node must wake the controller"
        );
        assert!(!st.quiet.contains_key("p"));
    }

    #[test]
    fn a_failure_wakes_at_once() {
        let mut st = waiting_wave();
        assert!(st.note_progress("a", "p", Progress::Applying, Progress::Failed));
        assert!(!st.quiet.contains_key("p"));
    }

    #[test]
    fn nodes_the_rollout_did_not_release_change_nothing() {
        let mut st = waiting_wave();
        assert!(!st.note_progress("d", "p", Progress::Applying, Progress::Committed));
        assert_eq!(st.quiet["p"].unfinished["g"], 3);
    }

    #[test]
    fn releasing_or_capacity_is_never_quiet_and_timers_come_due() {
        let mut st = waiting_wave();
        let capacity = BTreeMap::from([("g".to_string(), Waiting::Capacity)]);
        let seen = st.noted_changes("p");
        st.settle_after_step("p", false, &capacity, None, seen);
        assert!(!st.quiet.contains_key("p"));
        assert!(st.note_progress("a", "p", Progress::Applying, Progress::Committed));
        let bake = BTreeMap::from([("g".to_string(), Waiting::Bake(1_000))]);
        let seen = st.noted_changes("p");
        st.settle_after_step("p", true, &bake, Some(1_000), seen);
        assert!(
            !st.quiet.contains_key("p"),
            "a step that released is not quiet"
        );
        st.settle_after_step("p", false, &bake, Some(1_000), seen);
        assert!(!st.quiet["p"].due(999));
        assert!(st.quiet["p"].due(1_000));
    }

    #[test]
    fn progress_noted_while_a_step_is_written_keeps_the_rollout_stepping() {
        let mut st = waiting_wave();
        st.quiet.remove("p");
        // A step planned now, before the wave's nodes report...
        let seen = st.noted_changes("p");
        for id in ["a", "b", "c"] {
            assert!(commit(&mut st, id), "nothing quiet to count down: wakes");
        }
        // ...settles after they did: waiting for them would wait forever.
        let waiting = BTreeMap::from([("g".to_string(), Waiting::Wave)]);
        st.settle_after_step("p", false, &waiting, None, seen);
        assert!(!st.quiet.contains_key("p"), "left to step again");
    }
}
