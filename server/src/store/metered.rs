//! A [`Store`] that times every operation and counts its failures, for the
//! server's metrics (`flotilla_store_seconds{op}`,
//! `flotilla_store_errors_total{op}`): what a slow disk or a struggling etcd
//! looks like from the server, before it shows as slow joins or reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ChangeStream, Condition, Entries, LeaseId, Op, Revision, Store, StoreError, Visit};

pub struct Metered {
    inner: Arc<dyn Store>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }
}

/// Records how `op` went, and passes its result on.
fn note<T>(op: &'static str, started: Instant, r: Result<T, StoreError>) -> Result<T, StoreError> {
    metrics::histogram!("flotilla_store_seconds", "op" => op).record(started.elapsed());
    if r.is_err() {
        metrics::counter!("flotilla_store_errors_total", "op" => op).increment(1);
    }
    r
}

#[async_trait::async_trait]
impl Store for Metered {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = Instant::now();
        note("get", t, self.inner.get(key).await)
    }
    async fn get_at(&self, key: &str) -> Result<(Revision, Option<Vec<u8>>), StoreError> {
        let t = Instant::now();
        note("get", t, self.inner.get_at(key).await)
    }
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = Instant::now();
        note("scan", t, self.inner.scan_prefix(prefix).await)
    }
    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let t = Instant::now();
        note("scan", t, self.inner.last_in_prefix(prefix).await)
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let t = Instant::now();
        note("put", t, self.inner.put(key, value).await)
    }
    async fn put_unsynced(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let t = Instant::now();
        note("put", t, self.inner.put_unsynced(key, value).await)
    }
    async fn sync(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        note("sync", t, self.inner.sync().await)
    }
    async fn compare_and_swap_unsynced(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let t = Instant::now();
        note(
            "cas",
            t,
            self.inner
                .compare_and_swap_unsynced(key, expected, new)
                .await,
        )
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let t = Instant::now();
        note("delete", t, self.inner.delete(key).await)
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let t = Instant::now();
        note(
            "cas",
            t,
            self.inner.compare_and_swap(key, expected, new).await,
        )
    }
    async fn txn(
        &self,
        when: Vec<Condition>,
        then: Vec<Op>,
    ) -> Result<Option<Revision>, StoreError> {
        let t = Instant::now();
        note("txn", t, self.inner.txn(when, then).await)
    }
    async fn snapshot(&self, prefix: &str) -> Result<(Revision, Entries), StoreError> {
        let t = Instant::now();
        note("scan", t, self.inner.snapshot(prefix).await)
    }
    async fn visit_snapshot(
        &self,
        prefix: &str,
        visit: &mut Visit<'_>,
    ) -> Result<Revision, StoreError> {
        let t = Instant::now();
        note("scan", t, self.inner.visit_snapshot(prefix, visit).await)
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<ChangeStream, StoreError> {
        let t = Instant::now();
        note("watch", t, self.inner.watch(prefix, after).await)
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let t = Instant::now();
        note("lease", t, self.inner.grant_lease(ttl).await)
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let t = Instant::now();
        note("lease", t, self.inner.keep_alive(lease).await)
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let t = Instant::now();
        note("lease", t, self.inner.revoke(lease).await)
    }
}
