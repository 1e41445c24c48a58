//! Turns the fleet's state into events, on the leading replica: a group's
//! deficit or surplus changing, a rollout paused, completed or aborted, an
//! accepted node offline past the grace. What was last reported is kept in
//! the store (`events-seen`) and written in the same transaction as the
//! events, so a restart or a new leader neither repeats nor misses one.
//! Joins and patch failures are appended where they happen.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Batch, Kind};
use crate::app::App;
use crate::error::Result;
use crate::rollout::record::RolloutState;

const SEEN: &str = "events-seen";
/// How often the fleet is looked at (and at each group or rollout change).
const TICK: Duration = Duration::from_secs(1);
/// The least time between two looks.
const COALESCE: Duration = Duration::from_millis(250);

/// What the events so far told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// Group -> (deficit, surplus).
    pub groups: BTreeMap<String, (u32, u32)>,
    /// Patch id -> rollout state.
    pub rollouts: BTreeMap<String, String>,
    /// Nodes reported offline and not back since.
    pub offline: BTreeSet<String>,
}

/// A group's numbers now.
#[derive(Debug, Clone)]
pub struct GroupNow {
    pub name: String,
    pub desired: Option<u32>,
    pub healthy_active: u32,
    pub healthy: u32,
    pub deficit: u32,
}

impl GroupNow {
    fn surplus(&self) -> u32 {
        self.desired.map_or(0, |d| self.healthy.saturating_sub(d))
    }
}

/// A rollout's state now.
#[derive(Debug, Clone)]
pub struct RolloutNow {
    pub patch_id: String,
    pub state: RolloutState,
    pub reason: String,
    pub failures: u32,
    pub component: String,
    pub version: String,
}

/// An accepted node offline past the grace.
#[derive(Debug, Clone)]
pub struct OfflineNow {
    pub node: String,
    pub group: String,
    pub offline_secs: u64,
}

/// The events `now` calls for against `seen`, and what is seen after them.
/// `groups`/`offline` are None while they cannot be trusted yet (a new
/// leader's startup grace: nodes are still coming back), and stay as seen.
/// `fresh`: nothing was seen before (the first run): rollouts are taken as
/// they are, not reported.
pub fn diff(
    seen: &Seen,
    fresh: bool,
    groups: Option<&[GroupNow]>,
    rollouts: &[RolloutNow],
    offline: Option<&[OfflineNow]>,
) -> (Vec<(Kind, String, serde_json::Value)>, Seen) {
    let mut events = Vec::new();
    let mut next = seen.clone();
    if let Some(groups) = groups {
        next.groups.clear();
        for g in groups {
            let (old_deficit, old_surplus) = seen.groups.get(&g.name).copied().unwrap_or((0, 0));
            let surplus = g.surplus();
            let numbers = |key: &str, value: u32| {
                serde_json::json!({
                    "group": g.name, "desired": g.desired, "healthy_active": g.healthy_active,
                    "healthy": g.healthy, key: value,
                })
            };
            if g.deficit != old_deficit {
                events.push((Kind::Deficit, g.name.clone(), numbers("deficit", g.deficit)));
            }
            if surplus != old_surplus {
                events.push((Kind::Surplus, g.name.clone(), numbers("surplus", surplus)));
            }
            next.groups.insert(g.name.clone(), (g.deficit, surplus));
        }
    }
    next.rollouts.clear();
    for r in rollouts {
        let state = r.state.as_str();
        let changed = seen.rollouts.get(&r.patch_id).map(String::as_str) != Some(state);
        let kind = match r.state {
            RolloutState::Paused => Some(Kind::RolloutPaused),
            RolloutState::Completed => Some(Kind::RolloutCompleted),
            RolloutState::Aborted => Some(Kind::RolloutAborted),
            RolloutState::Running => None,
        };
        if let Some(kind) = kind
            && changed
            && !fresh
        {
            events.push((
                kind,
                r.patch_id.clone(),
                serde_json::json!({
                    "patch": r.patch_id, "component": r.component, "version": r.version,
                    "state": state, "reason": r.reason, "failures": r.failures,
                }),
            ));
        }
        next.rollouts.insert(r.patch_id.clone(), state.to_string());
    }
    if let Some(offline) = offline {
        next.offline.clear();
        for o in offline {
            if !seen.offline.contains(&o.node) {
                events.push((
                    Kind::NodeOffline,
                    o.node.clone(),
                    serde_json::json!({
                        "node": o.node, "group": o.group, "offline_secs": o.offline_secs,
                    }),
                ));
            }
            next.offline.insert(o.node.clone());
        }
    }
    (events, next)
}

/// Looks at the fleet every tick (and at each group or rollout change) while
/// this replica leads, until `shutdown`.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut groups = app.fleet.subscribe_groups();
    let mut rollouts = app.fleet.subscribe_rollouts();
    let mut leading_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = groups.recv() => {}
            _ = rollouts.recv() => {}
            () = tokio::time::sleep(TICK) => {}
        }
        // Changes come in bursts (a rollout moves with every report): one
        // look takes them all, and looks are at least a quarter second apart.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(COALESCE) => {}
        }
        drain(&mut groups);
        drain(&mut rollouts);
        if !app.fleet.is_leading() {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        let settled = since.elapsed() >= app.cfg.startup_grace;
        if let Err(e) = look(&app, settled).await {
            tracing::warn!(error = %e, "cannot turn the fleet's state into events; trying again");
        }
    }
}

/// Takes every change waiting in `rx` (the look that follows sees them all).
fn drain<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<T>) {
    use tokio::sync::broadcast::error::TryRecvError;
    while matches!(rx.try_recv(), Ok(_) | Err(TryRecvError::Lagged(_))) {}
}

