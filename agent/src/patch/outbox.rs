//! The report outbox: every patch phase the agent reaches is queued here, durably
//! (the table "outbox", keyed by a big-endian sequence number so iteration is in
//! order), and re-sent until the server acknowledges it, or acknowledges a newer
//! report of the same manifest, which supersedes it.
//!
//! Reports carry an id chosen once, at push: a re-send keeps it, and the server
//! records each id once, so re-sending after a lost answer is harmless.
//!
//! The server keeps only the newest phase per node and manifest, and every
//! `Report` call costs it the same whatever it says, so the sender sends only the
//! newest queued report of each manifest (see [`run_sender`]): during a fleet-wide
//! patch the phases an agent went through while its previous call was in flight
//! would otherwise cost the server one call each for nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::transfer::Transfer;
use flotilla_proto::{limits, pb};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::journal::Phase;
use crate::backoff::{self, Backoff};
use crate::state::{Keyspace, KvError};

/// How long one send may take before it counts as failed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// One report of a patch phase, as queued and as sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Report {
    /// Unique; kept across re-sends.
    pub report_id: String,
    /// The manifest it is about.
    pub manifest_id: String,
    /// The phase reached.
    pub phase: Phase,
    /// When, in Unix milliseconds.
    pub at_unix_ms: i64,
    /// Why, for RolledBack, Failed and Rejected (empty otherwise).
    pub error: String,
    /// The tail of a script's or health check's output.
    pub log_tail: String,
    /// How the artifacts were downloaded so far (None before any download).
    #[serde(default)]
    pub transfer: Option<Transfer>,
}

impl Report {
    /// A report with a fresh id, stamped now.
    pub fn new(manifest_id: &str, phase: Phase, error: &str, log_tail: &str) -> Self {
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            report_id: report_id(),
            manifest_id: manifest_id.to_string(),
            phase,
            at_unix_ms,
            error: error.to_string(),
            log_tail: log_tail.to_string(),
            transfer: None,
        }
    }

    /// The same report, carrying how the artifacts were downloaded.
    pub fn with_transfer(mut self, transfer: Option<Transfer>) -> Self {
        self.transfer = transfer;
        self
    }

    /// The request that carries this report.
    pub fn to_proto(&self) -> pb::ReportRequest {
        pb::ReportRequest {
            report_id: self.report_id.clone(),
            manifest_id: self.manifest_id.clone(),
            phase: self.phase.to_proto() as i32,
            at_unix_ms: self.at_unix_ms,
            error: self.error.clone(),
            log_tail: self.log_tail.clone(),
            transfer: self.transfer.as_ref().map(Transfer::to_proto),
        }
    }
}

/// A fresh, random report id: 16 bytes, lower-case hex.
pub fn report_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Why the outbox could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("report outbox database error: {0}")]
    Db(#[from] KvError),
    #[error("report outbox key {key} is not an 8-byte sequence number")]
    BadKey { key: String },
    #[error("queued report {seq} is corrupt: {source}")]
    Corrupt { seq: u64, source: serde_json::Error },
    #[error("cannot encode the report about manifest {manifest_id}: {source}")]
    Encode {
        manifest_id: String,
        source: serde_json::Error,
    },
    #[error("the report outbox has used up its sequence numbers")]
    Exhausted,
}

/// Handle on the outbox. Cheap to clone; clones share one queue and one wake-up.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    tree: Keyspace,
    /// The next sequence number. Held while a report is written, so sequence
    /// order is the order reports became visible in.
    next: Mutex<u64>,
    /// Wakes the sender when a report is pushed.
    pushed: Notify,
}

