//! The data directory is the server's secrets (CA key, store, credentials):
//! it and everything in it are owner-only, whatever the umask it was started with.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{Mode, umask};

/// Owner-only for every file and directory the process creates from now on,
/// including the store's own files, which it creates with default modes.
/// Process-wide: only the server process calls it.
pub fn owner_only_from_now() {
    umask(Mode::from_bits_truncate(0o077));
}

/// Creates `dir` (and missing parents of it) owner-only.
pub fn create(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Takes group and other permissions off `dir` and everything under it (made
/// by an older version, a restore or another tool). Symlinks are left alone
/// and never followed.
pub fn restrict(dir: &Path) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        tighten(&d)?;
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                tighten(&entry.path())?;
            }
        }
    }
    Ok(())
}

fn tighten(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrict_takes_group_and_other_bits_off_everything_but_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("db/blobs")).unwrap();
        std::fs::write(root.join("db/conf"), b"x").unwrap();
        std::fs::write(root.join("ca.pem"), b"x").unwrap();
        for (p, m) in [
            ("", 0o755),
            ("db", 0o775),
            ("db/blobs", 0o777),
            ("db/conf", 0o664),
            ("ca.pem", 0o644),
        ] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap();
        }
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        restrict(&root).unwrap();
        for (p, want) in [
            ("", 0o700),
            ("db", 0o700),
            ("db/blobs", 0o700),
            ("db/conf", 0o600),
            ("ca.pem", 0o600),
        ] {
            let mode = std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, want, "{p}");
        }
        // Not followed out of the directory.
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
