//! The embedded backend: one sled database, flushed before every write returns.

use std::path::Path;

use super::{Store, StoreError, WatchEvent};

/// sled-backed [`Store`] for a single server process.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn key_string(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(backend)?;
        Ok(Self { db })
    }

    /// fsyncs on a blocking thread. sled 0.34's `flush_async` can stall for good
    /// when many writers flush at once (seen with a few dozen agents reporting
    /// together); the blocking `flush` does not.
    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Backend(format!("flush task failed: {e}")))?
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (key_string(&k), v.to_vec()))
                    .map_err(backend)
            })
            .collect()
    }

    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        match self.db.scan_prefix(prefix).next_back() {
            Some(r) => {
                let (k, v) = r.map_err(backend)?;
                Ok(Some((key_string(&k), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.db.insert(key, value).map_err(backend)?;
        self.flush().await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.db.remove(key).map_err(backend)?;
        self.flush().await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let swapped = self
            .db
            .compare_and_swap(key, expected, new)
            .map_err(backend)?
            .is_ok();
        if swapped {
            self.flush().await?;
        }
        Ok(swapped)
    }

    fn watch_prefix(&self, prefix: &str) -> tokio::sync::mpsc::Receiver<WatchEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut sub = self.db.watch_prefix(prefix);
        tokio::spawn(async move {
            while let Some(event) = (&mut sub).await {
                let ev = match event {
                    sled::Event::Insert { key, value } => WatchEvent::Put {
                        key: key_string(&key),
                        value: value.to_vec(),
                    },
                    sled::Event::Remove { key } => WatchEvent::Delete {
                        key: key_string(&key),
                    },
                };
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Db, Update};

    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put("a/1", b"one".to_vec()).await.unwrap();
            s.put("a/2", b"two".to_vec()).await.unwrap();
            s.put("b/1", b"other".to_vec()).await.unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        let all = s.scan_prefix("a/").await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.last_in_prefix("a/").await.unwrap().unwrap().0, "a/2");
        assert!(s.last_in_prefix("c/").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn compare_and_swap_refuses_stale_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(
            s.compare_and_swap("k", None, Some(b"1".to_vec()))
                .await
                .unwrap()
        );
        assert!(
            !s.compare_and_swap("k", None, Some(b"2".to_vec()))
                .await
                .unwrap()
        );
        assert!(
            s.compare_and_swap("k", Some(b"1"), Some(b"2".to_vec()))
                .await
                .unwrap()
        );
        assert_eq!(s.get("k").await.unwrap().unwrap(), b"2");
    }

    #[tokio::test]
    async fn update_applies_closure_and_keeps_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(SledStore::open(dir.path()).unwrap()));
        let r: Result<Option<u32>, ()> = db
            .update("n", |cur: Option<u32>| {
                Ok(Update::Put(cur.unwrap_or(0) + 1))
            })
            .await
            .unwrap();
        assert_eq!(r, Ok(Some(1)));
        let r: Result<Option<u32>, &str> = db.update("n", |_| Err("no")).await.unwrap();
        assert_eq!(r, Err("no"));
        assert_eq!(db.get::<u32>("n").await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn watch_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut rx = s.watch_prefix("g/");
        s.put("g/x", b"1".to_vec()).await.unwrap();
        s.put("h/x", b"1".to_vec()).await.unwrap();
        s.delete("g/x").await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first,
            WatchEvent::Put {
                key: "g/x".into(),
                value: b"1".to_vec()
            }
        );
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second, WatchEvent::Delete { key: "g/x".into() });
    }
}
