//! Operator commands on rollouts: pause, resume, abort (with or without
//! rollback), and the stream of rollout changes watchers follow.

use std::collections::BTreeMap;

use super::{Fleet, RolloutInfo};
use crate::error::{Error, Result};
use crate::model::now_ms;
use crate::rollout::record::{self, RolloutRecord, RolloutState};

impl Fleet {
    /// Rollout ids (patch ids) as their state changes.
    pub fn subscribe_rollouts(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.rollout_events.subscribe()
    }

    /// Pauses a running (or converging) rollout: no new node starts.
    pub async fn pause_rollout(&self, id: &str, by: &str) -> Result<RolloutInfo> {
        self.change_rollout(id, |r| match r.state {
            RolloutState::Aborted => Err(Error::FailedPrecondition(format!(
                "rollout {id} was aborted; publish a new patch instead"
            ))),
            _ => {
                r.state = RolloutState::Paused;
                r.reason = format!("paused by {by}");
                Ok(())
            }
        })
        .await
    }

    /// Resumes a paused rollout; failures seen so far no longer count.
    pub async fn resume_rollout(&self, id: &str) -> Result<RolloutInfo> {
        let failures: BTreeMap<String, u32> = {
            let st = self.state.lock().await;
            let phases = st.phases.get(id);
            st.rollouts
                .get(id)
                .map(|r| {
                    r.groups
                        .iter()
                        .map(|(g, p)| {
                            let n = p
                                .released
                                .iter()
                                .filter(|n| {
                                    phases
                                        .and_then(|ph| ph.get(*n))
                                        .is_some_and(|x| x.phase.is_failure())
                                })
                                .count();
                            (g.clone(), n as u32)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        self.change_rollout(id, |r| match r.state {
            RolloutState::Paused => {
                r.state = RolloutState::Running;
                r.reason.clear();
                for (g, p) in r.groups.iter_mut() {
                    p.failures_acknowledged = failures.get(g).copied().unwrap_or(0);
                }
                Ok(())
            }
            s => Err(Error::FailedPrecondition(format!(
                "rollout {id} is {}, not paused",
                s.as_str()
            ))),
        })
        .await
    }

    /// Aborts a rollout: no new node starts; with `rollback`, nodes that
    /// committed undo the patch.
    pub async fn abort_rollout(&self, id: &str, rollback: bool, by: &str) -> Result<RolloutInfo> {
        self.change_rollout(id, |r| {
            if r.state == RolloutState::Aborted && (r.rollback || !rollback) {
                return Ok(());
            }
            r.state = RolloutState::Aborted;
            r.rollback = rollback;
            r.reason = format!(
                "aborted by {by}{}",
                if rollback {
                    ", committed nodes roll back"
                } else {
                    ""
                }
            );
            r.revision += 1;
            Ok(())
        })
        .await
    }

    /// Applies an operator's change to a rollout and stores it; the nodes it
    /// released hear of it, and the controller wakes, as it applies.
    async fn change_rollout(
        &self,
        id: &str,
        f: impl Fn(&mut RolloutRecord) -> Result<()>,
    ) -> Result<RolloutInfo> {
        self.mutate(false, |st| {
            let mut r = st
                .rollouts
                .get(id)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("no rollout for patch {id}")))?;
            f(&mut r)?;
            r.updated_at_ms = now_ms();
            Ok((vec![st.write(record::key(id), &r)], ()))
        })
        .await?;
        let st = self.state.lock().await;
        self.rollout_info_locked(&st, id)
            .ok_or_else(|| Error::NotFound(format!("no rollout for patch {id}")))
    }
}
