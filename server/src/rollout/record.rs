//! A rollout as stored: one record per published patch, under `rollouts/<id>`,
//! written before the nodes it releases are told.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::plan::GroupProgress;
use super::policy::PolicySpec;

pub const PREFIX: &str = "rollouts/";

pub fn key(patch_id: &str) -> String {
    format!("{PREFIX}{patch_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    Running,
    Paused,
    Aborted,
    /// Every target has it (or failed). Nodes that join or come back later
    /// still get it: a completed rollout keeps converging.
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Aborted => "aborted",
            Self::Completed => "completed",
        }
    }

    /// Whether the controller still releases nodes.
    pub fn releases(self) -> bool {
        matches!(self, Self::Running | Self::Completed)
    }

    /// Whether a watch of it is over.
    pub fn ended(self) -> bool {
        matches!(self, Self::Aborted | Self::Completed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub patch_id: String,
    /// As given at publish; the groups' defaults fill in the rest.
    pub policy: PolicySpec,
    pub emergency: bool,
    pub force: bool,
    pub state: RolloutState,
    pub reason: String,
    /// Aborted with rollback of the nodes that committed.
    #[serde(default)]
    pub rollback: bool,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub groups: BTreeMap<String, GroupProgress>,
    /// Grows on every change that alters nodes' desired states (releases,
    /// abort); part of the desired-state revision, so it only grows.
    pub revision: u64,
}

impl RolloutRecord {
    pub fn new(
        patch_id: &str,
        policy: PolicySpec,
        emergency: bool,
        force: bool,
        now_ms: i64,
    ) -> Self {
        Self {
            patch_id: patch_id.to_string(),
            policy,
            emergency,
            force,
            state: RolloutState::Running,
            reason: String::new(),
            rollback: false,
            started_at_ms: now_ms,
            updated_at_ms: now_ms,
            groups: BTreeMap::new(),
            revision: 0,
        }
    }

    pub fn is_released(&self, group: &str, node: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.released.contains(node))
    }
}
