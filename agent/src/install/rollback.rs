//! Undoing a `files` install from its `plan.json`, after it failed, after a failed
//! health check, or after a crash at any point of the install or of an earlier
//! rollback. Every step looks at the host as it is and moves it to the planned
//! previous state, so running it again, or after being cut off, is safe.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::InstallError;
use super::files::set_dir_mode;
use super::plan::{
    self, DONE_PLAN_FILE, Finish, Kind, PLAN_FILE, PlanEntry, fsync_dir, parent_of,
    remove_if_present, tmp_path,
};

/// Restores exactly what `plan.json` in `work_dir` says was there before the
/// install: old files (content, mode, owner) and symlinks back, new ones removed,
/// directories the install created removed if empty, temp files removed. Without a
/// plan nothing was changed, and nothing is done. Synchronous.
pub fn rollback_files(work_dir: &Path) -> Result<(), InstallError> {
    rollback_until(work_dir, None).map(|_| ())
}

/// `rollback_files`, stopping after `stop_after` paths so tests can leave the host
/// as a crash during rollback would. Returns whether it finished.
pub(crate) fn rollback_until(
    work_dir: &Path,
    stop_after: Option<usize>,
) -> Result<bool, InstallError> {
    let Some(plan) = plan::read_plan(work_dir)? else {
        return Ok(true);
    };
    let mut steps = 0usize;
    let mut step = || {
        steps += 1;
        stop_after.is_some_and(|n| steps > n)
    };
    // Files and symlinks first, latest first; then directories deepest first, so a
    // directory the install created is empty by the time it is removed. A path that
    // cannot be restored does not stop the others; the first error is returned and
    // the plan kept, so a later call can finish the job.
    let leaves = plan.entries.iter().rev().filter(|e| e.kind != Kind::Dir);
    let dirs = plan.entries.iter().rev().filter(|e| e.kind == Kind::Dir);
    let mut first_error = None;
    for pe in leaves.chain(dirs) {
        if step() {
            return Ok(false);
        }
        let restored = match pe.kind {
            Kind::Dir => restore_dir(pe),
            Kind::File | Kind::Symlink => restore_leaf(work_dir, pe),
        };
        if let Err(e) = restored {
            tracing::warn!(path = %pe.path.display(), "rollback step failed: {e}");
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Done: retire the plan, so a late second call cannot undo whatever is
    // installed over these paths afterwards.
    let from = work_dir.join(PLAN_FILE);
    let to = work_dir.join(DONE_PLAN_FILE);
    fs::rename(&from, &to).map_err(|e| InstallError::io("retire the install plan", &from, e))?;
    fsync_dir(work_dir).map_err(|e| InstallError::io("fsync directory", work_dir, e))?;
    Ok(true)
}

/// A file or symlink target back to its previous state.
fn restore_leaf(work_dir: &Path, pe: &PlanEntry) -> Result<(), InstallError> {
    let path = &pe.path;
    let parent = parent_of(path);
    if let Some(tmp) = tmp_path(path) {
        remove_if_present(&tmp).map_err(|e| InstallError::io("remove the temp file", &tmp, e))?;
    }
    match (pe.existed, pe.prev_kind) {
        (true, Some(Kind::File)) => restore_file(work_dir, pe),
        (true, Some(Kind::Symlink)) => {
            let Some(target) = &pe.prev_link_target else {
                return Err(bad_entry(work_dir, pe, "a symlink without its target"));
            };
            if fs::read_link(path).is_ok_and(|t| &t == target) {
                return Ok(());
            }
            plan::replace_symlink(path, target)
        }
        (true, _) => Err(bad_entry(work_dir, pe, "an earlier file of unknown kind")),
        (false, _) => {
            let meta = match fs::symlink_metadata(path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(InstallError::io("inspect", path, e)),
            };
            if meta.file_type().is_dir() {
                return Err(InstallError::RollbackConflict {
                    path: path.clone(),
                    reason: "the install wrote a file here but a directory is here now".into(),
                });
            }
            fs::remove_file(path).map_err(|e| InstallError::io("remove", path, e))?;
            fsync_dir(parent).map_err(|e| InstallError::io("fsync directory", parent, e))
        }
    }
}

fn restore_file(work_dir: &Path, pe: &PlanEntry) -> Result<(), InstallError> {
    let (Some(backup), Some(sha), Some(mode)) = (&pe.backup, &pe.backup_sha256, pe.prev_mode)
    else {
        return Err(bad_entry(
            work_dir,
            pe,
            "a replaced file without its backup",
        ));
    };
    let backup_path = work_dir.join(backup);
    let mut content = File::open(&backup_path)
        .map_err(|e| InstallError::io("open the backup", &backup_path, e))?;
    let owner = pe.prev_uid.zip(pe.prev_gid);
    let verify = |digest: &str, _len: u64| {
        if digest == sha {
            Ok(())
        } else {
            Err(InstallError::BackupCorrupt {
                path: backup_path.clone(),
            })
        }
    };
    // Always rewritten, even if it looks restored already: the rename is atomic
    // and cheap next to reasoning about which half of a crash we are in.
    plan::replace_file(&pe.path, &mut content, Finish { mode, owner }, &verify)
}

/// A directory back to its previous state: removed if the install created it (and
/// it is empty), its previous mode back if it existed.
fn restore_dir(pe: &PlanEntry) -> Result<(), InstallError> {
    let path = &pe.path;
    if pe.existed {
        return match pe.prev_mode {
            Some(mode) => set_dir_mode(path, mode),
            None => Ok(()),
        };
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(InstallError::io("inspect", path, e)),
        Ok(m) if !m.file_type().is_dir() => {
            tracing::warn!(path = %path.display(), "not removed: no longer the directory the install created");
            return Ok(());
        }
        Ok(_) => {}
    }
    match fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            // Something the install did not put there: not ours to delete.
            tracing::warn!(path = %path.display(), "created directory not removed: it is not empty");
            return Ok(());
        }
        Err(e) => return Err(InstallError::io("remove directory", path, e)),
    }
    let parent = parent_of(path);
    fsync_dir(parent).map_err(|e| InstallError::io("fsync directory", parent, e))
}

fn bad_entry(work_dir: &Path, pe: &PlanEntry, what: &str) -> InstallError {
    InstallError::BadPlan {
        path: work_dir.join(PLAN_FILE),
        reason: format!("entry {} records {what}", pe.path.display()),
    }
}
