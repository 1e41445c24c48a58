//! Group settings beyond the desired count: maintenance windows, rollout
//! defaults and the patch SLA; and the compliance report built from the
//! fleet's installed versions and reports.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::pb;

use super::Fleet;
use super::published::wants;
use crate::compliance::{self, NodeInput, PatchInput, Sla};
use crate::error::{Error, Result};
use crate::model::{GroupRecord, NodeStatus, keys, now_ms};
use crate::rollout::policy::PolicySpec;
use crate::rollout::window::Schedule;

fn sla_text(s: &Sla) -> String {
    format!(
        "critical={},high={},medium={},low={}",
        s.critical_days, s.high_days, s.medium_days, s.low_days
    )
}

fn sla_of(g: &GroupRecord) -> Sla {
    Sla::parse(&g.sla).unwrap_or_default()
}

fn config_of(g: &GroupRecord) -> pb::GroupConfig {
    let window_open =
        Schedule::parse(&g.timezone, &g.windows).is_ok_and(|s| s.is_open(now_ms() / 1000));
    pb::GroupConfig {
        name: g.name.clone(),
        timezone: if g.timezone.is_empty() {
            "UTC".into()
        } else {
            g.timezone.clone()
        },
        windows: g.windows.clone(),
        rollout: Some(g.rollout.to_pb()),
        sla: sla_text(&sla_of(g)),
        window_open,
    }
}

impl Fleet {
    /// Changes a group's windows, rollout defaults or SLA (creating the group
    /// if needed). Everything is checked before anything is stored.
    pub async fn configure_group(&self, r: &pb::ConfigureGroupRequest) -> Result<pb::GroupConfig> {
        let mut st = self.state.lock().await;
        let mut g = st
            .groups
            .get(&r.name)
            .cloned()
            .unwrap_or_else(|| GroupRecord::unmanaged(&r.name));
        if let Some(tz) = &r.timezone {
            g.timezone = tz.trim().to_string();
        }
        if r.clear_windows {
            g.windows.clear();
        }
        if !r.windows.is_empty() {
            g.windows = r.windows.clone();
        }
        Schedule::parse(&g.timezone, &g.windows)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if let Some(p) = &r.rollout {
            g.rollout = PolicySpec::from_pb(Some(p))?.over(&g.rollout);
        }
        if let Some(sla) = &r.sla {
            Sla::parse(sla).map_err(Error::InvalidArgument)?;
            g.sla = sla.trim().to_string();
        }
        self.db.put(&keys::group(&r.name), &g).await?;
        let config = config_of(&g);
        st.groups.insert(r.name.clone(), g);
        drop(st);
        self.membership_changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.rollout_wake.notify_one();
        Ok(config)
    }

    pub async fn group_config(&self, name: &str) -> Result<pb::GroupConfig> {
        let st = self.state.lock().await;
        st.groups
            .get(name)
            .map(config_of)
            .ok_or_else(|| Error::NotFound(format!("no group named {name}")))
    }

    /// The compliance report over the accepted nodes (of one group, or all).
    pub async fn compliance(&self, group: Option<&str>) -> Result<compliance::Report> {
        let st = self.state.lock().await;
        if let Some(g) = group
            && !st.groups.contains_key(g)
        {
            return Err(Error::NotFound(format!("no group named {g}")));
        }
        let nodes: Vec<_> = st
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Accepted)
            .filter(|n| group.is_none_or(|g| g == n.group))
            .collect();
        let now = time::OffsetDateTime::now_utc();
        let patches: Vec<PatchInput> = st
            .patches
            .values()
            .map(|(r, m)| {
                let phases = st.phases.get(&r.id);
                PatchInput {
                    id: r.id.clone(),
                    component: m.component.clone(),
                    version: m.version.clone(),
                    severity: m.severity,
                    issued_at_ms: m.issued_at.unix_timestamp() * 1000,
                    targeted: nodes
                        .iter()
                        .filter(|n| wants(n, m, now))
                        .map(|n| n.id.clone())
                        .collect::<BTreeSet<_>>(),
                    committed_at_ms: phases
                        .map(|p| {
                            p.iter()
                                .filter(|(_, n)| n.phase == pb::PatchPhase::Committed)
                                .map(|(id, n)| (id.clone(), n.at_ms))
                                .collect::<BTreeMap<_, _>>()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        let inputs: Vec<NodeInput> = nodes
            .iter()
            .map(|n| NodeInput {
                id: n.id.clone(),
                group: n.group.clone(),
                joined_at_ms: n.joined_at * 1000,
                installed: n.installed.clone(),
            })
            .collect();
        let slas: BTreeMap<&str, Sla> = st
            .groups
            .values()
            .map(|g| (g.name.as_str(), sla_of(g)))
            .collect();
        let sla = |g: &str| slas.get(g).cloned().unwrap_or_default();
        Ok(compliance::compute(&inputs, &patches, &sla, now_ms()))
    }
}
