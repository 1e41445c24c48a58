//! Test helpers: tar archives built entry by entry (malicious names written straight
//! into the header bytes, past the `tar` crate's own checks), whole-tree snapshots
//! to prove a host was left untouched or restored exactly, a policy, and a wait
//! for a process to be dead.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Compression;
use tar::{EntryType, Header};

use super::LocalPolicy;

/// One archive entry as a test describes it.
#[derive(Debug, Clone)]
pub(crate) enum Ent {
    File(&'static str, &'static [u8], u32),
    Dir(&'static str, u32),
    Symlink(&'static str, &'static str),
    /// Any type, name and link name, written raw.
    Raw(&'static str, EntryType, &'static str),
}

fn header(name: &str, etype: EntryType, size: u64, mode: u32, link: &str) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(etype);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    assert!(name.len() < gnu.name.len() && link.len() < gnu.linkname.len());
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    h
}

pub(crate) fn tar_bytes(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (h, data): (Header, &[u8]) = match e {
            Ent::File(n, d, m) => (header(n, EntryType::Regular, d.len() as u64, *m, ""), d),
            Ent::Dir(n, m) => (header(n, EntryType::Directory, 0, *m, ""), b""),
            Ent::Symlink(n, t) => (header(n, EntryType::Symlink, 0, 0o777, t), b""),
            Ent::Raw(n, et, l) => (header(n, *et, 0, 0o644, l), b""),
        };
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("finish tar")
}

/// Writes the archive (compressed if asked) to `dir/artifact.tar[.zst]`.
pub(crate) fn write_artifact(dir: &Path, entries: &[Ent], compression: Compression) -> PathBuf {
    let bytes = tar_bytes(entries);
    let (name, bytes) = match compression {
        Compression::None => ("artifact.tar", bytes),
        Compression::Zstd => (
            "artifact.tar.zst",
            zstd::encode_all(&bytes[..], 3).expect("zstd"),
        ),
    };
    let path = dir.join(name);
    fs::write(&path, bytes).expect("write artifact");
    path
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Snap {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: PathBuf },
}

/// Every path under `root` (root included) with its kind, mode and content.
pub(crate) fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, path: &Path, out: &mut BTreeMap<PathBuf, Snap>) {
    let meta = fs::symlink_metadata(path).expect("lstat");
    let rel = path.strip_prefix(root).expect("under root").to_path_buf();
    let mode = meta.mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).expect("readlink");
        out.insert(rel, Snap::Symlink { target });
    } else if ft.is_dir() {
        out.insert(rel, Snap::Dir { mode });
        for child in fs::read_dir(path).expect("readdir") {
            walk(root, &child.expect("dirent").path(), out);
        }
    } else {
        let bytes = fs::read(path).expect("read");
        out.insert(rel, Snap::File { mode, bytes });
    }
}

pub(crate) fn policy(paths: &[&Path]) -> LocalPolicy {
    LocalPolicy {
        allowed_paths: paths.iter().map(|p| p.to_path_buf()).collect(),
        allow_scripts: false,
        allow_health_checks: true,
        max_artifact_bytes: 16 << 20,
    }
}

pub(crate) fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, bytes).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub(crate) fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("lstat").mode() & 0o7777
}

/// A test's scratch space: `dest` (the install destination, existing), `work` (the
/// per-patch work directory) and `art` (where artifacts go), all in one tempdir.
pub(crate) struct Scratch {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub dest: PathBuf,
    pub work: PathBuf,
    pub art: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Canonical, so a symlinked /tmp does not look like a symlink under test.
        let root = fs::canonicalize(tmp.path()).expect("canonicalize");
        let dest = root.join("dest");
        let work = root.join("work");
        let art = root.join("art");
        for d in [&dest, &work, &art] {
            fs::create_dir(d).expect("mkdir");
        }
        Self {
            _tmp: tmp,
            root,
            dest,
            work,
            art,
        }
    }
}

/// A tmpfs of `size` mounted at `dir` for the test's life: a small filesystem
/// to fill. Needs root (as the test suite runs); without it the test fails
/// saying so, it does not skip.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Self {
        fs::create_dir_all(dir).expect("mkdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs at {} and needs root for it: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros to `path` until the filesystem is full (or `max` bytes).
pub(crate) fn fill(path: &Path, max: usize) {
    use std::io::Write;
    let mut f = fs::File::create(path).expect("create filler");
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    while written < max {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    let _ = f.sync_all();
}

/// Waits until the process whose pid `pidfile` holds is gone, or dead and
/// waiting for whoever adopted it to reap it; fails past `within`.
pub async fn wait_dead(pidfile: &std::path::Path, within: std::time::Duration) {
    let pid = std::fs::read_to_string(pidfile).expect("pid file");
    let stat = std::path::Path::new("/proc").join(pid.trim()).join("stat");
    let deadline = std::time::Instant::now() + within;
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => return,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(s) => assert!(
                std::time::Instant::now() < deadline,
                "process {} still alive: {s}",
                pid.trim()
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
