//! Groups: desired counts and the status provisioning tools watch, settings
//! beyond the count (maintenance windows, rollout defaults, patch SLA), and the
//! compliance report built from the fleet's installed versions and reports.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::phase::Phase;
use tokio::sync::broadcast;

use super::published::targets;
use super::view::Write;
use super::{Fleet, State};
use crate::compliance::{self, NodeInput, PatchInput, Sla};
use crate::error::{Error, Result};
use crate::membership;
use crate::model::{GroupRecord, NodeStatus, Role, keys, now_ms};
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

/// A group's counts, as provisioning tools watch them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub name: String,
    /// None when the group has no desired count (every node active).
    pub desired: Option<u32>,
    pub max_unavailable: u32,
    /// Nodes holding the active role, and those of them online.
    pub active: u32,
    pub healthy_active: u32,
    pub standby: u32,
    /// Standby nodes online.
    pub healthy_standby: u32,
    pub pending: u32,
    pub online: u32,
    /// desired - healthy_active, never below zero.
    pub deficit: u32,
    /// Nodes that are neither revoked nor rejected.
    pub total: u32,
}

/// A group's settings beyond its count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    /// IANA time zone of the windows ("UTC" when none was set).
    pub timezone: String,
    pub windows: Vec<String>,
    pub rollout: PolicySpec,
    /// The SLA in force, "critical=30,high=90,medium=180,low=365".
    pub sla: String,
    /// Whether a window is open now (true when there is none).
    pub window_open: bool,
    /// The node label whose value is a node's site.
    pub site_label: String,
}

/// A change to a group's settings: what is None (or empty) stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSettings {
    pub name: String,
    pub timezone: Option<String>,
    /// Replace the windows with these.
    pub windows: Vec<String>,
    /// Remove every window.
    pub clear_windows: bool,
    /// Rollout defaults; its unset fields keep the group's.
    pub rollout: Option<PolicySpec>,
    /// SLA days per severity, "critical=30,high=90".
    pub sla: Option<String>,
    /// The node label whose value is a node's site.
    pub site_label: Option<String>,
}

fn config_of(g: &GroupRecord) -> GroupConfig {
    let window_open =
        Schedule::parse(&g.timezone, &g.windows).is_ok_and(|s| s.is_open(now_ms() / 1000));
    GroupConfig {
        name: g.name.clone(),
        timezone: if g.timezone.is_empty() {
            "UTC".into()
        } else {
            g.timezone.clone()
        },
        windows: g.windows.clone(),
        rollout: g.rollout.clone(),
        sla: sla_text(&sla_of(g)),
        window_open,
        site_label: g.site_label().to_string(),
    }
}

/// "unknown group X", with the nearest existing name when one is close
/// enough to be what was meant.
pub(super) fn unknown_group<'a>(name: &str, known: impl Iterator<Item = &'a String>) -> Error {
    let near = known
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min();
    Error::NotFound(match near {
        Some((_, k)) => format!("unknown group {name} (did you mean {k}?)"),
        None => format!("unknown group {name}"),
    })
}

impl State {
    /// The write that makes a new group (a name deleted before goes on from
    /// its revision).
    pub(super) fn new_group(&self, mut g: GroupRecord) -> Write {
        if let Some(r) = self.retired_groups.get(&g.name) {
            g.revision = g.revision.max(r + 1);
        }
        self.write(keys::group(&g.name), &g)
    }
}

impl Fleet {
    /// NotFound (with a suggestion) unless the group exists.
    pub(super) fn require_group(st: &State, name: &str) -> Result<()> {
        if st.groups.contains_key(name) {
            Ok(())
        } else {
            Err(unknown_group(name, st.groups.keys()))
        }
    }

    /// Creates a group without a desired count if it does not exist (a join
    /// token for a new group makes it).
    pub async fn ensure_group(&self, name: &str) -> Result<()> {
        self.mutate(false, |st| {
            let writes = if st.groups.contains_key(name) {
                Vec::new()
            } else {
                vec![st.new_group(GroupRecord::unmanaged(name))]
            };
            Ok((writes, ()))
        })
        .await
    }

    /// Creates a group; AlreadyExists if it does.
    pub async fn create_group(
        &self,
        name: &str,
        desired: Option<u32>,
        max_unavailable: Option<u32>,
    ) -> Result<GroupStatus> {
        self.mutate(false, |st| {
            if st.groups.contains_key(name) {
                return Err(Error::AlreadyExists(format!("group {name} already exists")));
            }
            let mut g = GroupRecord::unmanaged(name);
            g.desired = desired;
            if let Some(m) = max_unavailable {
                g.max_unavailable = m;
            }
            Ok((vec![st.new_group(g)], ()))
        })
        .await?;
        Ok(self.status_of(&*self.state.lock().await, name))
    }

