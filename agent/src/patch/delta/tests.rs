//! Rebuilding from deltas: good ones, and every way one is refused without
//! leaving anything behind; deltas made by the stock `zstd` tool (Debian's
//! `zstd` package, which `scripts/test` installs when missing).

use std::path::Path;
use std::process::Command;

use super::*;

/// Deterministic bytes that do not compress: a delta is small only because
/// of its base.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed * 2 + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A base and a target that differs from it in a few places.
fn versions() -> (Vec<u8>, Vec<u8>) {
    let base = noise(1 << 20, 7);
    let mut target = base.clone();
    target[1000..1016].copy_from_slice(b"version 1.0.1 ok");
    target.splice(500_000..500_000, noise(3000, 9));
    target.truncate(target.len() - 777);
    (base, target)
}

fn artifact(name: &str, data: &[u8]) -> Artifact {
    Artifact {
        name: name.into(),
        sha256: flotilla_proto::sha256_hex(data),
        size: data.len() as u64,
    }
}

/// A delta as the CLI makes one (zstd's `--patch-from` settings).
fn encode(base: &[u8], target: &[u8], window_log: u32) -> Vec<u8> {
    let mut e = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 3, base).unwrap();
    e.long_distance_matching(true).unwrap();
    e.window_log(window_log).unwrap();
    e.include_checksum(true).unwrap();
    e.set_pledged_src_size(Some(target.len() as u64)).unwrap();
    e.write_all(target).unwrap();
    e.finish().unwrap()
}

