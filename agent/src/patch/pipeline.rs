//! The patch pipeline: takes the manifests the server offers and walks each
//! through Received → Verified → Downloaded → Applying → Applied → Healthy →
//! Committed (or RolledBack / Failed / Rejected), recording each step in the
//! journal (flushed) before acting on it and queueing a report for each. After a
//! crash it resumes from the journal: an interrupted apply is rolled back, and a
//! manifest the journal knows is never applied again.
//!
//! It also undoes committed patches the server asks it to (an aborted rollout):
//! Committed → Reverting (recorded and reported before the host is touched) →
//! RolledBack or Failed, with the signed manifest's rollback plan, its signatures
//! checked again first. A crash while Reverting finishes the undo at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_proto::manifest::{Install, Manifest, NodeTarget, Rollback};
use flotilla_proto::{limits, pb};
use tokio::sync::watch;

use super::fetch::{self, FetchLimits};
use super::journal::{Entry, Journal, Phase};
use super::outbox::{Outbox, Report};
use crate::embed::SharedChannel;
use crate::install::{self, Executor, LocalPolicy};
use crate::state::Store;

/// What the session hands over: the manifests offered, the committed patches to
/// undo, and what the node is.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    pub manifests: Vec<pb::SignedManifest>,
    /// Manifests to download (and verify) ahead of their install, which waits
    /// until they are offered in `manifests`.
    pub prefetch: Vec<pb::SignedManifest>,
    /// Ids of committed patches the server asks this node to undo (an aborted
    /// rollout). Anything not committed here is ignored; an offered manifest with
    /// one of these ids is not started.
    pub rollback: Vec<String>,
    pub target: NodeTarget,
    /// Agents of this site that may serve its artifacts, best first.
    pub site_peers: Vec<pb::SitePeer>,
}

/// How this host runs patches: set by the host's operator, never by the server.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Where the host's filesystem starts ("/" in production; a directory when
    /// several agents share one machine, as in tests and the dev fleet).
    pub root: PathBuf,
    /// Paths (as manifests name them) that `files` installs may write under,
    /// whether scripts may run, and the artifact size cap.
    pub policy: LocalPolicy,
    /// Where downloads and per-patch backups live (under the state dir).
    pub work_dir: PathBuf,
    pub fetch: FetchLimits,
    /// Servers to download from, in order.
    pub servers: Vec<String>,
    /// What applies the install plan ([`Executor::Host`] on a real agent).
    pub executor: Executor,
    /// The session's connection, to download over (the fleet simulator); when
    /// empty or unset, each download opens its own.
    pub shared: Option<SharedChannel>,
    /// The local address downloads connect from (None: the system's choice).
    pub source_address: Option<std::net::IpAddr>,
    /// This agent's site cache, when it serves its site: its own downloads
    /// go through it, so the site's uplink carries each artifact once.
    pub site_cache: Option<std::sync::Arc<crate::site::SiteCache>>,
    /// The metrics textfile, told of every step.
    pub textfile: Option<std::sync::Arc<crate::textfile::Textfile>>,
    /// How much disk downloads and backups may take.
    pub disk: DiskLimits,
}

pub struct Pipeline {
    store: Store,
    journal: Journal,
    outbox: Outbox,
    cfg: PipelineConfig,
    /// The offers (set by [`Pipeline::run`]): a download waiting to be tried
    /// again stops when the server no longer offers its patch.
    offers: Option<watch::Receiver<Offer>>,
    /// Committed patches the server asked to undo that could not be, with the
    /// reason last reported, so the same refusal is not queued again at every offer.
    refused: Mutex<BTreeMap<String, String>>,
    /// Log lines about offers nobody trusted signed: whoever answers as the
    /// server can send them as fast as it likes.
    untrusted_log: Mutex<UntrustedLog>,
}

/// One line a minute about untrusted offers: the first of each minute in
/// full, then how many more there were.
#[derive(Default)]
struct UntrustedLog {
    since: Option<std::time::Instant>,
    more: u64,
}

