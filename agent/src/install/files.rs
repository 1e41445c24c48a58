//! `files` installs: unpack a tar artifact into the destination, every file replaced
//! atomically, with everything needed to undo it made durable first.
//!
//! Order of work, and what a crash at each point leaves:
//! 1. Check the destination against the local policy, read the whole artifact and
//!    check every entry, then check every target path on the host. Nothing written.
//! 2. Copy each existing file that will be replaced to `work_dir/backup/<n>`, fsync.
//!    Only the work directory changed; with no plan, rollback has nothing to do.
//! 3. Write `work_dir/plan.json` (temp, fsync, rename, fsync dir): every target path,
//!    whether it existed, its previous kind, mode, owner, symlink target and backup.
//! 4. Create missing directories, then write each file and symlink as a temp file
//!    next to it, fsynced, renamed over the target, directory fsynced; then set the
//!    directory modes. From here on `rollback_files` restores the previous state.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Compression;

use super::archive::{self, EntryKind, TarEntry};
use super::beneath::{Beneath, Meta};
use super::plan::{
    self, BACKUP_DIR, Finish, Kind, PLAN_FILE, PLAN_VERSION, Plan, PlanEntry, fsync_dir, parent_of,
};
use super::{InstallError, LocalPolicy};

/// Mode of directories the artifact needs but does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// What a `files` install wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesReport {
    /// Every file and symlink installed, in archive order.
    pub written: Vec<PathBuf>,
}

/// Installs the tar at `artifact` into `destination`. Synchronous: run it on a
/// blocking thread. On an error after the plan was written, call `rollback_files`.
pub fn install_files(
    artifact: &Path,
    compression: Compression,
    destination: &Path,
    policy: &LocalPolicy,
    work_dir: &Path,
) -> Result<FilesReport, InstallError> {
    install_files_until(artifact, compression, destination, policy, work_dir, None)
}

/// `install_files`, stopping after `stop_after` files and symlinks so tests can
/// leave the host as a crash would.
pub(crate) fn install_files_until(
    artifact: &Path,
    compression: Compression,
    destination: &Path,
    policy: &LocalPolicy,
    work_dir: &Path,
    stop_after: Option<usize>,
) -> Result<FilesReport, InstallError> {
    install_files_with(
        artifact,
        compression,
        destination,
        policy,
        work_dir,
        stop_after,
        &|| {},
    )
}

/// `install_files_until`, calling `before_apply` once the plan is durable and
/// right before the host is changed: tests use it to race the install.
pub(crate) fn install_files_with(
    artifact: &Path,
    compression: Compression,
    destination: &Path,
    policy: &LocalPolicy,
    work_dir: &Path,
    stop_after: Option<usize>,
    before_apply: &dyn Fn(),
) -> Result<FilesReport, InstallError> {
    check_destination(destination, policy)?;
    let beneath = Beneath::new(&policy.allowed_paths)?;
    let plan_path = work_dir.join(PLAN_FILE);
    // A plan here means an install that was never rolled back: planning again would
    // record its half-applied state as "previous" and lose the real backups.
    if fs::symlink_metadata(&plan_path).is_ok() {
        return Err(InstallError::PlanExists { path: plan_path });
    }
    let file = File::open(artifact).map_err(|source| InstallError::Archive {
        artifact: artifact.to_path_buf(),
        source,
    })?;
    let entries = archive::read_entries(
        &file,
        compression,
        artifact,
        policy.max_artifact_bytes,
        destination,
    )?;
    let allowed = |rel: &Path| policy.allows(&destination.join(rel));
    let mut plan = build_plan(destination, &entries, &beneath, &allowed)?;
    plan.allowed = beneath.paths();
    check_space(destination, &entries, &plan, work_dir)?;
    make_backups(&beneath, &mut plan, work_dir)?;
    plan::write_plan(work_dir, &plan)?;
    before_apply();
    let apply = Apply {
        beneath: &beneath,
        file: &file,
        compression,
        artifact,
        destination,
        entries: &entries,
        plan: &plan,
    };
    apply.run(stop_after)
}

