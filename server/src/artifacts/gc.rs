//! Artifact garbage collection: files no unexpired patch (nor a rollout still
//! running or paused) refers to are removed once the retention period has
//! passed since the last patch needing them expired, or, for a file no patch
//! ever named (an upload never published, a partial upload), since it was
//! last written. Runs on a timer on every replica (each holds its own copies)
//! and on demand (`flotilla artifacts gc`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use flotilla_proto::delta::DeltaIndex;
use flotilla_proto::manifest::Manifest;

use super::{ArtifactStore, HeldFile};
use crate::error::{Error, Result};
use crate::model::{PatchRecord, keys};
use crate::rollout::record::{RolloutRecord, RolloutState};
use crate::store::Db;

/// How often each replica collects on its own.
pub const INTERVAL: Duration = Duration::from_secs(3600);
/// The first collection after a start: a server restarted more often than
/// hourly still collects, without adding to the work of its start.
pub const FIRST_AFTER: Duration = Duration::from_secs(600);

/// Until when a file must stay because of the patches naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    /// A rollout still running or paused fetches it: kept whatever its expiry.
    Always,
    /// Needed until this time (the latest expiry of the patches naming it).
    Until(SystemTime),
}

/// A file collected (or, in a dry run, that would be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub sha256: String,
    pub size: u64,
    /// An upload never completed.
    pub partial: bool,
    /// Why it may go, for the operator.
    pub why: String,
}

/// What one collection found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub collected: Vec<Collected>,
    pub kept: u64,
    pub kept_bytes: u64,
}

impl Outcome {
    pub fn collected_bytes(&self) -> u64 {
        self.collected.iter().map(|c| c.size).sum()
    }
}

