//! Rebuilding an artifact from a zstd delta (`zstd --patch-from`) and an older
//! artifact this host holds (the base). Nothing about a delta is trusted: the
//! base's digest is checked before it is used, the output is capped at the
//! target's declared size and hashed while it is written, and the file gets
//! the target's name only when its digest and size are the signed manifest's.
//! Any failure removes the partial file and names what was wrong, so the
//! caller falls back to downloading the full artifact.
//!
//! Memory is bounded: the base is held whole (at most
//! [`MAX_DELTA_BYTES`], 128 MiB) as zstd's reference prefix, and the decoder
//! keeps at most one window of output (its window log capped at
//! [`MAX_DELTA_WINDOW_LOG`]: 128 MiB), so about 256 MiB at worst.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flotilla_proto::delta::{MAX_DELTA_BYTES, MAX_DELTA_WINDOW_LOG};
use flotilla_proto::manifest::Artifact;
use sha2::{Digest, Sha256};

/// Output read from the decoder at a time.
const BUFFER: usize = 256 * 1024;

/// Why a rebuild failed. Nothing is left behind by any of them.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("artifact {name}: sha256 {sha256:?} is not 64 lower-case hex characters")]
    BadDigest { name: String, sha256: String },
    #[error("delta base {path}: {size} bytes; a base is at most {MAX_DELTA_BYTES} bytes")]
    BaseTooLarge { path: PathBuf, size: u64 },
    #[error("delta base {path} has sha256 {actual}, not the expected {expected}")]
    BaseDigest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "delta {path} needs a zstd window larger than 2^{MAX_DELTA_WINDOW_LOG} bytes, more than this host allows"
    )]
    WindowTooLarge { path: PathBuf },
    #[error(
        "delta {path} cannot be decoded (corrupt, truncated, or made from another base): {reason}"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("artifact {name} rebuilt from {path}: more bytes than the manifest's {size}")]
    TooLong {
        name: String,
        path: PathBuf,
        size: u64,
    },
    #[error("artifact {name} rebuilt from {path}: {got} bytes, the manifest says {size}")]
    Size {
        name: String,
        path: PathBuf,
        got: u64,
        size: u64,
    },
    #[error(
        "artifact {name} rebuilt from {path}: sha256 is {actual} but the manifest says {expected}"
    )]
    DigestMismatch {
        name: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the rebuild of artifact {name} stopped: {reason}")]
    Stopped { name: String, reason: String },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DeltaError + use<> {
    let path = path.to_path_buf();
    move |source| DeltaError::Io {
        action,
        path,
        source,
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// Rebuilds `target` from the delta file `delta` and the base file `base`
/// (whose SHA-256 must be `base_sha256`), on a blocking thread. Writes
/// `<out_dir>/<target sha256>.part`, then renames it to
/// `<out_dir>/<target sha256>` (and syncs the directory) only when its size
/// and digest are the target's; returns that path.
pub async fn rebuild(
    base: &Path,
    base_sha256: &str,
    delta: &Path,
    target: &Artifact,
    out_dir: &Path,
) -> Result<PathBuf, DeltaError> {
    let (base, base_sha256, delta, target, out_dir) = (
        base.to_path_buf(),
        base_sha256.to_string(),
        delta.to_path_buf(),
        target.clone(),
        out_dir.to_path_buf(),
    );
    let name = target.name.clone();
    tokio::task::spawn_blocking(move || {
        rebuild_blocking(&base, &base_sha256, &delta, &target, &out_dir)
    })
    .await
    .map_err(|e| DeltaError::Stopped {
        name,
        reason: e.to_string(),
    })?
}

fn rebuild_blocking(
    base: &Path,
    base_sha256: &str,
    delta: &Path,
    target: &Artifact,
    out_dir: &Path,
) -> Result<PathBuf, DeltaError> {
    for sha in [base_sha256, &target.sha256] {
        if !is_sha256(sha) {
            return Err(DeltaError::BadDigest {
                name: target.name.clone(),
                sha256: sha.to_string(),
            });
        }
    }
    let base_bytes = read_base(base, base_sha256)?;
    let part = out_dir.join(format!("{}.part", target.sha256));
    let done = out_dir.join(&target.sha256);
    let written = decode_into(&base_bytes, delta, target, &part).and_then(|()| {
        std::fs::rename(&part, &done).map_err(io("move the rebuilt file to", &done))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    File::open(out_dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", out_dir))?;
    Ok(done)
}

/// The base, whole, once its size and digest are checked.
fn read_base(path: &Path, expected: &str) -> Result<Vec<u8>, DeltaError> {
    let file = File::open(path).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("read", path))?.len();
    if len > MAX_DELTA_BYTES {
        return Err(DeltaError::BaseTooLarge {
            path: path.to_path_buf(),
            size: len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // Never more than the limit, even if the file grows meanwhile.
    file.take(MAX_DELTA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    if bytes.len() as u64 > MAX_DELTA_BYTES {
        return Err(DeltaError::BaseTooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != expected {
        return Err(DeltaError::BaseDigest {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

/// A decoder error, told apart: a frame asking for too large a window, or
/// anything else wrong with the delta.
fn decode_error(path: &Path, e: std::io::Error) -> DeltaError {
    let reason = e.to_string();
    // zstd's words for frameParameter_windowTooLarge.
    if reason.contains("too much memory") {
        DeltaError::WindowTooLarge {
            path: path.to_path_buf(),
        }
    } else {
        DeltaError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }
}

/// Streams the delta through the decoder into `part`, at most the target's
/// size, hashing as it writes; checks size and digest, then syncs.
fn decode_into(
    base: &[u8],
    delta: &Path,
    target: &Artifact,
    part: &Path,
) -> Result<(), DeltaError> {
    let input = File::open(delta).map_err(io("open", delta))?;
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(BufReader::new(input), base)
        .map_err(|e| decode_error(delta, e))?;
    decoder
        .window_log_max(MAX_DELTA_WINDOW_LOG)
        .map_err(|e| decode_error(delta, e))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(part)
        .map_err(io("create", part))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUFFER];
    let mut got = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(decode_error(delta, e)),
            Ok(0) => break,
            Ok(n) => n,
        };
        got += n as u64;
        if got > target.size {
            return Err(DeltaError::TooLong {
                name: target.name.clone(),
                path: delta.to_path_buf(),
                size: target.size,
            });
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("write", part))?;
    }
    if got != target.size {
        return Err(DeltaError::Size {
            name: target.name.clone(),
            path: delta.to_path_buf(),
            got,
            size: target.size,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if actual != target.sha256 {
        return Err(DeltaError::DigestMismatch {
            name: target.name.clone(),
            path: delta.to_path_buf(),
            expected: target.sha256.clone(),
            actual,
        });
    }
    out.sync_all().map_err(io("sync", part))
}

#[cfg(test)]
mod tests;
