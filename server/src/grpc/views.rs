//! Protobuf views of the fleet's domain types, and the domain types of the
//! requests that carry them: the only place they meet.

use flotilla_proto::pb;

use crate::error::Result;
use crate::fleet::{
    Desired, GroupConfig, GroupSettings, GroupStatus, PatchInfo, RolloutGroup, RolloutInfo,
    SignedManifest, WaveProgress,
};
use crate::model::{NodeStatus, Role};
use crate::patches::NodePatchState;
use crate::rollout::policy::PolicySpec;

/// The role a node is told and shown: pending until accepted, then its role.
pub fn role(status: NodeStatus, role: Role) -> pb::Role {
    match (status, role) {
        (NodeStatus::Accepted, Role::Active) => pb::Role::Active,
        (NodeStatus::Accepted, Role::Standby) => pb::Role::Standby,
        (NodeStatus::Pending, _) => pb::Role::Pending,
        _ => pb::Role::Unspecified,
    }
}

impl From<&SignedManifest> for pb::SignedManifest {
    fn from(m: &SignedManifest) -> Self {
        Self {
            id: m.id.clone(),
            // Shared, not copied: every node's state carries the same bytes.
            manifest: m.manifest.clone(),
            signatures: m.signatures.clone(),
            deltas: m.deltas.clone(),
        }
    }
}

impl From<&Desired> for pb::DesiredState {
    fn from(d: &Desired) -> Self {
        Self {
            revision: d.revision,
            node_id: d.node_id.clone(),
            group: d.group.clone(),
            desired_count: d.desired_count.unwrap_or(0),
            unmanaged: d.desired_count.is_none(),
            role: role(d.status, d.role) as i32,
            heartbeat_interval_ms: u32::try_from(d.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            manifests: d.manifests.iter().map(Into::into).collect(),
            prefetch: d.prefetch.iter().map(Into::into).collect(),
            labels: d.labels.clone().into_iter().collect(),
            rollback: d.rollback.clone(),
            trust: d.trust.iter().map(Into::into).collect(),
            site_peers: d
                .site_peers
                .iter()
                .map(|p| pb::SitePeer {
                    node_id: p.node_id.clone(),
                    url: p.url.clone(),
                })
                .collect(),
        }
    }
}

impl From<GroupStatus> for pb::GroupStatus {
    fn from(s: GroupStatus) -> Self {
        let GroupStatus {
            name,
            desired,
            max_unavailable,
            active,
            healthy_active,
            standby,
            healthy_standby: _,
            pending,
            online,
            deficit,
            total,
        } = s;
        Self {
            name,
            desired,
            max_unavailable,
            active,
            healthy_active,
            standby,
            pending,
            online,
            deficit,
            total,
        }
    }
}

/// A rollout policy from the wire, checked.
pub fn policy_spec(p: Option<&pb::RolloutPolicy>) -> Result<PolicySpec> {
    match p {
        None => Ok(PolicySpec::default()),
        Some(p) => Ok(PolicySpec {
            download_ahead: p.download_ahead,
            ..PolicySpec::parse(
                &p.waves,
                p.bake_secs,
                p.max_applying,
                p.failure_threshold.as_deref(),
                p.spread_label.as_deref(),
            )?
        }),
    }
}

impl From<&PolicySpec> for pb::RolloutPolicy {
    fn from(p: &PolicySpec) -> Self {
        Self {
            waves: p.waves.iter().flatten().map(ToString::to_string).collect(),
            bake_secs: p.bake_secs,
            max_applying: p.max_applying,
            failure_threshold: p.failure_threshold.map(|t| t.to_string()),
            spread_label: p.spread_label.clone(),
            download_ahead: p.download_ahead,
        }
    }
}

impl From<GroupConfig> for pb::GroupConfig {
    fn from(c: GroupConfig) -> Self {
        Self {
            rollout: Some((&c.rollout).into()),
            name: c.name,
            timezone: c.timezone,
            windows: c.windows,
            sla: c.sla,
            window_open: c.window_open,
            site_label: c.site_label,
        }
    }
}

impl TryFrom<pb::ConfigureGroupRequest> for GroupSettings {
    type Error = crate::error::Error;

