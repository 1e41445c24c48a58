//! The rollout controller: the one place that decides which targeted nodes get a
//! patch now. It runs each rollout's step per group (waves, bake time, windows,
//! capacity guard) on every change the fleet sees (a report, a node coming or
//! going, an operator's command) and at the next bake end or window change;
//! it records every release before the node is told, and pauses a rollout when
//! its failures reach the threshold.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_proto::phase::Phase;
use tokio_util::sync::CancellationToken;

use super::published::wants;
use super::view::{Effects, Write};
use super::{Fleet, State};
use crate::error::Result;
use crate::model::{GroupRecord, NodeRecord, NodeStatus, now_ms};
use crate::rollout::guard::{self, Load};
use crate::rollout::plan::{self, GroupView, Mode, Progress, Target, Waiting};
use crate::rollout::policy::{Policy, PolicySpec};
use crate::rollout::record::{self, RolloutRecord, RolloutState};
use crate::rollout::window::Schedule;

/// Bursts of reports are taken in one pass after this pause.
const COALESCE: Duration = Duration::from_millis(20);
/// Completed rollouts look at nodes that came or went at most this often.
const MEMBERSHIP_PASS: Duration = Duration::from_millis(250);

/// What a publish asks of its rollout.
#[derive(Debug, Clone, Default)]
pub struct RolloutRequest {
    pub policy: PolicySpec,
    pub emergency: bool,
    pub force: bool,
}

/// A node's last reported phase of one patch, and its error.
#[derive(Debug, Clone)]
pub(super) struct PhaseNote {
    pub phase: Phase,
    pub error: String,
    /// When the node reported it (unix ms).
    pub at_ms: i64,
}

/// The progress of a released node from its last report.
pub(super) fn progress_of(note: Option<&PhaseNote>) -> Progress {
    progress_of_phase(note.map(|n| n.phase))
}

pub(super) fn progress_of_phase(phase: Option<Phase>) -> Progress {
    match phase {
        Some(Phase::Committed) => Progress::Committed,
        Some(Phase::Superseded) => Progress::Superseded,
        Some(p) if p.is_failure() => Progress::Failed,
        _ => Progress::Applying,
    }
}

/// A group's maintenance schedule; one that no longer parses counts as closed,
/// so a bad record can only hold a rollout back, never let it run outside hours.
pub(super) fn schedule_of(g: Option<&GroupRecord>) -> Option<Schedule> {
    let g = g?;
    match Schedule::parse(&g.timezone, &g.windows) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(group = %g.name, error = %e, "stored maintenance windows do not parse");
            None
        }
    }
}

fn window_open(g: Option<&GroupRecord>, now_secs: i64) -> bool {
    match g {
        None => true,
        Some(_) => schedule_of(g).is_some_and(|s| s.is_open(now_secs)),
    }
}

impl State {
    /// Whether a patch is in a node's desired state: released to it by a
    /// rollout that was not aborted. Patches stored before rollouts existed
    /// have no record and count as released to all.
    pub(super) fn released_to(&self, patch_id: &str, group: &str, node: &str) -> bool {
        match self.rollouts.get(patch_id) {
            None => true,
            Some(r) => r.state != RolloutState::Aborted && r.is_released(group, node),
        }
    }

    /// Patches this node committed whose rollout was aborted with rollback.
    pub(super) fn rollbacks_for(&self, group: &str, node: &str) -> Vec<String> {
        self.rollouts
            .values()
            .filter(|r| {
                r.state == RolloutState::Aborted && r.rollback && r.is_released(group, node)
            })
            .filter(|r| {
                self.phases
                    .get(&r.patch_id)
                    .and_then(|p| p.get(node))
                    .is_some_and(|n| matches!(n.phase, Phase::Committed | Phase::Reverting))
            })
            .map(|r| r.patch_id.clone())
            .collect()
    }

    /// Sum of the rollouts' revisions: part of every desired-state revision.
    pub(super) fn rollout_revision(&self) -> u64 {
        self.rollouts.values().map(|r| r.revision).sum()
    }

