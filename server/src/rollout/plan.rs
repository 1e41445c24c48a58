//! One step of a rollout in one group, as a pure function: which nodes start
//! now, given the policy, the wave the group is in, its maintenance window and
//! the capacity guard. The controller (`fleet::rollouts`) feeds it the live
//! fleet and persists what it decides.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::policy::{Amount, Policy};

/// Where a released node stands with the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Released, not finished (includes not yet received).
    Applying,
    Committed,
    /// Rolled back, failed or rejected.
    Failed,
    /// Done without this patch: a newer version of its component is released
    /// to the node or installed on it. Counts as finished, not as a failure.
    Superseded,
}

/// A node the patch targets, as the step sees it.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub id: &'a str,
    pub online: bool,
    /// Released to this rollout, and how far it got; or superseded (never
    /// released: a newer version overtook it).
    pub progress: Option<Progress>,
    /// Applying another patch right now: not started on a second one.
    pub busy_elsewhere: bool,
    /// The node's value of the spread label ("" when unset or no label).
    pub spread: &'a str,
}

/// The group around the targets.
#[derive(Debug, Clone, Copy)]
pub struct GroupView {
    pub desired: Option<u32>,
    pub max_unavailable: u32,
    /// Online accepted nodes of the group not applying any patch.
    pub in_service: u32,
    pub window_open: bool,
}

impl GroupView {
    /// The capacity guard's floor: desired − max_unavailable (0 without a
    /// desired count: such a group promises no capacity).
    pub fn min_in_service(&self) -> u32 {
        self.desired
            .map_or(0, |d| d.saturating_sub(self.max_unavailable))
    }
}

/// How the rollout runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// One wave, no bake, no window, no per-group limit.
    pub emergency: bool,
    /// Not even the capacity guard.
    pub force: bool,
}

/// A group's position in its rollout, persisted with the rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupProgress {
    /// Index of the wave being released.
    pub wave: usize,
    /// Nodes released so far: they get the manifest in their desired state.
    pub released: BTreeSet<String>,
    /// When each wave started releasing and when it finished (unix ms).
    #[serde(default)]
    pub wave_started_ms: BTreeMap<usize, i64>,
    #[serde(default)]
    pub wave_done_ms: BTreeMap<usize, i64>,
    /// The lowest in-service count seen while releasing (None before any).
    #[serde(default)]
    pub lowest_in_service: Option<u32>,
    /// Failures already seen when the rollout was last resumed: only newer
    /// ones count against the threshold.
    #[serde(default)]
    pub failures_acknowledged: u32,
}

/// What a group is waiting for after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing: nodes were started this step or are still being started.
    Nothing,
    /// The released nodes of the current wave to finish.
    Wave,
    /// The bake time of the finished wave, until this unix ms.
    Bake(i64),
    /// The maintenance window to open.
    Window,
    /// The capacity guard (or the per-group limit) to allow another node.
    Capacity,
    /// Online targets are left, each busy with another patch: they start
    /// when that one finishes.
    Busy,
    /// Only offline nodes are left; they start when they come back.
    Offline,
    /// Every target has finished.
    Done,
}

impl Waiting {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nothing => "",
            Self::Wave => "wave",
            Self::Bake(_) => "bake",
            Self::Window => "window",
            Self::Capacity => "capacity",
            Self::Busy => "busy",
            Self::Offline => "offline",
            Self::Done => "done",
        }
    }

    /// Whether the group has nothing more to do until something changes in
    /// the fleet (a node joins or comes back).
    pub fn settled(self) -> bool {
        matches!(self, Self::Done | Self::Offline)
    }
}

/// The outcome of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Nodes to release now.
    pub release: Vec<String>,
    pub waiting: Waiting,
    /// The group's progress changed (wave, times, lowest in service).
    pub changed: bool,
}

/// Cumulative size of each wave for `n` targets. A spread label changes which
/// nodes a wave takes, never how many: a canary of 1 is one node.
pub fn wave_sizes(policy: &Policy, n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(policy.waves.len());
    for w in &policy.waves {
        let size = w.of(n).max(out.last().copied().unwrap_or(0));
        out.push(size);
    }
    out
}

