//! The etcd backend of the storage trait (cargo feature `etcd`): every key
//! under a prefix of its own, compare-and-swap as an etcd transaction, and
//! every write durable when etcd acknowledges it (raft-committed and fsynced
//! on a quorum), so `put_unsynced` and `sync` need nothing more.
//!
//! Revisions are etcd's own; a watch resumes from a revision and reports a
//! compacted one; leases are etcd leases. Reads of a whole prefix go in pages
//! at one revision, so no answer outgrows a gRPC message however large the
//! fleet. `https` endpoints are reached over TLS, with the CA and client
//! certificate given.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::etcd_members::Members;
use super::{
    Change, ChangeStream, Condition, Event, LeaseId, Op, Revision, Store, StoreError, Visit,
    WatchError,
};

/// How many entries one read of a prefix asks for.
const PAGE: i64 = 1000;

/// TLS to etcd, as PEM: the CA that signed etcd's certificates (else the
/// system's roots are not used: etcd clusters run their own CA), and this
/// client's certificate and key when etcd asks for one.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A connection to an etcd cluster, confined to the keys under `prefix`.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
    prefix: String,
}

/// The key (under the prefix) whose holder loads records into it (a restore,
/// a migration): no server starts meanwhile.
const HOLD_KEY: &str = "maintenance/holder";
/// The lease of that key: how long a run that stopped without a word keeps
/// the next one waiting.
pub const HOLD_TTL: Duration = Duration::from_secs(5);