    /// Which nodes are applying some patch now (released and not finished; a
    /// node that never got the patch of an aborted rollout is not), and how
    /// many nodes each group has in service: accepted, online, applying nothing.
    pub(super) fn load(&self) -> Load {
        let released = self.rollouts.values().flat_map(|r| {
            let phases = self.phases.get(&r.patch_id);
            r.groups.values().flat_map(move |g| {
                g.released.iter().map(move |id| guard::Released {
                    node: id,
                    finished: phases.and_then(|p| p.get(id)).map(|n| n.phase.is_final()),
                    aborted: r.state == RolloutState::Aborted,
                })
            })
        });
        let members = self.nodes.values().map(|n| guard::Member {
            id: &n.id,
            group: &n.group,
            accepted: n.status == NodeStatus::Accepted,
            online: self.online(&n.id),
        });
        Load::count(released, members)
    }

    /// Targeted node ids per group, for one patch.
    pub(super) fn targets_by_group(&self, patch_id: &str) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let Some((_, m)) = self.patches.get(patch_id) else {
            return out;
        };
        let now = time::OffsetDateTime::now_utc();
        for n in self.nodes.values().filter(|n| wants(n, m, now)) {
            out.entry(n.group.clone()).or_default().push(n.id.clone());
        }
        out
    }

    /// Whether `r` lets its targeted nodes in `group` download ahead of their
    /// install: as its policy (or the group's default) says, else where the
    /// group has maintenance windows; never in an emergency (everything is
    /// released at once) or once aborted.
    pub(super) fn downloads_ahead(&self, r: &RolloutRecord, group: &str) -> bool {
        if r.emergency || r.state == RolloutState::Aborted {
            return false;
        }
        let g = self.groups.get(group);
        let defaults = g.map(|g| g.rollout.clone()).unwrap_or_default();
        r.policy
            .over(&defaults)
            .download_ahead
            .unwrap_or_else(|| g.is_some_and(|g| !g.windows.is_empty()))
    }

    pub(super) fn policy_for(&self, r: &RolloutRecord, group: &str) -> Policy {
        let defaults = self
            .groups
            .get(group)
            .map(|g| g.rollout.clone())
            .unwrap_or_default();
        let spec = r.policy.over(&defaults);
        if r.emergency {
            Policy::emergency(&spec)
        } else {
            Policy::resolve(&spec)
        }
    }
}

/// One rollout's step as decided: the record to store (if it changed) and
/// what the rollout waits for once it is stored.
pub(super) struct Step {
    patch_id: String,
    write: Option<Write>,
    /// Paused for failures: it waits for nothing.
    paused: bool,
    released_now: bool,
    waiting: BTreeMap<String, Waiting>,
    until: Option<i64>,
}

