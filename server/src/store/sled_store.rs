//! The embedded backend: one sled database, flushed before every write returns.
//! One long-lived flusher thread makes writes durable: every write that arrives
//! while a flush runs shares the next one (group commit), so a burst of reports
//! costs a few fsyncs, not one each, and no thread is started or woken per write.
//! Writes are applied under one lock (they are in-memory there; the fsync is
//! outside it), which orders them into the history watchers follow.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::history::History;
use super::{ChangeStream, Condition, Event, LeaseId, Op, Revision, Store, StoreError, Visit};

/// The tree that names every key written under a lease: a lease ends with the
/// process, so at the next opening those keys are deleted.
const LEASED_TREE: &str = "__leased";

/// sled-backed [`Store`] for a single server process.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    leased: sled::Tree,
    /// The write lock, with the history and leases it orders.
    history: Mutex<History>,
    /// The task deleting expired leases' keys runs (started with the first lease).
    reaper: std::sync::atomic::AtomicBool,
    commit: Arc<GroupCommit>,
    /// What the flusher has made durable so far.
    progress: watch::Receiver<Progress>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// Flush bookkeeping shared with the flusher thread. A writer takes a ticket
/// after its write is in sled's memory; a flush that starts after a ticket was
/// taken makes that write durable.
#[derive(Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    wake: Condvar,
}

#[derive(Default)]
struct CommitState {
    /// Tickets handed out so far.
    issued: u64,
    /// Every handle is gone: flush what is left and stop.
    closing: bool,
}

/// What the flusher reports after each flush.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// The last failed flush: tickets after `durable` up to this one get its error.
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