fn check_destination(destination: &Path, policy: &LocalPolicy) -> Result<(), InstallError> {
    if !destination.is_absolute() {
        return Err(InstallError::DestinationNotAbsolute {
            destination: destination.to_path_buf(),
        });
    }
    let not_allowed = || InstallError::DestinationNotAllowed {
        destination: destination.to_path_buf(),
    };
    if !policy.overlaps(destination) {
        return Err(not_allowed());
    }
    Ok(())
}

/// Plans the destination itself and every missing directory above it, top-down.
/// Inside an allowed tree each one must be a real directory (never a symlink);
/// above it the host's own layout decides.
fn plan_destination(destination: &Path, beneath: &Beneath) -> Result<Vec<PlanEntry>, InstallError> {
    let not_dir = |p: &Path| InstallError::DestinationNotDirectory {
        destination: p.to_path_buf(),
    };
    let mut missing = Vec::new();
    let mut at = destination;
    loop {
        if beneath.anchor_of(at).is_some() {
            match beneath.lstat(at)? {
                Some(m) if m.is_dir() => break,
                Some(m) if m.is_symlink() => {
                    return Err(InstallError::HostSymlink {
                        path: at.to_path_buf(),
                    });
                }
                Some(_) => return Err(not_dir(at)),
                None => {
                    missing.push(at);
                    at = at.parent().ok_or_else(|| not_dir(at))?;
                }
            }
            continue;
        }
        match fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(not_dir(at)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(InstallError::DestinationNotAllowed {
                    destination: at.to_path_buf(),
                });
            }
            Err(e) => return Err(InstallError::io("inspect", at, e)),
        }
    }
    Ok(missing
        .into_iter()
        .rev()
        .map(|p| PlanEntry::new(p.to_path_buf(), Kind::Dir, Some(IMPLICIT_DIR_MODE)))
        .collect())
}

/// A symlink's target, taken from the link's own directory, must stay inside
/// the allowed tree the link is in (the install itself never follows links,
/// but the software that reads them does).
fn check_link_inside(
    beneath: &Beneath,
    entry: &str,
    path: &Path,
    target: &Path,
) -> Result<(), InstallError> {
    let Some(anchor) = beneath.anchor_of(path) else {
        return Err(InstallError::OutsideAllowed {
            path: path.to_path_buf(),
        });
    };
    let text = target.to_string_lossy();
    let leaves = || InstallError::SymlinkLeavesAllowed {
        entry: entry.to_owned(),
        target: text.clone().into_owned(),
        allowed: anchor.to_path_buf(),
    };
    let mut at = parent_of(path).to_path_buf();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at == anchor || !at.pop() {
                    return Err(leaves());
                }
            }
            p => at.push(p),
        }
    }
    if at.starts_with(anchor) {
        Ok(())
    } else {
        Err(leaves())
    }
}