impl Outbox {
    /// The outbox kept in `tree` (the agent's "outbox" tree; see
    /// [`crate::state::Store::tree`]). Reports queued before a restart are still there.
    pub fn open(tree: impl Into<Keyspace>) -> Result<Self, OutboxError> {
        let tree = tree.into();
        let next = match tree.last()? {
            None => 1,
            Some((key, _)) => seq_of(&key)?.checked_add(1).ok_or(OutboxError::Exhausted)?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                tree,
                next: Mutex::new(next),
                pushed: Notify::new(),
            }),
        })
    }

    /// Queues `report`, flushed to disk before returning, then wakes the sender. An
    /// error or log tail longer than the protocol allows is cut to fit (the error
    /// keeps its start, the log its end), so the server never refuses it for size.
    pub fn push(&self, mut report: Report) -> Result<(), OutboxError> {
        report.error = keep_head(&report.error, limits::MAX_REPORT_TEXT);
        report.log_tail = keep_tail(&report.log_tail, limits::MAX_REPORT_TEXT);
        let bytes = serde_json::to_vec(&report).map_err(|source| OutboxError::Encode {
            manifest_id: report.manifest_id.clone(),
            source,
        })?;
        {
            // The lock only guards a counter: a poisoned one is still right.
            let mut next = self
                .inner
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let seq = *next;
            let following = seq.checked_add(1).ok_or(OutboxError::Exhausted)?;
            self.inner.tree.insert(seq.to_be_bytes(), bytes)?;
            *next = following;
        }
        self.inner.tree.flush()?;
        self.inner.pushed.notify_one();
        Ok(())
    }

    /// Queued reports with their sequence numbers, oldest first.
    pub fn pending(&self) -> Result<Vec<(u64, Report)>, OutboxError> {
        self.inner
            .tree
            .iter()?
            .into_iter()
            .map(|(key, value)| {
                let seq = seq_of(&key)?;
                let report = serde_json::from_slice(&value)
                    .map_err(|source| OutboxError::Corrupt { seq, source })?;
                Ok((seq, report))
            })
            .collect()
    }

    /// Removes report `seq` (the server acknowledged it), flushed.
    pub fn ack(&self, seq: u64) -> Result<(), OutboxError> {
        self.inner.tree.remove(seq.to_be_bytes())?;
        self.inner.tree.flush()?;
        Ok(())
    }

    /// Removes report `seq` (the server acknowledged it) and the `superseded`
    /// older reports of its manifest, which then need never be sent. The
    /// superseded ones go first, flushed, and `seq` only after them: a crash in
    /// between leaves `seq` queued, to be sent again (the server ignores a report
    /// id it already has), never an older report without the one that replaces it.
    pub fn ack_superseding(&self, seq: u64, superseded: &[u64]) -> Result<(), OutboxError> {
        if !superseded.is_empty() {
            for older in superseded {
                self.inner.tree.remove(older.to_be_bytes())?;
            }
            self.inner.tree.flush()?;
        }
        self.ack(seq)
    }

    /// Removes every queued report about the manifests `ids` (their journal
    /// entries were let go: nothing about them needs telling), flushed.
    pub fn forget(&self, ids: &[String]) -> Result<(), OutboxError> {
        if ids.is_empty() {
            return Ok(());
        }
        for (seq, report) in self.pending()? {
            if ids.contains(&report.manifest_id) {
                self.inner.tree.remove(seq.to_be_bytes())?;
            }
        }
        self.inner.tree.flush()?;
        Ok(())
    }

    /// Returns once a report has been pushed since the last wait returned (at once if
    /// one was pushed meanwhile: no wake-up is lost).
    pub async fn wait(&self) {
        self.inner.pushed.notified().await;
    }
}

fn seq_of(key: &[u8]) -> Result<u64, OutboxError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| OutboxError::BadKey {
            key: hex::encode(key),
        })
}

