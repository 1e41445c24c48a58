//! Rollouts: how a published patch reaches its targets. `policy` holds wave
//! sizes and thresholds, `plan` decides one step in one group, `guard` counts
//! nodes in service and checks the failure threshold, `window` knows
//! a group's maintenance windows, and `record` is what is stored per rollout.
//! The controller that runs them lives with the live fleet (`fleet::rollouts`).

pub mod guard;
pub mod plan;
pub mod policy;
pub mod record;
pub mod window;
