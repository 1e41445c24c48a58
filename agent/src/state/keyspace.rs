//! A view of one sled tree confined to the keys under a prefix.
//!
//! A real agent owns its whole database, so its prefix is empty and every call
//! maps one to one onto the tree: the same keys on disk as before this type
//! existed. The fleet simulator keeps thousands of agents in one database (sled
//! allows one open database per path, and each costs file descriptors and
//! buffers), so it gives each agent its own prefix in shared trees. The journal,
//! the outbox and the store work on a `Keyspace` and never see the prefix.

use std::sync::Arc;

use sled::{CompareAndSwapError, IVec};

/// Keys of `tree` that start with `prefix`, with the prefix left out of every key
/// handed in or out. Cheap to clone.
#[derive(Clone)]
pub struct Keyspace {
    tree: sled::Tree,
    prefix: Arc<[u8]>,
}

impl From<sled::Tree> for Keyspace {
    fn from(tree: sled::Tree) -> Self {
        Self::whole(tree)
    }
}

impl Keyspace {
    /// The whole tree (no prefix): what a real agent uses.
    pub fn whole(tree: sled::Tree) -> Self {
        Self::prefixed(tree, Vec::new())
    }

    /// The keys of `tree` under `prefix`. No prefix may be a prefix of another
    /// one in use on the same tree, or their keys would mix: end each with a
    /// separator the names cannot contain.
    pub fn prefixed(tree: sled::Tree, prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            tree,
            prefix: prefix.into().into(),
        }
    }

    /// The prefix (empty for a whole tree).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn strip(&self, full: &IVec) -> IVec {
        // Every key a prefix scan returns starts with the prefix.
        let n = self.prefix.len().min(full.len());
        IVec::from(&full[n..])
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.get(self.key(key.as_ref()))
    }

    pub fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> sled::Result<Option<IVec>> {
        self.tree.insert(self.key(key.as_ref()), value)
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.remove(self.key(key.as_ref()))
    }

    /// sled's compare-and-swap on the prefixed key.
    pub fn compare_and_swap<O: AsRef<[u8]>, N: Into<IVec>>(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<O>,
        new: Option<N>,
    ) -> sled::Result<Result<(), CompareAndSwapError>> {
        self.tree.compare_and_swap(self.key(key.as_ref()), old, new)
    }

    /// Every (key, value) under the prefix, in key order, keys without the prefix.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = sled::Result<(IVec, IVec)>> + '_ {
        self.tree
            .scan_prefix(&self.prefix)
            .map(move |item| item.map(|(k, v)| (self.strip(&k), v)))
    }

    /// Every (key, value) whose key (without the prefix) starts with `start`.
    pub fn scan(
        &self,
        start: &[u8],
    ) -> impl DoubleEndedIterator<Item = sled::Result<(IVec, IVec)>> + '_ {
        self.tree
            .scan_prefix(self.key(start))
            .map(move |item| item.map(|(k, v)| (self.strip(&k), v)))
    }

    /// The last (key, value) under the prefix.
    pub fn last(&self) -> sled::Result<Option<(IVec, IVec)>> {
        self.iter().next_back().transpose()
    }

    /// Writes all of `entries` atomically (one sled batch).
    pub fn apply(&self, entries: &[(&[u8], Vec<u8>)]) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            batch.insert(self.key(key), value.as_slice());
        }
        self.tree.apply_batch(batch)
    }

    /// Flushes the whole database to disk (sled has no narrower flush).
    pub fn flush(&self) -> sled::Result<usize> {
        self.tree.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    #[test]
    fn a_whole_tree_keeps_its_keys_unchanged() {
        let db = db();
        let tree = db.open_tree("t").unwrap();
        let ks = Keyspace::from(tree.clone());
        ks.insert("a", b"1".to_vec()).unwrap();
        ks.apply(&[(b"b", b"2".to_vec())]).unwrap();
        assert_eq!(tree.get("a").unwrap().unwrap(), b"1");
        assert_eq!(tree.get("b").unwrap().unwrap(), b"2");
        assert_eq!(ks.last().unwrap().unwrap().0, b"b");
        assert_eq!(ks.iter().count(), 2);
    }

    #[test]
    fn prefixes_keep_agents_apart() {
        let db = db();
        let tree = db.open_tree("t").unwrap();
        let a = Keyspace::prefixed(tree.clone(), b"a1/".to_vec());
        let b = Keyspace::prefixed(tree.clone(), b"a10/".to_vec());
        a.insert("k", b"from a".to_vec()).unwrap();
        b.insert("k", b"from b".to_vec()).unwrap();
        b.insert("z", b"last".to_vec()).unwrap();
        assert_eq!(a.get("k").unwrap().unwrap(), b"from a");
        assert_eq!(b.get("k").unwrap().unwrap(), b"from b");
        // Scans see only their own keys, without the prefix.
        let keys: Vec<IVec> = a.iter().map(|r| r.unwrap().0).collect();
        assert_eq!(keys, vec![IVec::from(b"k")]);
        assert_eq!(a.last().unwrap().unwrap().0, b"k");
        assert_eq!(b.last().unwrap().unwrap().0, b"z");
        assert_eq!(tree.get("a1/k").unwrap().unwrap(), b"from a");

        assert!(
            a.compare_and_swap("k", Some(b"from a"), Some(b"new".to_vec()))
                .unwrap()
                .is_ok()
        );
        assert!(
            a.compare_and_swap("k", Some(b"from a"), Some(b"x".to_vec()))
                .unwrap()
                .is_err()
        );
        a.remove("k").unwrap();
        assert!(a.get("k").unwrap().is_none());
        assert_eq!(b.get("k").unwrap().unwrap(), b"from b");
        assert!(a.last().unwrap().is_none());
    }
}
