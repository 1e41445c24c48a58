//! The append-only audit log: who did what, on what, when. Entries are created
//! with compare-and-swap on a fresh sequence number, so none is ever overwritten.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::model::{AuditRecord, keys, now_ms};
use crate::store::Db;

/// Everything the server writes to the audit log. The operator guide's audit
/// table lists each (a test holds it to that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ServerInit,
    ReplicaInit,
    CredentialCreate,
    CredentialRevoke,
    CredentialRotate,
    TokenCreate,
    TokenRevoke,
    TokenExtend,
    GroupCreate,
    GroupSet,
    GroupConfigure,
    GroupDelete,
    NodeAccept,
    NodeLabels,
    NodeMove,
    NodeReject,
    NodeRevoke,
    NodeJoin,
    NodeRejoin,
    NodeClone,
    JoinFailed,
    AuthFailed,
    NodeRenew,
    NodeReenroll,
    ServerCertRenew,
    TrustSet,
    TrustRotate,
    ArtifactUpload,
    ArtifactGc,
    PatchPublish,
    PatchPublishEmergency,
    RolloutPause,
    RolloutResume,
    RolloutAbort,
}

impl Action {
    pub const ALL: &[Action] = &[
        Action::ServerInit,
        Action::ReplicaInit,
        Action::CredentialCreate,
        Action::CredentialRevoke,
        Action::CredentialRotate,
        Action::TokenCreate,
        Action::TokenRevoke,
        Action::TokenExtend,
        Action::GroupCreate,
        Action::GroupSet,
        Action::GroupConfigure,
        Action::GroupDelete,
        Action::NodeAccept,
        Action::NodeLabels,
        Action::NodeMove,
        Action::NodeReject,
        Action::NodeRevoke,
        Action::NodeJoin,
        Action::NodeRejoin,
        Action::NodeClone,
        Action::JoinFailed,
        Action::AuthFailed,
        Action::NodeRenew,
        Action::NodeReenroll,
        Action::ServerCertRenew,
        Action::TrustSet,
        Action::TrustRotate,
        Action::ArtifactUpload,
        Action::ArtifactGc,
        Action::PatchPublish,
        Action::PatchPublishEmergency,
        Action::RolloutPause,
        Action::RolloutResume,
        Action::RolloutAbort,
    ];

    /// The name stored and shown: `group.set`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ServerInit => "server.init",
            Action::ReplicaInit => "replica.init",
            Action::CredentialCreate => "credential.create",
            Action::CredentialRevoke => "credential.revoke",
            Action::CredentialRotate => "credential.rotate",
            Action::TokenCreate => "token.create",
            Action::TokenRevoke => "token.revoke",
            Action::TokenExtend => "token.extend",
            Action::GroupCreate => "group.create",
            Action::GroupSet => "group.set",
            Action::GroupConfigure => "group.configure",
            Action::GroupDelete => "group.delete",
            Action::NodeAccept => "node.accept",
            Action::NodeLabels => "node.labels",
            Action::NodeMove => "node.move",
            Action::NodeReject => "node.reject",
            Action::NodeRevoke => "node.revoke",
            Action::NodeJoin => "node.join",
            Action::NodeRejoin => "node.rejoin",
            Action::NodeClone => "node.clone",
            Action::JoinFailed => "join.failed",
            Action::AuthFailed => "auth.failed",
            Action::NodeRenew => "node.renew",
            Action::NodeReenroll => "node.reenroll",
            Action::ServerCertRenew => "server.cert.renew",
            Action::TrustSet => "trust.set",
            Action::TrustRotate => "trust.rotate",
            Action::ArtifactUpload => "artifact.upload",
            Action::ArtifactGc => "artifact.gc",
            Action::PatchPublish => "patch.publish",
            Action::PatchPublishEmergency => "patch.publish.emergency",
            Action::RolloutPause => "rollout.pause",
            Action::RolloutResume => "rollout.resume",
            Action::RolloutAbort => "rollout.abort",
        }
    }
}

pub struct AuditLog {
    db: Db,
    next: AtomicU64,
}

impl AuditLog {
    /// Opens the log, continuing after its last entry.
    pub async fn open(db: Db) -> Result<Self> {
        let last = db.last::<AuditRecord>(keys::AUDIT).await?;
        Ok(Self {
            db,
            next: AtomicU64::new(last.map_or(1, |r| r.seq + 1)),
        })
    }

    /// Appends an entry; durable when this returns.
    pub async fn record(
        &self,
        actor: &str,
        action: Action,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditRecord> {
        loop {
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            let rec = AuditRecord {
                seq,
                at_ms: now_ms(),
                actor: actor.to_string(),
                action: action.as_str().to_string(),
                target: target.to_string(),
                detail: detail.clone(),
            };
            if self.db.create(&keys::audit(seq), &rec).await? {
                return Ok(rec);
            }
        }
    }

    /// The newest `limit` entries, oldest first.
    pub async fn tail(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut all = self.db.list::<AuditRecord>(keys::AUDIT).await?;
        let skip = all.len().saturating_sub(limit);
        Ok(all.split_off(skip))
    }
}

#[cfg(test)]
mod tests {
    use super::Action;

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
