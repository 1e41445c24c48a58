//! The etcd backend of the storage trait (cargo feature `etcd`): every key
//! under a prefix of its own, compare-and-swap as an etcd transaction, and
//! every write durable when etcd acknowledges it (raft-committed and fsynced
//! on a quorum), so `put_unsynced` and `sync` need nothing more.
//!
//! This is the first step of running the server as replicas on etcd: the
//! backend and its conformance with sled. Leadership, fencing, watches and
//! leases come with the replicas themselves.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp,
};

use super::{Store, StoreError};

/// A connection to an etcd cluster, confined to the keys under `prefix`.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

/// The key (under the prefix) whose holder is the one server of the fleet.
const HOLD_KEY: &str = "server/holder";
/// The lease of that key: how long a server that stopped without a word keeps
/// the next one waiting.
pub const HOLD_TTL: Duration = Duration::from_secs(5);

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn etcd(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`, ...), failing over among
    /// them; keys live under `prefix` (e.g. `/flotilla/`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10));
        let client = Client::connect(endpoints, Some(opts)).await.map_err(|e| {
            StoreError::Backend(format!("cannot reach etcd at {}: {e}", endpoints.join(",")))
        })?;
        Ok(Self {
            client,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Claims this prefix for this process until it exits: a key under the
    /// prefix tied to an etcd lease that this process keeps alive. While one
    /// server holds it, another is refused (one server per fleet until
    /// replicas exist); a server stopped without a word lets it go within
    /// [`HOLD_TTL`], which a new one waits for. A holder that cannot renew its
    /// lease stops the process rather than write on after losing it.
    pub async fn hold_exclusive(&self) -> Result<(), StoreError> {
        let key = self.key(HOLD_KEY);
        let holder = format!("pid {} on {}", std::process::id(), hostname());
        let deadline = tokio::time::Instant::now() + HOLD_TTL + Duration::from_secs(2);
        let lease = loop {
            let lease = self
                .client
                .lease_client()
                .grant(HOLD_TTL.as_secs() as i64, None)
                .await
                .map_err(etcd)?
                .id();
            let claim = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    holder.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.client.kv_client().txn(claim).await.map_err(etcd)?;
            if resp.succeeded() {
                break lease;
            }
            let _ = self.client.lease_client().revoke(lease).await;
            if tokio::time::Instant::now() >= deadline {
                let held_by = self
                    .get(HOLD_KEY)
                    .await?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                return Err(StoreError::Backend(format!(
                    "another flotilla-server ({held_by}) runs on etcd prefix {}: \
                     one server per fleet (stop it, or pick another --etcd-prefix)",
                    self.prefix
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let (mut keeper, mut answers) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(etcd)?;
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(HOLD_TTL / 3).await;
                let ok = keeper.keep_alive().await.is_ok()
                    && matches!(answers.message().await, Ok(Some(a)) if a.ttl() > 0);
                if ok {
                    renewed = tokio::time::Instant::now();
                } else if renewed.elapsed() >= HOLD_TTL {
                    tracing::error!(
                        "lost this server's hold on its etcd prefix (etcd unreachable for {HOLD_TTL:?}); stopping so that no other server's writes are overwritten"
                    );
                    std::process::exit(1);
                }
            }
        });
        Ok(())
    }

    fn strip(&self, full: &[u8]) -> String {
        let full = String::from_utf8_lossy(full);
        full.strip_prefix(&self.prefix).unwrap_or(&full).to_string()
    }

    async fn range(
        &self,
        prefix: &str,
        order: SortOrder,
        limit: i64,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, order)
            .with_limit(limit);
        let resp = self
            .client
            .kv_client()
            .get(self.key(prefix), Some(opts))
            .await
            .map_err(etcd)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (self.strip(kv.key()), kv.value().to_vec()))
            .collect())
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(self.key(key), None)
            .await
            .map_err(etcd)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.range(prefix, SortOrder::Ascend, 0).await
    }

    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .range(prefix, SortOrder::Descend, 1)
            .await?
            .into_iter()
            .next())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .put(self.key(key), value, None)
            .await
            .map(drop)
            .map_err(etcd)
    }

    async fn put_unsynced(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.put(key, value).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn compare_and_swap_unsynced(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        self.compare_and_swap(key, expected, new).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .delete(self.key(key), None)
            .await
            .map(drop)
            .map_err(etcd)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let k = self.key(key);
        // Absent is "never created"; present is "holds exactly these bytes".
        let when = match expected {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::value(k.clone(), CompareOp::Equal, v.to_vec()),
        };
        let then = match new {
            Some(v) => TxnOp::put(k, v, None),
            None => TxnOp::delete(k, None),
        };
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when([when]).and_then([then]))
            .await
            .map_err(etcd)?;
        Ok(resp.succeeded())
    }
}

#[cfg(test)]
mod tests {
    //! Against a real etcd (Debian's `etcd-server`; `scripts/test` installs
    //! it), one member on loopback ports picked for the test.

    use std::time::{Duration, Instant};

    use super::*;

    /// One etcd member (the end-to-end harness's) with its temp dir.
    struct Etcd {
        member: flotilla_e2e::etcd::Etcd,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A member that answers requests, not only connections.
    async fn etcd() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let member = flotilla_e2e::etcd::Etcd::start(dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = EtcdStore::connect(std::slice::from_ref(&member.url), "/probe/").await
                && s.get("x").await.is_ok()
            {
                return Etcd { member, _dir: dir };
            }
            assert!(Instant::now() < deadline, "etcd did not answer in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn store(e: &Etcd, prefix: &str) -> EtcdStore {
        EtcdStore::connect(std::slice::from_ref(&e.member.url), prefix)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keeps_the_promises_of_the_storage_trait() {
        let e = etcd().await;
        let s = store(&e, "/flotilla/").await;
        crate::store::conformance::keeps_the_promises_of_the_storage_trait(std::sync::Arc::new(s))
            .await;
    }

    #[tokio::test]
    async fn prefixes_keep_fleets_apart_and_concurrent_cas_lets_one_win() {
        let e = etcd().await;
        let (a, b) = (store(&e, "/a/").await, store(&e, "/ab/").await);
        a.put("k", b"from a".to_vec()).await.unwrap();
        b.put("k", b"from b".to_vec()).await.unwrap();
        assert_eq!(a.get("k").await.unwrap().unwrap(), b"from a");
        assert_eq!(a.scan_prefix("").await.unwrap().len(), 1);
        // 16 creators race for one key: exactly one gets it.
        let wins: Vec<bool> = futures::future::join_all((0..16).map(|i| {
            let s = a.clone();
            async move {
                s.compare_and_swap("claim", None, Some(vec![i]))
                    .await
                    .unwrap()
            }
        }))
        .await;
        assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_named_in_the_error() {
        let port = free_port();
        let err = match EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/x/").await {
            Err(e) => e.to_string(),
            Ok(s) => s.get("k").await.unwrap_err().to_string(),
        };
        assert!(err.contains("etcd"), "{err}");
    }
}