fn etcd(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`, ...), failing over among
    /// them; keys live under `prefix` (e.g. `/flotilla/`). `tls` applies to
    /// `https` endpoints.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<EtcdTls>,
    ) -> Result<Self, StoreError> {
        // A member cut off from the others answers "no leader" at once
        // instead of hanging: the request goes to the next.
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_require_leader(true);
        if let Some(tls) = tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = tls.ca {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        let members = Members::connect(endpoints, opts).await.map_err(|e| {
            StoreError::Backend(format!("cannot reach etcd at {}: {e}", endpoints.join(",")))
        })?;
        Ok(Self {
            members: Arc::new(members),
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Claims this prefix for `what` (a restore, a migration) until the
    /// process exits: a key under the prefix tied to an etcd lease that this
    /// process keeps alive. While it is held, another run is refused and no
    /// server starts; a run stopped without a word lets it go within
    /// [`HOLD_TTL`], which a new one waits for. A holder that cannot renew its
    /// lease stops the process rather than write on after losing it.
    pub async fn hold_for(&self, what: &str) -> Result<(), StoreError> {
        let key = self.key(HOLD_KEY);
        let holder = format!(
            "{what}, pid {} on {}",
            std::process::id(),
            crate::replica::hostname()
        );
        let deadline = tokio::time::Instant::now() + HOLD_TTL + Duration::from_secs(2);
        let lease = loop {
            let lease = self.grant_lease(HOLD_TTL).await?;
            let claim = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    holder.clone(),
                    Some(PutOptions::new().with_lease(lease.0)),
                )]);
            let resp = self
                .members
                .call(|c| {
                    let claim = claim.clone();
                    async move { c.kv_client().txn(claim).await }
                })
                .await
                .map_err(etcd)?;
            if resp.succeeded() {
                break lease;
            }
            let _ = self.revoke(lease).await;
            if tokio::time::Instant::now() >= deadline {
                let held_by = self
                    .get(HOLD_KEY)
                    .await?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                return Err(StoreError::Backend(format!(
                    "etcd prefix {} is held by another run ({held_by}): wait for it to end",
                    self.prefix
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(HOLD_TTL / 3).await;
                let ok = matches!(me.keep_alive(lease).await, Ok(true));
                if ok {
                    renewed = tokio::time::Instant::now();
                } else if renewed.elapsed() >= HOLD_TTL {
                    tracing::error!(
                        "lost the hold on the etcd prefix (etcd unreachable for {HOLD_TTL:?}); stopping so that nothing is written without it"
                    );
                    std::process::exit(1);
                }
            }
        });
        Ok(())
    }

    /// Who holds this prefix for a restore or migration, if anyone.
    pub async fn holder(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(HOLD_KEY)
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn strip(&self, full: &[u8]) -> String {
        let full = String::from_utf8_lossy(full);
        full.strip_prefix(&self.prefix).unwrap_or(&full).to_string()
    }

    /// Hands every entry under `prefix`, as of one revision, to `visit`, a
    /// page at a time.
    async fn visit_prefix(
        &self,
        prefix: &str,
        visit: &mut Visit<'_>,
    ) -> Result<Revision, StoreError> {
        let full = self.key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.into_bytes();
        let mut at = 0i64;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_sort(SortTarget::Key, SortOrder::Ascend)
                .with_limit(PAGE);
            if at > 0 {
                opts = opts.with_revision(at);
            }
            let resp = self
                .members
                .read(|c| {
                    let (from, opts) = (from.clone(), opts.clone());
                    async move { c.kv_client().get(from, Some(opts)).await }
                })
                .await
                .map_err(etcd)?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                visit(&self.strip(kv.key()), kv.value(), kv.lease() != 0)?;
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(at as Revision),
            }
        }
    }

    fn txn_op(&self, op: Op) -> TxnOp {
        match op {
            Op::Put { key, value, lease } => TxnOp::put(
                self.key(&key),
                value,
                lease.map(|l| PutOptions::new().with_lease(l.0)),
            ),
            Op::Delete(key) => TxnOp::delete(self.key(&key), None),
        }
    }

    fn compare(&self, c: Condition) -> Compare {
        match c {
            // Absent is "never created"; present is "holds exactly these bytes".
            Condition::Absent(k) => Compare::create_revision(self.key(&k), CompareOp::Equal, 0),
            Condition::Equals(k, v) => Compare::value(self.key(&k), CompareOp::Equal, v),
        }
    }
}

/// A connection to the test member at `url`, once it answers requests (not
/// only connections).
#[cfg(test)]
pub(crate) async fn connect_when_up(url: &str, prefix: &str) -> EtcdStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = EtcdStore::connect(&[url.to_string()], prefix, None).await
            && s.get("x").await.is_ok()
        {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "etcd at {url} did not answer in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// etcd's answer for a lease that expired or was revoked (it has no code of
/// its own in the client's errors, only this text).
fn lease_gone(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self.get_kv(key).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn get_at(&self, key: &str) -> Result<(Revision, Option<Vec<u8>>), StoreError> {
        let resp = self.get_kv(key).await?;
        let revision = resp
            .header()
            .map(|h| h.revision() as Revision)
            .ok_or_else(|| StoreError::Backend("etcd answered without a revision".into()))?;
        Ok((revision, resp.kvs().first().map(|kv| kv.value().to_vec())))
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.snapshot(prefix).await?.1)
    }

    async fn last_in_prefix(&self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let full = self.key(prefix);
        let resp = self
            .members
            .read(|c| {
                let (full, opts) = (full.clone(), opts.clone());
                async move { c.kv_client().get(full, Some(opts)).await }
            })
            .await
            .map_err(etcd)?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (self.strip(kv.key()), kv.value().to_vec())))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let full = self.key(key);
        self.members
            .call(|c| {
                let (full, value) = (full.clone(), value.clone());
                async move { c.kv_client().put(full, value, None).await }
            })
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
        let full = self.key(key);
        self.members
            .call(|c| {
                let full = full.clone();
                async move { c.kv_client().delete(full, None).await }
            })
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
        let (when, then) = super::cas(key, expected, new);
        Ok(self.txn(vec![when], vec![then]).await?.is_some())
    }

    async fn txn(
        &self,
        when: Vec<Condition>,
        then: Vec<Op>,
    ) -> Result<Option<Revision>, StoreError> {
        let when: Vec<Compare> = when.into_iter().map(|c| self.compare(c)).collect();
        let then: Vec<TxnOp> = then.into_iter().map(|o| self.txn_op(o)).collect();
        let txn = Txn::new().when(when).and_then(then);
        let resp = self
            .members
            .call(|c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await
            .map_err(etcd)?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision() as Revision)))
    }

    async fn visit_snapshot(
        &self,
        prefix: &str,
        visit: &mut Visit<'_>,
    ) -> Result<Revision, StoreError> {
        self.visit_prefix(prefix, visit).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<ChangeStream, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after as i64 + 1);
        let full = self.key(prefix);
        let stream = self
            .members
            .read(|c| {
                let (full, opts) = (full.clone(), opts.clone());
                async move { c.watch_client().watch(full, Some(opts)).await }
            })
            .await
            .map_err(etcd)?;
        let me = self.clone();
        // One item per etcd revision: a response may carry several, and a
        // transaction's events share one.
        let changes = futures::stream::unfold(Some(stream), move |stream| {
            let me = me.clone();
            async move {
                let mut stream = stream?;
                loop {
                    match stream.message().await {
                        Err(e) => {
                            return Some((vec![Err(WatchError::Backend(e.to_string()))], None));
                        }
                        Ok(None) => {
                            let e = WatchError::Backend("etcd ended the watch".into());
                            return Some((vec![Err(e)], None));
                        }
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0 {
                                let e = WatchError::Compacted(resp.compact_revision() as Revision);
                                return Some((vec![Err(e)], None));
                            }
                            if resp.canceled() {
                                let e = WatchError::Backend(format!(
                                    "etcd cancelled the watch: {}",
                                    resp.cancel_reason()
                                ));
                                return Some((vec![Err(e)], None));
                            }
                            let changes = me.changes(resp.events());
                            if !changes.is_empty() {
                                return Some((changes, Some(stream)));
                            }
                        }
                    }
                }
            }
        })
        .flat_map(futures::stream::iter);
        Ok(changes.boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let resp = self
            .members
            .call(|c| async move {
                c.lease_client()
                    .grant(ttl.as_secs().max(1) as i64, None)
                    .await
            })
            .await
            .map_err(etcd)?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let renewal = self.members.read(|c| async move {
            let (mut keeper, mut answers) = c.lease_client().keep_alive(lease.0).await?;
            keeper.keep_alive().await?;
            answers.message().await
        });
        match renewal.await {
            Ok(Some(a)) => Ok(a.ttl() > 0),
            Ok(None) => Err(StoreError::Backend(
                "etcd: no answer to a lease renewal".into(),
            )),
            Err(e) if lease_gone(&e) => Ok(false),
            Err(e) => Err(etcd(e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let revoked = self
            .members
            .read(|c| async move { c.lease_client().revoke(lease.0).await })
            .await;
        match revoked {
            Ok(_) => Ok(()),
            // Already gone is what revoking asks for.
            Err(e) if lease_gone(&e) => Ok(()),
            Err(e) => Err(etcd(e)),
        }
    }
}

impl EtcdStore {
    /// The key's entry, read from a member that answers.
    async fn get_kv(&self, key: &str) -> Result<etcd_client::GetResponse, StoreError> {
        let full = self.key(key);
        self.members
            .read(|c| {
                let full = full.clone();
                async move { c.kv_client().get(full, None).await }
            })
            .await
            .map_err(etcd)
    }

    /// Groups watch events into one change per revision.
    fn changes(&self, events: &[etcd_client::Event]) -> Vec<Result<Change, WatchError>> {
        let mut out: Vec<Change> = Vec::new();
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let revision = kv.mod_revision() as Revision;
            let key = self.strip(kv.key());
            let event = match e.event_type() {
                EventType::Put => Event::Put {
                    key,
                    value: kv.value().to_vec(),
                },
                EventType::Delete => Event::Delete { key },
            };
            match out.last_mut() {
                Some(c) if c.revision == revision => c.events.push(event),
                _ => out.push(Change {
                    revision,
                    events: vec![event],
                }),
            }
        }
        out.into_iter().map(Ok).collect()
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
        connect_when_up(&member.url, "/probe/").await;
        Etcd { member, _dir: dir }
    }

    async fn store(e: &Etcd, prefix: &str) -> EtcdStore {
        EtcdStore::connect(std::slice::from_ref(&e.member.url), prefix, None)
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
    async fn keeps_transactions_history_and_leases() {
        let e = etcd().await;
        let s = std::sync::Arc::new(store(&e, "/flotilla/").await);
        crate::store::conformance::keeps_transactions_and_history(s.clone()).await;
        crate::store::conformance::keeps_leases(s.clone()).await;
        let c = s.clone();
        crate::store::conformance::feed_follows_and_resyncs(s, || async move {
            let (rev, _) = c.snapshot("").await.unwrap();
            c.members
                .call(|c| async move { c.kv_client().compact(rev as i64, None).await })
                .await
                .unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_prefix_larger_than_a_page_is_read_whole_at_one_revision() {
        let e = etcd().await;
        let s = store(&e, "/big/").await;
        let n = PAGE as usize * 2 + 7;
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            let ops = chunk
                .iter()
                .map(|i| Op::put(format!("r/{i:05}"), vec![1; 16]))
                .collect();
            s.txn(vec![], ops).await.unwrap().unwrap();
        }
        s.put("rz", b"after the prefix".to_vec()).await.unwrap();
        let (rev, all) = s.snapshot("r/").await.unwrap();
        assert_eq!(all.len(), n);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(all.last().unwrap().0, format!("r/{:05}", n - 1));
        assert!(rev > 0);
        assert_eq!(s.scan_prefix("r/").await.unwrap().len(), n);
    }

    #[test]
    fn the_end_of_a_prefix_is_the_next_key_after_it() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
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
    async fn https_endpoints_use_the_given_ca_and_client_certificate() {
        use flotilla_e2e::etcd::{Etcd, EtcdTlsFiles};
        let dir = tempfile::tempdir().unwrap();
        let files = EtcdTlsFiles::generate(dir.path());
        let member = Etcd::start_with(dir.path(), Some(&files));
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        let tls = EtcdTls {
            ca: Some(read(&files.ca)),
            identity: Some((read(&files.client_cert), read(&files.client_key))),
        };
        let endpoints = std::slice::from_ref(&member.url);
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            if let Ok(s) = EtcdStore::connect(endpoints, "/tls/", Some(tls.clone())).await
                && s.put("k", b"v".to_vec()).await.is_ok()
            {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "etcd over TLS did not answer in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(s.get("k").await.unwrap().unwrap(), b"v");
        // Without the client certificate, or trusting another CA, nothing is read.
        let refused = |tls: EtcdTls| async move {
            match EtcdStore::connect(endpoints, "/tls/", Some(tls)).await {
                Err(e) => e.to_string(),
                Ok(s) => s.get("k").await.unwrap_err().to_string(),
            }
        };
        let no_cert = refused(EtcdTls {
            ca: tls.ca.clone(),
            identity: None,
        })
        .await;
        assert!(no_cert.contains("etcd"), "{no_cert}");
        let other_dir = dir.path().join("other");
        std::fs::create_dir(&other_dir).unwrap();
        let other = EtcdTlsFiles::generate(&other_dir);
        let wrong_ca = refused(EtcdTls {
            ca: Some(read(&other.ca)),
            identity: tls.identity.clone(),
        })
        .await;
        assert!(wrong_ca.contains("etcd"), "{wrong_ca}");
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_named_in_the_error() {
        let port = free_port();
        let err = match EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/x/", None).await
        {
            Err(e) => e.to_string(),
            Ok(s) => s.get("k").await.unwrap_err().to_string(),
        };
        assert!(err.contains("etcd"), "{err}");
    }
}
