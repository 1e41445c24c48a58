//! A named set of keys in the agent's database, confined to a prefix: the
//! interface the journal, the outbox and the store work on. Two backends sit
//! behind it:
//!
//! - **redb**, a real agent's: one file, copy-on-write with checksums, every
//!   write its own transaction, durable when the call returns, and no
//!   background threads (an idle agent's process sleeps; sled's thread pool
//!   woke seven threads every second). Its prefix is empty.
//! - **sled**, the fleet simulator's: thousands of agents in one shared
//!   database, each under its own prefix (sled allows one open database per
//!   path, and each costs descriptors and buffers); writes are durable after
//!   [`Keyspace::flush`].
//!
//! Callers never see the prefix, and write as if flushing were needed.

use std::sync::Arc;

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A failure of the database under a keyspace.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Sled(#[from] sled::Error),
    #[error("{0}")]
    Redb(String),
}

fn redb_err(e: impl Into<redb::Error>) -> KvError {
    KvError::Redb(e.into().to_string())
}

#[derive(Clone)]
enum Backend {
    Sled(sled::Tree),
    Redb {
        db: Arc<redb::Database>,
        table: Arc<str>,
    },
}

/// Keys of one table (or tree) that start with `prefix`, with the prefix left
/// out of every key handed in or out. Cheap to clone.
#[derive(Clone)]
pub struct Keyspace {
    backend: Backend,
    prefix: Arc<[u8]>,
}

impl From<sled::Tree> for Keyspace {
    fn from(tree: sled::Tree) -> Self {
        Self::whole(tree)
    }
}

type Table<'a> = redb::TableDefinition<'a, &'static [u8], &'static [u8]>;

impl Keyspace {
    /// The whole sled tree (no prefix).
    pub fn whole(tree: sled::Tree) -> Self {
        Self::prefixed(tree, Vec::new())
    }

