//! Host paths reached beneath the allowed directories, one component at a time
//! from an open directory handle, never through a symlink: whatever symlinks
//! earlier patches, other software or another process (even mid-install) put
//! inside an allowed tree, a `files` install or rollback cannot create, change
//! or remove anything outside it.
//!
//! The parents of the allowed paths are the host's layout, set up by its
//! operator: they are resolved as the filesystem says (`/opt` may be a symlink
//! to `/data/opt` when `/opt/app` is allowed), and no patch can change them,
//! because a patch cannot write above an allowed path. An allowed path itself
//! must be a real directory (or not exist yet): a symlink there is refused
//! whoever made it, and a patch can put only a directory there.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::InstallError;

/// What is at a host path, without following a symlink there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub kind: FileType,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }
    pub fn is_file(&self) -> bool {
        self.kind == FileType::RegularFile
    }
    pub fn is_symlink(&self) -> bool {
        self.kind == FileType::Symlink
    }
}

/// One allowed tree: its path as the policy names it and where it really is.
#[derive(Debug, Clone)]
struct Anchor {
    path: PathBuf,
    real: PathBuf,
}

/// The allowed trees of one install or rollback.
#[derive(Debug, Clone)]
pub(crate) struct Beneath {
    anchors: Vec<Anchor>,
}