impl Fleet {
    /// Decides one step of a rollout in every group it reaches: pauses it on
    /// too many failures, releases what may start; `load` follows the nodes
    /// released. Nothing is stored or told here (see `step_rollouts`).
    fn step(&self, st: &State, patch_id: &str, load: &mut Load) -> Option<Step> {
        let mut r = st.rollouts.get(patch_id).cloned()?;
        if !r.state.releases() {
            return None;
        }
        let now = now_ms();
        let targets = st.targets_by_group(patch_id);
        let phases = st.phases.get(patch_id);
        let newer = st.newer_than(patch_id);
        let mut changed = false;
        // Every group has finished, or only offline nodes are left in its last wave.
        let mut all_settled = true;
        let mut next: Option<i64> = None;
        let mut releases: Vec<String> = Vec::new();
        let mut waiting: BTreeMap<String, Waiting> = BTreeMap::new();
        // Failures since the last resume against each group's threshold.
        if r.state == RolloutState::Running {
            for (group, ids) in &targets {
                let policy = st.policy_for(&r, group);
                let Some(pos) = r.groups.get(group) else {
                    continue;
                };
                let failures: Vec<guard::Failure<'_>> = pos
                    .released
                    .iter()
                    .filter_map(|id| phases.and_then(|p| p.get(id)).map(|n| (id, n)))
                    .filter(|(_, n)| n.phase.is_failure())
                    .map(|(id, n)| guard::Failure {
                        node: id,
                        at_ms: n.at_ms,
                        error: &n.error,
                    })
                    .collect();
                if let Some(reason) = guard::failure_pause(
                    group,
                    &policy,
                    ids.len(),
                    &failures,
                    pos.failures_acknowledged,
                ) {
                    tracing::warn!(patch = patch_id, %reason, "rollout paused");
                    r.state = RolloutState::Paused;
                    r.reason = reason;
                    r.updated_at_ms = now;
                    return Some(Step {
                        patch_id: patch_id.to_string(),
                        write: Some(st.write(record::key(patch_id), &r)),
                        paused: true,
                        released_now: false,
                        waiting: BTreeMap::new(),
                        until: None,
                    });
                }
            }
        }
        for (group, ids) in &targets {
            let g = st.groups.get(group);
            let policy = st.policy_for(&r, group);
            let pos = r.groups.entry(group.clone()).or_default();
            let view_targets: Vec<Target<'_>> = ids
                .iter()
                .map(|id| {
                    let node = &st.nodes[id];
                    let released = pos.released.contains(id);
                    let progress = if released {
                        Some(progress_of(phases.and_then(|p| p.get(id))))
                    } else {
                        newer
                            .as_ref()
                            .and_then(|n| st.superseding(n, group, id))
                            .map(|_| Progress::Superseded)
                    };
                    Target {
                        id,
                        online: st.online(id),
                        progress,
                        busy_elsewhere: !released && load.is_busy(id),
                        spread: policy
                            .spread_label
                            .as_ref()
                            .and_then(|l| node.labels.get(l))
                            .map_or("", String::as_str),
                    }
                })
                .collect();
            let view = GroupView {
                desired: g.and_then(|g| g.desired),
                max_unavailable: g.map_or(1, |g| g.max_unavailable),
                in_service: load.in_service(group),
                window_open: window_open(g, now / 1000),
            };
            let mode = Mode {
                emergency: r.emergency,
                force: r.force,
            };
            let step = plan::step(&policy, mode, view, &view_targets, pos, now);
            if !step.waiting.settled() && pos.lowest_in_service.is_none_or(|l| view.in_service < l)
            {
                pos.lowest_in_service = Some(view.in_service);
                changed = true;
            }
            changed |= step.changed;
            all_settled &= step.waiting == Waiting::Done
                || (step.waiting == Waiting::Offline && pos.wave + 1 == policy.waves.len());
            match step.waiting {
                Waiting::Bake(until) => next = Some(next.map_or(until, |n| n.min(until))),
                Waiting::Window => {
                    if let Some(at) = schedule_of(g).and_then(|s| s.next_change(now / 1000)) {
                        let at = at * 1000;
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
                _ => {}
            }
            if !step.release.is_empty() {
                tracing::info!(patch = patch_id, group = %group, wave = pos.wave, nodes = step.release.len(), "releasing");
                pos.released.extend(step.release.iter().cloned());
                load.released(group, &step.release);
                releases.extend(step.release);
                changed = true;
            }
            waiting.insert(group.clone(), step.waiting);
        }
        if r.state == RolloutState::Running && releases.is_empty() && all_settled {
            r.state = RolloutState::Completed;
            tracing::info!(patch = patch_id, "rollout completed");
            changed = true;
        }
        if !releases.is_empty() {
            r.revision += 1;
        }
        let write = changed.then(|| {
            r.updated_at_ms = now;
            st.write(record::key(patch_id), &r)
        });
        Some(Step {
            patch_id: patch_id.to_string(),
            write,
            paused: false,
            released_now: !releases.is_empty(),
            waiting,
            until: next,
        })
    }

    /// Steps the rollouts `ids` names, stores what changed in one fenced write (durable, and only by the
    /// leader, before any node is told: nodes hear as it applies), then
    /// notes what each waits for. Returns the next moment (unix ms) something
    /// changes by itself (bake end, window).
    pub(super) async fn step_rollouts(&self, ids: Vec<String>) -> Option<i64> {
        if ids.is_empty() {
            return None;
        }
        let (steps, stepped, seen) = {
            let st = self.state.lock().await;
            let mut load = st.load();
            let steps: Vec<Step> = ids
                .iter()
                .filter_map(|id| self.step(&st, id, &mut load))
                .collect();
            let seen: HashMap<String, u64> = ids
                .iter()
                .map(|id| (id.clone(), st.noted_changes(id)))
                .collect();
            (steps, ids, seen)
        };
        let next = steps.iter().filter_map(|s| s.until).min();
        let writes: Vec<Write> = steps.iter().filter_map(|s| s.write.clone()).collect();
        let stored = match self.commit(writes, true).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "rollout step failed");
                false
            }
        };
        let mut st = self.state.lock().await;
        if stored {
            for s in steps {
                if s.paused {
                    st.waiting.remove(&s.patch_id);
                    st.quiet.remove(&s.patch_id);
                    continue;
                }
                let noted = seen.get(&s.patch_id).copied().unwrap_or(0);
                st.settle_after_step(&s.patch_id, s.released_now, &s.waiting, s.until, noted);
                st.waiting.insert(s.patch_id, s.waiting);
            }
        } else {
            // Another write came first (or the store failed): step again.
            for id in &stepped {
                st.quiet.remove(id);
            }
        }
        drop(st);
        for id in stepped {
            let _ = self.rollout_events.send(id);
        }
        if stored {
            next
        } else {
            let soon = now_ms() + 1000;
            Some(next.map_or(soon, |n| n.min(soon)))
        }
    }

    /// Records a node's phase of a patch (already written by the caller) in
    /// the view, then what follows from it: the node's installed versions,
    /// the next patches for a node that had more than one desired state
    /// carries, and a rollback for a node that committed after its rollout
    /// was aborted with rollback. Each of these holds whether this or the
    /// store's feed applied the phase first.
    pub async fn note_phase(
        &self,
        node_id: &str,
        patch_id: &str,
        phase: Phase,
        error: &str,
        at_ms: i64,
    ) -> Result<()> {
        let mut fx = Effects::default();
        let follows = {
            let mut st = self.state.lock().await;
            let was_final = st
                .phases
                .get(patch_id)
                .and_then(|p| p.get(node_id))
                .is_some_and(|n| n.phase.is_final());
            // A node with more in flight than one desired state carries gets
            // the next one when this one is done.
            let queued_before = phase.is_final()
                && !was_final
                && st
                    .nodes
                    .get(node_id)
                    .is_some_and(|n| !st.offer_for(n).queued.is_empty());
            let note = PhaseNote {
                phase,
                error: error.to_string(),
                at_ms,
            };
            self.apply_phase(&mut st, patch_id, node_id, note, &mut fx);
            let had_queued = queued_before || (phase.is_final() && st.offers_more(node_id));
            // What follows, seen on the view now (each is decided again on
            // the view when it is written).
            let installs = matches!(phase, Phase::Committed | Phase::RolledBack)
                && st
                    .nodes
                    .get(node_id)
                    .is_some_and(|n| st.refresh_installed(&mut n.clone(), patch_id));
            let undo = phase == Phase::Committed
                && st
                    .rollouts
                    .get(patch_id)
                    .is_some_and(|r| r.state == RolloutState::Aborted && r.rollback);
            (had_queued, installs, undo)
        };
        let (had_queued, installs, undo) = follows;
        self.fire(fx);
        if installs || had_queued {
            self.mutate(false, |st| {
                let Some(mut node) = st.nodes.get(node_id).cloned() else {
                    return Ok((Vec::new(), ()));
                };
                let mut changed = installs && st.refresh_installed(&mut node, patch_id);
                if had_queued {
                    node.revision += 1;
                    changed = true;
                }
                let writes = if changed {
                    vec![st.write(crate::model::keys::node(node_id), &node)]
                } else {
                    Vec::new()
                };
                Ok((writes, ()))
            })
            .await?;
        }
        // A node that committed after its rollout was aborted with rollback
        // must hear that it is to undo it.
        if undo {
            self.mutate(false, |st| {
                let writes = match st.rollouts.get(patch_id) {
                    Some(r) if r.state == RolloutState::Aborted && r.rollback => {
                        let mut r = r.clone();
                        r.revision += 1;
                        vec![st.write(record::key(patch_id), &r)]
                    }
                    _ => Vec::new(),
                };
                Ok((writes, ()))
            })
            .await?;
        }
        Ok(())
    }

    /// Advances every rollout on each change in the fleet and when a bake time
    /// ends or a maintenance window opens.
    pub async fn run_rollouts(self: Arc<Self>, shutdown: CancellationToken) {
        // When completed rollouts last looked at the fleet.
        let mut last_full = std::time::Instant::now()
            .checked_sub(MEMBERSHIP_PASS)
            .unwrap_or_else(std::time::Instant::now);
        loop {
            // Rollouts are the leader's to step.
            let mut leadership = self.leadership();
            if !leadership.is_leading() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = leadership.acquired() => {}
                    _ = self.rollout_wake.notified() => {}
                }
                continue;
            }
            let pass_started = std::time::Instant::now();
            // A completed rollout only has work when nodes come, go or
            // change groups, or while it still holds a returning node back.
            // During a reconnect storm membership changes all the time:
            // completed rollouts look at most every MEMBERSHIP_PASS.
            let full_due = last_full.elapsed() >= MEMBERSHIP_PASS;
            let membership = full_due && self.membership_changed.swap(false, Ordering::Relaxed);
            if membership {
                last_full = std::time::Instant::now();
            }
            let (ids, mut next) = self.due_rollouts(&*self.state.lock().await, membership);
            if let Some(at) = self.step_rollouts(ids).await {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if self.membership_changed.load(Ordering::Relaxed) {
                // A change still waits for the next full pass.
                let at = now_ms()
                    + MEMBERSHIP_PASS
                        .saturating_sub(last_full.elapsed())
                        .as_millis() as i64;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            let pass = pass_started.elapsed();
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis((at - now_ms()).max(0) as u64 + 5)
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.rollout_wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            // A pass over a large fleet takes a while: leave at least twice
            // that to everything else (sessions, reports) before the next.
            let pause = COALESCE.max(pass * 2);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The rollouts that want a step now, and when a quiet one comes due.
    fn due_rollouts(&self, st: &State, membership: bool) -> (Vec<String>, Option<i64>) {
        let now = now_ms();
        let mut next: Option<i64> = None;
        let mut ids: Vec<String> = Vec::new();
        for r in st.rollouts.values() {
            let wants_step = match r.state {
                RolloutState::Running => true,
                RolloutState::Completed => {
                    membership
                        || st
                            .waiting
                            .get(&r.patch_id)
                            .is_some_and(|w| w.values().any(|w| !w.settled()))
                }
                _ => false,
            };
            if !wants_step {
                continue;
            }
            match st.quiet.get(&r.patch_id) {
                Some(q) if !membership && !q.due(now) => {
                    if let Some(at) = q.until {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
                _ => ids.push(r.patch_id.clone()),
            }
        }
        (ids, next)
    }
}

impl State {
    /// Sets the node's version of the component `patch_id` changes: the
    /// newest patch of that component it has committed (and not undone), or
    /// none. True when that changed the record.
    fn refresh_installed(&self, node: &mut NodeRecord, patch_id: &str) -> bool {
        let Some((_, m)) = self.patches.get(patch_id) else {
            return false;
        };
        let component = &m.component;
        let newest = self
            .patches
            .values()
            .filter(|(_, m)| &m.component == component)
            .filter(|(r, _)| {
                self.phases
                    .get(&r.id)
                    .and_then(|p| p.get(&node.id))
                    .is_some_and(|n| n.phase == Phase::Committed)
            })
            .max_by_key(|(r, _)| r.seq)
            .map(|(_, m)| m.version.clone());
        if node.installed.get(component) == newest.as_ref() {
            return false;
        }
        match newest {
            Some(v) => node.installed.insert(component.clone(), v),
            None => node.installed.remove(component),
        };
        true
    }
}
