//! Which patch reaches a node when: a component's versions in order (a newer
//! version installed or on its way overtakes an older one, which is then
//! superseded, never released), and one patch at a time (a node busy with
//! another patch is waited for).

use super::State;
use crate::rollout::record::RolloutState;

/// The newer versions of a patch's component, looked up once per step.
#[derive(Debug)]
pub(super) struct Newer<'a> {
    pub(super) component: &'a str,
    pub(super) version: semver::Version,
    /// (patch id, version) of every newer published patch of the component.
    patches: Vec<(&'a str, &'a str)>,
}

impl State {
    /// What overtakes `patch_id` on nodes: a newer version of its component.
    pub(super) fn newer_than(&self, patch_id: &str) -> Option<Newer<'_>> {
        let (_, m) = self.patches.get(patch_id)?;
        // A signed downgrade is meant to replace newer versions.
        if m.allow_downgrade {
            return None;
        }
        let version = semver::Version::parse(&m.version).ok()?;
        let patches = self
            .patches
            .iter()
            .filter(|(id, (_, o))| {
                id.as_str() != patch_id
                    && o.component == m.component
                    && semver::Version::parse(&o.version).is_ok_and(|v| v > version)
            })
            .map(|(id, (_, o))| (id.as_str(), o.version.as_str()))
            .collect();
        Some(Newer {
            component: &m.component,
            version,
            patches,
        })
    }

    /// The newer version that overtakes a patch on this node: one installed,
    /// or one released to it (applying or done). Such a node is never released
    /// the older patch, so a component's versions reach a node in order.
    pub(super) fn superseding<'a>(
        &'a self,
        newer: &Newer<'a>,
        group: &str,
        node: &str,
    ) -> Option<&'a str> {
        if let Some(have) = self
            .nodes
            .get(node)
            .and_then(|n| n.installed.get(newer.component))
            && semver::Version::parse(have).is_ok_and(|v| v > newer.version)
        {
            return Some(have.as_str());
        }
        newer
            .patches
            .iter()
            .find(|(id, _)| {
                // One that failed there leaves the older one to be tried.
                self.released_to(id, group, node)
                    && !self
                        .phases
                        .get(*id)
                        .and_then(|p| p.get(node))
                        .is_some_and(|n| n.phase.is_failure())
            })
            .map(|(_, v)| *v)
    }

    /// Another patch this node is applying now (released, no outcome yet).
    pub(super) fn busy_with(&self, patch_id: &str, group: &str, node: &str) -> Option<&str> {
        self.rollouts
            .values()
            .filter(|r| r.patch_id != patch_id && r.is_released(group, node))
            .find(
                |r| match self.phases.get(&r.patch_id).and_then(|p| p.get(node)) {
                    None => r.state != RolloutState::Aborted,
                    Some(n) => !n.phase.is_final(),
                },
            )
            .map(|r| r.patch_id.as_str())
    }
}
