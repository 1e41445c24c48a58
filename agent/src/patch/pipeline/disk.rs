//! The pipeline's disk use: room checked before a download starts, a bound on
//! the download directory, downloads no patch needs removed, and the backups
//! of committed patches kept for the newest few versions of each component.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::{Install, Manifest};
use flotilla_proto::transfer::bytes;

use super::{Entry, Phase, Pipeline, under_root};
use crate::install::{SPACE_SLACK, free_space};

/// How much disk the pipeline may take on this host: set by the host's
/// operator, never by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLimits {
    /// The committed versions of each component whose backups stay, newest
    /// first (at least 1: the newest is what `rollout abort --rollback` undoes).
    pub keep_backups: usize,
    /// Most bytes the download directory holds: complete downloads (kept as
    /// the bases of later deltas) and downloads in progress.
    pub max_download_bytes: u64,
}

/// Backups kept per component when the host's operator sets none.
pub const DEFAULT_KEEP_BACKUPS: usize = 2;
/// Download directory bound when the host's operator sets none.
pub const DEFAULT_MAX_DOWNLOAD_BYTES: u64 = 8 << 30;

impl Default for DiskLimits {
    fn default() -> Self {
        Self {
            keep_backups: DEFAULT_KEEP_BACKUPS,
            max_download_bytes: DEFAULT_MAX_DOWNLOAD_BYTES,
        }
    }
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

impl Pipeline {
    /// Bytes `m`'s artifacts still need in the download directory.
    fn still_to_download(&self, m: &Manifest) -> u64 {
        let dir = self.artifact_dir();
        m.artifacts
            .iter()
            .map(|a| {
                if dir.join(&a.sha256).exists() {
                    0
                } else {
                    a.size
                        .saturating_sub(len(&dir.join(format!("{}.part", a.sha256))))
                }
            })
            .sum()
    }

    /// Why `m` cannot be downloaded and installed on this host's disks, if
    /// it cannot: its downloads on the download directory's filesystem, and
    /// for a `files` install what it unpacks (at least its artifact's size)
    /// on the destination's, plus a margin, summed when they share a
    /// filesystem; and the download directory's own bound. The exact room an
    /// install needs (its files and the backups of those it replaces) is
    /// checked again once the archive's listing is known, before anything is
    /// written to the host.
    pub(super) fn check_room(&self, m: &Manifest) -> Result<(), String> {
        let download = self.still_to_download(m);
        let held: u64 = std::fs::read_dir(self.artifact_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let limit = self.cfg.disk.max_download_bytes;
        if held.saturating_add(download) > limit {
            return Err(format!(
                "insufficient disk: the download directory would hold {} with this patch's {} \
                 still to download, more than its limit of {} (max_download_bytes)",
                bytes(held.saturating_add(download)),
                bytes(download),
                bytes(limit)
            ));
        }
        let mut wanted = vec![(
            self.artifact_dir(),
            download,
            format!("{} to download", bytes(download)),
        )];
        if let Install::Files {
            artifact,
            destination,
            ..
        } = &m.install
        {
            let size = m
                .artifacts
                .iter()
                .find(|a| &a.name == artifact)
                .map_or(0, |a| a.size);
            wanted.push((
                under_root(&self.cfg.root, destination),
                size,
                format!("at least {} to unpack", bytes(size)),
            ));
        }
        // One need per filesystem: the download and the unpacked files add
        // up when they share one.
        let mut needs: Vec<(u64, PathBuf, u64, u64, String)> = Vec::new();
        for (path, n, what) in wanted {
            let (on, free, dev) = free_space(&path)
                .map_err(|e| format!("cannot read the free space of {}: {e}", path.display()))?;
            match needs.iter_mut().find(|need| need.0 == dev) {
                Some(need) => {
                    need.3 += n;
                    need.4 = format!("{} + {what}", need.4);
                }
                None => needs.push((dev, on, free, n, what)),
            }
        }
        for (_, on, free, n, what) in needs {
            let want = n.saturating_add(SPACE_SLACK);
            if free < want {
                return Err(format!(
                    "insufficient disk: the filesystem of {} has {} free, the patch needs {} \
                     ({what} + {} margin); nothing was downloaded or installed",
                    on.display(),
                    bytes(free),
                    bytes(want),
                    bytes(SPACE_SLACK)
                ));
            }
        }
        Ok(())
    }

    /// The digests of the downloads to keep: `m`'s, those of every
    /// unfinished patch, and with `bases`, those of each component's
    /// installed version (a later version's deltas are rebuilt from them).
    fn downloads_needed(&self, m: &Manifest, bases: bool) -> BTreeSet<String> {
        let entries = self.journal.all().unwrap_or_default();
        let installed = bases.then(|| newest_committed(&entries, m));
        let mut keep: BTreeSet<String> = m.artifacts.iter().map(|a| a.sha256.clone()).collect();
        for e in &entries {
            let needed = !e.phase.is_final()
                || installed
                    .as_ref()
                    .is_some_and(|i| i.contains(e.manifest_id.as_str()));
            if needed && let Ok(other) = Manifest::parse(&e.manifest) {
                keep.extend(other.artifacts.into_iter().map(|a| a.sha256));
            }
        }
        keep
    }

    /// Removes downloads (complete or partial) not in `keep`.
    fn remove_downloads_but(&self, keep: &BTreeSet<String>, why: &str) {
        let Ok(dir) = std::fs::read_dir(self.artifact_dir()) else {
            return;
        };
        for file in dir.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let sha = name.strip_suffix(".part").unwrap_or(&name);
            if !keep.contains(sha) && std::fs::remove_file(file.path()).is_ok() {
                tracing::info!(file = %name, "removed an unneeded download {why}");
            }
        }
    }