impl Beneath {
    /// The trees of `allowed` (absolute, normal paths). A path inside another
    /// allowed path adds nothing and is dropped. Refused: an allowed path whose
    /// resolution goes through a symlink inside another allowed tree, which a
    /// patch could replace.
    pub fn new(allowed: &[PathBuf]) -> Result<Self, InstallError> {
        let mut outer: Vec<&PathBuf> = allowed
            .iter()
            .filter(|a| !allowed.iter().any(|b| b != *a && a.starts_with(b)))
            .collect();
        outer.sort();
        outer.dedup();
        let mut anchors = Vec::new();
        for path in outer {
            // The parents are the host's layout and may be symlinks; the allowed
            // path itself must be a real directory (or missing), so that no link
            // there, whoever made it, can move the tree.
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(InstallError::OutsideAllowed { path: path.clone() });
            };
            anchors.push(Anchor {
                path: path.clone(),
                real: resolve(parent)?.join(name),
            });
        }
        for a in &anchors {
            for link in links_on_the_way(a.path.parent().unwrap_or(Path::new("/")))? {
                if let Some(b) = anchors
                    .iter()
                    .find(|b| b.path != a.path && within(&link, b))
                {
                    return Err(InstallError::AnchorThroughAllowedTree {
                        allowed: a.path.clone(),
                        link,
                        other: b.path.clone(),
                    });
                }
            }
            if let Some(b) = anchors
                .iter()
                .find(|b| b.path != a.path && a.real.starts_with(&b.real))
            {
                return Err(InstallError::AnchorThroughAllowedTree {
                    allowed: a.path.clone(),
                    link: a.real.clone(),
                    other: b.path.clone(),
                });
            }
        }
        Ok(Self { anchors })
    }

    /// The allowed paths, as the policy names them (what a plan records).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.anchors.iter().map(|a| a.path.clone()).collect()
    }

    /// Whether `path` is an allowed path itself: only a directory may be there.
    pub fn is_anchor(&self, path: &Path) -> bool {
        self.anchors.iter().any(|a| a.path == path)
    }

    /// The allowed path `path` lies at or under.
    pub fn anchor_of(&self, path: &Path) -> Option<&Path> {
        self.anchor(path).map(|a| a.path.as_path())
    }

    fn anchor(&self, path: &Path) -> Option<&Anchor> {
        self.anchors.iter().find(|a| path.starts_with(&a.path))
    }

    /// The directory holding `path`, opened from its allowed tree's root one
    /// component at a time without following symlinks, and `path`'s own name.
    pub fn parent(&self, path: &Path) -> Result<Parent, InstallError> {
        let anchor = self
            .anchor(path)
            .ok_or_else(|| InstallError::OutsideAllowed {
                path: path.to_path_buf(),
            })?;
        let rel = path.strip_prefix(&anchor.path).expect("under its anchor");
        let mut parts: Vec<&OsStr> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                _ => {
                    return Err(InstallError::OutsideAllowed {
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        let Some(name) = parts.pop() else {
            // The allowed directory itself: held by its (operator-made) parent.
            let (Some(dir), Some(name)) = (anchor.real.parent(), anchor.real.file_name()) else {
                return Err(InstallError::OutsideAllowed {
                    path: path.to_path_buf(),
                });
            };
            let fd = open_dir(dir).map_err(|e| InstallError::io("open directory", dir, e))?;
            return Ok(Parent {
                fd,
                dir: anchor.path.parent().unwrap_or(Path::new("/")).to_path_buf(),
                name: name.to_os_string(),
            });
        };
        let mut fd = rustix::fs::open(
            &anchor.real,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| walk_error(&anchor.path, e))?;
        let mut at = anchor.path.clone();
        for part in parts {
            at.push(part);
            fd = rustix::fs::openat(
                &fd,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| walk_error(&at, e))?;
        }
        Ok(Parent {
            fd,
            dir: at,
            name: name.to_os_string(),
        })
    }

    /// [`Beneath::parent`], or None when a directory on the way is missing.
    pub fn parent_if_present(&self, path: &Path) -> Result<Option<Parent>, InstallError> {
        match self.parent(path) {
            Ok(p) => Ok(Some(p)),
            Err(InstallError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What is at `path` (None: nothing, or a missing directory above it).
    pub fn lstat(&self, path: &Path) -> Result<Option<Meta>, InstallError> {
        match self.parent_if_present(path)? {
            Some(p) => p.lstat(),
            None => Ok(None),
        }
    }
}

/// Where an allowed path really is: its deepest existing ancestor resolved by
/// the filesystem, the rest appended.
fn resolve(path: &Path) -> Result<PathBuf, InstallError> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        match fs::canonicalize(existing) {
            Ok(mut real) => {
                real.extend(rest.iter().rev());
                return Ok(real);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err(InstallError::io("resolve", path, e));
                };
                rest.push(name);
                existing = parent;
            }
            Err(e) => return Err(InstallError::io("resolve", existing, e)),
        }
    }
}

/// Where each symlink met on the way to `path` (it or an ancestor) sits.
fn links_on_the_way(path: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut out = Vec::new();
    for p in path.ancestors() {
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            continue;
        };
        if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
            out.push(resolve(parent)?.join(name));
        }
    }
    Ok(out)
}

