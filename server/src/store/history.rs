//! The sled backend's history and leases: revisions counted from the store's
//! opening, the latest changes kept for watchers that catch up, the live
//! watchers, and the table of leases with the keys each one holds.
//!
//! Everything here changes under the store's one write lock, so a revision,
//! its change and the order watchers see are the order writes were applied.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{Change, ChangeStream, LeaseId, Revision, WatchError};

/// How many changes a live watcher may fall behind: one further behind is
/// told the history is compacted and reads afresh.
pub const RETAINED: usize = 1024;
/// How many bytes of recent changes are kept for watchers that start behind
/// (at least the last change): the history costs this much memory at most,
/// whatever the records' sizes.
const RETAINED_BYTES: usize = 1 << 20;

pub struct History {
    revision: Revision,
    /// Recent changes, shared with the live channel (not copied).
    recent: VecDeque<Arc<Change>>,
    recent_bytes: usize,
    live: broadcast::Sender<Arc<Change>>,
    leases: HashMap<LeaseId, Lease>,
    /// Which lease holds each leased key.
    leased: HashMap<String, LeaseId>,
    next_lease: i64,
}

struct Lease {
    ttl: Duration,
    expires: Instant,
    keys: BTreeSet<String>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            revision: 0,
            recent: VecDeque::new(),
            recent_bytes: 0,
            live: broadcast::channel(RETAINED).0,
            leases: HashMap::new(),
            leased: HashMap::new(),
            next_lease: 1,
        }
    }
}

/// Roughly what a change holds in memory.
fn size_of(change: &Change) -> usize {
    change
        .events
        .iter()
        .map(|e| match e {
            super::Event::Put { key, value } => key.len() + value.len() + 64,
            super::Event::Delete { key } => key.len() + 64,
        })
        .sum()
}

fn under(prefix: &str, change: &Change) -> Option<Change> {
    let events: Vec<_> = change
        .events
        .iter()
        .filter(|e| e.key().starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then_some(Change {
        revision: change.revision,
        events,
    })
}

impl History {
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Records a committed write; returns its revision.
    pub fn commit(&mut self, events: Vec<super::Event>) -> Revision {
        self.revision += 1;
        let change = Arc::new(Change {
            revision: self.revision,
            events,
        });
        self.recent_bytes += size_of(&change);
        self.recent.push_back(change.clone());
        while self.recent.len() > 1
            && (self.recent.len() > RETAINED || self.recent_bytes > RETAINED_BYTES)
        {
            let old = self.recent.pop_front().expect("not empty");
            self.recent_bytes -= size_of(&old);
        }
        // Nobody watching is fine.
        let _ = self.live.send(change);
        self.revision
    }

    /// The changes under `prefix` after `after`: those kept, then the live
    /// ones. Called under the write lock, so none is missed or seen twice.
    pub fn watch(&self, prefix: &str, after: Revision) -> ChangeStream {
        let oldest_kept = self
            .recent
            .front()
            .map_or(self.revision + 1, |c| c.revision);
        if after + 1 < oldest_kept {
            let err = WatchError::Compacted(oldest_kept);
            return futures::stream::once(async move { Err(err) }).boxed();
        }
        let backlog: Vec<_> = self
            .recent
            .iter()
            .filter(|c| c.revision > after)
            .filter_map(|c| under(prefix, c))
            .map(Ok)
            .collect();
        let prefix = prefix.to_string();
        let compacted_at = self.revision;
        let live = BroadcastStream::new(self.live.subscribe())
            .filter_map(move |r| {
                let item = match r {
                    Ok(c) => under(&prefix, &c).map(Ok),
                    // Fell behind by more than is kept: read afresh.
                    Err(BroadcastStreamRecvError::Lagged(_)) => {
                        Some(Err(WatchError::Compacted(compacted_at)))
                    }
                };
                futures::future::ready(item)
            })
            // Nothing follows a compaction.
            .scan(false, |ended, item| {
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = item.is_err();
                futures::future::ready(Some(item))
            });
        futures::stream::iter(backlog).chain(live).boxed()
    }

    pub fn grant(&mut self, ttl: Duration) -> LeaseId {
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                ttl,
                expires: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        id
    }

    /// Renews a live lease; false when it is gone.
    pub fn renew(&mut self, id: LeaseId) -> bool {
        match self.leases.get_mut(&id) {
            Some(l) if l.expires > Instant::now() => {
                l.expires = Instant::now() + l.ttl;
                true
            }
            _ => false,
        }
    }

    pub fn is_live(&self, id: LeaseId) -> bool {
        self.leases
            .get(&id)
            .is_some_and(|l| l.expires > Instant::now())
    }

    pub fn lease_of(&self, key: &str) -> Option<LeaseId> {
        self.leased.get(key).copied()
    }

    /// `key` is now held by `lease` (or by none).
    pub fn attach(&mut self, key: &str, lease: Option<LeaseId>) {
        if let Some(old) = self.leased.remove(key)
            && let Some(l) = self.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if let Some(id) = lease
            && let Some(l) = self.leases.get_mut(&id)
        {
            l.keys.insert(key.to_string());
            self.leased.insert(key.to_string(), id);
        }
    }

    /// Removes a lease; returns the keys it held (to delete).
    pub fn end(&mut self, id: LeaseId) -> Vec<String> {
        let Some(l) = self.leases.remove(&id) else {
            return Vec::new();
        };
        for k in &l.keys {
            self.leased.remove(k);
        }
        l.keys.into_iter().collect()
    }

    /// Leases past their time.
    pub fn expired(&self, now: Instant) -> Vec<LeaseId> {
        self.leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// When the next lease runs out, if any is live.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }
}
