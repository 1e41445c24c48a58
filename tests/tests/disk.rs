//! A full disk under a real agent: a patch that does not fit the filesystem
//! under its destination is refused as `insufficient disk` before its
//! download starts, with how much it needs; the host is unchanged, nothing is
//! downloaded, and a patch that fits installs afterwards. A download
//! directory full of what no patch needs is cleared to make room.

use std::path::Path;
use std::process::Command;

use flotilla_e2e::patch;

/// A tmpfs of `size` at `dir` until dropped. Needs root, as the suite runs:
/// without it the test fails saying so.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs at {} and needs root for it: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_patch_that_does_not_fit_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = patch::signed_fleet(dir.path(), &k, 1);
    let root = agents[0].root();
    let demo = root.join("opt/demo");
    let _fs = Tmpfs::mount(&demo, "2m");
    std::fs::write(demo.join("VERSION"), b"0\n").unwrap();
    let before = patch::snapshot(&root);

    let big = vec![1u8; 3 << 20];
    let tar = dir.path().join("big.tar");
    patch::tar(
        &tar,
        &[("VERSION", b"1\n", 0o644), ("data.bin", &big, 0o644)],
    );
    let spec = patch::files_spec(dir.path(), "too-big", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("too-big"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let out = patch::wait_outcomes(&server, "too-big", 1);
    let (_, phase, error) = &out[0];
    // Refused before its download: not one byte of it was fetched.
    assert_eq!(phase, "failed", "{out:?}");
    assert!(error.contains("insufficient disk"), "{error}");
    assert!(error.contains(&demo.display().to_string()), "{error}");
    assert_eq!(patch::snapshot(&root), before, "the host changed");
    let downloaded: Vec<_> = std::fs::read_dir(agents[0].state_dir.join("artifacts"))
        .map(|d| d.flatten().map(|f| f.file_name()).collect())
        .unwrap_or_default();
    assert!(downloaded.is_empty(), "downloaded: {downloaded:?}");

    // One that fits goes in.
    let tar = dir.path().join("small.tar");
    patch::tar(&tar, &[("VERSION", b"2\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "fits", "2.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("fits"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let out = patch::wait_outcomes(&server, "fits", 1);
    assert_eq!(out[0].1, "committed", "{out:?}");
    assert_eq!(std::fs::read(demo.join("VERSION")).unwrap(), b"2\n");
}

/// The agent's download directory fills up with what an earlier download left
/// (a partial file of an artifact no patch needs): the download that meets the
/// full disk removes it and goes on, and the patch commits.
#[test]
fn a_full_download_directory_is_cleared_of_unneeded_downloads_and_the_patch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = patch::signed_fleet(dir.path(), &k, 1);
    let artifacts = agents[0].state_dir.join("artifacts");
    let _fs = Tmpfs::mount(&artifacts, "3m");
    let stale = artifacts.join(format!("{}.part", "0".repeat(64)));
    std::fs::write(&stale, vec![7u8; 2560 << 10]).unwrap();

    let tar = dir.path().join("app.tar");
    patch::tar(&tar, &[("data.bin", &patch::noise(1 << 20, 5), 0o644)]);
    let spec = patch::files_spec(dir.path(), "needs-room", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("needs-room"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let out = patch::wait_outcomes(&server, "needs-room", 1);
    assert_eq!(out[0].1, "committed", "{out:?}");
    assert!(!stale.exists(), "the unneeded partial download was removed");
    // Found before the download started, not by a failed write.
    let st = patch::status(&server, "needs-room");
    let failures = st["nodes"][0]["transfer"]["failures"].to_string();
    assert!(!failures.contains("No space left"), "{st}");
    assert!(
        agents[0]
            .log_text()
            .contains("removed an unneeded download to make room")
    );
}
