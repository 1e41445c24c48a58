//! Content-addressed artifact files: `<data-dir>/artifacts/<sha256>`, written to a
//! partial file, appended to in order (so uploads resume), then hashed, fsynced
//! and renamed into place. A file under its digest's name always has that digest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost::bytes::Bytes;
use sha2::Digest;

use crate::error::{Error, Result};

mod cache;
pub mod gc;
pub mod meter;
pub mod peers;
pub mod sites;

/// Largest artifact the server accepts.
pub const MAX_ARTIFACT_BYTES: u64 = flotilla_proto::manifest::MAX_ARTIFACT_BYTES;

pub struct ArtifactStore {
    dir: PathBuf,
    /// Small complete artifacts, held in memory while they are served.
    cache: cache::Cache,
    /// The cap on artifact bytes sent per second, and the bytes sent.
    pub meter: std::sync::Arc<meter::Meter>,
    /// Downloads in flight per site, and the cap on them.
    pub sites: sites::SiteSlots,
    /// Written by a collection while it decides and removes; read by each
    /// publish from finding its files held until its patch is stored, so a
    /// file a publish found is never collected under it (publishes do not
    /// wait for each other).
    pub collecting: tokio::sync::RwLock<()>,
}

/// A file in the store (complete, or an upload in progress).
#[derive(Debug, Clone)]
pub struct HeldFile {
    pub sha256: String,
    pub size: u64,
    pub partial: bool,
    pub modified: std::time::SystemTime,
}

/// How much of an artifact the server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub received: u64,
    pub complete: bool,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("cannot {what} {}: {e}", path.display()))
}

/// Checks a digest string's shape (it becomes a file name).
pub fn check_sha256(s: &str) -> Result<()> {
    if s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "sha256 must be 64 lower-case hex characters".into(),
        ))
    }
}