/// Decides one step for one group. `pos` is updated in place (wave advance,
/// times); the caller persists it together with the released nodes.
pub fn step(
    policy: &Policy,
    mode: Mode,
    group: GroupView,
    targets: &[Target<'_>],
    pos: &mut GroupProgress,
    now_ms: i64,
) -> Step {
    let policy_one;
    let policy = if mode.emergency {
        policy_one = Policy {
            waves: vec![Amount::Percent(100)],
            bake: std::time::Duration::ZERO,
            max_applying: 0,
            ..policy.clone()
        };
        &policy_one
    } else {
        policy
    };
    let mut changed = false;
    let n = targets.len();
    let sizes = wave_sizes(policy, n);
    let last = sizes.len() - 1;
    let released = targets.iter().filter(|t| t.progress.is_some()).count();
    let applying = targets
        .iter()
        .filter(|t| t.progress == Some(Progress::Applying))
        .count();
    let done = |_| Step {
        release: Vec::new(),
        waiting: Waiting::Done,
        changed: false,
    };
    if n == 0 {
        return done(());
    }
    if pos.wave > last {
        pos.wave = last;
        changed = true;
    }
    // Move past every wave that is out, finished and baked.
    loop {
        let size = sizes[pos.wave];
        if released < size || applying > 0 {
            break;
        }
        let done_at = *pos.wave_done_ms.entry(pos.wave).or_insert_with(|| {
            changed = true;
            now_ms
        });
        // Every target finished (the later waves have no one left to
        // release): done, without baking for nobody.
        if pos.wave == last || released >= sizes[last] {
            for w in pos.wave + 1..=last {
                pos.wave_done_ms.insert(w, now_ms);
            }
            changed |= pos.wave != last;
            pos.wave = last;
            return Step {
                release: Vec::new(),
                waiting: Waiting::Done,
                changed,
            };
        }
        // A wave that added no node to the one before has nothing to bake.
        let added = pos.wave == 0 || sizes[pos.wave] > sizes[pos.wave - 1];
        let bake_until = if added {
            done_at + policy.bake.as_millis() as i64
        } else {
            done_at
        };
        if now_ms < bake_until {
            return Step {
                release: Vec::new(),
                waiting: Waiting::Bake(bake_until),
                changed,
            };
        }
        pos.wave += 1;
        changed = true;
    }
    let size = sizes[pos.wave];
    if !mode.emergency && !group.window_open {
        return Step {
            release: Vec::new(),
            waiting: Waiting::Window,
            changed,
        };
    }
    let mut quota = size.saturating_sub(released);
    let mut capacity_bound = false;
    if policy.max_applying > 0 {
        let room = (policy.max_applying as usize).saturating_sub(applying);
        if room < quota {
            quota = room;
            capacity_bound = true;
        }
    }
    if !mode.force {
        let room = group.in_service.saturating_sub(group.min_in_service()) as usize;
        if room < quota {
            quota = room;
            capacity_bound = true;
        }
    }
    let mut candidates: Vec<&Target<'_>> = targets
        .iter()
        .filter(|t| t.progress.is_none() && t.online && !t.busy_elsewhere)
        .collect();
    let chosen = spread_pick(targets, &mut candidates, quota);
    if !chosen.is_empty() {
        pos.wave_started_ms.entry(pos.wave).or_insert_with(|| {
            changed = true;
            now_ms
        });
        let after = group.in_service.saturating_sub(chosen.len() as u32);
        if pos.lowest_in_service.is_none_or(|l| after < l) {
            pos.lowest_in_service = Some(after);
            changed = true;
        }
    }
    let unreleased = n - released - chosen.len();
    // A node busy with another patch is still here: its turn comes when that
    // patch finishes, not when it reconnects.
    let busy = targets
        .iter()
        .any(|t| t.progress.is_none() && t.online && t.busy_elsewhere);
    let waiting = if !chosen.is_empty() {
        Waiting::Nothing
    } else if released + chosen.len() >= size && applying > 0 {
        Waiting::Wave
    } else if capacity_bound && !candidates.is_empty() {
        Waiting::Capacity
    } else if applying > 0 {
        Waiting::Wave
    } else if busy {
        Waiting::Busy
    } else if unreleased > 0 {
        Waiting::Offline
    } else {
        Waiting::Done
    };
    Step {
        release: chosen,
        waiting,
        changed,
    }
}

/// Picks up to `quota` candidates, each time from the label value with the
/// fewest nodes released so far (ties by value), so no site takes a wave alone.
/// Within a value, nodes go by id. O(n log n): a fleet-wide emergency picks
/// thousands at once.
fn spread_pick(
    targets: &[Target<'_>],
    candidates: &mut Vec<&Target<'_>>,
    quota: usize,
) -> Vec<String> {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};
    let mut released: BTreeMap<&str, usize> = BTreeMap::new();
    for t in targets {
        let c = released.entry(t.spread).or_default();
        if t.progress.is_some() {
            *c += 1;
        }
    }
    candidates.sort_by(|a, b| (a.spread, a.id).cmp(&(b.spread, b.id)));
    let mut queues: BTreeMap<&str, VecDeque<&Target<'_>>> = BTreeMap::new();
    for t in candidates.iter() {
        queues.entry(t.spread).or_default().push_back(t);
    }
    // Min-heap on (released so far, value).
    let mut heap: BinaryHeap<Reverse<(usize, &str)>> =
        queues.keys().map(|v| Reverse((released[v], *v))).collect();
    let mut chosen = Vec::new();
    while chosen.len() < quota {
        let Some(Reverse((count, value))) = heap.pop() else {
            break;
        };
        let queue = queues.get_mut(value).expect("a queue per value");
        let Some(t) = queue.pop_front() else {
            continue;
        };
        chosen.push(t.id.to_string());
        if !queue.is_empty() {
            heap.push(Reverse((count + 1, value)));
        }
    }
    let taken: std::collections::HashSet<&str> = chosen.iter().map(String::as_str).collect();
    candidates.retain(|t| !taken.contains(t.id));
    chosen
}

#[cfg(test)]
mod tests;