/// How often a line about untrusted offers is written.
const UNTRUSTED_LOG_EVERY: Duration = Duration::from_secs(60);

/// How far the server lets an offered patch go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Go {
    /// To the end: install, check, commit.
    Install,
    /// Up to Downloaded: its install is not released yet.
    DownloadOnly,
    /// Nowhere until offered (a restart: the offer is not known yet).
    Wait,
}

/// How a step ended when it did not succeed.
struct Stop {
    phase: Phase,
    error: String,
    tail: String,
    /// Trying again later may go through (the host may change: space freed, a
    /// path put right); the artifact, plan and backups will not.
    retry: bool,
    /// Refused before its signatures checked out (Rejected).
    untrusted: bool,
}

impl Stop {
    fn new(phase: Phase, error: impl Into<String>) -> Self {
        Self {
            phase,
            error: error.into(),
            tail: String::new(),
            retry: false,
            untrusted: false,
        }
    }

    /// A refusal of bytes no key the host trusts signed.
    fn untrusted(error: impl Into<String>) -> Self {
        Self {
            untrusted: true,
            ..Self::new(Phase::Rejected, error)
        }
    }
}

/// Longest wait between two tries of a rollback that could not complete.
const ROLLBACK_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(300);

/// Most bytes of an error or an output tail a step keeps (journal, report, log).
const STEP_TEXT_BYTES: usize = 4096;

/// Why a script install cannot be undone when its manifest gives no rollback script.
pub const NO_ROLLBACK_PLAN: &str = "the manifest has no rollback plan";

/// The reason a patch undone at the server's request carries.
pub const REVERTED: &str = "rolled back at the server's request (the rollout was aborted)";

/// The install plan a `files` install keeps in its patch directory, and the name it
/// is retired to once restored (see `install::rollback_files`).
const PLAN_FILE: &str = "plan.json";
const DONE_PLAN_FILE: &str = "plan.rolled-back.json";

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Where the agent with work (state) directory `work_dir` keeps its downloads.
pub fn artifact_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("artifacts")
}