    /// The keys of a sled tree under `prefix`. No prefix may be a prefix of
    /// another one in use on the same tree, or their keys would mix: end each
    /// with a separator the names cannot contain.
    pub fn prefixed(tree: sled::Tree, prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            backend: Backend::Sled(tree),
            prefix: prefix.into().into(),
        }
    }

    /// The table named `table` of a redb database (made by its first write).
    pub fn redb(db: Arc<redb::Database>, table: &str) -> Self {
        Self {
            backend: Backend::Redb {
                db,
                table: table.into(),
            },
            prefix: Vec::new().into(),
        }
    }

    /// The prefix (empty for a whole tree or table).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn strip(&self, full: &[u8]) -> Vec<u8> {
        // Every key a prefix scan returns starts with the prefix.
        full[self.prefix.len().min(full.len())..].to_vec()
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, KvError> {
        let key = self.key(key.as_ref());
        match &self.backend {
            Backend::Sled(tree) => Ok(tree.get(key)?.map(|v| v.to_vec())),
            Backend::Redb { db, table } => {
                use redb::{ReadableDatabase, ReadableTable};
                let tx = db.begin_read().map_err(redb_err)?;
                let t = match tx.open_table(Table::new(table)) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                    Err(e) => return Err(redb_err(e)),
                };
                Ok(t.get(key.as_slice())
                    .map_err(redb_err)?
                    .map(|v| v.value().to_vec()))
            }
        }
    }

    /// One write transaction on the redb table; durable when it returns.
    fn write<T>(
        db: &redb::Database,
        table: &str,
        f: impl FnOnce(&mut redb::Table<'_, &'static [u8], &'static [u8]>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let tx = db.begin_write().map_err(redb_err)?;
        let out = {
            let mut t = tx.open_table(Table::new(table)).map_err(redb_err)?;
            f(&mut t)?
        };
        tx.commit().map_err(redb_err)?;
        Ok(out)
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), KvError> {
        self.apply(&[(key.as_ref(), value.as_ref().to_vec())])
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), KvError> {
        let key = self.key(key.as_ref());
        match &self.backend {
            Backend::Sled(tree) => tree.remove(key).map(drop).map_err(KvError::from),
            Backend::Redb { db, table } => Self::write(db, table, |t| {
                t.remove(key.as_slice()).map(drop).map_err(redb_err)
            }),
        }
    }

    /// Sets `key` to `new` (None removes it) if it holds `old` (None: absent).
    /// False, changing nothing, if it did not.
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, KvError> {
        let key = self.key(key.as_ref());
        match &self.backend {
            Backend::Sled(tree) => Ok(tree.compare_and_swap(key, old, new)?.is_ok()),
            Backend::Redb { db, table } => Self::write(db, table, |t| {
                use redb::ReadableTable;
                let current = t
                    .get(key.as_slice())
                    .map_err(redb_err)?
                    .map(|v| v.value().to_vec());
                if current.as_deref() != old {
                    return Ok(false);
                }
                match new {
                    Some(v) => t.insert(key.as_slice(), v).map(drop).map_err(redb_err)?,
                    None => t.remove(key.as_slice()).map(drop).map_err(redb_err)?,
                }
                Ok(true)
            }),
        }
    }

    /// Every (key, value) under the prefix, in key order, keys without it.
    pub fn iter(&self) -> Result<Vec<Pair>, KvError> {
        self.scan(b"")
    }

    /// Every (key, value) whose key (without the prefix) starts with `start`.
    pub fn scan(&self, start: &[u8]) -> Result<Vec<Pair>, KvError> {
        let from = self.key(start);
        match &self.backend {
            Backend::Sled(tree) => tree
                .scan_prefix(&from)
                .map(|item| {
                    item.map(|(k, v)| (self.strip(&k), v.to_vec()))
                        .map_err(KvError::from)
                })
                .collect(),
            Backend::Redb { db, table } => {
                use redb::{ReadableDatabase, ReadableTable};
                let tx = db.begin_read().map_err(redb_err)?;
                let t = match tx.open_table(Table::new(table)) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(redb_err(e)),
                };
                let mut out = Vec::new();
                for item in t.range(from.as_slice()..).map_err(redb_err)? {
                    let (k, v) = item.map_err(redb_err)?;
                    if !k.value().starts_with(&from) {
                        break;
                    }
                    out.push((self.strip(k.value()), v.value().to_vec()));
                }
                Ok(out)
            }
        }
    }

    /// The last (key, value) under the prefix.
    pub fn last(&self) -> Result<Option<Pair>, KvError> {
        match &self.backend {
            Backend::Sled(tree) => tree
                .scan_prefix(&*self.prefix)
                .next_back()
                .transpose()
                .map(|kv| kv.map(|(k, v)| (self.strip(&k), v.to_vec())))
                .map_err(KvError::from),
            // The real agent's keyspaces have no prefix: the table's last key.
            Backend::Redb { .. } => Ok(self.iter()?.pop()),
        }
    }

    /// Writes all of `entries` atomically.
    pub fn apply(&self, entries: &[(&[u8], Vec<u8>)]) -> Result<(), KvError> {
        match &self.backend {
            Backend::Sled(tree) => {
                let mut batch = sled::Batch::default();
                for (key, value) in entries {
                    batch.insert(self.key(key), value.as_slice());
                }
                tree.apply_batch(batch).map_err(KvError::from)
            }
            Backend::Redb { db, table } => Self::write(db, table, |t| {
                for (key, value) in entries {
                    t.insert(self.key(key).as_slice(), value.as_slice())
                        .map_err(redb_err)?;
                }
                Ok(())
            }),
        }
    }

    /// Makes every write so far durable: sled's whole database (it has no
    /// narrower flush); nothing to do on redb, whose writes are durable when
    /// they return.
    pub fn flush(&self) -> Result<(), KvError> {
        match &self.backend {
            Backend::Sled(tree) => tree.flush().map(drop).map_err(KvError::from),
            Backend::Redb { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sled_db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    fn redb_db(dir: &std::path::Path) -> Arc<redb::Database> {
        Arc::new(redb::Database::create(dir.join("t.redb")).unwrap())
    }

    /// The same behaviour on every backend.
    fn behaves(ks: &Keyspace) {
        assert!(ks.get("a").unwrap().is_none());
        assert!(ks.iter().unwrap().is_empty());
        assert!(ks.last().unwrap().is_none());
        ks.insert("a", b"1").unwrap();
        ks.apply(&[(b"b", b"2".to_vec()), (b"c/x", b"3".to_vec())])
            .unwrap();
        assert_eq!(ks.get("a").unwrap().unwrap(), b"1");
        assert_eq!(ks.last().unwrap().unwrap().0, b"c/x");
        assert_eq!(ks.iter().unwrap().len(), 3);
        assert_eq!(
            ks.scan(b"c/").unwrap(),
            vec![(b"c/x".to_vec(), b"3".to_vec())]
        );
        assert!(ks.compare_and_swap("a", Some(b"1"), Some(b"new")).unwrap());
        assert!(!ks.compare_and_swap("a", Some(b"1"), Some(b"x")).unwrap());
        assert!(!ks.compare_and_swap("z", Some(b"1"), None).unwrap());
        assert!(ks.compare_and_swap("z", None, Some(b"made")).unwrap());
        assert!(ks.compare_and_swap("z", Some(b"made"), None).unwrap());
        assert!(ks.get("z").unwrap().is_none());
        assert_eq!(ks.get("a").unwrap().unwrap(), b"new");
        ks.remove("a").unwrap();
        assert!(ks.get("a").unwrap().is_none());
        ks.flush().unwrap();
    }

    #[test]
    fn every_backend_keeps_the_same_promises() {
        let db = sled_db();
        behaves(&Keyspace::whole(db.open_tree("t").unwrap()));
        behaves(&Keyspace::prefixed(
            db.open_tree("u").unwrap(),
            b"a1/".to_vec(),
        ));
        let dir = tempfile::tempdir().unwrap();
        behaves(&Keyspace::redb(redb_db(dir.path()), "t"));
    }

    #[test]
    fn redb_writes_are_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ks = Keyspace::redb(redb_db(dir.path()), "t");
            ks.insert("k", b"v").unwrap();
        }
        let db = Arc::new(redb::Database::open(dir.path().join("t.redb")).unwrap());
        assert_eq!(Keyspace::redb(db, "t").get("k").unwrap().unwrap(), b"v");
    }

    #[test]
    fn prefixes_keep_agents_apart() {
        let db = sled_db();
        let tree = db.open_tree("t").unwrap();
        let a = Keyspace::prefixed(tree.clone(), b"a1/".to_vec());
        let b = Keyspace::prefixed(tree.clone(), b"a10/".to_vec());
        a.insert("k", b"from a").unwrap();
        b.insert("k", b"from b").unwrap();
        b.insert("z", b"last").unwrap();
        assert_eq!(a.get("k").unwrap().unwrap(), b"from a");
        assert_eq!(b.get("k").unwrap().unwrap(), b"from b");
        // Scans see only their own keys, without the prefix.
        let keys: Vec<Vec<u8>> = a.iter().unwrap().into_iter().map(|kv| kv.0).collect();
        assert_eq!(keys, vec![b"k".to_vec()]);
        assert_eq!(a.last().unwrap().unwrap().0, b"k");
        assert_eq!(b.last().unwrap().unwrap().0, b"z");
        assert_eq!(tree.get("a1/k").unwrap().unwrap(), b"from a");
        a.remove("k").unwrap();
        assert!(a.get("k").unwrap().is_none());
        assert_eq!(b.get("k").unwrap().unwrap(), b"from b");
        assert!(a.last().unwrap().is_none());
    }
}