async fn look(app: &App, settled: bool) -> Result<()> {
    let stored = app.db.raw().get(SEEN).await?;
    let (seen, fresh) = match &stored {
        Some(b) => (serde_json::from_slice(b).unwrap_or_default(), false),
        None => (Seen::default(), true),
    };
    let groups: Vec<GroupNow> = app
        .fleet
        .published_group_statuses()
        .await
        .into_iter()
        .map(|g| GroupNow {
            name: g.name,
            desired: g.desired,
            healthy_active: g.healthy_active,
            healthy: g.healthy_active + g.healthy_standby,
            deficit: g.deficit,
        })
        .collect();
    let mut rollouts: Vec<RolloutNow> = app
        .fleet
        .rollout_briefs()
        .await
        .into_iter()
        .map(|r| RolloutNow {
            patch_id: r.patch_id,
            state: r.state,
            reason: r.reason,
            failures: 0,
            component: r.component,
            version: r.version,
        })
        .collect();
    // The failure count (which visits the rollout's nodes) only for a
    // rollout about to be told of.
    for r in rollouts.iter_mut().filter(|r| {
        !fresh
            && r.state != RolloutState::Running
            && seen.rollouts.get(&r.patch_id).map(String::as_str) != Some(r.state.as_str())
    }) {
        if let Some(info) = app.fleet.rollout_info(&r.patch_id).await {
            r.failures = info.failures;
        }
    }
    let offline: Vec<OfflineNow> = app
        .fleet
        .offline_past(app.cfg.offline_grace)
        .await
        .into_iter()
        .map(|(node, group, d)| OfflineNow {
            node,
            group,
            offline_secs: d.as_secs(),
        })
        .collect();
    let (events, next) = diff(
        &seen,
        fresh,
        settled.then_some(groups.as_slice()),
        &rollouts,
        settled.then_some(offline.as_slice()),
    );
    if next == seen && !fresh {
        return Ok(());
    }
    let (when, then) = crate::store::cas(
        SEEN,
        stored.as_deref(),
        Some(serde_json::to_vec(&next).expect("seen serialises")),
    );
    // None: another leader wrote meanwhile; the next look starts from its.
    app.events
        .append_batch(Batch {
            events,
            when: vec![when],
            then: vec![then],
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, desired: u32, healthy_active: u32, healthy: u32) -> GroupNow {
        GroupNow {
            name: name.into(),
            desired: Some(desired),
            healthy_active,
            healthy,
            deficit: desired.saturating_sub(healthy_active),
        }
    }

    fn kinds(events: &[(Kind, String, serde_json::Value)]) -> Vec<(&str, &str)> {
        events
            .iter()
            .map(|(k, s, _)| (k.as_str(), s.as_str()))
            .collect()
    }

    #[test]
    fn each_change_is_told_once() {
        let seen = Seen::default();
        let (ev, seen) = diff(&seen, true, Some(&[group("g", 3, 1, 1)]), &[], Some(&[]));
        assert_eq!(kinds(&ev), [("deficit", "g")]);
        assert_eq!(ev[0].2["deficit"], 2);
        // Nothing changed: nothing told.
        let (ev, seen) = diff(&seen, false, Some(&[group("g", 3, 1, 1)]), &[], Some(&[]));
        assert!(ev.is_empty());
        // Filled, then one node more than needed: the deficit goes to 0, a surplus appears.
        let (ev, seen) = diff(&seen, false, Some(&[group("g", 3, 3, 4)]), &[], Some(&[]));
        assert_eq!(kinds(&ev), [("deficit", "g"), ("surplus", "g")]);
        assert_eq!(
            (ev[0].2["deficit"].as_u64(), ev[1].2["surplus"].as_u64()),
            (Some(0), Some(1))
        );
        // While groups cannot be trusted (startup grace), they stay as seen.
        let (ev, after) = diff(&seen, false, None, &[], None);
        assert!(ev.is_empty());
        assert_eq!(after.groups, seen.groups);
    }

    #[test]
    fn rollouts_and_offline_nodes_are_told_on_change_only() {
        let r = |state| RolloutNow {
            patch_id: "p1".into(),
            state,
            reason: String::new(),
            failures: 0,
            component: "c".into(),
            version: "1.0.0".into(),
        };
        let off = OfflineNow {
            node: "n1".into(),
            group: "g".into(),
            offline_secs: 30,
        };
        // The first run takes rollouts as they are.
        let (ev, seen) = diff(
            &Seen::default(),
            true,
            None,
            &[r(RolloutState::Completed)],
            None,
        );
        assert!(ev.is_empty());
        let (ev, seen) = diff(&seen, false, None, &[r(RolloutState::Completed)], None);
        assert!(ev.is_empty());
        let seen = Seen {
            rollouts: [("p1".to_string(), "running".to_string())].into(),
            ..seen
        };
        let (ev, seen) = diff(
            &seen,
            false,
            None,
            &[r(RolloutState::Paused)],
            Some(std::slice::from_ref(&off)),
        );
        assert_eq!(
            kinds(&ev),
            [("rollout.paused", "p1"), ("node.offline", "n1")]
        );
        let (ev, seen) = diff(
            &seen,
            false,
            None,
            &[r(RolloutState::Paused)],
            Some(std::slice::from_ref(&off)),
        );
        assert!(ev.is_empty());
        // Back online, then offline again: told again.
        let (_, seen) = diff(&seen, false, None, &[r(RolloutState::Completed)], Some(&[]));
        let (ev, _) = diff(&seen, false, None, &[], Some(&[off]));
        assert_eq!(kinds(&ev), [("node.offline", "n1")]);
    }
}
