//! The append-only audit log: who did what, on what, when. Entries are created
//! with compare-and-swap on a fresh sequence number, so none is ever overwritten.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::model::{AuditRecord, keys, now_ms};
use crate::store::Db;

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
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditRecord> {
        loop {
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            let rec = AuditRecord {
                seq,
                at_ms: now_ms(),
                actor: actor.to_string(),
                action: action.to_string(),
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