/// The flusher: waits for tickets newer than the last flush, flushes once for
/// all of them, publishes how far it got. Runs until every handle is dropped.
fn flusher(db: sled::Db, commit: Arc<GroupCommit>, progress: watch::Sender<Progress>) {
    let mut flushed_upto = 0;
    loop {
        let upto = {
            let mut s = commit.state.lock().expect("commit state");
            while s.issued == flushed_upto && !s.closing {
                s = commit.wake.wait(s).expect("commit state");
            }
            if s.issued == flushed_upto {
                return;
            }
            // This flush covers every ticket issued until now.
            s.issued
        };
        let result = db.flush();
        flushed_upto = upto;
        progress.send_modify(|p| {
            p.flushes += 1;
            match result {
                Ok(_) => p.durable = upto,
                Err(e) => p.failed = Some((upto, e.to_string())),
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.commit.state.lock().expect("commit state").closing = true;
        self.commit.wake.notify_one();
        // Pending writes are flushed and the flusher's handle on the database
        // is gone before this store's is: nothing of ours holds it after the
        // drop (sled's own I/O threads may, for a moment).
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

/// How long opening waits for a lock being let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledStore {
    /// Opens (or creates) the database in `dir` and starts its flusher thread.
    /// A lock still held by a store just closed (sled's I/O threads finishing,
    /// in this process or a server that just exited) is waited for up to
    /// [`LOCK_WAIT`]; after that the database is in use.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            let opened = sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                // Every write is flushed by the flusher thread before it returns;
                // sled's own periodic flush only runs its segment cleaning (and an
                // fsync) each tick. Every 5 s instead of every 500 ms: an idle server
                // makes 0.2 fsyncs a second, not 2, and still reclaims space.
                .flush_every_ms(Some(5_000))
                .open();
            match opened {
                Ok(db) => break db,
                // sled words its lock failure only in text.
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::InUse(dir.display().to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(backend(e)),
            }
        };
        let leased = db.open_tree(LEASED_TREE).map_err(backend)?;
        // Leases do not outlive the process that held them.
        for entry in leased.iter() {
            let (key, _) = entry.map_err(backend)?;
            db.remove(&key).map_err(backend)?;
            leased.remove(&key).map_err(backend)?;
        }
        let commit = Arc::new(GroupCommit::default());
        let (tx, progress) = watch::channel(Progress::default());
        let (flusher_db, flusher_commit) = (db.clone(), commit.clone());
        let flusher = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || flusher(flusher_db, flusher_commit, tx))
            .map_err(|e| StoreError::Backend(format!("cannot start the flusher thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                leased,
                history: Mutex::new(History::default()),
                reaper: std::sync::atomic::AtomicBool::new(false),
                commit,
                progress,
                flusher: Some(flusher),
            }),
        })
    }

    fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Returns once everything written before the call is on disk. sled 0.34's
    /// `flush_async` can stall for good when many writers flush at once (seen
    /// with a few dozen agents reporting together); the flusher thread's
    /// blocking `flush` does not.
    async fn flush(&self) -> Result<(), StoreError> {
        let ticket = {
            let mut s = self.inner.commit.state.lock().expect("commit state");
            s.issued += 1;
            s.issued
        };
        self.inner.commit.wake.notify_one();
        let mut progress = self.inner.progress.clone();
        let p = progress
            .wait_for(|p| p.durable >= ticket || p.failed.as_ref().is_some_and(|f| f.0 >= ticket))
            .await
            .map_err(|_| StoreError::Backend("the flusher thread has stopped".into()))?;
        if p.durable >= ticket {
            return Ok(());
        }
        let e = p.failed.as_ref().map(|f| f.1.clone()).unwrap_or_default();
        Err(StoreError::Backend(e))
    }

    /// How many fsyncs have run.
    pub fn flushes(&self) -> u64 {
        self.inner.progress.borrow().flushes
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.inner.history.lock().expect("store history")
    }

    /// Applies `then` if every condition of `when` holds, in memory (durable
    /// after the next flush), and records it in the history. None when a
    /// condition failed; Some(None) when it held but nothing changed.
    fn apply(
        &self,
        when: &[Condition],
        then: Vec<Op>,
    ) -> Result<Option<Option<Revision>>, StoreError> {
        let mut h = self.history();
        let db = self.db();
        for c in when {
            let holds = match c {
                Condition::Absent(k) => !db.contains_key(k).map_err(backend)?,
                Condition::Equals(k, v) => db.get(k).map_err(backend)?.is_some_and(|c| c == v[..]),
            };
            if !holds {
                return Ok(None);
            }
        }
        // The writes are the events themselves; each with the lease that
        // will hold its key (none for a delete). Marks: (key, lease or none).
        let mut events = Vec::with_capacity(then.len());
        let mut leases: Vec<Option<LeaseId>> = Vec::with_capacity(then.len());
        let mut marks: Vec<(String, Option<[u8; 8]>)> = Vec::new();
        for op in then {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(id) = lease {
                        if !h.is_live(id) {
                            return Err(StoreError::Backend(format!(
                                "lease {} has expired or was revoked",
                                id.0
                            )));
                        }
                        marks.push((key.clone(), Some(id.0.to_be_bytes())));
                    } else if h.lease_of(&key).is_some() {
                        marks.push((key.clone(), None));
                    }
                    leases.push(lease);
                    events.push(Event::Put { key, value });
                }
                Op::Delete(key) => {
                    // Deleting what is not there changes nothing (as on etcd).
                    if !db.contains_key(&key).map_err(backend)? {
                        continue;
                    }
                    if h.lease_of(&key).is_some() {
                        marks.push((key.clone(), None));
                    }
                    leases.push(None);
                    events.push(Event::Delete { key });
                }
            }
        }
        if events.is_empty() {
            return Ok(Some(None));
        }
        // Marks first: a crash between the two leaves at worst a mark whose key
        // the next opening deletes, never a leased key that outlives its lease.
        for (key, mark) in marks {
            match mark {
                Some(m) => self.inner.leased.insert(key, &m).map(drop),
                None => self.inner.leased.remove(key).map(drop),
            }
            .map_err(backend)?;
        }
        // One write goes in as it is; several as one atomic batch (a batch
        // takes sled's exclusive lock, so only transactions pay for it).
        if let [event] = &events[..] {
            match event {
                Event::Put { key, value } => db.insert(key, value.as_slice()).map(drop),
                Event::Delete { key } => db.remove(key).map(drop),
            }
            .map_err(backend)?;
        } else {
            let mut batch = sled::Batch::default();
            for event in &events {
                match event {
                    Event::Put { key, value } => batch.insert(key.as_bytes(), value.as_slice()),
                    Event::Delete { key } => batch.remove(key.as_bytes()),
                }
            }
            db.apply_batch(batch).map_err(backend)?;
        }
        for (event, lease) in events.iter().zip(leases) {
            h.attach(event.key(), lease);
        }
        Ok(Some(Some(h.commit(events))))
    }

    /// Deletes the keys of leases past their time.
    fn expire_leases(&self) -> Result<(), StoreError> {
        let due = self.history().expired(std::time::Instant::now());
        for id in due {
            self.end_lease(id)?;
        }
        Ok(())
    }

    fn end_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        let keys = self.history().end(id);
        let ops = keys.into_iter().map(Op::Delete).collect();
        self.apply(&[], ops)?;
        Ok(())
    }

    /// Starts (once) the task that deletes expired leases' keys. It holds the
    /// store weakly: it stops when the store is dropped.
    fn start_reaper(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(inner) = weak.upgrade() else { return };
                    let store = SledStore { inner };
                    if let Err(e) = store.expire_leases() {
                        tracing::warn!(error = %e, "could not delete an expired lease's keys");
                    }
                    store.history().next_expiry()
                };
                let wait = next.map_or(Duration::from_millis(500), |t| {
                    t.saturating_duration_since(std::time::Instant::now())
                        .min(Duration::from_millis(500))
                });
                tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db().get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    async fn get_at(&self, key: &str) -> Result<(Revision, Option<Vec<u8>>), StoreError> {
        // Writes commit under the history's lock: read under it too.
        let h = self.history();
        let value = self.db().get(key).map_err(backend)?.map(|v| v.to_vec());
        Ok((h.revision(), value))
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db()
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (key_string(&k), v.to_vec()))
                    .map_err(backend)
            })
            .collect()
    }

    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        match self.db().scan_prefix(prefix).next_back() {
            Some(r) => {
                let (k, v) = r.map_err(backend)?;
                Ok(Some((key_string(&k), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(&[], vec![Op::put(key, value)])?;
        self.flush().await
    }

    async fn put_unsynced(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(&[], vec![Op::put(key, value)])?;
        Ok(())
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.apply(&[], vec![Op::Delete(key.to_string())])?;
        self.flush().await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let swapped = self.compare_and_swap_unsynced(key, expected, new).await?;
        if swapped {
            self.flush().await?;
        }
        Ok(swapped)
    }

    async fn compare_and_swap_unsynced(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let (when, then) = super::cas(key, expected, new);
        Ok(self.apply(&[when], vec![then])?.is_some())
    }

    async fn txn(
        &self,
        when: Vec<Condition>,
        then: Vec<Op>,
    ) -> Result<Option<Revision>, StoreError> {
        match self.apply(&when, then)? {
            None => Ok(None),
            Some(rev) => {
                self.flush().await?;
                Ok(Some(rev.unwrap_or_else(|| self.history().revision())))
            }
        }
    }

    async fn visit_snapshot(
        &self,
        prefix: &str,
        visit: &mut Visit<'_>,
    ) -> Result<Revision, StoreError> {
        // Under the write lock: no write lands between the scan and its
        // revision (writers wait for the scan).
        let h = self.history();
        for entry in self.db().scan_prefix(prefix) {
            let (k, v) = entry.map_err(backend)?;
            let key = key_string(&k);
            let leased = h.lease_of(&key).is_some();
            visit(&key, &v, leased)?;
        }
        Ok(h.revision())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<ChangeStream, StoreError> {
        Ok(self.history().watch(prefix, after))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.start_reaper();
        Ok(self.history().grant(ttl))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let live = self.history().renew(lease);
        if !live {
            // Past its time but not yet reaped: its keys go now.
            self.end_lease(lease)?;
            self.flush().await?;
        }
        Ok(live)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.end_lease(lease)?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Db, Update};

    /// Opens the database again after the last store on it was dropped (open
    /// itself waits for a lock being let go).
    fn reopen(dir: &Path) -> SledStore {
        SledStore::open(dir).unwrap_or_else(|e| panic!("cannot reopen {}: {e}", dir.display()))
    }

    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put("a/1", b"one".to_vec()).await.unwrap();
            s.put("a/2", b"two".to_vec()).await.unwrap();
            s.put("b/1", b"other".to_vec()).await.unwrap();
        }
        let s = reopen(dir.path());
        let all = s.scan_prefix("a/").await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.last_in_prefix("a/").await.unwrap().unwrap().0, "a/2");
        assert!(s.last_in_prefix("c/").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn keeps_the_promises_of_the_storage_trait() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        crate::store::conformance::keeps_the_promises_of_the_storage_trait(std::sync::Arc::new(s))
            .await;
    }

    #[tokio::test]
    async fn keeps_transactions_history_and_leases() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        crate::store::conformance::keeps_transactions_and_history(s.clone()).await;
        crate::store::conformance::keeps_leases(s.clone()).await;
        // The history kept here is bounded: more writes than it holds are
        // what compaction is on sled.
        let filler = s.clone();
        crate::store::conformance::feed_follows_and_resyncs(s, || async move {
            for i in 0..crate::store::history::RETAINED + 10 {
                filler
                    .put_unsynced(&format!("z/{i}"), vec![0])
                    .await
                    .unwrap();
            }
        })
        .await;
    }

    #[tokio::test]
    async fn leased_keys_do_not_outlive_the_process() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
            let held = Op::Put {
                key: "held".into(),
                value: b"1".to_vec(),
                lease: Some(lease),
            };
            s.txn(vec![], vec![held, Op::put("kept", b"2".to_vec())])
                .await
                .unwrap()
                .unwrap();
        }
        let s = reopen(dir.path());
        assert!(s.get("held").await.unwrap().is_none());
        assert_eq!(s.get("kept").await.unwrap().unwrap(), b"2");
        assert!(s.inner.leased.is_empty());
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
            eprintln!("{n} writes, {} flushes", s.flushes());
            assert!(s.flushes() >= 1);
            assert!(s.flushes() < n as u64, "no write shared a flush");
        }
        let s = reopen(dir.path());
        assert_eq!(s.scan_prefix("r/").await.unwrap().len(), n);
    }

    #[tokio::test]
    async fn unsynced_writes_are_visible_at_once_and_durable_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let before = s.flushes();
            s.put_unsynced("u/1", b"one".to_vec()).await.unwrap();
            s.put_unsynced("u/2", b"two".to_vec()).await.unwrap();
            assert_eq!(s.get("u/1").await.unwrap().unwrap(), b"one");
            assert_eq!(s.flushes(), before, "an unsynced write flushed");
            s.sync().await.unwrap();
            assert_eq!(s.flushes(), before + 1);
        }
        let s = reopen(dir.path());
        assert_eq!(s.scan_prefix("u/").await.unwrap().len(), 2);
    }
}
