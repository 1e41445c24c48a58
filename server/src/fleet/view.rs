//! Writing through the fleet's view of the store. The view holds every node,
//! group, patch, rollout and node patch state as last stored (kept current by
//! `apply`); writes are decided on it under the fleet's lock, sent without it
//! as one transaction that holds only if each record still has the bytes the
//! view saw (compare-and-swap), and applied from the store's answer. A
//! conflict (another replica, or another task here, wrote first) reads those
//! records afresh and the decision is taken again. No store round trip is
//! made under the fleet's lock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::apply::{decode, followed};
use super::{Fleet, State};
use crate::error::{Error, Result};
use crate::model::keys;
use crate::store::{Condition, Op, Revision};

/// What the view has of one record it writes: its bytes as stored (None:
/// deleted) and the revision they are from.
#[derive(Debug, Clone)]
pub(super) struct Known {
    pub(super) revision: Revision,
    pub(super) bytes: Option<Arc<[u8]>>,
}

/// What a [`Write`] expects its key to hold.
#[derive(Debug, Clone)]
enum Expect {
    /// What the view has (None: absent).
    Seen(Option<Arc<[u8]>>),
    /// Anything: a key only this write's record refers to.
    Any,
}

/// A record write decided on the view.
#[derive(Debug, Clone)]
pub(super) struct Write {
    key: String,
    expect: Expect,
    value: Vec<u8>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

impl State {
    /// `key` becomes `value` if it still holds what this view has of it.
    pub(super) fn write<T: Serialize>(&self, key: String, value: &T) -> Write {
        let expect = Expect::Seen(self.known.get(&key).and_then(|k| k.bytes.clone()));
        Write {
            key,
            expect,
            value: encode(value),
        }
    }

    /// `key` (which must not exist yet) becomes `value`.
    pub(super) fn create<T: Serialize>(key: String, value: &T) -> Write {
        Write {
            key,
            expect: Expect::Seen(None),
            value: encode(value),
        }
    }

    /// `key`, which the view does not follow, becomes `value`, whatever it held.
    pub(super) fn overwrite<T: Serialize>(key: String, value: &T) -> Write {
        Write {
            key,
            expect: Expect::Any,
            value: encode(value),
        }
    }
}

/// What applying records calls for once the fleet's lock is let go.
#[derive(Default)]
pub(super) struct Effects {
    /// Nodes came, went, or changed role, status, group or labels.
    pub(super) changed: bool,
    /// A group's settings changed: rollouts look at the fleet again.
    pub(super) groups: bool,
    /// A patch, rollout or node phase changed: the controller looks.
    pub(super) rollout_wake: bool,
    /// Rollouts whose watchers are told.
    pub(super) rollouts: BTreeSet<String>,
    /// Groups whose status changed: published before the lock is let go.
    pub(super) statuses: BTreeSet<String>,
}

/// Most writes one transaction carries (etcd refuses more than 128 by default).
const MAX_TXN_WRITES: usize = 64;
/// A decision that keeps conflicting is taken again at most this often.
const MAX_ATTEMPTS: usize = 32;

impl Fleet {
    /// Wakes what `fx` calls for.
    pub(super) fn fire(&self, fx: Effects) {
        if fx.changed {
            self.changed();
        }
        if fx.groups {
            self.membership_changed.store(true, Ordering::Relaxed);
            self.rollout_wake.notify_one();
        }
        if fx.rollout_wake {
            self.rollout_wake.notify_one();
        }
        for id in fx.rollouts {
            let _ = self.rollout_events.send(id);
        }
    }

    /// Sends `writes` as transactions of at most [`MAX_TXN_WRITES`] (fenced by
    /// this replica's leadership when `fenced`) and applies each that commits.
    /// False when one found a record changed since the view saw it: the view
    /// now has that record afresh, and the caller decides again.
    pub(super) async fn commit(&self, writes: Vec<Write>, fenced: bool) -> Result<bool> {
        let fence = if fenced {
            let leadership = self.leadership();
            match leadership.fence() {
                Some(_) if !leadership.is_leading() => {
                    return Err(Error::FailedPrecondition(
                        "this server does not lead the fleet now; the leader does this".into(),
                    ));
                }
                fence => fence,
            }
        } else {
            None
        };
        for chunk in writes.chunks(MAX_TXN_WRITES) {
            let mut when: Vec<Condition> = fence.iter().cloned().collect();
            let mut then = Vec::with_capacity(chunk.len());
            for w in chunk {
                match &w.expect {
                    Expect::Seen(None) => when.push(Condition::Absent(w.key.clone())),
                    Expect::Seen(Some(b)) => {
                        when.push(Condition::Equals(w.key.clone(), b.to_vec()))
                    }
                    Expect::Any => {}
                }
                then.push(Op::put(w.key.clone(), w.value.clone()));
            }
            match self.db.raw().txn(when, then).await? {
                Some(revision) => {
                    let mut fx = Effects::default();
                    {
                        let mut st = self.state.lock().await;
                        for w in chunk {
                            self.apply(&mut st, &w.key, Some(&w.value), revision, &mut fx);
                        }
                        self.publish_statuses(&mut st, &mut fx);
                    }
                    self.fire(fx);
                }
                None => {
                    if let Some(Condition::Equals(k, v)) = &fence
                        && self.db.raw().get(k).await?.as_deref() != Some(v.as_slice())
                    {
                        return Err(Error::FailedPrecondition(
                            "this server no longer leads the fleet: its write was refused (fenced)"
                                .into(),
                        ));
                    }
                    self.refresh(chunk.iter().map(|w| w.key.as_str())).await?;
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Reads `keys` afresh into the view.
    async fn refresh(&self, keys: impl Iterator<Item = &str>) -> Result<()> {
        let mut read = Vec::new();
        for key in keys {
            let (revision, value) = self.db.raw().get_at(key).await?;
            // A publish sequence number taken: the patch that took it.
            if key.starts_with(keys::PATCH_SEQS)
                && let Some(id) = value.as_deref().and_then(|v| decode::<String>(key, v))
            {
                let key = keys::patch(&id);
                let (revision, value) = self.db.raw().get_at(&key).await?;
                read.push((key, revision, value));
            }
            if followed(key) {
                read.push((key.to_string(), revision, value));
            }
        }
        let mut fx = Effects::default();
        {
            let mut st = self.state.lock().await;
            for (key, revision, value) in &read {
                self.apply(&mut st, key, value.as_deref(), *revision, &mut fx);
            }
            self.publish_statuses(&mut st, &mut fx);
        }
        self.fire(fx);
        Ok(())
    }

    /// Decides on the view (`decide` returns the writes and the answer), commits
    /// the writes, and decides again on a conflict. `decide` may run several
    /// times; its error ends it with nothing written.
    pub(super) async fn mutate<R>(
        &self,
        fenced: bool,
        mut decide: impl FnMut(&mut State) -> Result<(Vec<Write>, R)>,
    ) -> Result<R> {
        for _ in 0..MAX_ATTEMPTS {
            let (writes, answer) = {
                let mut st = self.state.lock().await;
                decide(&mut st)?
            };
            if writes.is_empty() || self.commit(writes, fenced).await? {
                return Ok(answer);
            }
        }
        Err(Error::Unavailable(
            "the fleet's records kept changing under this request; try again".into(),
        ))
    }
}