    fn try_from(r: pb::ConfigureGroupRequest) -> Result<Self> {
        Ok(Self {
            rollout: r
                .rollout
                .as_ref()
                .map(|p| policy_spec(Some(p)))
                .transpose()?,
            name: r.name,
            timezone: r.timezone,
            windows: r.windows,
            clear_windows: r.clear_windows,
            sla: r.sla,
            site_label: r.site_label,
        })
    }
}

impl From<WaveProgress> for pb::WaveProgress {
    fn from(w: WaveProgress) -> Self {
        Self {
            index: w.index,
            size: w.size,
            started_at_ms: w.started_at_ms,
            done_at_ms: w.done_at_ms,
        }
    }
}

impl From<RolloutGroup> for pb::RolloutGroup {
    fn from(g: RolloutGroup) -> Self {
        Self {
            group: g.group,
            wave: g.wave,
            waves: g.waves,
            targeted: g.targeted,
            released: g.released,
            committed: g.committed,
            failed: g.failed,
            applying: g.applying,
            waiting_for: g.waiting_for,
            bake_until_ms: g.bake_until_ms,
            in_service: g.in_service,
            min_in_service: g.min_in_service,
            waves_progress: g.waves_progress.into_iter().map(Into::into).collect(),
            lowest_in_service: g.lowest_in_service,
            window_opens_at_ms: g.window_opens_at_ms,
        }
    }
}

impl From<RolloutInfo> for pb::RolloutInfo {
    fn from(r: RolloutInfo) -> Self {
        Self {
            patch_id: r.patch_id,
            state: r.state.as_str().to_string(),
            reason: r.reason,
            emergency: r.emergency,
            force: r.force,
            policy: Some((&r.policy).into()),
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
            groups: r.groups.into_iter().map(Into::into).collect(),
            failures: r.failures,
            rollback: r.rollback,
            component: r.component,
            version: r.version,
            severity: r.severity.as_str().to_string(),
        }
    }
}

impl From<PatchInfo> for pb::PatchInfo {
    fn from(p: PatchInfo) -> Self {
        let PatchInfo {
            record,
            manifest: m,
            targeted,
            emergency,
            rollout_state,
        } = p;
        Self {
            id: record.id,
            component: m.component,
            version: m.version,
            severity: m.severity.as_str().to_string(),
            issued_at: m.issued_at.unix_timestamp(),
            expires_at: m.expires_at.unix_timestamp(),
            published_at: record.published_at,
            published_by: record.published_by,
            artifacts: m
                .artifacts
                .into_iter()
                .map(|a| pb::ArtifactRef {
                    name: a.name,
                    sha256: a.sha256,
                    size: a.size,
                })
                .collect(),
            targeted,
            signatures: record.signatures.len() as u32,
            manifest: record.manifest.into_bytes(),
            deltas: record.deltas.into_bytes(),
            emergency,
            rollout_state: rollout_state.map_or("", |s| s.as_str()).to_string(),
        }
    }
}

impl From<NodePatchState> for pb::NodePatchState {
    fn from(s: NodePatchState) -> Self {
        Self {
            node_id: s.node_id,
            group: s.group,
            phase: s.phase,
            first_at_ms: s.first_at_ms,
            updated_at_ms: s.updated_at_ms,
            error: s.error,
            log_tail: s.log_tail,
            transfer: s
                .transfer
                .as_ref()
                .map(flotilla_proto::transfer::Transfer::to_proto),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_round_trips_through_the_wire() {
        let spec = policy_spec(Some(&pb::RolloutPolicy {
            waves: vec!["1".into(), "10%".into(), "100%".into()],
            bake_secs: Some(30),
            max_applying: Some(2),
            failure_threshold: Some("5%".into()),
            spread_label: Some("site".into()),
            download_ahead: Some(false),
        }))
        .unwrap();
        assert_eq!(spec.download_ahead, Some(false));
        assert_eq!(policy_spec(Some(&(&spec).into())).unwrap(), spec);
        assert_eq!(policy_spec(None).unwrap(), PolicySpec::default());
    }

    #[test]
    fn a_bad_policy_on_the_wire_is_refused_by_name() {
        let bad = pb::ConfigureGroupRequest {
            name: "g".into(),
            rollout: Some(pb::RolloutPolicy {
                waves: vec!["1".into(), "50%".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = GroupSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("last wave"), "{e}");
    }

    #[test]
    fn roles_shown_follow_the_node_status() {
        assert_eq!(role(NodeStatus::Accepted, Role::Active), pb::Role::Active);
        assert_eq!(role(NodeStatus::Accepted, Role::Standby), pb::Role::Standby);
        assert_eq!(role(NodeStatus::Pending, Role::Active), pb::Role::Pending);
        assert_eq!(
            role(NodeStatus::Revoked, Role::Active),
            pb::Role::Unspecified
        );
    }
}
