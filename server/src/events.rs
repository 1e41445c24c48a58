//! Fleet events for autoscalers, chat and scripts: a durable, ordered log in
//! the store (`events/<id>`), appended from any replica in one transaction
//! with its head (`events-head`), so ids only grow and every replica sees one
//! order. Webhooks deliver it (`webhooks`), `flotilla events --follow` streams
//! it; the leader's `detect` turns fleet state into events.

pub mod detect;
pub mod http;
pub mod webhooks;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::now_ms;
use crate::store::{Condition, Db, Op};

const PREFIX: &str = "events/";
const HEAD: &str = "events-head";
/// The highest id pruned: reads start past it.
const FLOOR: &str = "events-floor";

fn key(id: u64) -> String {
    format!("{PREFIX}{id:020}")
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A group has fewer healthy active nodes than desired (or again enough:
    /// `deficit` 0), each time the deficit changes.
    Deficit,
    /// A group has more online nodes than desired (or no longer: `surplus`
    /// 0), each time the surplus changes: the scale-in side.
    Surplus,
    RolloutPaused,
    RolloutCompleted,
    RolloutAborted,
    /// An accepted node offline for the offline grace.
    NodeOffline,
    /// A host joined (or re-joined) as a node.
    NodeJoined,
    /// A node reported a patch failed or rolled back.
    PatchFailed,
}

impl Kind {
    pub const ALL: &[Kind] = &[
        Kind::Deficit,
        Kind::Surplus,
        Kind::RolloutPaused,
        Kind::RolloutCompleted,
        Kind::RolloutAborted,
        Kind::NodeOffline,
        Kind::NodeJoined,
        Kind::PatchFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deficit => "deficit",
            Kind::Surplus => "surplus",
            Kind::RolloutPaused => "rollout.paused",
            Kind::RolloutCompleted => "rollout.completed",
            Kind::RolloutAborted => "rollout.aborted",
            Kind::NodeOffline => "node.offline",
            Kind::NodeJoined => "node.joined",
            Kind::PatchFailed => "patch.failed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.as_str() == s)
    }
}

/// Checks a list of kind names (e.g. a webhook's), naming the first unknown.
pub fn parse_kinds(names: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
        if n.is_empty() {
            continue;
        }
        if Kind::parse(n).is_none() {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(Error::InvalidArgument(format!(
                "unknown event {n:?} (events: {})",
                known.join(", ")
            )));
        }
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

/// One event, as stored and as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Grows by one per event: receivers de-duplicate by it.
    pub id: u64,
    pub at_ms: i64,
    pub kind: String,
    /// What it is about: a group, a patch id or a node id.
    pub subject: String,
    pub data: serde_json::Value,
}

/// The events to append in one transaction, with a condition of the
/// caller's (e.g. the detector's last-seen state) and its write.
pub struct Batch {
    pub events: Vec<(Kind, String, serde_json::Value)>,
    pub when: Vec<Condition>,
    pub then: Vec<Op>,
}

#[derive(Clone)]
pub struct EventLog {
    db: Db,
    /// Woken after each local append: this replica's deliveries and
    /// followers look at once (other replicas' appends are polled).
    pub appended: std::sync::Arc<tokio::sync::Notify>,
    /// Event streams open per operator credential (each a task and a
    /// poll of the store every half second while it follows).
    pub followers: std::sync::Arc<crate::slots::KeyedSlots>,
}

/// Event streams one credential may hold open at once.
pub const MAX_FOLLOWERS_PER_CREDENTIAL: usize = 8;

impl EventLog {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            appended: Default::default(),
            followers: std::sync::Arc::new(crate::slots::KeyedSlots::new(
                MAX_FOLLOWERS_PER_CREDENTIAL,
            )),
        }
    }

    /// The newest event's id (0: none yet), and the head's stored bytes.
    async fn head(&self) -> Result<(u64, Option<Vec<u8>>)> {
        let bytes = self.db.raw().get(HEAD).await?;
        let id = match &bytes {
            Some(b) => serde_json::from_slice::<u64>(b).map_err(|e| {
                Error::Internal(format!("the event log's head does not parse: {e}"))
            })?,
            None => 0,
        };
        Ok((id, bytes))
    }

    /// The newest event's id (0: none yet).
    pub async fn newest(&self) -> Result<u64> {
        Ok(self.head().await?.0)
    }

    /// Appends one event; durable when this returns.
    pub async fn append(&self, kind: Kind, subject: &str, data: serde_json::Value) -> Result<u64> {
        let batch = Batch {
            events: vec![(kind, subject.to_string(), data)],
            when: Vec::new(),
            then: Vec::new(),
        };
        Ok(self.append_batch(batch).await?.unwrap_or(0))
    }

    /// Appends `batch.events` in order, with the batch's own writes, if its
    /// conditions hold; returns the last id, or None when a condition of the
    /// batch's failed (nothing written). Another replica's append meanwhile
    /// is waited out and tried again.
    pub async fn append_batch(&self, batch: Batch) -> Result<Option<u64>> {
        if batch.events.is_empty() && batch.then.is_empty() {
            return Ok(Some(self.newest().await?));
        }
        loop {
            let (head, stored) = self.head().await?;
            let at_ms = now_ms();
            let mut then = batch.then.clone();
            let mut id = head;
            for (kind, subject, data) in &batch.events {
                id += 1;
                let event = Event {
                    id,
                    at_ms,
                    kind: kind.as_str().to_string(),
                    subject: subject.clone(),
                    data: data.clone(),
                };
                then.push(Op::put(
                    key(id),
                    serde_json::to_vec(&event).expect("event serialises"),
                ));
            }
            let (head_is, head_put) = crate::store::cas(
                HEAD,
                stored.as_deref(),
                Some(serde_json::to_vec(&id).expect("id serialises")),
            );
            then.push(head_put);
            let mut when = batch.when.clone();
            when.push(head_is);
            if self.db.raw().txn(when, then).await?.is_some() {
                self.appended.notify_waiters();
                return Ok(Some(id));
            }
            // Which condition failed: the head moved (try again) or the batch's.
            if self.head().await?.1 == stored {
                return Ok(None);
            }
        }
    }

    /// Up to `limit` events after `after`, oldest first (from the oldest
    /// kept, when `after` was pruned).
    pub async fn after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let (newest, _) = self.head().await?;
        let floor = self.db.get::<u64>(FLOOR).await?.unwrap_or(0);
        let after = after.max(floor);
        if newest <= after {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for id in after + 1..=newest.min(after + limit as u64) {
            // A pruned id is skipped; the rest are there (written with the head).
            if let Some(e) = self.db.get::<Event>(&key(id)).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Removes events up to `upto` written before `before_ms` (delivered to
    /// every webhook, or dropped by it, and old enough for followers).
    pub async fn prune(&self, upto: u64, before_ms: i64) -> Result<u64> {
        let mut gone = Vec::new();
        for (k, v) in self.db.raw().scan_prefix(PREFIX).await? {
            let Ok(e) = serde_json::from_slice::<Event>(&v) else {
                continue;
            };
            if e.id > upto || e.at_ms >= before_ms {
                break;
            }
            gone.push((k, e.id));
        }
        let Some((_, last)) = gone.last() else {
            return Ok(0);
        };
        // The floor first: a reader never looks for a pruned id.
        self.db.put(FLOOR, last).await?;
        for chunk in gone.chunks(256) {
            let deletes = chunk.iter().map(|(k, _)| Op::Delete(k.clone())).collect();
            self.db.raw().txn(Vec::new(), deletes).await?;
        }
        Ok(gone.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_keep_their_order_and_reads_start_past_what_was_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(
            crate::store::SledStore::open(tmp.path()).unwrap(),
        ));
        let log = EventLog::new(db.clone());
        for n in 0..5 {
            let id = log
                .append(Kind::Deficit, "g", serde_json::json!({ "n": n }))
                .await
                .unwrap();
            assert_eq!(id, n + 1);
        }
        // A second log on the same store (another replica) goes on after it.
        let other = EventLog::new(db);
        assert_eq!(
            other
                .append(Kind::Surplus, "g", serde_json::json!({}))
                .await
                .unwrap(),
            6
        );
        let ids = |v: Vec<Event>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(log.after(0, 100).await.unwrap()), [1, 2, 3, 4, 5, 6]);
        assert_eq!(ids(log.after(4, 1).await.unwrap()), [5]);
        // Pruned up to 3 (all are old enough): a reader from 0 starts at 4.
        assert_eq!(log.prune(3, i64::MAX).await.unwrap(), 3);
        assert_eq!(ids(log.after(0, 2).await.unwrap()), [4, 5]);
        assert_eq!(log.prune(3, i64::MAX).await.unwrap(), 0);
        // Too new to prune.
        assert_eq!(log.prune(6, 0).await.unwrap(), 0);
        assert!(parse_kinds(&["deficit,nope".into()]).is_err());
        assert_eq!(
            parse_kinds(&["deficit, surplus".into(), "deficit".into()]).unwrap(),
            ["deficit", "surplus"]
        );
    }
}
