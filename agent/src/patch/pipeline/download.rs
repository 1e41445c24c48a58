//! The download step of the pipeline: every artifact of a patch, from a delta
//! where the host holds its base, else whole; tries that fail for a reason
//! that may pass are tried again with backoff until the patch expires, and
//! stop when the server no longer offers the patch.

use std::time::Duration;

use flotilla_proto::delta::DeltaIndex;
use flotilla_proto::manifest::{Artifact, Manifest};
use flotilla_proto::transfer::Transfer;

use super::{Entry, Phase, Pipeline, Stop};
use crate::patch::delta;
use crate::patch::fetch::{self, ArtifactSource, ClientSource};
use crate::site::peers::PeerSource;
use crate::uplink::Uplink;

/// How the downloads of a patch ended, when not by a failure.
pub(super) enum Downloaded {
    /// Every artifact is on disk, verified.
    Done,
    /// The server stopped offering the patch while its download waited to be
    /// tried again: the entry stays Verified until it is offered again.
    Withdrawn,
}

/// Why one try at a patch's downloads stopped.
pub(super) enum DownloadError {
    /// Nothing to download with (no identity): the patch fails.
    Stop(Stop),
    Fetch(fetch::FetchError),
}

/// Where one try at a patch's downloads gets its bytes.
pub(super) struct Sources {
    servers: ClientSource,
    /// The site's serving agents, when this agent is told of any.
    peers: Option<PeerSource>,
}

impl Pipeline {
    pub(super) fn uplink(&self) -> Uplink {
        Uplink {
            store: self.store.clone(),
            servers: self.cfg.servers.clone(),
            shared: self.cfg.shared.clone(),
            source_address: self.cfg.source_address,
        }
    }

    /// The servers (the open session's connection first, when it is shared),
    /// and the site peers the server named last.
    pub(super) fn sources(&self) -> Result<Sources, String> {
        let servers = self.uplink().source()?;
        let named = self
            .offers
            .as_ref()
            .map(|o| o.borrow().site_peers.clone())
            .unwrap_or_default();
        let peers = match (named.is_empty(), self.store.identity()) {
            (false, Ok(Some(identity))) => {
                Some(PeerSource::new(&named, &identity, self.cfg.source_address))
            }
            _ => None,
        }
        .filter(|p| !p.is_empty());
        Ok(Sources { servers, peers })
    }

    /// Fetches `a` into the artifact directory: from the site's peers first
    /// (any failure there noted, and the servers then go on from what
    /// arrived), through this agent's own site cache when it serves its
    /// site, else from the servers.
    async fn fetch(
        &self,
        sources: &Sources,
        a: &Artifact,
        transfer: &mut Transfer,
    ) -> Result<std::path::PathBuf, fetch::FetchError> {
        let dir = self.artifact_dir();
        let cap = self.cfg.policy.max_artifact_bytes;
        if let Some(peers) = &sources.peers
            && !dir.join(&a.sha256).exists()
        {
            let limits = fetch::FetchLimits {
                max_attempts: u32::try_from(peers.servers()).unwrap_or(u32::MAX),
                ..self.cfg.fetch.clone()
            };
            match fetch::fetch(peers, a, &dir, cap, &limits, transfer).await {
                Ok(path) => return Ok(path),
                Err(e) => {
                    tracing::warn!(artifact = %a.name, error = %e, "no site peer could serve the artifact; fetching it from the servers");
                }
            }
        } else if let Some(cache) = &self.cfg.site_cache
            && !dir.join(&a.sha256).exists()
        {
            let cached = cache.fill(a, transfer).await?;
            std::fs::create_dir_all(&dir).map_err(|source| fetch::FetchError::Io {
                name: a.name.clone(),
                action: "create directory",
                path: dir.clone(),
                source,
            })?;
            // Shared with the cache, which never evicts a file the host
            // still holds; a copy where a link cannot be made.
            let here = dir.join(&a.sha256);
            if std::fs::hard_link(&cached, &here).is_err() {
                let _ = std::fs::copy(&cached, &here);
            }
        }
        fetch::fetch(&sources.servers, a, &dir, cap, &self.cfg.fetch, transfer).await
    }

    /// Every artifact of `m`, downloaded and verified. A failure that may pass
    /// (the network, a server or peer down, slow or cut off) is tried again with
    /// backoff until the patch expires, each try journaled and reported with the
    /// entry's transfer; one that would fail the same way again fails the patch.
    pub(super) async fn download(
        &self,
        entry: &mut Entry,
        m: &Manifest,
    ) -> Result<Downloaded, Stop> {
        let mut transfer = entry.transfer.clone().unwrap_or_default();
        let mut backoff = crate::backoff::Backoff::new(
            self.cfg.fetch.retry_after,
            fetch::RETRY_ROUND_CAP.max(self.cfg.fetch.retry_after),
        );
        // Refused whole rather than failing half-way through.
        self.make_room(m)
            .map_err(|why| Stop::new(Phase::Failed, why))?;
        let mut freed = false;
        loop {
            let result = self.download_once(m, &entry.deltas, &mut transfer).await;
            entry.transfer = Some(transfer.clone());
            let e = match result {
                Ok(()) => return Ok(Downloaded::Done),
                Err(DownloadError::Stop(stop)) => return Err(stop),
                Err(DownloadError::Fetch(e)) => e,
            };
            if e.is_disk_full() {
                if !freed {
                    freed = true;
                    self.free_space(m);
                    continue;
                }
                return Err(Stop::new(
                    Phase::Failed,
                    format!("insufficient disk: the download filled its filesystem: {e}"),
                ));
            }
            if !e.is_transient() {
                return Err(Stop::new(Phase::Failed, format!("download failed: {e}")));
            }
            let delay = backoff.next_delay();
            let expires_at = m.expires_at;
            if time::OffsetDateTime::now_utc() + delay >= expires_at {
                return Err(Stop::new(
                    Phase::Failed,
                    format!(
                        "download failed after {} attempt(s), and the patch expires at {expires_at} \
                         before the next: {e}",
                        transfer.attempts
                    ),
                ));
            }
            let note = format!(
                "download not complete after {} attempt(s); trying again in {}s: {e}",
                transfer.attempts,
                delay.as_secs().max(1)
            );
            tracing::warn!(patch = %m.id, "{note}");
            let phase = entry.phase;
            if !self.advance(entry, phase, &note, "") {
                return Err(Stop::new(
                    Phase::Failed,
                    "cannot record the download's progress",
                ));
            }
            if !self.still_offered(&m.id, delay).await {
                tracing::info!(patch = %m.id, "the server no longer offers this patch; its download waits until it does");
                return Ok(Downloaded::Withdrawn);
            }
        }
    }

