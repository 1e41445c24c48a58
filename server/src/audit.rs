//! The append-only, hash-chained audit log: who did what, on what, when. Each
//! entry is written in one transaction with the log's head (the newest entry's
//! seq and hash), on the condition that the head is still the one it chains
//! to: entries are never overwritten, and on several replicas they still form
//! one chain.

pub mod chain;

use crate::error::{Error, Result};
use crate::model::{AuditRecord, keys, now_ms};
use crate::store::{Condition, Db, Op};
use chain::Head;

/// Declares [`Action`] with each variant's stored name, and `Action::ALL`
/// from the same list: a new action cannot be left out of `ALL` (which the
/// guide's audit table is held to).
macro_rules! actions {
    ($($variant:ident => $name:literal,)*) => {
        /// Everything the server writes to the audit log. The operator guide's
        /// audit table lists each (a test holds it to that).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Action {
            $($variant,)*
        }

        impl Action {
            pub const ALL: &[Action] = &[$(Action::$variant,)*];

            /// The name stored and shown: `group.set`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Action::$variant => $name,)*
                }
            }
        }
    };
}

actions! {
    ServerInit => "server.init",
    ReplicaInit => "replica.init",
    CredentialCreate => "credential.create",
    CredentialRevoke => "credential.revoke",
    CredentialRotate => "credential.rotate",
    TokenCreate => "token.create",
    TokenRevoke => "token.revoke",
    TokenExtend => "token.extend",
    GroupCreate => "group.create",
    GroupSet => "group.set",
    GroupConfigure => "group.configure",
    GroupDelete => "group.delete",
    NodeAccept => "node.accept",
    NodeLabels => "node.labels",
    NodeMove => "node.move",
    NodeReject => "node.reject",
    NodeRevoke => "node.revoke",
    NodeJoin => "node.join",
    NodeRejoin => "node.rejoin",
    NodeClone => "node.clone",
    JoinFailed => "join.failed",
    AuthFailed => "auth.failed",
    NodeRenew => "node.renew",
    NodeReenroll => "node.reenroll",
    ServerCertRenew => "server.cert.renew",
    TrustSet => "trust.set",
    TrustRotate => "trust.rotate",
    ArtifactUpload => "artifact.upload",
    ArtifactGc => "artifact.gc",
    WebhookAdd => "webhook.add",
    WebhookRemove => "webhook.remove",
    WebhookDropped => "webhook.dropped",
    PatchPublish => "patch.publish",
    PatchPublishEmergency => "patch.publish.emergency",
    RolloutPause => "rollout.pause",
    RolloutResume => "rollout.resume",
    RolloutAbort => "rollout.abort",
    DashboardSignIn => "dashboard.signin",
    DashboardSignOut => "dashboard.signout",
}

pub struct AuditLog {
    db: Db,
    /// The head as this replica last wrote or read it (with its stored
    /// bytes, the condition of the next append); None: read it again.
    head: tokio::sync::Mutex<Option<(Option<Vec<u8>>, Head)>>,
    /// Held by a chain check: one at a time (each hashes the whole log).
    verifying: tokio::sync::Mutex<()>,
}

impl AuditLog {
    /// Opens the log, continuing after its head.
    pub async fn open(db: Db) -> Result<Self> {
        let log = Self {
            db,
            head: tokio::sync::Mutex::new(None),
            verifying: tokio::sync::Mutex::new(()),
        };
        *log.head.lock().await = Some(log.read_head().await?);
        Ok(log)
    }