/// Checks every target path on the host and records its previous state.
fn build_plan(
    destination: &Path,
    entries: &[TarEntry],
    beneath: &Beneath,
    allowed: &dyn Fn(&Path) -> bool,
) -> Result<Plan, InstallError> {
    let mut out = plan_destination(destination, beneath)?;
    let dest_created = !out.is_empty();
    let not_allowed = |entry: String, rel: &Path| InstallError::EntryNotAllowed {
        entry,
        path: destination.join(rel),
    };

    // Every directory the entries need, listed or not; BTreeMap's path order puts
    // each parent before its children.
    let mut dirs: BTreeMap<&Path, Option<(&str, u32)>> = BTreeMap::new();
    for e in entries {
        if let EntryKind::Dir { mode } = e.kind {
            dirs.insert(&e.rel, Some((&e.name, mode)));
        }
        for ancestor in e.rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            dirs.entry(ancestor).or_insert(None);
        }
    }
    let mut created: HashSet<&Path> = HashSet::new();
    let parent_created = |created: &HashSet<&Path>, rel: &Path| {
        dest_created || rel.parent().is_some_and(|p| created.contains(p))
    };
    for (rel, listed) in dirs {
        let path = destination.join(rel);
        if let Some((name, _)) = listed
            && !allowed(rel)
        {
            return Err(not_allowed(name.to_owned(), rel));
        }
        let meta = if parent_created(&created, rel) {
            None
        } else if beneath.anchor_of(&path).is_some() {
            beneath.lstat(&path)?
        } else {
            // Above the allowed trees: the host's layout, passed through only.
            host_lstat(&path)?
        };
        let Some(meta) = meta else {
            if !allowed(rel) {
                return Err(not_allowed(rel.display().to_string(), rel));
            }
            created.insert(rel);
            let mode = listed.map_or(IMPLICIT_DIR_MODE, |(_, m)| m);
            out.push(PlanEntry::new(path, Kind::Dir, Some(mode)));
            continue;
        };
        if meta.is_symlink() {
            return Err(InstallError::HostSymlink { path });
        }
        if !meta.is_dir() {
            return Err(InstallError::HostFileWhereDirectory { path });
        }
        // An existing directory the artifact only passes through is not a target.
        if let Some((_, mode)) = listed {
            let mut pe = PlanEntry::new(path, Kind::Dir, Some(mode));
            record_prev(&mut pe, Kind::Dir, &meta);
            out.push(pe);
        }
    }

    for e in entries {
        let (kind, mode) = match e.kind {
            EntryKind::Dir { .. } => continue,
            EntryKind::File { mode, .. } => (Kind::File, Some(mode)),
            EntryKind::Symlink { .. } => (Kind::Symlink, None),
        };
        if !allowed(&e.rel) {
            return Err(not_allowed(e.name.clone(), &e.rel));
        }
        let path = destination.join(&e.rel);
        // An allowed path is a directory: a link there would move the whole tree.
        if beneath.is_anchor(&path) {
            return Err(InstallError::NotADirectoryAtAllowedPath {
                entry: e.name.clone(),
                path,
                kind: if kind == Kind::File {
                    "file"
                } else {
                    "symlink"
                },
            });
        }
        if let EntryKind::Symlink { target } = &e.kind {
            check_link_inside(beneath, &e.name, &path, target)?;
        }
        let meta = if parent_created(&created, &e.rel) {
            None
        } else {
            beneath.lstat(&path)?
        };
        let mut pe = PlanEntry::new(path, kind, mode);
        if let Some(meta) = meta {
            if meta.is_dir() {
                return Err(InstallError::HostDirectoryWhereFile { path: pe.path });
            } else if meta.is_file() {
                record_prev(&mut pe, Kind::File, &meta);
            } else if meta.is_symlink() {
                // Replacing a symlink renames over the link itself, never through it.
                let target = beneath.parent(&pe.path)?.read_link()?;
                if target.to_str().is_none() {
                    return Err(InstallError::RollbackConflict {
                        path: pe.path,
                        reason:
                            "its current symlink target is not UTF-8, so it could not be restored"
                                .into(),
                    });
                }
                record_prev(&mut pe, Kind::Symlink, &meta);
                pe.prev_link_target = Some(target);
            } else {
                return Err(InstallError::HostSpecialFile { path: pe.path });
            }
        }
        out.push(pe);
    }
    Ok(Plan {
        version: PLAN_VERSION,
        destination: destination.to_path_buf(),
        allowed: Vec::new(),
        entries: out,
    })
}

fn host_lstat(path: &Path) -> Result<Option<Meta>, InstallError> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Meta {
            kind: rustix::fs::FileType::from_raw_mode(m.mode()),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InstallError::io("inspect", path, e)),
    }
}

fn record_prev(pe: &mut PlanEntry, kind: Kind, meta: &Meta) {
    pe.existed = true;
    pe.prev_kind = Some(kind);
    pe.prev_mode = Some(meta.mode);
    pe.prev_uid = Some(meta.uid);
    pe.prev_gid = Some(meta.gid);
}