impl ArtifactStore {
    pub fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(dir.join("partial")).map_err(|e| io("create", &dir, e))?;
        Ok(Self {
            dir,
            cache: cache::Cache::default(),
            meter: std::sync::Arc::new(meter::Meter::new(0)),
            sites: sites::SiteSlots::new(0),
            collecting: tokio::sync::RwLock::new(()),
        })
    }

    /// The same store, sending at most `rate` artifact bytes per second in all
    /// (0: no cap).
    pub fn with_max_rate(mut self, rate: u32) -> Self {
        self.meter = std::sync::Arc::new(meter::Meter::new(rate));
        self
    }

    /// The same store, letting at most `max` nodes of one site download at
    /// once (0: no cap).
    pub fn with_max_site_downloads(mut self, max: u32) -> Self {
        self.sites = sites::SiteSlots::new(max);
        self
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    fn partial(&self, sha256: &str) -> PathBuf {
        self.dir.join("partial").join(sha256)
    }

    /// A complete artifact small enough to be served from memory (read from
    /// disk by the first download), or None: stream it from [`Self::path`].
    /// Errors when no complete artifact has that digest.
    pub async fn in_memory(&self, sha256: &str) -> Result<Option<Bytes>> {
        if let Some(b) = self.cache.get(sha256) {
            return Ok(Some(b));
        }
        let len = self
            .complete_size(sha256)
            .ok_or_else(|| Error::NotFound(format!("no artifact with sha256 {sha256}")))?;
        if len > cache::MAX_HELD_ARTIFACT {
            return Ok(None);
        }
        let path = self.path(sha256);
        let b = self
            .cache
            .load(sha256, path.clone(), len)
            .await
            .map_err(|e| io("read", &path, e))?;
        Ok(Some(b))
    }

    /// Every file held: complete artifacts and uploads in progress (anything
    /// else in the directory is not the store's, and is left alone).
    pub fn files(&self) -> Result<Vec<HeldFile>> {
        let mut out = Vec::new();
        for (dir, partial) in [(self.dir.clone(), false), (self.dir.join("partial"), true)] {
            let entries = std::fs::read_dir(&dir).map_err(|e| io("list", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io("list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() || check_sha256(&name).is_err() {
                    continue;
                }
                out.push(HeldFile {
                    sha256: name,
                    size: meta.len(),
                    partial,
                    modified: meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// Removes a file (complete or partial), durably.
    pub fn remove(&self, sha256: &str, partial: bool) -> Result<()> {
        check_sha256(sha256)?;
        let path = if partial {
            self.partial(sha256)
        } else {
            self.cache.forget(sha256);
            self.path(sha256)
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &path, e));
            }
            _ => {}
        }
        let dir = path.parent().unwrap_or(&self.dir);
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", dir, e))
    }

    /// Marks a complete artifact as wanted now (a publish names it again):
    /// its retention as an unnamed file starts over.
    pub fn touch(&self, sha256: &str) {
        let path = self.path(sha256);
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Size of a complete artifact, if present.
    pub fn complete_size(&self, sha256: &str) -> Option<u64> {
        std::fs::metadata(self.path(sha256)).ok().map(|m| m.len())
    }

    pub fn held(&self, sha256: &str, size: u64) -> Result<Held> {
        check_sha256(sha256)?;
        if size > MAX_ARTIFACT_BYTES {
            return Err(Error::ResourceExhausted(format!(
                "artifact of {size} bytes is larger than the server's limit of {MAX_ARTIFACT_BYTES}"
            )));
        }
        if let Some(len) = self.complete_size(sha256) {
            if len != size {
                return Err(Error::FailedPrecondition(format!(
                    "artifact {sha256} is held with {len} bytes, not {size}"
                )));
            }
            return Ok(Held {
                received: len,
                complete: true,
            });
        }
        let received = std::fs::metadata(self.partial(sha256)).map_or(0, |m| m.len());
        Ok(Held {
            received,
            complete: false,
        })
    }

    /// Appends `data` at `offset` (which must be what the server holds).
    pub fn append(&self, sha256: &str, size: u64, offset: u64, data: &[u8]) -> Result<Held> {
        let held = self.held(sha256, size)?;
        if held.complete {
            return Ok(held);
        }
        if offset != held.received {
            return Err(Error::FailedPrecondition(format!(
                "upload of {sha256} must continue at byte {}, not {offset}",
                held.received
            )));
        }
        if offset + data.len() as u64 > size {
            return Err(Error::InvalidArgument(format!(
                "upload of {sha256} is longer than its declared {size} bytes"
            )));
        }
        let path = self.partial(sha256);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("open", &path, e))?;
        f.write_all(data).map_err(|e| io("write", &path, e))?;
        Ok(Held {
            received: offset + data.len() as u64,
            complete: false,
        })
    }

    /// Fsyncs what was appended (so `received` is real after a crash), and when
    /// every byte is there, checks the digest and moves the file into place.
    pub fn settle(&self, sha256: &str, size: u64) -> Result<Held> {
        let held = self.held(sha256, size)?;
        if held.complete {
            return Ok(held);
        }
        let path = self.partial(sha256);
        if let Ok(f) = std::fs::File::open(&path) {
            f.sync_all().map_err(|e| io("sync", &path, e))?;
        }
        if held.received < size {
            return Ok(held);
        }
        let mut f = std::fs::File::open(&path).map_err(|e| io("open", &path, e))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|e| io("read", &path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            let _ = std::fs::remove_file(&path);
            return Err(Error::InvalidArgument(format!(
                "uploaded bytes have sha256 {actual}, not {sha256}; the upload was discarded"
            )));
        }
        let dest = self.path(sha256);
        std::fs::rename(&path, &dest).map_err(|e| io("rename", &dest, e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", &self.dir, e))?;
        Ok(Held {
            received: size,
            complete: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_resumes_and_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let data = b"hello artifact bytes".to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&data));
        let size = data.len() as u64;
        assert_eq!(store.held(&sha, size).unwrap().received, 0);
        store.append(&sha, size, 0, &data[..5]).unwrap();
        assert_eq!(store.settle(&sha, size).unwrap().received, 5);
        // Resuming at the wrong offset is refused.
        assert!(store.append(&sha, size, 0, &data[..5]).is_err());
        store.append(&sha, size, 5, &data[5..]).unwrap();
        let held = store.settle(&sha, size).unwrap();
        assert!(held.complete);
        assert_eq!(std::fs::read(store.path(&sha)).unwrap(), data);

        let bad_sha = "0".repeat(64);
        store.append(&bad_sha, 3, 0, b"abc").unwrap();
        let err = store.settle(&bad_sha, 3).unwrap_err();
        assert!(err.to_string().contains("discarded"), "{err}");
        assert_eq!(store.held(&bad_sha, 3).unwrap().received, 0);
        assert!(store.append(&bad_sha, 3, 0, b"abcd").is_err());
        assert!(store.held("../x", 1).is_err());
    }
}