fn within(path: &Path, a: &Anchor) -> bool {
    path.starts_with(&a.real) || path.starts_with(&a.path)
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A component that could not be opened as a directory: a symlink (refused), a
/// file, or missing.
fn walk_error(at: &Path, e: rustix::io::Errno) -> InstallError {
    let is_link = fs::symlink_metadata(at).is_ok_and(|m| m.file_type().is_symlink());
    if e == rustix::io::Errno::LOOP || (e == rustix::io::Errno::NOTDIR && is_link) {
        InstallError::HostSymlink {
            path: at.to_path_buf(),
        }
    } else if e == rustix::io::Errno::NOTDIR {
        InstallError::HostFileWhereDirectory {
            path: at.to_path_buf(),
        }
    } else {
        InstallError::io("open directory", at, e.into())
    }
}

/// An open directory and one name in it: every operation is relative to the
/// handle, so swapping a directory on the way for a symlink changes nothing.
#[derive(Debug)]
pub(crate) struct Parent {
    fd: OwnedFd,
    /// The directory's path, for messages.
    dir: PathBuf,
    name: OsString,
}

impl Parent {
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    fn err(&self, action: &'static str, e: impl Into<io::Error>) -> InstallError {
        InstallError::io(action, self.path(), e.into())
    }

    /// A sibling of this name in the same directory (the temp file beside it).
    pub fn sibling(&self, name: &OsStr) -> Result<Parent, InstallError> {
        Ok(Parent {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| self.err("open directory", e))?,
            dir: self.dir.clone(),
            name: name.to_os_string(),
        })
    }

    pub fn name(&self) -> &OsStr {
        &self.name
    }

    pub fn lstat(&self) -> Result<Option<Meta>, InstallError> {
        match rustix::fs::statat(&self.fd, self.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta {
                kind: FileType::from_raw_mode(st.st_mode),
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            })),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) => Err(self.err("inspect", e)),
        }
    }

    pub fn read_link(&self) -> Result<PathBuf, InstallError> {
        use std::os::unix::ffi::OsStringExt;
        let target = rustix::fs::readlinkat(&self.fd, self.name.as_os_str(), Vec::new())
            .map_err(|e| self.err("read the symlink", e))?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// Opens the file here for reading; a symlink here is refused.
    pub fn open_read(&self) -> Result<File, InstallError> {
        let fd = rustix::fs::openat(
            &self.fd,
            self.name.as_os_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                InstallError::HostSymlink { path: self.path() }
            } else {
                self.err("open", e)
            }
        })?;
        Ok(File::from(fd))
    }

    /// Creates a new file here (nothing may exist, a symlink included).
    pub fn create_new(&self, mode: u32) -> Result<File, InstallError> {
        let fd = rustix::fs::openat(
            &self.fd,
            self.name.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| self.err("create", e))?;
        Ok(File::from(fd))
    }

    /// Removes the file or symlink here; a missing one is fine.
    pub fn remove_if_present(&self) -> Result<(), InstallError> {
        match rustix::fs::unlinkat(&self.fd, self.name.as_os_str(), AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
            Err(e) => Err(self.err("remove", e)),
        }
    }

    /// Removes the directory here; Ok(false) if it is not empty.
    pub fn remove_dir(&self) -> Result<bool, InstallError> {
        match rustix::fs::unlinkat(&self.fd, self.name.as_os_str(), AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(true),
            Err(e) if e == rustix::io::Errno::NOTEMPTY || e == rustix::io::Errno::EXIST => {
                Ok(false)
            }
            Err(e) => Err(self.err("remove directory", e)),
        }
    }

    pub fn symlink(&self, target: &Path) -> Result<(), InstallError> {
        rustix::fs::symlinkat(target, &self.fd, self.name.as_os_str())
            .map_err(|e| self.err("create the symlink", e))
    }

    /// Creates a directory here; Ok(false) if something is already here.
    pub fn mkdir(&self, mode: u32) -> Result<bool, InstallError> {
        match rustix::fs::mkdirat(&self.fd, self.name.as_os_str(), Mode::from_raw_mode(mode)) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::EXIST => Ok(false),
            Err(e) => Err(self.err("create directory", e)),
        }
    }

    /// Opens the directory here (not through a symlink), to change its mode.
    pub fn open_dir(&self) -> Result<File, InstallError> {
        let fd = rustix::fs::openat(
            &self.fd,
            self.name.as_os_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| walk_error(&self.path(), e))?;
        Ok(File::from(fd))
    }

    /// Renames `from` (a name in the same directory) over this name.
    pub fn rename_from(&self, from: &Parent) -> Result<(), InstallError> {
        rustix::fs::renameat(
            &from.fd,
            from.name.as_os_str(),
            &self.fd,
            self.name.as_os_str(),
        )
        .map_err(|e| self.err("rename into place", e))
    }

    /// Makes the directory's entries durable.
    pub fn sync_dir(&self) -> Result<(), InstallError> {
        rustix::fs::fsync(&self.fd)
            .map_err(|e| InstallError::io("fsync directory", &self.dir, e.into()))
    }
}