fn ago(now: SystemTime, t: SystemTime) -> String {
    let d = now.duration_since(t).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// The audit entry's detail for a collection that removed files.
pub fn audit_detail(out: &Outcome, retention: Duration) -> serde_json::Value {
    serde_json::json!({
        "removed": out.collected.iter().map(|c| serde_json::json!({
            "sha256": c.sha256, "size": c.size, "partial": c.partial, "why": c.why,
        })).collect::<Vec<_>>(),
        "bytes": out.collected_bytes(),
        "kept": out.kept,
        "retention_secs": retention.as_secs(),
    })
}

/// Collects every [`INTERVAL`] (the first [`FIRST_AFTER`] after the start) until
/// `shutdown`; each collection that removed something is audited as the
/// server's.
pub async fn run(
    app: std::sync::Arc<crate::app::App>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut next = tokio::time::Instant::now() + FIRST_AFTER;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        next = tokio::time::Instant::now() + INTERVAL;
        let retention = app.cfg.artifact_retention;
        match collect(&app.artifacts, &app.db, retention, false).await {
            Ok(out) if out.collected.is_empty() => {}
            Ok(out) => {
                tracing::info!(
                    removed = out.collected.len(),
                    bytes = out.collected_bytes(),
                    kept = out.kept,
                    "artifacts collected"
                );
                if let Err(e) = app
                    .audit
                    .record(
                        "server",
                        crate::audit::Action::ArtifactGc,
                        "artifacts",
                        audit_detail(&out, retention),
                    )
                    .await
                {
                    tracing::error!("cannot audit the artifact collection: {e}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "artifact collection failed; trying again later"),
        }
    }
}

/// Which of `files` may go at `now`, given what the patches need.
pub fn plan(
    files: Vec<HeldFile>,
    needed: &BTreeMap<String, Needed>,
    now: SystemTime,
    retention: Duration,
) -> Outcome {
    let mut out = Outcome::default();
    for f in files {
        let why = match needed.get(&f.sha256) {
            Some(Needed::Always) => None,
            Some(Needed::Until(until)) => (*until + retention <= now).then(|| {
                format!(
                    "every patch naming it expired (the last {} ago)",
                    ago(now, *until)
                )
            }),
            None => (f.modified + retention <= now).then(|| {
                format!(
                    "{}no patch names it (last written {} ago)",
                    if f.partial {
                        "an unfinished upload; "
                    } else {
                        ""
                    },
                    ago(now, f.modified)
                )
            }),
        };
        match why {
            Some(why) => out.collected.push(Collected {
                sha256: f.sha256,
                size: f.size,
                partial: f.partial,
                why,
            }),
            None => {
                out.kept += 1;
                out.kept_bytes += f.size;
            }
        }
    }
    out
}

/// What every stored patch needs held, and until when.
pub async fn needed(db: &Db) -> Result<BTreeMap<String, Needed>> {
    let patches: Vec<PatchRecord> = db.list(keys::PATCHES).await?;
    let rollouts: Vec<RolloutRecord> = db.list(crate::rollout::record::PREFIX).await?;
    let live: std::collections::BTreeSet<&str> = rollouts
        .iter()
        .filter(|r| matches!(r.state, RolloutState::Running | RolloutState::Paused))
        .map(|r| r.patch_id.as_str())
        .collect();
    let mut needed = BTreeMap::new();
    for p in &patches {
        let m = Manifest::parse(p.manifest.as_bytes())
            .map_err(|e| Error::Internal(format!("stored patch {} does not parse: {e}", p.id)))?;
        let need = if live.contains(p.id.as_str()) {
            Needed::Always
        } else {
            Needed::Until(m.expires_at.into())
        };
        let deltas = if p.deltas.is_empty() {
            Vec::new()
        } else {
            DeltaIndex::parse(p.deltas.as_bytes())
                .map_err(|e| {
                    Error::Internal(format!(
                        "stored delta index of {} does not parse: {e}",
                        p.id
                    ))
                })?
                .deltas
                .into_iter()
                .map(|d| d.sha256)
                .collect()
        };
        for sha in m.artifacts.into_iter().map(|a| a.sha256).chain(deltas) {
            let slot = needed.entry(sha).or_insert(need);
            *slot = match (*slot, need) {
                (Needed::Until(a), Needed::Until(b)) => Needed::Until(a.max(b)),
                _ => Needed::Always,
            };
        }
    }
    Ok(needed)
}

/// Collects (or with `dry_run`, only lists) what may go now. Publishing
/// waits meanwhile, so a publish that finds a file held keeps it.
pub async fn collect(
    store: &ArtifactStore,
    db: &Db,
    retention: Duration,
    dry_run: bool,
) -> Result<Outcome> {
    let _publishing = store.collecting.write().await;
    let files = store.files()?;
    let needed = needed(db).await?;
    let out = plan(files, &needed, SystemTime::now(), retention);
    if !dry_run {
        for c in &out.collected {
            store.remove(&c.sha256, c.partial)?;
            tracing::info!(sha256 = %c.sha256, size = c.size, why = %c.why, "artifact removed");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: char, partial: bool, modified: SystemTime) -> HeldFile {
        HeldFile {
            sha256: n.to_string().repeat(64),
            size: 10,
            partial,
            modified,
        }
    }

    #[test]
    fn only_what_no_live_patch_needs_goes_after_the_retention() {
        let day = Duration::from_secs(86_400);
        let now = SystemTime::UNIX_EPOCH + 100 * day;
        let retention = 30 * day;
        let needed: BTreeMap<String, Needed> = [
            // Expired 31 days ago: goes.
            ('a', Needed::Until(now - 31 * day)),
            // Expired 29 days ago: stays until day 30.
            ('b', Needed::Until(now - 29 * day)),
            // Not expired.
            ('c', Needed::Until(now + day)),
            // A running rollout's, long expired: stays.
            ('d', Needed::Always),
        ]
        .into_iter()
        .map(|(n, need)| (n.to_string().repeat(64), need))
        .collect();
        let old = now - 40 * day;
        let files = vec![
            file('a', false, old),
            file('b', false, old),
            file('c', false, old),
            file('d', false, old),
            // Named by no patch: by its age.
            file('e', false, old),
            file('f', false, now - day),
            file('0', true, old),
            file('1', true, now),
        ];
        let out = plan(files, &needed, now, retention);
        let gone: Vec<char> = out
            .collected
            .iter()
            .map(|c| c.sha256.chars().next().unwrap())
            .collect();
        assert_eq!(gone, vec!['a', 'e', '0'], "{:?}", out.collected);
        assert_eq!(out.kept, 5);
        assert_eq!(out.kept_bytes, 50);
        assert!(
            out.collected[0].why.contains("expired"),
            "{:?}",
            out.collected
        );
        assert!(out.collected[2].partial && out.collected[2].why.contains("unfinished upload"));
    }
}