    /// Deletes a group that has no pending or accepted node. The caller has
    /// checked that no join token can still add one.
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        self.mutate(false, |st| {
            Self::require_group(st, name)?;
            let members = st
                .nodes
                .values()
                .filter(|n| n.group == name)
                .filter(|n| matches!(n.status, NodeStatus::Pending | NodeStatus::Accepted))
                .count();
            if members > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "group {name} still has {members} node(s): revoke or reject them first"
                )));
            }
            let mut g = st.groups.get(name).cloned().expect("checked above");
            g.deleted = true;
            g.revision += 1;
            Ok((vec![st.write(keys::group(name), &g)], ()))
        })
        .await
    }

    /// Sets a group's desired count; an unknown group is NotFound unless
    /// `create` is set.
    pub async fn set_group(
        &self,
        name: &str,
        desired: u32,
        max_unavailable: Option<u32>,
        create: bool,
    ) -> Result<GroupStatus> {
        self.mutate(false, |st| {
            let mut g = match st.groups.get(name) {
                Some(g) => g.clone(),
                None if create => {
                    let mut g = GroupRecord::unmanaged(name);
                    if let Some(r) = st.retired_groups.get(name) {
                        g.revision = g.revision.max(r + 1);
                    }
                    g
                }
                None => return Err(unknown_group(name, st.groups.keys())),
            };
            g.desired = Some(desired);
            if let Some(m) = max_unavailable {
                g.max_unavailable = m;
            }
            g.revision += 1;
            Ok((vec![st.write(keys::group(name), &g)], ()))
        })
        .await?;
        self.reconcile(name).await?;
        Ok(self.status_of(&*self.state.lock().await, name))
    }

    fn status_of(&self, st: &State, name: &str) -> GroupStatus {
        let g = st.groups.get(name);
        let mut c = membership::Counts::default();
        let mut healthy_standby = 0;
        for n in st.nodes.values().filter(|n| n.group == name) {
            let online = st.online(&n.id);
            match n.status {
                NodeStatus::Pending => c.pending += 1,
                NodeStatus::Accepted => match n.role {
                    Role::Active => {
                        c.active += 1;
                        if online {
                            c.healthy_active += 1;
                        }
                    }
                    Role::Standby => {
                        c.standby += 1;
                        if online {
                            healthy_standby += 1;
                        }
                    }
                },
                NodeStatus::Rejected | NodeStatus::Revoked => continue,
            }
            c.total += 1;
            if online {
                c.online += 1;
            }
        }
        let desired = g.and_then(|g| g.desired);
        GroupStatus {
            name: name.to_string(),
            desired,
            max_unavailable: g.map_or(1, |g| g.max_unavailable),
            active: c.active,
            healthy_active: c.healthy_active,
            standby: c.standby,
            healthy_standby,
            pending: c.pending,
            online: c.online,
            deficit: c.deficit(desired),
            total: c.total,
        }
    }

    pub(super) fn publish_status(&self, st: &mut State, name: &str) {
        let status = self.status_of(st, name);
        if st.published.get(name) != Some(&status) {
            st.published.insert(name.to_string(), status.clone());
            let _ = self.group_events.send(status);
        }
    }

    /// Status of every group (or one: NotFound if there is none).
    pub async fn group_statuses(&self, only: Option<&str>) -> Result<Vec<GroupStatus>> {
        let st = self.state.lock().await;
        if let Some(o) = only {
            Self::require_group(&st, o)?;
        }
        Ok(st
            .groups
            .keys()
            .filter(|n| only.is_none_or(|o| o == n.as_str()))
            .map(|n| self.status_of(&st, n))
            .collect())
    }

    /// Every group's status as last published to watchers (kept current by
    /// every change): no node is visited, so it is cheap enough to ask every
    /// second.
    pub async fn published_group_statuses(&self) -> Vec<GroupStatus> {
        let st = self.state.lock().await;
        st.groups
            .keys()
            .filter_map(|n| st.published.get(n).cloned())
            .collect()
    }

    /// Group status changes from now on.
    pub fn subscribe_groups(&self) -> broadcast::Receiver<GroupStatus> {
        self.group_events.subscribe()
    }

    /// Changes an existing group's windows, rollout defaults or SLA.
    /// Everything is checked before anything is stored.
    pub async fn configure_group(&self, r: &GroupSettings) -> Result<GroupConfig> {
        self.mutate(false, |st| {
            Self::require_group(st, &r.name)?;
            let mut g = st.groups.get(&r.name).cloned().expect("checked above");
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
                g.rollout = p.over(&g.rollout);
            }
            if let Some(sla) = &r.sla {
                Sla::parse(sla).map_err(Error::InvalidArgument)?;
                g.sla = sla.trim().to_string();
            }
            if let Some(label) = &r.site_label {
                let label = label.trim();
                flotilla_proto::limits::check_name("site label", label, 63)
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                g.site_label = Some(label.to_string());
            }
            // Windows and rollout defaults decide which patches the nodes
            // download ahead: their desired states change.
            g.revision += 1;
            let config = config_of(&g);
            Ok((vec![st.write(keys::group(&r.name), &g)], config))
        })
        .await
    }

    pub async fn group_config(&self, name: &str) -> Result<GroupConfig> {
        let st = self.state.lock().await;
        st.groups
            .get(name)
            .map(config_of)
            .ok_or_else(|| unknown_group(name, st.groups.keys()))
    }

    /// The compliance report over the accepted nodes (of one group, or all).
    pub async fn compliance(&self, group: Option<&str>) -> Result<compliance::Report> {
        let st = self.state.lock().await;
        if let Some(g) = group {
            Self::require_group(&st, g)?;
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
                    expired: m.expires_at <= now,
                    // Expired or not: a node that never took it missed it.
                    targeted: nodes
                        .iter()
                        .filter(|n| targets(n, m))
                        .map(|n| n.id.clone())
                        .collect::<BTreeSet<_>>(),
                    committed_at_ms: phases
                        .map(|p| {
                            p.iter()
                                .filter(|(_, n)| n.phase == Phase::Committed)
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
                trust_version: n.facts.trust_version,
                installed: n.installed.clone(),
            })
            .collect();
        let slas: BTreeMap<&str, Sla> = st
            .groups
            .values()
            .map(|g| (g.name.as_str(), sla_of(g)))
            .collect();
        let sla = |g: &str| slas.get(g).cloned().unwrap_or_default();
        Ok(compliance::compute(
            &inputs,
            &patches,
            &sla,
            now_ms(),
            st.trust_version(),
        ))
    }
}