    /// Removes downloads that no unfinished patch but `m` needs (the
    /// installed versions' too), so a full disk may take `m`'s artifacts.
    pub(super) fn free_space(&self, m: &Manifest) {
        self.remove_downloads_but(&self.downloads_needed(m, false), "to free space");
    }

    /// Checks there is room for `m` before its download starts; when there
    /// is not, first removes the downloads nothing needs (a withdrawn
    /// patch's, an unfinished one's no longer offered), then the installed
    /// versions' kept as delta bases, checking again after each.
    pub(super) fn make_room(&self, m: &Manifest) -> Result<(), String> {
        if self.check_room(m).is_ok() {
            return Ok(());
        }
        self.remove_downloads_but(&self.downloads_needed(m, true), "to make room");
        if self.check_room(m).is_ok() {
            return Ok(());
        }
        self.free_space(m);
        self.check_room(m)
    }

    /// Once `m` is committed: keeps its artifacts as the bases a later
    /// version's deltas are rebuilt from and removes those of the versions of
    /// its component it replaced (unless another unfinished or installed
    /// patch shares them); keeps the backups of the newest
    /// [`DiskLimits::keep_backups`] committed versions of its component and
    /// removes the older ones', and those of its patches that were rolled back
    /// (nothing undoes them again). A failed patch's directory stays: when
    /// its rollback failed too, its backups are what an operator restores by
    /// hand.
    pub(super) fn keep_installed(&self, m: &Manifest) {
        let entries = match self.journal.all() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the journal; the replaced version's downloads and backups stay");
                return;
            }
        };
        let keep = self.downloads_needed(m, true);
        let mut committed: Vec<&Entry> = Vec::new();
        for e in entries.iter().filter(|e| e.component == m.component) {
            if e.manifest_id != m.id
                && e.phase.is_final()
                && let Ok(other) = Manifest::parse(&e.manifest)
            {
                for a in other.artifacts.iter().filter(|a| !keep.contains(&a.sha256)) {
                    self.remove_download(&a.sha256);
                }
            }
            match e.phase {
                Phase::Committed => committed.push(e),
                Phase::RolledBack => self.remove_patch_dir(&e.manifest_id, "it was rolled back"),
                _ => {}
            }
        }
        // Newest version first (`m`, just committed, leads whatever the
        // clock says; versions only grow, times tie within a second).
        committed.sort_by_key(|e| {
            std::cmp::Reverse((
                e.manifest_id == m.id,
                semver::Version::parse(&e.version).ok(),
                e.updated_at,
            ))
        });
        let keep_backups = self.cfg.disk.keep_backups.max(1);
        for e in committed.iter().skip(keep_backups) {
            self.remove_patch_dir(
                &e.manifest_id,
                &format!("{keep_backups} newer version(s) of its component are installed"),
            );
        }
    }

    fn remove_patch_dir(&self, id: &str, why: &str) {
        let dir = self.patch_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(patch = %id, "removed the patch's backups: {why}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(patch = %id, error = %e, "cannot remove the patch's backups");
            }
        }
    }
}

/// The ids of the newest committed patch of each component; `m`'s
/// component's is `m` (just committed, or about to be: journal times are in
/// seconds, so it may tie with the version it replaced).
fn newest_committed<'a>(entries: &'a [Entry], m: &'a Manifest) -> BTreeSet<&'a str> {
    let mut newest: std::collections::BTreeMap<&str, &Entry> = Default::default();
    for e in entries.iter().filter(|e| e.phase == Phase::Committed) {
        let slot = newest.entry(e.component.as_str()).or_insert(e);
        if (e.updated_at, e.started_at) > (slot.updated_at, slot.started_at) {
            *slot = e;
        }
    }
    newest
        .values()
        .filter(|e| e.component != m.component)
        .map(|e| e.manifest_id.as_str())
        .chain([m.id.as_str()])
        .collect()
}
