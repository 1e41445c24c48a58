//! Replacing a file so that a crash or power loss leaves either the old
//! contents or the new, never a torn file: the one way every Flotilla program
//! writes a file it relies on (CA and keys, credential files, the agent's
//! status and install plan).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path`: a temp file beside it (`.<name>.tmp`, created
/// with `mode` before the umask), fsynced, renamed over `path`, then the
/// directory fsynced so the rename itself is durable. The directory must
/// exist.
///
/// The temp file is always a new file of this process's own: whatever is at
/// its name first (a file left by a crash, or a symlink or file someone else
/// put there, as in a shared directory) is unlinked, never written through,
/// and the file is then created exclusively without following a symlink. So
/// a secret never lands in a file another user can read or chose, and a
/// name this process may not unlink (another user's, in a sticky directory)
/// is an error naming it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot remove {} left in the way: {e}", tmp.display()),
                ));
            }
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_whole_files_with_the_mode_asked_for() {
        let dir = std::env::temp_dir().join(format!("flotilla-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // No temp file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_writes_through_what_is_at_the_temp_name() {
        let dir =
            std::env::temp_dir().join(format!("flotilla-durable-link-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Someone else's readable file, and a symlink to it at the temp name.
        let theirs = dir.join("theirs");
        fs::write(&theirs, b"theirs").unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("secret");
        std::os::unix::fs::symlink(&theirs, dir.join(".secret.tmp")).unwrap();
        write_atomic(&path, b"key", 0o600).unwrap();
        assert_eq!(
            fs::read(&theirs).unwrap(),
            b"theirs",
            "written through the link"
        );
        assert_eq!(fs::read(&path).unwrap(), b"key");
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o077, 0);
        // A plain file at the temp name (a crash's, or a readable one put
        // there) is replaced, not reused with its own mode.
        let tmp = dir.join(".secret.tmp");
        fs::write(&tmp, b"stale").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"key2", 0o600).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "kept the stale file's mode"
        );
        assert_eq!(fs::read(&path).unwrap(), b"key2");
        assert!(!tmp.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
