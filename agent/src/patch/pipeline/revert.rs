//! Undoing a committed patch at the server's request (an aborted rollout):
//! Committed → Reverting (recorded and reported before the host is touched) →
//! RolledBack or Failed, with the signed manifest's rollback plan, its
//! signatures checked again first; a crash while Reverting finishes the undo at
//! the next start.

use super::*;

impl Pipeline {
    /// Undoes committed patch `id` at the server's request. Anything not committed
    /// (unknown, still in progress, already undone, failed) is left alone. When the
    /// patch cannot be undone it stays committed, and a Committed report says why.
    pub(super) async fn revert(&self, id: &str) {
        let mut entry = match self.journal.get(id) {
            Ok(Some(e)) if e.phase == Phase::Committed => e,
            Ok(Some(e)) => {
                tracing::debug!(patch = %id, phase = e.phase.as_str(), "asked to undo a patch that is not committed; ignoring");
                return;
            }
            Ok(None) => {
                tracing::debug!(patch = %limits::clip(id, 256).escape_debug(), "asked to undo an unknown patch; ignoring");
                return;
            }
            Err(e) => {
                tracing::error!(patch = %limits::clip(id, 256).escape_debug(), error = %e, "cannot read the journal");
                return;
            }
        };
        let m = match self.prepare_revert(&entry, false).await {
            Ok(m) => m,
            Err(reason) => {
                self.refuse_revert(&entry, &reason);
                return;
            }
        };
        self.refused_lock().remove(id);
        tracing::info!(patch = %id, "undoing a committed patch at the server's request");
        if self.advance(&mut entry, Phase::Reverting, "", "") {
            self.finish_revert(entry, m).await;
        }
    }

    /// Everything that must hold before a committed patch is undone, checked
    /// before the host is touched: the stored manifest's signatures against the
    /// trust policy pinned now (a tampered database cannot swap the rollback
    /// plan), a rollback plan, the backup of a `files` install, and for a rollback
    /// script, this host's leave to run scripts and the script itself on disk
    /// (fetched again, digest checked, when it was cleaned up).
    async fn prepare_revert(&self, entry: &Entry, resuming: bool) -> Result<Manifest, String> {
        let m = self.verify_signatures(entry).map_err(|e| e.to_string())?;
        // Only the component's newest commit is undone: restoring an older
        // one's backup under a newer install would leave the files half old
        // while the journal says the newer one is committed. (An undo a crash
        // cut short has left the index already and is finished.)
        if !resuming {
            let newest = self
                .journal
                .installed_id(&entry.component)
                .map_err(|e| e.to_string())?;
            if let Some(newest) = newest.filter(|n| *n != entry.manifest_id) {
                return Err(format!(
                    "a newer patch of {} ({}) is installed over it: only the newest \
                     commit of a component is undone",
                    limits::clip(&entry.component, 256),
                    limits::clip(&newest, 256)
                ));
            }
        }
        if self.cfg.executor.skips_host() {
            return Ok(m);
        }
        match (&m.install, &m.rollback) {
            (Install::Files { .. }, _) => {
                let dir = self.patch_dir(&m.id);
                let present = |name: &str| std::fs::symlink_metadata(dir.join(name)).is_ok();
                // A restore cut short may already have retired the plan.
                let backup_kept = present(PLAN_FILE) || (resuming && present(DONE_PLAN_FILE));
                if !backup_kept {
                    return Err(format!(
                        "the backup its install kept ({}) is gone",
                        dir.join(PLAN_FILE).display()
                    ));
                }
            }
            (Install::Script { .. }, Some(Rollback::Script { artifact, .. })) => {
                if !self.cfg.policy.allow_scripts {
                    return Err(super::verify::Refusal::ScriptsNotAllowed.to_string());
                }
                self.fetch_artifact(&m, artifact).await?;
            }
            (Install::Script { .. }, _) => return Err(NO_ROLLBACK_PLAN.into()),
        }
        Ok(m)
    }

    /// Artifact `name` of `m` on disk, fetched if missing, its digest checked.
    async fn fetch_artifact(&self, m: &Manifest, name: &str) -> Result<PathBuf, String> {
        let a = m
            .artifact(name)
            .ok_or_else(|| format!("no artifact {name}"))?;
        let source = self.uplink().source()?;
        fetch::fetch(
            &source,
            a,
            &self.artifact_dir(),
            self.cfg.policy.max_artifact_bytes,
            &self.cfg.fetch,
            &mut Default::default(),
        )
        .await
        .map_err(|e| format!("download failed: {e}"))
    }

    fn refused_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // Only a cache of what was reported: a poisoned one is still usable.
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells the server a committed patch it asked to undo cannot be (a Committed
    /// report with the reason), once per reason. The entry and the host stay as
    /// they are; a later offer tries again.
    fn refuse_revert(&self, entry: &Entry, reason: &str) {
        let error = format!("cannot be rolled back: {reason}");
        let mut refused = self.refused_lock();
        if refused.get(&entry.manifest_id) == Some(&error) {
            return;
        }
        tracing::warn!(patch = %entry.manifest_id, %error, "not undoing a committed patch");
        match self.outbox.push(Report::new(
            &entry.manifest_id,
            Phase::Committed,
            &error,
            "",
        )) {
            Ok(()) => {
                refused.insert(entry.manifest_id.clone(), error);
            }
            Err(e) => {
                tracing::error!(patch = %entry.manifest_id, error = %e, "cannot queue a report")
            }
        }
    }

    /// Undoes a patch whose Reverting step is recorded, then records (and
    /// reports) RolledBack, or Failed when the host could not be restored.
    async fn finish_revert(&self, mut entry: Entry, m: Manifest) {
        match self.undo(&m).await {
            Ok(tail) => {
                self.advance(&mut entry, Phase::RolledBack, REVERTED, &tail);
            }
            Err(stop) => {
                let error = format!(
                    "rolling back at the server's request failed: {}",
                    stop.error
                );
                self.advance(&mut entry, Phase::Failed, &error, &stop.tail);
            }
        }
        self.cleanup(&m);
    }

    /// Finishes an undo a crash cut short, after the same checks as at its start;
    /// one that no longer passes ends Failed without touching the host.
    pub(super) async fn resume_revert(&self, mut entry: Entry) {
        match self.prepare_revert(&entry, true).await {
            Ok(m) => self.finish_revert(entry, m).await,
            Err(reason) => {
                let error = format!("cannot finish rolling back: {reason}");
                self.advance(&mut entry, Phase::Failed, &error, "");
            }
        }
    }
}
