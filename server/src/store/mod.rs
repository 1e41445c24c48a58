//! The storage trait every server component uses: typed records over a key-value
//! store with prefix scan, compare-and-swap, multi-key transactions, a history
//! of changes to watch, and leases. Backends: sled (one process), and etcd
//! (cargo feature `etcd`). Nothing above this module knows which backend it
//! runs on.

#[cfg(test)]
mod conformance;
#[cfg(feature = "etcd")]
mod etcd_members;
#[cfg(feature = "etcd")]
pub(crate) mod etcd_store;
mod feed;
mod history;
pub mod metered;
mod sled_store;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "etcd")]
pub use etcd_store::{EtcdStore, EtcdTls};
pub use feed::{Feed, FeedItem};
pub use sled_store::SledStore;

/// A compare-and-swap as a transaction's condition and write: `key` holds
/// `expected` (None: absent), then becomes `new` (None: deleted).
pub(crate) fn cas(key: &str, expected: Option<&[u8]>, new: Option<Vec<u8>>) -> (Condition, Op) {
    let when = match expected {
        None => Condition::Absent(key.to_string()),
        Some(v) => Condition::Equals(key.to_string(), v.to_vec()),
    };
    let then = match new {
        Some(v) => Op::put(key, v),
        None => Op::Delete(key.to_string()),
    };
    (when, then)
}

/// Keys with their values, in key order.
pub type Entries = Vec<(String, Vec<u8>)>;

/// A point in the store's history: every committed write has a higher one
/// than the writes before it. On etcd it is etcd's revision; on sled it
/// counts from the store's opening (nothing outlives the process there).
pub type Revision = u64;

/// What must hold for a [`Store::txn`] to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly these bytes.
    Equals(String, Vec<u8>),
}

/// One write of a [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the key; with a lease, the key goes when the lease does.
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete(String),
}

impl Op {
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease: None,
        }
    }
}

/// A lease: keys written under it are deleted when it expires (its holder
/// stopped renewing: the process died, hung, or lost the store) or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// One key's change in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put { key, .. } | Event::Delete { key } => key,
        }
    }
}

/// The events of one committed write (a transaction's are together), under
/// the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// Why a watch ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WatchError {
    /// The history the watch asked for is gone (etcd compacted it, or the
    /// watcher fell too far behind): read afresh and watch from there.
    #[error("the store's history before revision {0} is compacted")]
    Compacted(Revision),
    #[error("store watch failed: {0}")]
    Backend(String),
}

/// What [`Store::visit_snapshot`] hands each entry to: key, value, and
/// whether a lease holds it.
pub type Visit<'a> =
    dyn for<'k, 'v> FnMut(&'k str, &'v [u8], bool) -> Result<(), StoreError> + Send + 'a;

/// Changes in revision order; ends with an error, never silently.
pub type ChangeStream = BoxStream<'static, Result<Change, WatchError>>;

