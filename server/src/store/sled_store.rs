//! The embedded backend: one sled database, flushed before every write returns.
//! Writers that arrive while a flush runs share the next one (group commit), so
//! a burst of reports costs a few fsyncs, not one each.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::{Store, StoreError, WatchEvent};

/// sled-backed [`Store`] for a single server process.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    commit: Arc<GroupCommit>,
}

/// Flush bookkeeping. A writer takes a ticket after its write is in sled's
/// memory; a flush that starts after a ticket was taken makes that write
/// durable. One writer at a time runs the flush; the others wait for it.
#[derive(Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    done: Notify,
}

#[derive(Default)]
struct CommitState {
    /// Tickets handed out so far.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running.
    running: bool,
    /// The last flush failed: tickets up to `failed_upto` get this error.
    failed: Option<(u64, String)>,
    /// Flushes run so far (for tests and metrics).
    flushes: u64,
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
        Ok(Self {
            db,
            commit: Arc::default(),
        })
    }

    /// Returns once everything written before the call is on disk. The fsync
    /// runs on a blocking thread: sled 0.34's `flush_async` can stall for good
    /// when many writers flush at once (seen with a few dozen agents reporting
    /// together); the blocking `flush` does not.
    async fn flush(&self) -> Result<(), StoreError> {
        let ticket = {
            let mut s = self.commit.state.lock().expect("commit state");
            s.issued += 1;
            s.issued
        };
        loop {
            // Registered before looking, so a flush ending in between still wakes us.
            let done = self.commit.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let upto = {
                let mut s = self.commit.state.lock().expect("commit state");
                if let Some((failed_upto, e)) = &s.failed
                    && ticket <= *failed_upto
                    && ticket > s.durable
                {
                    return Err(StoreError::Backend(e.clone()));
                }
                if ticket <= s.durable {
                    return Ok(());
                }
                if s.running {
                    None
                } else {
                    s.running = true;
                    // This flush covers every ticket issued until now.
                    Some(s.issued)
                }
            };
            let Some(upto) = upto else {
                done.await;
                continue;
            };
            // The flush and its bookkeeping run to the end on their own thread
            // even if this writer's request is dropped meanwhile; otherwise
            // `running` could stay set and every later writer would wait.
            let db = self.db.clone();
            let commit = self.commit.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                let result = db.flush();
                let mut s = commit.state.lock().expect("commit state");
                s.running = false;
                s.flushes += 1;
                match result {
                    Ok(_) => s.durable = s.durable.max(upto),
                    Err(e) => s.failed = Some((upto, e.to_string())),
                }
                drop(s);
                commit.done.notify_waiters();
            })
            .await;
            if let Err(e) = flushed {
                return Err(StoreError::Backend(format!("flush task failed: {e}")));
            }
        }
    }

    /// How many fsyncs have run.
    pub fn flushes(&self) -> u64 {
        self.commit.state.lock().expect("commit state").flushes
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_share_flushes_and_all_survive() {
        let dir = tempfile::tempdir().unwrap();
        let n = 400;
        {
            let s = SledStore::open(dir.path()).unwrap();
            let writes: Vec<_> = (0..n)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move { s.put(&format!("r/{i:04}"), vec![1; 64]).await })
                })
                .collect();
            for w in writes {
                w.await.unwrap().unwrap();
            }
            println!("{n} writes, {} flushes", s.flushes());
            assert!(s.flushes() >= 1);
            assert!(s.flushes() < n as u64, "no write shared a flush");
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.scan_prefix("r/").await.unwrap().len(), n);
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