    /// One try at every artifact not yet on disk: from a delta where one
    /// applies, else whole.
    async fn download_once(
        &self,
        m: &Manifest,
        deltas: &str,
        transfer: &mut Transfer,
    ) -> Result<(), DownloadError> {
        let sources = self
            .sources()
            .map_err(|e| DownloadError::Stop(Stop::new(Phase::Failed, e)))?;
        let index = self.delta_index(m, deltas);
        for a in &m.artifacts {
            if let Some(index) = &index
                && self.rebuilt_from_delta(&sources, index, a, transfer).await
            {
                continue;
            }
            self.fetch(&sources, a, transfer)
                .await
                .map_err(DownloadError::Fetch)?;
        }
        Ok(())
    }

    /// The delta index offered with `m`, if it is one for `m`'s exact bytes.
    /// It is trusted for nothing (see `flotilla_proto::delta`); one that does
    /// not check out only means whole artifacts.
    fn delta_index(&self, m: &Manifest, deltas: &str) -> Option<DeltaIndex> {
        if deltas.is_empty() {
            return None;
        }
        let bytes = self.journal.get(&m.id).ok().flatten()?.manifest;
        match DeltaIndex::parse(deltas.as_bytes())
            .and_then(|i| i.validate_against(m, &bytes).map(|()| i))
        {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!(patch = %m.id, error = %e, "ignoring the delta index; downloading whole artifacts");
                None
            }
        }
    }

    /// Rebuilds artifact `a` from a delta whose base this host holds: the
    /// delta is downloaded (counted in `transfer`), the result checked against
    /// the signed digest. False when no delta applies or any step failed (the
    /// failure noted in `transfer`): the artifact is then fetched whole.
    pub(super) async fn rebuilt_from_delta(
        &self,
        sources: &Sources,
        index: &DeltaIndex,
        a: &Artifact,
        transfer: &mut Transfer,
    ) -> bool {
        let dir = self.artifact_dir();
        if dir.join(&a.sha256).exists() {
            // Complete already (the fetcher checks its digest).
            return false;
        }
        let Some(d) = index
            .for_artifact(&a.name)
            .find(|d| dir.join(&d.base_sha256).is_file())
        else {
            return false;
        };
        let file = Artifact {
            name: d.name.clone(),
            sha256: d.sha256.clone(),
            size: d.size,
        };
        // The delta's file is removed after use only if this fetch made it:
        // whatever was there under that digest already (another patch's
        // artifact, a base) is the host's, not the delta's.
        let held_before = dir.join(&d.sha256).exists();
        let before = transfer.server_bytes + transfer.peer_bytes;
        let fetched = self.fetch(sources, &file, transfer).await;
        transfer.delta_bytes += transfer.server_bytes + transfer.peer_bytes - before;
        let result = match fetched {
            Ok(path) => delta::rebuild(&dir.join(&d.base_sha256), &d.base_sha256, &path, a, &dir)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if !held_before {
            let _ = std::fs::remove_file(dir.join(&d.sha256));
        }
        match result {
            Ok(_) => {
                tracing::info!(artifact = %a.name, delta = %d.name, bytes = d.size, "artifact rebuilt from a delta");
                true
            }
            Err(e) => {
                let why = format!(
                    "delta {} for artifact {}: {e}; fetching it whole",
                    d.name, a.name
                );
                tracing::warn!("{why}");
                transfer.noted(&why);
                false
            }
        }
    }

    /// Waits `delay`; false if meanwhile the server stopped offering patch `id`
    /// (withdrawn, its rollout aborted, or overtaken by a newer version).
    async fn still_offered(&self, id: &str, delay: Duration) -> bool {
        let until = tokio::time::Instant::now() + delay;
        let Some(mut offers) = self.offers.clone() else {
            tokio::time::sleep_until(until).await;
            return true;
        };
        loop {
            {
                let offer = offers.borrow_and_update();
                if offer.rollback.iter().any(|r| r == id)
                    || !offer
                        .manifests
                        .iter()
                        .chain(&offer.prefetch)
                        .any(|s| s.id == id)
                {
                    return false;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                changed = offers.changed() => if changed.is_err() {
                    // The session is gone (the agent is stopping).
                    tokio::time::sleep_until(until).await;
                    return true;
                }
            }
        }
    }
}