/// The first at most `max` bytes of `s`, cut at a character boundary.
fn keep_head(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The last at most `max` bytes of `s`, cut at a character boundary.
fn keep_tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// One call of a pass of the sender: the newest queued report of a manifest, and
/// the older queued reports of that manifest it supersedes.
#[derive(Debug)]
struct Outgoing {
    seq: u64,
    report: Report,
    superseded: Vec<u64>,
}

/// What to send for `queued` (oldest first): for each manifest only its newest
/// report, the last queued, which carries its own error and log tail and makes
/// the older ones of its manifest superfluous (the server keeps only the newest
/// phase). The sends keep the queue order of the reports they carry, so reports
/// of different manifests keep their order relative to each other.
fn plan(queued: Vec<(u64, Report)>) -> Vec<Outgoing> {
    let mut older: HashMap<String, Vec<u64>> = HashMap::new();
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (seq, report) in &queued {
        newest.insert(&report.manifest_id, *seq);
    }
    let newest: HashSet<u64> = newest.into_values().collect();
    let mut sends = Vec::with_capacity(newest.len());
    for (seq, report) in queued {
        if newest.contains(&seq) {
            let superseded = older.remove(&report.manifest_id).unwrap_or_default();
            sends.push(Outgoing {
                seq,
                report,
                superseded,
            });
        } else {
            older.entry(report.manifest_id).or_default().push(seq);
        }
    }
    sends
}

/// Sends queued reports, in order, through `send` until each is acknowledged or
/// superseded: of the reports of one manifest queued when a pass starts only the
/// newest is sent, and once the server acknowledges it the older ones are removed
/// with it, unsent (see [`plan`] and [`Outbox::ack_superseding`]). A failed (or,
/// after [`SEND_TIMEOUT`], hung) send is retried after the crate's backoff, from a
/// fresh read of the queue: the same report, unless a newer one of its manifest
/// was queued meanwhile. With nothing queued it sleeps until a push. Returns when
/// `shutdown` completes; a report whose answer was cut short stays queued and is sent
/// again (the server ignores a report id it already has).
pub async fn run_sender<F, Fut, S>(outbox: Outbox, mut send: F, shutdown: S)
where
    F: FnMut(Report) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
    S: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new(backoff::BASE, backoff::DEFAULT_CAP);
    loop {
        let queued = match outbox.pending() {
            Ok(queued) => queued,
            Err(OutboxError::Corrupt { seq, source }) => {
                // It can never be sent; keeping it would block every later report.
                tracing::error!(seq, error = %source, "dropping a corrupt queued report");
                if let Err(e) = outbox.ack(seq) {
                    tracing::warn!(seq, error = %e, "cannot drop the corrupt report");
                    if pause(&mut backoff, &mut shutdown).await {
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the report outbox");
                if pause(&mut backoff, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        if queued.is_empty() {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = outbox.wait() => continue,
            }
        }
        for Outgoing {
            seq,
            report,
            superseded,
        } in plan(queued)
        {
            let attempt = tokio::time::timeout(SEND_TIMEOUT, send(report.clone()));
            let result = tokio::select! {
                biased;
                () = &mut shutdown => return,
                result = attempt => result,
            };
            let failure = match result {
                Ok(Ok(())) => match outbox.ack_superseding(seq, &superseded) {
                    Ok(()) => {
                        backoff.reset();
                        continue;
                    }
                    Err(e) => format!("cannot remove the acknowledged report: {e}"),
                },
                // Malformed in the server's eyes, or about a patch the server
                // does not know or never offered this node: sending it again
                // cannot help, and keeping it would hold back every later
                // report. Only it is dropped: the older reports of its manifest
                // were not acknowledged, so the next pass sends the newest of them.
                Ok(Err(status)) if refused_for_good(status.code()) => {
                    tracing::error!(
                        seq,
                        manifest = %report.manifest_id,
                        code = ?status.code(),
                        error = %status.message(),
                        "the server refuses this report; dropping it"
                    );
                    match outbox.ack(seq) {
                        Ok(()) => continue,
                        Err(e) => format!("cannot drop the refused report: {e}"),
                    }
                }
                Ok(Err(status)) => {
                    format!("server answered {:?}: {}", status.code(), status.message())
                }
                Err(_) => format!("no answer within {SEND_TIMEOUT:?}"),
            };
            tracing::warn!(
                seq,
                manifest = %report.manifest_id,
                phase = %report.phase,
                reason = %failure,
                "report not delivered; retrying"
            );
            if pause(&mut backoff, &mut shutdown).await {
                return;
            }
            // Retry from a fresh read of the queue, so the retry carries the newest
            // report of this manifest, which may have been queued meanwhile (the
            // reports sent before it in this pass are gone).
            break;
        }
    }
}

/// Whether the server's answer refuses this one report for good. Anything else
/// (unavailable, rate-limited, the node not accepted yet) is retried.
fn refused_for_good(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
    )
}

/// Sleeps the next backoff delay; true if shutdown came first.
async fn pause<S: Future<Output = ()>>(
    backoff: &mut Backoff,
    shutdown: &mut std::pin::Pin<&mut S>,
) -> bool {
    let delay = backoff.next_delay();
    tokio::select! {
        biased;
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

#[cfg(test)]
mod tests;