/// Room the filesystem keeps beyond what an install needs: directory entries,
/// inodes' blocks, and the rounding of each file to whole blocks.
pub(crate) const SPACE_SLACK: u64 = 1 << 20;

/// The filesystem holding `path` (or, when it does not exist yet, its
/// nearest existing ancestor, which will hold it): that ancestor, the bytes
/// free to an unprivileged writer there, and the filesystem's device.
pub(crate) fn free_space(path: &Path) -> io::Result<(PathBuf, u64, u64)> {
    let on = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let st = nix::sys::statvfs::statvfs(&on).map_err(io::Error::from)?;
    let dev = std::os::unix::fs::MetadataExt::dev(&fs::metadata(&on)?);
    Ok((
        on,
        st.blocks_available().saturating_mul(st.fragment_size()),
        dev,
    ))
}

/// Refuses an install that cannot fit before anything is written: the files
/// it unpacks (their exact sizes, from the archive) on the destination's
/// filesystem, and the backups of the files it replaces on the work
/// directory's. A full disk mid-install is still handled (temp files removed,
/// rolled back), but should not be the usual way to find out.
fn check_space(
    destination: &Path,
    entries: &[TarEntry],
    plan: &Plan,
    work_dir: &Path,
) -> Result<(), InstallError> {
    let unpacked: u64 = entries
        .iter()
        .map(|e| match e.kind {
            EntryKind::File { size, .. } => size.div_ceil(4096) * 4096,
            _ => 4096,
        })
        .sum();
    let backups: u64 = plan
        .entries
        .iter()
        .filter(|pe| pe.prev_kind == Some(Kind::File))
        .filter_map(|pe| fs::symlink_metadata(&pe.path).ok())
        .map(|m| m.len())
        .sum();
    // The destination may not exist yet: its nearest existing ancestor holds it.
    let need = |path: &Path, bytes: u64| -> Result<(), InstallError> {
        let (on, free, _) =
            free_space(path).map_err(|e| InstallError::io("read the free space of", path, e))?;
        let need = bytes.saturating_add(SPACE_SLACK);
        if free < need {
            return Err(InstallError::NotEnoughSpace {
                path: on,
                need,
                free,
            });
        }
        Ok(())
    };
    need(destination, unpacked)?;
    need(work_dir, backups)
}

/// Copies every file about to be replaced into `work_dir/backup/<n>`. The copies
/// need no temp+rename: until the plan that names them is written, none is used.
fn make_backups(beneath: &Beneath, plan: &mut Plan, work_dir: &Path) -> Result<(), InstallError> {
    let dir = work_dir.join(BACKUP_DIR);
    // Left by an attempt that crashed before writing its plan; nothing refers to it.
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(InstallError::io("clear the backup directory", &dir, e));
        }
        _ => {}
    }
    fs::create_dir_all(&dir).map_err(|e| InstallError::io("create", &dir, e))?;
    let mut n = 0usize;
    for pe in &mut plan.entries {
        if pe.prev_kind != Some(Kind::File) {
            continue;
        }
        let name = format!("{BACKUP_DIR}/{n}");
        n += 1;
        let dst = work_dir.join(&name);
        // Opened without following a symlink anywhere on the way.
        let mut src = beneath.parent(&pe.path)?.open_read()?;
        let opened = src
            .metadata()
            .map_err(|e| InstallError::io("inspect", &pe.path, e))?;
        if !opened.is_file() {
            return Err(InstallError::HostSpecialFile {
                path: pe.path.clone(),
            });
        }
        let mut out = File::create(&dst).map_err(|e| InstallError::io("create", &dst, e))?;
        let (sha, _) = plan::copy_hashing(&mut src, &mut out)
            .map_err(|e| InstallError::io("back up", &pe.path, e))?;
        out.sync_all()
            .map_err(|e| InstallError::io("fsync", &dst, e))?;
        pe.backup = Some(name);
        pe.backup_sha256 = Some(sha);
    }
    fsync_dir(&dir).map_err(|e| InstallError::io("fsync directory", &dir, e))?;
    fsync_dir(work_dir).map_err(|e| InstallError::io("fsync directory", work_dir, e))
}