    /// The stored head, or for a log written before the chain (or empty) the
    /// one its newest entry gives, with no stored bytes (the first append
    /// creates it).
    async fn read_head(&self) -> Result<(Option<Vec<u8>>, Head)> {
        if let Some(bytes) = self.db.raw().get(keys::AUDIT_HEAD).await? {
            let head: Head = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Internal(format!("the audit log's head does not parse: {e}"))
            })?;
            return Ok((Some(bytes), head));
        }
        let last = self.db.last::<AuditRecord>(keys::AUDIT).await?;
        Ok((
            None,
            last.map_or(
                Head {
                    seq: 0,
                    sha256: String::new(),
                },
                |r| Head {
                    seq: r.seq,
                    sha256: chain::hash(&r),
                },
            ),
        ))
    }

    /// Appends an entry, chained to the newest; durable when this returns.
    pub async fn record(
        &self,
        actor: &str,
        action: Action,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditRecord> {
        let mut cached = self.head.lock().await;
        loop {
            let (stored, head) = match cached.take() {
                Some(h) => h,
                None => self.read_head().await?,
            };
            let mut rec = AuditRecord {
                seq: head.seq + 1,
                at_ms: now_ms(),
                actor: actor.to_string(),
                action: action.as_str().to_string(),
                target: target.to_string(),
                detail: detail.clone(),
                prev: head.sha256.clone(),
                sha256: String::new(),
            };
            rec.sha256 = chain::hash(&rec);
            let next = Head {
                seq: rec.seq,
                sha256: rec.sha256.clone(),
            };
            let next_bytes = serde_json::to_vec(&next).expect("head serialises");
            let entry = serde_json::to_vec(&rec).expect("audit entry serialises");
            let (head_is, head_put) = crate::store::cas(
                keys::AUDIT_HEAD,
                stored.as_deref(),
                Some(next_bytes.clone()),
            );
            let key = keys::audit(rec.seq);
            let written = self
                .db
                .raw()
                .txn(
                    vec![head_is, Condition::Absent(key.clone())],
                    vec![Op::put(key, entry), head_put],
                )
                .await?;
            if written.is_some() {
                *cached = Some((Some(next_bytes), next));
                return Ok(rec);
            }
            // Another replica appended meanwhile: chain to its entry.
        }
    }

    /// The entries whose seqs share block `b` (`b * BLOCK` to `b * BLOCK +
    /// BLOCK - 1`), oldest first: keys are zero-padded seqs, so a block is
    /// one prefix read, whatever the log's length.
    async fn block(&self, b: u64) -> Result<Vec<AuditRecord>> {
        Ok(self
            .db
            .list::<AuditRecord>(&format!("{}{b:018}", keys::AUDIT))
            .await?)
    }

    /// The newest entry's seq (0: the log is empty).
    async fn newest_seq(&self) -> Result<u64> {
        Ok(self
            .db
            .last::<AuditRecord>(keys::AUDIT)
            .await?
            .map_or(0, |r| r.seq))
    }

    /// The newest `limit` entries, oldest first.
    pub async fn tail(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut page = self.back(0, limit, u64::MAX, |_| true).await?.entries;
        page.reverse();
        Ok(page)
    }

    /// Up to `limit` entries older than seq `before` (0: from the newest)
    /// that `keep` takes, newest first, reading at most about `max_read`
    /// entries (a filter that matches little cannot make one request read
    /// the whole log): where the next page goes on from is in the answer.
    pub async fn back(
        &self,
        before: u64,
        limit: usize,
        max_read: u64,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Back> {
        let top = match self.newest_seq().await? {
            0 => return Ok(Back::default()),
            newest if before == 0 || before > newest => newest + 1,
            _ => before,
        };
        let mut entries = Vec::new();
        let mut read = 0u64;
        let mut b = (top - 1) / BLOCK;
        loop {
            let block = self.block(b).await?;
            read += block.len() as u64;
            let mut lowest = b * BLOCK;
            for e in block.into_iter().rev().filter(|e| e.seq < top) {
                lowest = e.seq;
                if keep(&e) {
                    entries.push(e);
                    if entries.len() >= limit {
                        return Ok(Back {
                            entries,
                            next: lowest,
                        });
                    }
                }
            }
            if b == 0 {
                return Ok(Back { entries, next: 0 });
            }
            if read >= max_read {
                return Ok(Back {
                    entries,
                    next: lowest.max(1),
                });
            }
            b -= 1;
        }
    }

    /// The oldest `limit` entries after seq `after` written at `since_ms` or
    /// later, oldest first (an export's pages). Reads about `limit` entries:
    /// where `since_ms` starts is found by halving the blocks.
    pub async fn page(&self, after: u64, since_ms: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        let newest = self.newest_seq().await?;
        let last = newest / BLOCK;
        let mut b = (after + 1) / BLOCK;
        if since_ms > 0 {
            // The first block whose newest entry is at or after `since_ms`
            // (entries are written in time order, give or take the clocks
            // of replicas: one block earlier is read too).
            let (mut lo, mut hi) = (b, last);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let ends_before = self
                    .block(mid)
                    .await?
                    .last()
                    .is_some_and(|e| e.at_ms < since_ms);
                if ends_before {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            b = b.max(lo.saturating_sub(1));
        }
        let mut out = Vec::new();
        while b <= last && out.len() < limit {
            out.extend(
                self.block(b)
                    .await?
                    .into_iter()
                    .filter(|r| r.seq > after && r.at_ms >= since_ms)
                    .take(limit - out.len()),
            );
            b += 1;
        }
        Ok(out)
    }

    /// Checks the whole stored chain against the stored head and `anchors`,
    /// one entry at a time (bounded memory, whatever the log's length), one
    /// check at a time on this replica.
    pub async fn verify(
        &self,
        anchors: &[Head],
    ) -> Result<std::result::Result<chain::Intact, chain::Broken>> {
        let _one = self.verifying.lock().await;
        // Entries and head from one snapshot, so an append in between is not
        // taken for tampering.
        let mut head = None;
        let mut verifier = chain::Verifier::new(anchors, true);
        let mut broken = None;
        self.db
            .raw()
            .visit_snapshot("audit", &mut |key, value, _| {
                if broken.is_some() {
                    return Ok(());
                }
                if key == keys::AUDIT_HEAD {
                    head = Some(value.to_vec());
                } else if let Some(seq) = key.strip_prefix(keys::AUDIT) {
                    let pushed = match serde_json::from_slice::<AuditRecord>(value) {
                        Ok(r) => verifier.push(&r),
                        Err(e) => {
                            let seq = seq.parse().unwrap_or(0);
                            Err(chain::Broken {
                                seq,
                                reason: format!("entry {seq} does not parse: {e}"),
                            })
                        }
                    };
                    broken = pushed.err();
                }
                Ok(())
            })
            .await?;
        if let Some(b) = broken {
            return Ok(Err(b));
        }
        let head = head
            .map(|bytes| {
                serde_json::from_slice::<Head>(&bytes).map_err(|e| {
                    Error::Internal(format!("the audit log's head does not parse: {e}"))
                })
            })
            .transpose()?;
        Ok(verifier.finish(head.as_ref()))
    }
}

/// Entries read in one block (see [`AuditLog::back`]).
const BLOCK: u64 = 100;

/// A page of [`AuditLog::back`]: its entries, newest first, and the seq the
/// next page goes on below (0: the log's first entry was reached).
#[derive(Debug, Default)]
pub struct Back {
    pub entries: Vec<AuditRecord>,
    pub next: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn db(dir: &std::path::Path) -> Db {
        Db::new(Arc::new(crate::store::SledStore::open(dir).unwrap()))
    }

    /// A log of `n` entries written before the chain, entry `seq` at
    /// `seq` seconds, its actor "a{seq % 7}".
    async fn plain_log(db: &Db, n: u64) -> AuditLog {
        for seq in 1..=n {
            let e = serde_json::json!({
                "seq": seq, "at_ms": seq as i64 * 1000, "actor": format!("a{}", seq % 7),
                "action": "group.set", "target": "g", "detail": {},
            });
            db.put(&keys::audit(seq), &e).await.unwrap();
        }
        AuditLog::open(db.clone()).await.unwrap()
    }

    #[tokio::test]
    async fn pages_read_only_the_blocks_they_need() {
        let tmp = tempfile::tempdir().unwrap();
        let db = db(tmp.path());
        let log = plain_log(&db, 1234).await;
        let seqs = |v: &[AuditRecord]| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&log.tail(3).await.unwrap()), [1232, 1233, 1234]);
        // Newest first below a seq, across block edges.
        let back = log.back(1201, 4, u64::MAX, |_| true).await.unwrap();
        assert_eq!(
            (seqs(&back.entries), back.next),
            (vec![1200, 1199, 1198, 1197], 1197)
        );
        // A filter: every 7th; to the log's start.
        let back = log
            .back(20, 100, u64::MAX, |r| r.actor == "a0")
            .await
            .unwrap();
        assert_eq!((seqs(&back.entries), back.next), (vec![14, 7], 0));
        // A filter matching nothing reads about `max_read`, then says where
        // to go on from.
        let back = log.back(0, 100, 250, |_| false).await.unwrap();
        assert!(back.entries.is_empty());
        assert_eq!(back.next, 900);
        let back = log.back(back.next, 100, 250, |_| false).await.unwrap();
        assert_eq!(back.next, 600);
        // Forward, after a seq or from a time.
        assert_eq!(
            seqs(&log.page(98, 0, 4).await.unwrap()),
            [99, 100, 101, 102]
        );
        assert_eq!(
            seqs(&log.page(0, 777_000, 3).await.unwrap()),
            [777, 778, 779]
        );
        assert_eq!(
            seqs(&log.page(1000, 777_000, 2).await.unwrap()),
            [1001, 1002]
        );
        assert!(log.page(0, 2_000_000, 5).await.unwrap().is_empty());
        assert!(log.page(1234, 0, 5).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_log_written_before_the_chain_goes_on_chained_and_edits_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let db = db(tmp.path());
        // Two entries as the server wrote them before the chain.
        for seq in 1..=2u64 {
            let legacy = serde_json::json!({
                "seq": seq, "at_ms": 1, "actor": "alice", "action": "group.set",
                "target": "g", "detail": {"desired": seq},
            });
            db.put(&keys::audit(seq), &legacy).await.unwrap();
        }
        let log = AuditLog::open(db.clone()).await.unwrap();
        for n in 0..3 {
            log.record("bob", Action::GroupSet, "g", serde_json::json!({ "n": n }))
                .await
                .unwrap();
        }
        // A second opening (another replica, or a restart) goes on the chain.
        let other = AuditLog::open(db.clone()).await.unwrap();
        let rec = other
            .record("carol", Action::GroupSet, "g", serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(rec.seq, 6);
        log.record("bob", Action::GroupSet, "g", serde_json::json!({}))
            .await
            .unwrap();
        let ok = log.verify(&[]).await.unwrap().unwrap();
        assert_eq!((ok.entries, ok.chained_from), (7, Some(3)));

        // One stored entry edited in place.
        let mut e: AuditRecord = db.get(&keys::audit(4)).await.unwrap().unwrap();
        e.actor = "mallory".into();
        db.put(&keys::audit(4), &e).await.unwrap();
        let broken = log.verify(&[]).await.unwrap().unwrap_err();
        assert_eq!(broken.seq, 4, "{broken:?}");
        assert!(broken.reason.contains("was changed"), "{broken:?}");
    }

    /// Every action the server can write is in the operator guide's table.
    #[test]
    fn the_operator_guide_lists_every_action() {
        let guide = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md"),
        )
        .unwrap();
        let table: String = guide
            .split("## Audit log")
            .nth(1)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("| `"))
            .collect();
        let missing: Vec<&str> = Action::ALL
            .iter()
            .map(|a| a.as_str())
            .filter(|a| !table.contains(&format!("`{a}`")))
            .collect();
        assert!(missing.is_empty(), "not in the audit table: {missing:?}");
    }
}
