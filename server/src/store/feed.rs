//! Following a prefix of the store: a first full read, then every change in
//! order, across the watch breaking (resumed from the last revision seen) and
//! across a compacted history (read afresh, handed over as a new start). What
//! a replica's in-memory view is kept current with.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Change, ChangeStream, Revision, Store, StoreError, WatchError};

/// What a [`Feed`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// Everything under the prefix as of `revision`: replaces what the
    /// follower knew (the first item, and after a compaction).
    Reset {
        revision: Revision,
        entries: Vec<(String, Vec<u8>)>,
    },
    /// One committed write, after the last item.
    Change(Change),
}

/// How long the feed waits before trying again after the store failed; it
/// doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Follows one prefix. Never ends: a store that cannot be reached is tried
/// again (with back-off) until it answers; [`Feed::failing`] tells whether it
/// is failing now.
pub struct Feed {
    store: Arc<dyn Store>,
    prefix: String,
    /// The last revision handed over (None: a fresh read is due).
    revision: Option<Revision>,
    stream: Option<ChangeStream>,
    retry: Duration,
    failing: Option<String>,
}

impl Feed {
    /// A feed whose first item is a [`FeedItem::Reset`] with everything under `prefix`.
    pub fn new(store: Arc<dyn Store>, prefix: &str) -> Self {
        Self {
            store,
            prefix: prefix.to_string(),
            revision: None,
            stream: None,
            retry: RETRY_MIN,
            failing: None,
        }
    }

    /// A feed of the changes under `prefix` after `revision` (the reader
    /// already has everything up to it).
    pub fn after(store: Arc<dyn Store>, prefix: &str, revision: Revision) -> Self {
        Self {
            revision: Some(revision),
            ..Self::new(store, prefix)
        }
    }

    /// The last revision handed over.
    pub fn revision(&self) -> Option<Revision> {
        self.revision
    }

    /// The store's last error, while the feed cannot get past it.
    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    fn failed(&mut self, e: impl ToString) -> Duration {
        let e = e.to_string();
        if self.failing.as_deref() != Some(&e) {
            tracing::warn!(prefix = %self.prefix, error = %e, "following the store failed; retrying");
        }
        self.failing = Some(e);
        self.stream = None;
        let wait = self.retry;
        self.retry = (self.retry * 2).min(RETRY_MAX);
        wait
    }

    fn recovered(&mut self) {
        if self.failing.take().is_some() {
            tracing::info!(prefix = %self.prefix, "following the store again");
        }
        self.retry = RETRY_MIN;
    }

    /// The next item. Cancel-safe between items: dropping the future loses nothing.
    pub async fn next(&mut self) -> FeedItem {
        loop {
            let Some(after) = self.revision else {
                match self.store.snapshot(&self.prefix).await {
                    Ok((revision, entries)) => {
                        self.recovered();
                        self.revision = Some(revision);
                        return FeedItem::Reset { revision, entries };
                    }
                    Err(e) => {
                        let wait = self.failed(e);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            };
            if self.stream.is_none() {
                match self.store.watch(&self.prefix, after).await {
                    Ok(s) => self.stream = Some(s),
                    Err(e) => {
                        let wait = self.failed(e);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("watch just opened");
            match stream.next().await {
                Some(Ok(change)) => {
                    self.recovered();
                    // A resumed watch never repeats, but guard the order anyway.
                    if change.revision <= after {
                        continue;
                    }
                    self.revision = Some(change.revision);
                    return FeedItem::Change(change);
                }
                Some(Err(WatchError::Compacted(_))) => {
                    tracing::info!(prefix = %self.prefix, after, "store history compacted; reading afresh");
                    self.stream = None;
                    self.revision = None;
                }
                Some(Err(WatchError::Backend(e))) => {
                    let wait = self.failed(e);
                    tokio::time::sleep(wait).await;
                }
                None => {
                    let wait = self.failed(StoreError::Backend("the store's watch ended".into()));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
