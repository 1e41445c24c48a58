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
}

impl AuditLog {
    /// Opens the log, continuing after its head.
    pub async fn open(db: Db) -> Result<Self> {
        let log = Self {
            db,
            head: tokio::sync::Mutex::new(None),
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

    /// The newest `limit` entries, oldest first.
    pub async fn tail(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut all = self.db.list::<AuditRecord>(keys::AUDIT).await?;
        let skip = all.len().saturating_sub(limit);
        Ok(all.split_off(skip))
    }

    /// The oldest `limit` entries after seq `after` written at `since_ms` or
    /// later, oldest first (an export's pages).
    pub async fn page(&self, after: u64, since_ms: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        Ok(self
            .db
            .list::<AuditRecord>(keys::AUDIT)
            .await?
            .into_iter()
            .filter(|r| r.seq > after && r.at_ms >= since_ms)
            .take(limit)
            .collect())
    }

    /// Checks the whole stored chain against the stored head and `anchors`.
    pub async fn verify(
        &self,
        anchors: &[Head],
    ) -> Result<std::result::Result<chain::Intact, chain::Broken>> {
        // Entries and head from one snapshot, so an append in between is not
        // taken for tampering.
        let (_, entries) = self.db.raw().snapshot("audit").await?;
        let mut head = None;
        let mut records = Vec::new();
        for (key, value) in entries {
            if key == keys::AUDIT_HEAD {
                head = Some(serde_json::from_slice::<Head>(&value).map_err(|e| {
                    Error::Internal(format!("the audit log's head does not parse: {e}"))
                })?);
            } else if let Some(seq) = key.strip_prefix(keys::AUDIT) {
                match serde_json::from_slice::<AuditRecord>(&value) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        let seq = seq.parse().unwrap_or(0);
                        return Ok(Err(chain::Broken {
                            seq,
                            reason: format!("entry {seq} does not parse: {e}"),
                        }));
                    }
                }
            }
        }
        Ok(chain::verify(&records, head.as_ref(), anchors, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn db(dir: &std::path::Path) -> Db {
        Db::new(Arc::new(crate::store::SledStore::open(dir).unwrap()))
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
