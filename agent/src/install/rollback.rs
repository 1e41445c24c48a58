//! Undoing a `files` install from its `plan.json`, after it failed, after a failed
//! health check, or after a crash at any point of the install or of an earlier
//! rollback. Every step looks at the host as it is and moves it to the planned
//! previous state, so running it again, or after being cut off, is safe.

use std::fs::{self, File};
use std::path::Path;

use super::InstallError;
use super::beneath::Beneath;
use super::files::set_dir_mode;
use super::plan::{self, DONE_PLAN_FILE, Finish, Kind, PLAN_FILE, PlanEntry, fsync_dir, tmp_of};

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
    // Beneath the same allowed paths as the install, never through a symlink.
    let allowed = if plan.allowed.is_empty() {
        vec![plan.destination.clone()]
    } else {
        plan.allowed.clone()
    };
    let beneath = Beneath::new(&allowed)?;
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
    // Temp files first: a large one left by a failed write may hold the very
    // space the restores need.
    for pe in plan.entries.iter().filter(|e| e.kind != Kind::Dir) {
        if let Err(e) = remove_tmp(&beneath, pe) {
            tracing::warn!(path = %pe.path.display(), "cannot remove a temp file: {e}");
            first_error.get_or_insert(e);
        }
    }
    for pe in leaves.chain(dirs) {
        if step() {
            return Ok(false);
        }
        let restored = match pe.kind {
            Kind::Dir => restore_dir(&beneath, pe),
            Kind::File | Kind::Symlink => restore_leaf(&beneath, work_dir, pe),
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

/// Removes the temp file beside a file or symlink target, if any.
fn remove_tmp(beneath: &Beneath, pe: &PlanEntry) -> Result<(), InstallError> {
    match beneath.parent_if_present(&pe.path)? {
        Some(at) => tmp_of(&at)?.remove_if_present(),
        None => Ok(()),
    }
}

/// A file or symlink target back to its previous state.
fn restore_leaf(beneath: &Beneath, work_dir: &Path, pe: &PlanEntry) -> Result<(), InstallError> {
    let path = &pe.path;
    let at = match beneath.parent_if_present(path)? {
        Some(at) => at,
        // Its directory is gone: nothing the install wrote is left there.
        None if !pe.existed => return Ok(()),
        None => beneath.parent(path)?,
    };
    tmp_of(&at)?.remove_if_present()?;
    match (pe.existed, pe.prev_kind) {
        (true, Some(Kind::File)) => restore_file(beneath, work_dir, pe),
        (true, Some(Kind::Symlink)) => {
            let Some(target) = &pe.prev_link_target else {
                return Err(bad_entry(work_dir, pe, "a symlink without its target"));
            };
            if at.read_link().is_ok_and(|t| &t == target) {
                return Ok(());
            }
            plan::replace_symlink(beneath, path, target)
        }
        (true, _) => Err(bad_entry(work_dir, pe, "an earlier file of unknown kind")),
        (false, _) => match at.lstat()? {
            None => Ok(()),
            Some(m) if m.is_dir() => Err(InstallError::RollbackConflict {
                path: path.clone(),
                reason: "the install wrote a file here but a directory is here now".into(),
            }),
            Some(_) => {
                at.remove_if_present()?;
                at.sync_dir()
            }
        },
    }
}

fn restore_file(beneath: &Beneath, work_dir: &Path, pe: &PlanEntry) -> Result<(), InstallError> {
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
    plan::replace_file(
        beneath,
        &pe.path,
        &mut content,
        Finish { mode, owner },
        &verify,
    )
}

/// A directory back to its previous state: removed if the install created it (and
/// it is empty), its previous mode back if it existed.
fn restore_dir(beneath: &Beneath, pe: &PlanEntry) -> Result<(), InstallError> {
    let path = &pe.path;
    if pe.existed {
        return match pe.prev_mode {
            Some(mode) => set_dir_mode(beneath, path, mode),
            None => Ok(()),
        };
    }
    let Some(at) = beneath.parent_if_present(path)? else {
        return Ok(());
    };
    match at.lstat()? {
        None => return Ok(()),
        Some(m) if !m.is_dir() => {
            tracing::warn!(path = %path.display(), "not removed: no longer the directory the install created");
            return Ok(());
        }
        Some(_) => {}
    }
    if !at.remove_dir()? {
        // Something the install did not put there: not ours to delete.
        tracing::warn!(path = %path.display(), "created directory not removed: it is not empty");
        return Ok(());
    }
    at.sync_dir()
}

fn bad_entry(work_dir: &Path, pe: &PlanEntry, what: &str) -> InstallError {
    InstallError::BadPlan {
        path: work_dir.join(PLAN_FILE),
        reason: format!("entry {} records {what}", pe.path.display()),
    }
}