/// `path` (absolute, as a manifest names it) inside `root`.
pub fn under_root(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

impl Pipeline {
    pub fn new(store: Store, journal: Journal, outbox: Outbox, cfg: PipelineConfig) -> Self {
        Self {
            store,
            journal,
            outbox,
            cfg,
            offers: None,
            refused: Mutex::new(BTreeMap::new()),
            untrusted_log: Mutex::default(),
        }
    }

    /// Resumes unfinished entries, then takes offers until `offers` closes.
    pub async fn run(mut self, mut offers: watch::Receiver<Offer>) {
        self.offers = Some(offers.clone());
        self.resume().await;
        loop {
            let offer = offers.borrow_and_update().clone();
            self.take(offer).await;
            if offers.changed().await.is_err() {
                return;
            }
        }
    }

    /// Acts on one offer: first undoes the committed patches it names, then
    /// starts every offered manifest the journal does not know (and the server
    /// does not ask to undo), then downloads those offered ahead of their
    /// install.
    async fn take(&self, offer: Offer) {
        // Newest commit first (the journal's own order of commits): an older
        // commit of a component is undone only once those above it are.
        let mut undo: Vec<(i64, &String)> = offer
            .rollback
            .iter()
            .map(|id| {
                let at = self
                    .journal
                    .get(id)
                    .ok()
                    .flatten()
                    .map_or(0, |e| e.updated_at);
                (at, id)
            })
            .collect();
        undo.sort_by(|a, b| b.cmp(a));
        undo.dedup();
        for (_, id) in undo {
            self.revert(id).await;
        }
        let installs = offer.manifests.iter().map(|s| (s, Go::Install));
        let ahead = offer
            .prefetch
            .iter()
            .filter(|s| !offer.manifests.iter().any(|m| m.id == s.id))
            .map(|s| (s, Go::DownloadOnly));
        for (signed, go) in installs.chain(ahead) {
            if offer.rollback.contains(&signed.id) {
                continue;
            }
            match self.journal.get(&signed.id) {
                // Not applying yet: it stopped to wait for the offer (after a
                // restart, when the server stopped offering it for a while, or
                // downloaded ahead of its install).
                Ok(Some(entry)) if entry.phase == Phase::Verified => {
                    self.go_on(entry, go, &offer.target).await
                }
                Ok(Some(entry)) if entry.phase == Phase::Downloaded && go == Go::Install => {
                    self.go_on(entry, go, &offer.target).await
                }
                Ok(Some(_)) => continue,
                Ok(None) => self.start(signed.clone(), &offer.target, go).await,
                Err(e) => {
                    tracing::error!(patch = %signed.id, error = %e, "cannot read the journal")
                }
            }
        }
    }

    /// The host's local policy with its paths moved under the root.
    fn host_policy(&self) -> LocalPolicy {
        let mut p = self.cfg.policy.clone();
        p.allowed_paths = p
            .allowed_paths
            .iter()
            .map(|a| under_root(&self.cfg.root, &a.to_string_lossy()))
            .collect();
        p
    }

    fn patch_dir(&self, id: &str) -> PathBuf {
        self.cfg.work_dir.join("patches").join(id)
    }

    fn artifact_dir(&self) -> PathBuf {
        artifact_dir(&self.cfg.work_dir)
    }

    /// Queues the report of `phase` (flushed), then records `entry` in `phase`
    /// (flushed). In that order, a crash between the two can only repeat a
    /// report (the step is redone from the journal), never lose the last one.
    fn advance(&self, entry: &mut Entry, phase: Phase, error: &str, tail: &str) -> bool {
        self.record_step(entry, phase, error, tail, true)
    }

    /// [`Self::advance`], saying so in the log when `log`.
    fn record_step(
        &self,
        entry: &mut Entry,
        phase: Phase,
        error: &str,
        tail: &str,
        log: bool,
    ) -> bool {
        // Whatever an artifact, a script or a server made of these, the journal,
        // the report and the log line get a bounded copy.
        let error = &limits::clip(error, STEP_TEXT_BYTES);
        let tail = &limits::clip_front(tail, STEP_TEXT_BYTES);
        if let Err(e) = self.outbox.push(
            Report::new(&entry.manifest_id, phase, error, tail)
                .with_transfer(entry.transfer.clone()),
        ) {
            tracing::error!(patch = %entry.manifest_id, error = %e, "cannot queue a report");
        }
        entry.phase = phase;
        entry.updated_at = unix_now();
        if phase.is_final() {
            // Only downloads read it: a finished patch's entry keeps no more
            // than it needs.
            entry.deltas = String::new();
        }
        entry.error = (!error.is_empty()).then(|| error.to_string());
        entry.log_tail = tail.to_string();
        if let Err(e) = self.journal.record(entry) {
            tracing::error!(patch = %entry.manifest_id, error = %e, "cannot record a patch step; stopping it");
            return false;
        }
        if phase.is_final() && log {
            tracing::info!(patch = %entry.manifest_id, phase = phase.as_str(), error, "patch finished");
        }
        if let Some(t) = &self.cfg.textfile {
            t.patch(&entry.manifest_id, phase.as_str());
        }
        true
    }

    async fn start(&self, signed: pb::SignedManifest, target: &NodeTarget, go: Go) {
        // The id becomes a journal key and goes back in reports: take only ids a
        // manifest could have (the signed bytes must then agree).
        if flotilla_proto::limits::check_name("manifest id", &signed.id, 128).is_err() {
            let id = limits::clip(&signed.id, 256);
            tracing::warn!(id = %id.escape_debug(), "ignoring an offer with an impossible manifest id");
            return;
        }
        // The index is not signed (each delta is checked against the signed
        // digests): one past its limit is not kept, nor read, at all.
        let deltas = if signed.deltas.len() > flotilla_proto::delta::MAX_INDEX_BYTES {
            tracing::warn!(
                patch = %signed.id,
                bytes = signed.deltas.len(),
                "the offer's delta index is past its limit; downloading whole artifacts"
            );
            String::new()
        } else {
            // Not UTF-8 is not an index: the full artifacts will do.
            String::from_utf8(signed.deltas.to_vec()).unwrap_or_default()
        };
        let entry = Entry {
            manifest_id: signed.id.clone(),
            manifest: signed.manifest.into(),
            signatures: signed.signatures,
            component: String::new(),
            version: String::new(),
            phase: Phase::Received,
            started_at: unix_now(),
            updated_at: unix_now(),
            error: None,
            log_tail: String::new(),
            transfer: None,
            deltas,
        };
        if let Err(e) = self.journal.record(&entry) {
            tracing::error!(patch = %entry.manifest_id, error = %e, "cannot record a received patch");
            return;
        }
        let _ = self
            .outbox
            .push(Report::new(&entry.manifest_id, Phase::Received, "", ""));
        tracing::debug!(patch = %entry.manifest_id, "patch received");
        self.verify_and_go_on(entry, Some(target), go).await;
    }

    /// Verifies a received entry, then carries on with it as far as `go` says,
    /// or rejects it.
    async fn verify_and_go_on(&self, mut entry: Entry, target: Option<&NodeTarget>, go: Go) {
        // Within one run of the update (a fresh offer, or a restart that
        // verifies again): the time it started, so a clock jump meanwhile
        // changes nothing.
        let at = entry.started_at;
        match self.verify(&entry, target, at) {
            Ok(m) => {
                tracing::info!(patch = %entry.manifest_id, component = %m.component, version = %m.version, "patch received");
                entry.component = m.component.clone();
                entry.version = m.version.clone();
                if self.advance(&mut entry, Phase::Verified, "", "") && go != Go::Wait {
                    self.carry_on(entry, m, go).await;
                }
            }
            Err(stop) if stop.untrusted => self.reject_untrusted(entry, &stop.error),
            Err(stop) => {
                self.advance(&mut entry, stop.phase, &stop.error, "");
            }
        }
    }

    /// Rejects a received entry whose signatures did not check out. Its bytes
    /// are not kept (nothing will read them; the id stays, so it is not
    /// looked at again while the journal remembers it), and the journal keeps
    /// only so many such entries, letting the oldest go with their queued
    /// reports: offers nobody trusted signed cannot grow the host's state,
    /// however many a server sends.
    fn reject_untrusted(&self, mut entry: Entry, error: &str) {
        entry.manifest = Vec::new();
        entry.signatures = Vec::new();
        entry.deltas = String::new();
        if !self.record_step(&mut entry, Phase::Rejected, error, "", false) {
            return;
        }
        self.log_untrusted(&entry.manifest_id, error);
        match self.journal.note_untrusted(&entry) {
            Ok(removed) => {
                if let Err(e) = self.outbox.forget(&removed) {
                    tracing::warn!(error = %e, "cannot drop the reports of forgotten refusals");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot bound the journal's refusals"),
        }
    }

    /// Logs an untrusted offer's refusal: the first of each minute, then how
    /// many more the minute had (the journal and reports say the rest).
    fn log_untrusted(&self, id: &str, error: &str) {
        let mut log = self
            .untrusted_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if log
            .since
            .is_some_and(|t| now.duration_since(t) < UNTRUSTED_LOG_EVERY)
        {
            log.more += 1;
            return;
        }
        let more = std::mem::take(&mut log.more);
        log.since = Some(now);
        tracing::warn!(
            patch = %id, error, refused_before_unlogged = more,
            "an offered patch was refused: its signatures do not check out \
             (one line a minute; the journal and the server's reports have each)"
        );
    }

    /// Carries on with an entry the journal holds (verified, or downloaded
    /// ahead), offered again. It is verified again first: since it was, the
    /// trust policy may have rotated its signers' keys out, the host's policy
    /// or installed versions may have changed, and the manifest may have
    /// expired — judged now, not when it was first received: a patch
    /// downloaded ahead months ago is not released after its expiry.
    async fn go_on(&self, mut entry: Entry, go: Go, target: &NodeTarget) {
        match self.verify(&entry, Some(target), unix_now()) {
            Ok(m) => self.carry_on(entry, m, go).await,
            Err(stop) => {
                self.advance(&mut entry, stop.phase, &stop.error, "");
                if let Ok(m) = Manifest::parse(&entry.manifest) {
                    self.cleanup(&m);
                }
            }
        }
    }

    /// Rolls back after a failure and records how that went. The reason is
    /// journaled first (same phase), so a crash mid-rollback resumes the rollback
    /// instead of, say, re-running a health check on a half-restored host.
    async fn roll_back(&self, entry: &mut Entry, m: &Manifest, why: Stop) {
        if !entry.phase.is_final() && entry.error.is_none() {
            entry.error = Some(limits::clip(&why.error, STEP_TEXT_BYTES));
            entry.updated_at = unix_now();
            if let Err(e) = self.journal.record(entry) {
                tracing::error!(patch = %entry.manifest_id, error = %e, "cannot record the rollback; rolling back anyway");
            }
        }
        // An install script that outlived a crash of the agent must stop before
        // anything is undone.
        if let Install::Script { artifact, .. } = &m.install {
            let dir = self.patch_dir(&m.id);
            install::kill_recorded(
                &dir.join("install.pgid"),
                &format!("FLOTILLA_PATCH_ID={}", m.id),
                &dir.join(format!("{artifact}.run")),
            );
        }
        // A rollback the host stops for now (a full disk, a path in the way) is
        // tried again with backoff until it completes, the entry staying in its
        // phase with the reason, journaled and reported; a restart tries again
        // too. One that can never complete is final.
        let mut backoff = crate::backoff::Backoff::new(crate::backoff::BASE, ROLLBACK_RETRY_CAP);
        let mut attempt = 1u32;
        loop {
            match self.undo(m).await {
                Ok(_) => {
                    self.advance(entry, Phase::RolledBack, &why.error, &why.tail);
                    break;
                }
                Err(e) if e.retry => {
                    let delay = backoff.next_delay();
                    let note = limits::clip(
                        &format!(
                            "rollback not complete (try {attempt}), trying again in {}s: {}; it undoes: {}",
                            delay.as_secs().max(1),
                            e.error,
                            why.error
                        ),
                        STEP_TEXT_BYTES,
                    );
                    tracing::warn!(patch = %entry.manifest_id, "{note}");
                    let phase = entry.phase;
                    self.advance(entry, phase, &note, &why.tail);
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(e) => {
                    let error = format!("{}; rollback failed too: {}", why.error, e.error);
                    self.advance(entry, Phase::Failed, &error, &why.tail);
                    break;
                }
            }
        }
        self.cleanup(m);
    }

    /// Downloaded artifacts are not needed once an entry is final; backups stay
    /// (a later rollback of a committed patch needs them).
    fn cleanup(&self, m: &Manifest) {
        for a in &m.artifacts {
            self.remove_download(&a.sha256);
        }
    }

    /// Removes an artifact's download, complete or partial.
    fn remove_download(&self, sha256: &str) {
        let _ = std::fs::remove_file(self.artifact_dir().join(sha256));
        let _ = std::fs::remove_file(self.artifact_dir().join(format!("{sha256}.part")));
    }

    /// From Verified (or a later phase after a restart) to the end, or to
    /// Downloaded when only the download is released.
    async fn carry_on(&self, mut entry: Entry, m: Manifest, go: Go) {
        if entry.phase == Phase::Verified {
            match self.download(&mut entry, &m).await {
                Ok(Downloaded::Done) => {
                    if !self.advance(&mut entry, Phase::Downloaded, "", "") {
                        return;
                    }
                }
                Ok(Downloaded::Withdrawn) => return,
                Err(stop) => {
                    self.advance(&mut entry, stop.phase, &stop.error, &stop.tail);
                    self.cleanup(&m);
                    return;
                }
            }
        }
        if entry.phase == Phase::Downloaded && go != Go::Install {
            tracing::info!(patch = %entry.manifest_id, "downloaded ahead; the install waits for its release");
            return;
        }
        if entry.phase == Phase::Downloaded {
            if !self.advance(&mut entry, Phase::Applying, "", "") {
                return;
            }
            match self.apply(&m).await {
                Ok(tail) => {
                    if !self.advance(&mut entry, Phase::Applied, "", &tail) {
                        return;
                    }
                }
                Err(stop) => {
                    let why = Stop {
                        error: format!("install failed: {}", stop.error),
                        ..stop
                    };
                    self.roll_back(&mut entry, &m, why).await;
                    return;
                }
            }
        }
        if entry.phase == Phase::Applied {
            let check = m
                .health_check
                .as_ref()
                .filter(|_| !self.cfg.executor.skips_host());
            let tail = match check {
                Some(check) => match install::health_check(check, &self.env(&m, "health")).await {
                    Ok(tail) => tail,
                    Err(e) => {
                        let tail = match &e {
                            install::InstallError::HealthCheckFailed { tail, .. } => tail.clone(),
                            _ => String::new(),
                        };
                        let why = Stop {
                            tail,
                            ..Stop::new(Phase::RolledBack, e.to_string())
                        };
                        self.roll_back(&mut entry, &m, why).await;
                        return;
                    }
                },
                None => String::new(),
            };
            if !self.advance(&mut entry, Phase::Healthy, "", &tail) {
                return;
            }
        }
        if entry.phase == Phase::Healthy {
            self.advance(&mut entry, Phase::Committed, "", "");
            self.keep_installed(&m);
        }
    }

    /// Picks up where a crash left each unfinished entry.
    async fn resume(&self) {
        let entries = match self.journal.unfinished() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal to resume");
                return;
            }
        };
        for mut entry in entries {
            tracing::info!(patch = %entry.manifest_id, phase = entry.phase.as_str(), "resuming patch");
            let m = match Manifest::parse(&entry.manifest) {
                Ok(m) => m,
                Err(e) => {
                    self.advance(
                        &mut entry,
                        Phase::Failed,
                        &format!("journal entry unreadable: {e}"),
                        "",
                    );
                    continue;
                }
            };
            match entry.phase {
                // Verification is cheap and the trust rules may have changed: redo it,
                // still against the time the update started.
                // The offer (and so the node's target facts) is gone after a restart;
                // the server only offered the manifest because it targets this node.
                // The rest waits for the server's offer, as below.
                Phase::Received => self.verify_and_go_on(entry, None, Go::Wait).await,
                // Nothing on the host changed yet: go on only when the server
                // offers the patch again (it may have been withdrawn, its
                // rollout aborted, or overtaken while the agent was down).
                Phase::Verified | Phase::Downloaded => {
                    tracing::info!(patch = %entry.manifest_id, "waiting for the server to offer the patch again");
                }
                // An undo the server asked for, cut short: finish it (both ways of
                // undoing are safe to repeat).
                Phase::Reverting => self.resume_revert(entry).await,
                // A rollback cut short: finish it.
                Phase::Applying | Phase::Applied | Phase::Healthy if entry.error.is_some() => {
                    let why = Stop::new(Phase::RolledBack, entry.error.clone().unwrap_or_default());
                    self.roll_back(&mut entry, &m, why).await;
                }
                // An apply cut short is never finished blind: restore the host.
                Phase::Applying => {
                    let why = Stop::new(
                        Phase::RolledBack,
                        "the agent stopped while applying; the host was restored",
                    );
                    self.roll_back(&mut entry, &m, why).await;
                }
                _ => self.carry_on(entry, m, Go::Install).await,
            }
        }
    }
}

mod disk;
pub use disk::{DEFAULT_KEEP_BACKUPS, DEFAULT_MAX_DOWNLOAD_BYTES, DiskLimits};
mod download;
use download::Downloaded;
mod host;
mod revert;
#[cfg(test)]
mod tests;
mod verify;
