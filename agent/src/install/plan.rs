//! The install plan kept in the work directory (`plan.json`), and the small durable
//! file operations that install and rollback share: every host change is a temp file
//! in the target's own directory, fsynced, renamed over the target, then the
//! directory fsynced, so a crash leaves the old or the new file, never a torn one.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::InstallError;
use super::beneath::{Beneath, Parent};

pub(crate) const PLAN_FILE: &str = "plan.json";
/// Where a finished rollback moves the plan, so a late second rollback cannot undo
/// whatever was installed after the first one.
pub(crate) const DONE_PLAN_FILE: &str = "plan.rolled-back.json";
pub(crate) const BACKUP_DIR: &str = "backup";
pub(crate) const PLAN_VERSION: u32 = 1;
/// Suffix of the temp file written next to each target (`.<name>.flotilla-tmp`).
pub(crate) const TMP_SUFFIX: &str = ".flotilla-tmp";

/// What sits (or sat) at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
}

/// Everything the install will touch, in the order it touches it: directories
/// top-down (parents first), then files and symlinks in archive order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Plan {
    pub version: u32,
    pub destination: PathBuf,
    /// The allowed paths the install worked beneath; rollback works beneath
    /// the same ones. Absent in plans from before it was recorded: then the
    /// destination is the only one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<PathBuf>,
    pub entries: Vec<PlanEntry>,
}

/// One host path. `prev_*` describe it before the install; they are absent when it
/// did not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanEntry {
    /// Absolute host path.
    pub path: PathBuf,
    /// What the install leaves there.
    pub kind: Kind,
    /// The permission bits the install sets (none: left as it is, and for symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    pub existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_kind: Option<Kind>,
    /// Full previous mode bits (`st_mode & 0o7777`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_link_target: Option<PathBuf>,
    /// The previous content's copy, relative to the work directory (`backup/<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_sha256: Option<String>,
}

impl PlanEntry {
    pub fn new(path: PathBuf, kind: Kind, mode: Option<u32>) -> Self {
        Self {
            path,
            kind,
            mode,
            existed: false,
            prev_kind: None,
            prev_mode: None,
            prev_uid: None,
            prev_gid: None,
            prev_link_target: None,
            backup: None,
            backup_sha256: None,
        }
    }
}

/// Writes the plan durably: temp, fsync, rename, fsync the work directory.
pub(crate) fn write_plan(work_dir: &Path, plan: &Plan) -> Result<(), InstallError> {
    let path = work_dir.join(PLAN_FILE);
    let bytes = serde_json::to_vec_pretty(plan).map_err(|e| InstallError::BadPlan {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    flotilla_proto::durable::write_atomic(&path, &bytes, 0o600)
        .map_err(|e| InstallError::io("write the install plan", &path, e))
}

/// The plan, or None when there is none (nothing on the host was changed).
pub(crate) fn read_plan(work_dir: &Path) -> Result<Option<Plan>, InstallError> {
    let path = work_dir.join(PLAN_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(InstallError::io("read the install plan", &path, e)),
    };
    let plan: Plan = serde_json::from_slice(&bytes).map_err(|e| InstallError::BadPlan {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if plan.version != PLAN_VERSION {
        return Err(InstallError::BadPlan {
            path,
            reason: format!("version {} is not {PLAN_VERSION}", plan.version),
        });
    }
    Ok(Some(plan))
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `.<name>.flotilla-tmp`: the temp file's name for `name`, in the same
/// directory so the rename over it is atomic.
pub(crate) fn tmp_name(name: &OsStr) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(TMP_SUFFIX);
    tmp
}

pub(crate) fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// The temp file beside `target`.
pub(crate) fn tmp_of(target: &Parent) -> Result<Parent, InstallError> {
    target.sibling(&tmp_name(target.name()))
}

/// Options for the last steps before a temp file is renamed into place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    pub mode: u32,
    /// Owner to restore (rollback only); installs keep the agent as owner.
    pub owner: Option<(u32, u32)>,
}

/// Atomically replaces `target` with the bytes of `content`. `verify` sees the
/// SHA-256 and length of what was written and may refuse it before anything is
/// renamed (a truncated artifact, a corrupt backup). Every step is relative to
/// the target's directory handle (see `beneath`).
pub(crate) fn replace_file(
    beneath: &Beneath,
    target: &Path,
    content: &mut dyn Read,
    finish: Finish,
    verify: &dyn Fn(&str, u64) -> Result<(), InstallError>,
) -> Result<(), InstallError> {
    let at = beneath.parent(target)?;
    let tmp = tmp_of(&at)?;
    let io_err = |action, e| InstallError::io(action, tmp.path(), e);
    // A stale temp (or something placed at our reserved name) goes first; the
    // exclusive create then refuses to open anything that exists, symlinks included.
    tmp.remove_if_present()?;
    let mut file = tmp.create_new(0o600)?;
    let written = copy_hashing(content, &mut file);
    let checked = written
        .map_err(|e| io_err("write", e))
        .and_then(|(digest, len)| verify(&digest, len));
    if let Err(e) = checked {
        // A partial temp file (a full disk, a refused copy) must not stay behind.
        drop(file);
        let _ = tmp.remove_if_present();
        return Err(e);
    }
    if let Some((uid, gid)) = finish.owner {
        restore_owner(&file, &tmp.path(), uid, gid)?;
    }
    // Explicit chmod: the create mode went through the umask, and chown cleared
    // setuid/setgid.
    let done = file
        .set_permissions(fs::Permissions::from_mode(finish.mode))
        .map_err(|e| io_err("set the mode of", e))
        .and_then(|()| file.sync_all().map_err(|e| io_err("fsync", e)));
    drop(file);
    if let Err(e) = done.and_then(|()| at.rename_from(&tmp)) {
        let _ = tmp.remove_if_present();
        return Err(e);
    }
    at.sync_dir()
}

/// Atomically replaces `target` with a symlink to `link_target`.
pub(crate) fn replace_symlink(
    beneath: &Beneath,
    target: &Path,
    link_target: &Path,
) -> Result<(), InstallError> {
    let at = beneath.parent(target)?;
    let tmp = tmp_of(&at)?;
    tmp.remove_if_present()?;
    tmp.symlink(link_target)?;
    if let Err(e) = at.rename_from(&tmp) {
        let _ = tmp.remove_if_present();
        return Err(e);
    }
    at.sync_dir()
}

/// Sets the owner back; an agent that does not run as root could not have changed
/// it either, so "not permitted" is logged, not fatal.
fn restore_owner(file: &File, path: &Path, uid: u32, gid: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::MetadataExt;
    let meta = file
        .metadata()
        .map_err(|e| InstallError::io("stat", path, e))?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    match std::os::unix::fs::fchown(file, Some(uid), Some(gid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(path = %path.display(), uid, gid, "cannot restore the owner: {e}");
            Ok(())
        }
        Err(e) => Err(InstallError::io("restore the owner of", path, e)),
    }
}

/// Copies everything from `from` into `to`, returning the hex SHA-256 and length.
pub(crate) fn copy_hashing(from: &mut dyn Read, to: &mut dyn Write) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}