/// A failure of the backend itself (I/O, corruption, lost connection).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend error: {0}")]
    Backend(String),
    #[error(
        "the database in {0} is in use: another flotilla-server is running on this data dir \
         (stop it first, or pick another --data-dir)"
    )]
    InUse(String),
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Key-value storage. Every write is durable when its future resolves.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The key's value with the revision it was read at: no write at or
    /// before that revision is newer than the value.
    async fn get_at(&self, key: &str) -> Result<(Revision, Option<Vec<u8>>), StoreError>;
    /// All entries whose key starts with `prefix`, in key order.
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The entry with the greatest key under `prefix`.
    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError>;
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Writes `value`, visible to reads at once, without waiting for it to be
    /// durable: a later [`Store::sync`] (or any durable write) makes it so.
    /// For writes made under a lock that must not be held across an fsync;
    /// whoever acknowledges the change calls `sync` first.
    async fn put_unsynced(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Returns once every write made before the call is durable.
    async fn sync(&self) -> Result<(), StoreError>;
    /// [`Store::compare_and_swap`] without waiting for the disk (see
    /// [`Store::put_unsynced`]).
    async fn compare_and_swap_unsynced(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Sets `key` to `new` (None deletes) only if it currently holds `expected`
    /// (None = absent). Returns false, changing nothing, if it did not.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError>;

    /// Applies every op of `then`, atomically and durably, if every condition
    /// of `when` holds; otherwise changes nothing. Returns the commit's
    /// revision, or None when a condition failed.
    async fn txn(
        &self,
        when: Vec<Condition>,
        then: Vec<Op>,
    ) -> Result<Option<Revision>, StoreError>;
    /// Every entry under `prefix`, as of one revision (which it returns).
    async fn snapshot(&self, prefix: &str) -> Result<(Revision, Entries), StoreError> {
        let mut entries = Vec::new();
        let revision = self
            .visit_snapshot(prefix, &mut |k, v, _| {
                entries.push((k.to_string(), v.to_vec()));
                Ok(())
            })
            .await?;
        Ok((revision, entries))
    }
    /// Every entry under `prefix` as of one revision, handed to `visit` in
    /// key order with whether a lease holds it (such keys end with their
    /// holder: a backup leaves them out), without holding them all in memory.
    /// Returns the revision.
    async fn visit_snapshot(
        &self,
        prefix: &str,
        visit: &mut Visit<'_>,
    ) -> Result<Revision, StoreError>;
    /// The changes under `prefix` committed after revision `after`, in order,
    /// then the new ones as they commit.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<ChangeStream, StoreError>;
    /// A new lease that lives `ttl` past its last renewal.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews the lease. False when it is gone (expired or revoked): its keys
    /// are deleted and it cannot come back.
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError>;
    /// Ends the lease now, deleting its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
}

/// Typed JSON records over a [`Store`].
#[derive(Clone)]
pub struct Db {
    store: Arc<dyn Store>,
}

/// Outcome of [`Db::update`]'s closure.
pub enum Update<T> {
    /// Write this value.
    Put(T),
    /// Leave the record as it is.
    Keep,
}

impl Db {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub fn raw(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).expect("records always serialise")
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.store.get(key).await? {
            Some(bytes) => Ok(Some(Self::decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.store.put(key, Self::encode(value)).await
    }

    /// See [`Store::sync`].
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.store.sync().await
    }

    /// Inserts only if `key` is absent; false if it existed.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, StoreError> {
        self.store
            .compare_and_swap(key, None, Some(Self::encode(value)))
            .await
    }

    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        self.store
            .scan_prefix(prefix)
            .await?
            .into_iter()
            .map(|(k, v)| Self::decode(&k, &v))
            .collect()
    }

    /// Every record under `prefix` with its key.
    pub async fn list_keyed<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.store
            .scan_prefix(prefix)
            .await?
            .into_iter()
            .map(|(k, v)| {
                let t = Self::decode(&k, &v)?;
                Ok((k, t))
            })
            .collect()
    }

    pub async fn last<T: DeserializeOwned>(&self, prefix: &str) -> Result<Option<T>, StoreError> {
        match self.store.last_in_prefix(prefix).await? {
            Some((k, v)) => Ok(Some(Self::decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// Read-modify-write with compare-and-swap, retried on conflict. `f` sees the
    /// current record and decides; its error aborts without writing. Returns the
    /// record as stored afterwards.
    pub async fn update<T, E, F>(&self, key: &str, f: F) -> Result<Result<Option<T>, E>, StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<Update<T>, E>,
    {
        self.update_with(key, f, true).await
    }

    /// [`Db::update`] without waiting for the disk: whoever acknowledges the
    /// change calls [`Db::sync`] first (see [`Store::put_unsynced`]).
    pub async fn update_unsynced<T, E, F>(
        &self,
        key: &str,
        f: F,
    ) -> Result<Result<Option<T>, E>, StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<Update<T>, E>,
    {
        self.update_with(key, f, false).await
    }

    async fn update_with<T, E, F>(
        &self,
        key: &str,
        mut f: F,
        durable: bool,
    ) -> Result<Result<Option<T>, E>, StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<Update<T>, E>,
    {
        loop {
            let current = self.store.get(key).await?;
            let decoded = match &current {
                Some(bytes) => Some(Self::decode::<T>(key, bytes)?),
                None => None,
            };
            match f(decoded) {
                Err(e) => return Ok(Err(e)),
                Ok(Update::Keep) => {
                    let again = match &current {
                        Some(bytes) => Some(Self::decode::<T>(key, bytes)?),
                        None => None,
                    };
                    return Ok(Ok(again));
                }
                Ok(Update::Put(value)) => {
                    let bytes = Self::encode(&value);
                    let swapped = if durable {
                        self.store
                            .compare_and_swap(key, current.as_deref(), Some(bytes))
                            .await?
                    } else {
                        self.store
                            .compare_and_swap_unsynced(key, current.as_deref(), Some(bytes))
                            .await?
                    };
                    if swapped {
                        return Ok(Ok(Some(value)));
                    }
                }
            }
        }
    }
}