/// A temp dir with `base` and `delta` written into it, and an empty `out/`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(base: &[u8], delta: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base"), base).unwrap();
        std::fs::write(dir.path().join("delta"), delta).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        Self { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    async fn rebuild(&self, base_sha256: &str, target: &Artifact) -> Result<PathBuf, DeltaError> {
        rebuild(
            &self.path("base"),
            base_sha256,
            &self.path("delta"),
            target,
            &self.path("out"),
        )
        .await
    }
    /// Files in `out/`: none after a refusal.
    fn out_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

#[tokio::test]
async fn a_good_delta_rebuilds_the_target() {
    let (base, target) = versions();
    let delta = encode(&base, &target, 21);
    assert!(delta.len() < 8 * 1024, "{} bytes", delta.len());
    let s = Setup::new(&base, &delta);
    let a = artifact("app.tar", &target);
    let out = s
        .rebuild(&flotilla_proto::sha256_hex(&base), &a)
        .await
        .unwrap();
    assert_eq!(out, s.path("out").join(&a.sha256));
    assert_eq!(std::fs::read(&out).unwrap(), target);
    assert_eq!(s.out_files(), vec![a.sha256.clone()], "no .part left");
}

#[tokio::test]
async fn a_base_with_another_digest_is_refused() {
    let (base, target) = versions();
    let s = Setup::new(&base, &encode(&base, &target, 21));
    let expected = "ab".repeat(32);
    let err = s
        .rebuild(&expected, &artifact("app.tar", &target))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeltaError::BaseDigest { expected: e, .. } if *e == expected),
        "{err}"
    );
    assert!(err.to_string().contains("not the expected abab"), "{err}");
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn a_base_over_the_limit_is_refused_unread() {
    let s = Setup::new(b"", b"");
    // Sparse: the size alone refuses it.
    File::options()
        .write(true)
        .open(s.path("base"))
        .unwrap()
        .set_len(MAX_DELTA_BYTES + 1)
        .unwrap();
    let err = s
        .rebuild(&"0".repeat(64), &artifact("app.tar", b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaError::BaseTooLarge { size, .. } if size == MAX_DELTA_BYTES + 1));
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn a_corrupt_or_truncated_delta_fails_and_leaves_nothing() {
    let (base, target) = versions();
    let good = encode(&base, &target, 21);
    let base_sha = flotilla_proto::sha256_hex(&base);
    let a = artifact("app.tar", &target);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    for b in &mut flipped[mid..mid + 8] {
        *b ^= 0x5a;
    }
    let truncated = good[..good.len() - 20].to_vec();
    for (what, delta) in [("flipped", flipped), ("truncated", truncated)] {
        let s = Setup::new(&base, &delta);
        let err = s.rebuild(&base_sha, &a).await.unwrap_err();
        assert!(matches!(err, DeltaError::Corrupt { .. }), "{what}: {err}");
        assert!(err.to_string().contains("cannot be decoded"), "{err}");
        assert!(s.out_files().is_empty(), "{what}: {:?}", s.out_files());
    }
    let s = Setup::new(&base, b"not zstd at all");
    let err = s.rebuild(&base_sha, &a).await.unwrap_err();
    assert!(matches!(err, DeltaError::Corrupt { .. }), "{err}");
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn a_delta_of_other_bytes_is_a_digest_mismatch() {
    let (base, target) = versions();
    let mut other = target.clone();
    other[12345] ^= 1;
    let s = Setup::new(&base, &encode(&base, &other, 21));
    let a = artifact("app.tar", &target);
    let err = s
        .rebuild(&flotilla_proto::sha256_hex(&base), &a)
        .await
        .unwrap_err();
    match &err {
        DeltaError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, a.sha256);
            assert_eq!(*actual, flotilla_proto::sha256_hex(&other));
        }
        _ => panic!("{err}"),
    }
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn output_longer_or_shorter_than_the_target_is_refused() {
    let (base, target) = versions();
    let s = Setup::new(&base, &encode(&base, &target, 21));
    let base_sha = flotilla_proto::sha256_hex(&base);
    // The manifest says fewer bytes than the delta makes: stopped at the cap.
    let short = artifact("app.tar", &target[..target.len() - 1]);
    let err = s.rebuild(&base_sha, &short).await.unwrap_err();
    assert!(
        matches!(&err, DeltaError::TooLong { size, .. } if *size == short.size),
        "{err}"
    );
    assert!(s.out_files().is_empty());
    let mut long = artifact("app.tar", &target);
    long.size += 1;
    let err = s.rebuild(&base_sha, &long).await.unwrap_err();
    assert!(
        matches!(&err, DeltaError::Size { got, .. } if *got == target.len() as u64),
        "{err}"
    );
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn a_frame_wanting_a_larger_window_is_refused() {
    let base = noise(4096, 3);
    // No content size: the frame header then states its window, 2^28.
    let mut e = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 3, &base).unwrap();
    e.window_log(MAX_DELTA_WINDOW_LOG + 1).unwrap();
    e.include_contentsize(false).unwrap();
    e.write_all(&base[..100]).unwrap();
    let delta = e.finish().unwrap();
    let s = Setup::new(&base, &delta);
    let err = s
        .rebuild(
            &flotilla_proto::sha256_hex(&base),
            &artifact("x", &base[..100]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaError::WindowTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("2^27"), "{err}");
    assert!(s.out_files().is_empty());
}

#[tokio::test]
async fn digests_that_are_not_file_names_are_refused() {
    let s = Setup::new(b"base", b"delta");
    let mut a = artifact("app.tar", b"x");
    a.sha256 = "../../etc/passwd".into();
    let err = s
        .rebuild(&flotilla_proto::sha256_hex(b"base"), &a)
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaError::BadDigest { .. }), "{err}");
    let err = s
        .rebuild("../base", &artifact("app.tar", b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeltaError::BadDigest { .. }), "{err}");
    assert!(s.out_files().is_empty());
}

/// Runs the stock `zstd` with `args`; panics unless it exits 0.
fn stock_zstd(args: &[&Path]) {
    let out = match Command::new("zstd").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the stock `zstd` tool is not installed; scripts/test installs it (apt-get install zstd)"
        ),
        Err(e) => panic!("cannot run zstd: {e}"),
    };
    assert!(
        out.status.success(),
        "zstd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_delta_made_by_stock_zstd_rebuilds() {
    let (base, target) = versions();
    let s = Setup::new(&base, b"");
    std::fs::write(s.path("new"), &target).unwrap();
    let patch_from = format!("--patch-from={}", s.path("base").display());
    stock_zstd(&[
        Path::new("-q"),
        Path::new("-f"),
        Path::new(&patch_from),
        &s.path("new"),
        Path::new("-o"),
        &s.path("delta"),
    ]);
    let a = artifact("app.tar", &target);
    let out = s
        .rebuild(&flotilla_proto::sha256_hex(&base), &a)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out).unwrap(), target);
}