/// Step 4: the host changes, in plan order.
struct Apply<'a> {
    beneath: &'a Beneath,
    file: &'a File,
    compression: Compression,
    artifact: &'a Path,
    destination: &'a Path,
    entries: &'a [TarEntry],
    plan: &'a Plan,
}

impl Apply<'_> {
    fn run(&self, stop_after: Option<usize>) -> Result<FilesReport, InstallError> {
        for pe in &self.plan.entries {
            if pe.kind == Kind::Dir && !pe.existed {
                create_dir(self.beneath, &pe.path)?;
            }
        }
        let changed = |name: &str| InstallError::ArtifactChanged {
            artifact: self.artifact.to_path_buf(),
            entry: name.to_owned(),
        };
        let io_err = |source| InstallError::Archive {
            artifact: self.artifact.to_path_buf(),
            source,
        };
        let mut written = Vec::new();
        let mut archive = archive::open(self.file, self.compression, self.artifact)?;
        let mut next = self.entries.iter();
        for entry in archive.entries().map_err(io_err)? {
            let mut entry = entry.map_err(io_err)?;
            let Some(t) = archive::classify(&entry, self.artifact)? else {
                continue;
            };
            // Same file, read again: anything but the entries checked is a change.
            if next.next() != Some(&t) {
                return Err(changed(&t.name));
            }
            if matches!(t.kind, EntryKind::Dir { .. }) {
                continue;
            }
            if stop_after.is_some_and(|n| written.len() >= n) {
                return Ok(FilesReport { written });
            }
            let path = self.destination.join(&t.rel);
            match &t.kind {
                EntryKind::File { mode, size } => {
                    let finish = Finish {
                        mode: *mode,
                        owner: None,
                    };
                    let verify = |_: &str, len: u64| {
                        if len == *size {
                            Ok(())
                        } else {
                            Err(changed(&t.name))
                        }
                    };
                    plan::replace_file(self.beneath, &path, &mut entry, finish, &verify)?;
                }
                EntryKind::Symlink { target } => {
                    plan::replace_symlink(self.beneath, &path, target)?;
                }
                EntryKind::Dir { .. } => {}
            }
            written.push(path);
        }
        if next.next().is_some() {
            return Err(changed("(end of archive)"));
        }
        // Directory modes last, deepest first: a read-only directory from the
        // artifact must not stop its own files from being written.
        for pe in self.plan.entries.iter().rev() {
            if let (Kind::Dir, Some(mode)) = (pe.kind, pe.mode) {
                set_dir_mode(self.beneath, &pe.path, mode)?;
            }
        }
        Ok(FilesReport { written })
    }
}

fn create_dir(beneath: &Beneath, path: &Path) -> Result<(), InstallError> {
    let at = beneath.parent(path)?;
    // Private until its final mode is set at the end.
    if !at.mkdir(0o700)? {
        // Appeared since the check; fine only if it is a real directory.
        if !at.lstat()?.is_some_and(|m| m.is_dir()) {
            return Err(InstallError::HostFileWhereDirectory {
                path: path.to_path_buf(),
            });
        }
    }
    at.sync_dir()
}

/// Sets a directory's permission bits, through a handle opened without
/// following a symlink.
pub(crate) fn set_dir_mode(beneath: &Beneath, path: &Path, mode: u32) -> Result<(), InstallError> {
    let Some(at) = beneath.parent_if_present(path)? else {
        return Ok(());
    };
    match at.lstat()? {
        Some(m) if m.is_dir() && m.mode != mode => {}
        _ => return Ok(()),
    }
    let dir = at.open_dir()?;
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| InstallError::io("set the mode of", path, e))?;
    dir.sync_all()
        .map_err(|e| InstallError::io("fsync directory", path, e))
}
