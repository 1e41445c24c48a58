//! What holds a rollout back besides its waves, as pure functions: which
//! nodes are busy applying a patch and how many each group has in service
//! (the capacity guard's count), and whether a group's failures reach the
//! threshold that pauses the rollout.

use std::collections::{HashMap, HashSet};

use super::policy::Policy;

/// A node some rollout released, as the count sees it.
#[derive(Debug, Clone, Copy)]
pub struct Released<'a> {
    pub node: &'a str,
    /// Its last report: None before any, then whether that phase is final.
    pub finished: Option<bool>,
    /// The rollout was aborted: a node that never reported did not get the
    /// patch, and is not busy with it.
    pub aborted: bool,
}

/// A node of the fleet, as the count sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub id: &'a str,
    pub group: &'a str,
    pub accepted: bool,
    pub online: bool,
}

/// Busy nodes, and each group's nodes in service: accepted, online, applying
/// nothing.
#[derive(Debug, Default)]
pub struct Load {
    busy: HashSet<String>,
    in_service: HashMap<String, u32>,
}

impl Load {
    pub fn count<'a>(
        released: impl IntoIterator<Item = Released<'a>>,
        members: impl IntoIterator<Item = Member<'a>>,
    ) -> Self {
        let busy: HashSet<String> = released
            .into_iter()
            .filter(|r| match r.finished {
                None => !r.aborted,
                Some(done) => !done,
            })
            .map(|r| r.node.to_string())
            .collect();
        let mut in_service: HashMap<String, u32> = HashMap::new();
        for m in members {
            if m.accepted && m.online && !busy.contains(m.id) {
                *in_service.entry(m.group.to_string()).or_default() += 1;
            }
        }
        Self { busy, in_service }
    }

    pub fn in_service(&self, group: &str) -> u32 {
        self.in_service.get(group).copied().unwrap_or(0)
    }

    pub fn is_busy(&self, node: &str) -> bool {
        self.busy.contains(node)
    }

    /// Released nodes stop counting as in service (they were online and idle:
    /// only such nodes are released).
    pub fn released(&mut self, group: &str, ids: &[String]) {
        if let Some(n) = self.in_service.get_mut(group) {
            *n = n.saturating_sub(ids.len() as u32);
        }
        self.busy.extend(ids.iter().cloned());
    }
}

/// A released node whose patch failed (rolled back, failed or rejected).
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub node: &'a str,
    pub at_ms: i64,
    pub error: &'a str,
}

/// Why the rollout pauses for `group`, if it does: the failures since the
/// last resume (`acknowledged` were seen before it) reach the threshold, a
/// count or a share of the group's `targets` and at least 1. The reason names
/// the latest failure.
pub fn failure_pause(
    group: &str,
    policy: &Policy,
    targets: usize,
    failures: &[Failure<'_>],
    acknowledged: u32,
) -> Option<String> {
    let new_failures = (failures.len() as u32).saturating_sub(acknowledged);
    let threshold = policy.failure_threshold.of(targets).max(1) as u32;
    let latest = failures.iter().max_by_key(|f| f.at_ms)?;
    (new_failures >= threshold).then(|| {
        format!(
            "{new_failures} failure(s) in group {group} reached the threshold of {threshold}: node {}: {}",
            latest.node,
            if latest.error.is_empty() {
                "no error given"
            } else {
                latest.error
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rollout::policy::Amount;

    fn released(node: &str, finished: Option<bool>, aborted: bool) -> Released<'_> {
        Released {
            node,
            finished,
            aborted,
        }
    }

    #[test]
    fn busy_is_released_and_not_finished() {
        // (last report, rollout aborted) -> busy
        let table = [
            (None, false, true),
            (None, true, false),
            (Some(false), false, true),
            (Some(false), true, true),
            (Some(true), false, false),
            (Some(true), true, false),
        ];
        for (finished, aborted, busy) in table {
            let load = Load::count([released("n1", finished, aborted)], []);
            assert_eq!(load.is_busy("n1"), busy, "{finished:?} aborted={aborted}");
        }
    }

    #[test]
    fn in_service_counts_accepted_online_idle_nodes_per_group() {
        let m = |id, group, accepted, online| Member {
            id,
            group,
            accepted,
            online,
        };
        let members = [
            m("a1", "a", true, true),
            m("a2", "a", true, true),
            m("a3", "a", true, false), // offline
            m("a4", "a", false, true), // pending
            m("a5", "a", true, true),  // busy
            m("b1", "b", true, true),
            m("b2", "b", true, true), // busy
        ];
        let mut load = Load::count(
            [
                released("a5", Some(false), false),
                released("b2", None, false),
            ],
            members,
        );
        assert_eq!(load.in_service("a"), 2);
        assert_eq!(load.in_service("b"), 1);
        assert_eq!(load.in_service("c"), 0);
        load.released("a", &["a1".into()]);
        assert_eq!(load.in_service("a"), 1);
        assert!(load.is_busy("a1"));
        load.released("b", &["b1".into(), "x".into()]);
        assert_eq!(load.in_service("b"), 0, "never below zero");
    }

    fn policy(threshold: Amount) -> Policy {
        Policy {
            waves: vec![Amount::Percent(100)],
            bake: Duration::ZERO,
            max_applying: 0,
            failure_threshold: threshold,
            spread_label: None,
        }
    }

    #[test]
    fn failures_pause_at_the_threshold_since_the_last_resume() {
        let f = |node, at_ms, error| Failure { node, at_ms, error };
        let two = [f("n1", 10, "exit 1"), f("n2", 20, "")];
        // (threshold, targets, failures, acknowledged) -> pauses
        let table: [(Amount, usize, &[Failure<'_>], u32, bool); 8] = [
            (Amount::Count(1), 10, &[], 0, false),
            (Amount::Count(1), 10, &two[..1], 0, true),
            (Amount::Count(2), 10, &two[..1], 0, false),
            (Amount::Count(2), 10, &two, 0, true),
            (Amount::Count(2), 10, &two, 1, false),
            (Amount::Percent(20), 10, &two, 0, true),
            (Amount::Percent(30), 10, &two, 0, false),
            // A share of few targets is still at least one failure.
            (Amount::Percent(1), 3, &two[..1], 0, true),
        ];
        for (threshold, targets, failures, ack, pauses) in table {
            let why = failure_pause("g", &policy(threshold), targets, failures, ack);
            assert_eq!(
                why.is_some(),
                pauses,
                "{threshold:?} {targets} {ack}: {why:?}"
            );
        }
        let why = failure_pause("g", &policy(Amount::Count(2)), 10, &two, 0).unwrap();
        assert_eq!(
            why,
            "2 failure(s) in group g reached the threshold of 2: node n2: no error given"
        );
    }
}
