//! Small artifacts held in memory while they are served. A fleet-wide patch
//! serves the same bytes to every node: read from disk per download, each
//! download cost the server several blocking-pool round trips (open, stat,
//! seek, read) and a copy per chunk; held once, chunks are slices of one buffer.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prost::bytes::Bytes;
use tokio::sync::OnceCell;

/// Largest artifact held in memory; larger ones are streamed from disk.
pub const MAX_HELD_ARTIFACT: u64 = 8 * 1024 * 1024;
/// Most bytes held in all; the artifact held longest goes first.
pub const HELD_BUDGET: u64 = 64 * 1024 * 1024;

/// Artifacts by digest, each read from disk once by whoever asks first.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_sha: HashMap<String, (Arc<OnceCell<Bytes>>, u64)>,
    /// Oldest first, for eviction.
    order: VecDeque<String>,
    bytes: u64,
}

impl Cache {
    /// The artifact `sha256` if it is in memory already.
    pub fn get(&self, sha256: &str) -> Option<Bytes> {
        let e = self.entries.lock().expect("held artifacts");
        e.by_sha
            .get(sha256)
            .and_then(|(cell, _)| cell.get().cloned())
    }

    /// Drops `sha256` (its file is being removed).
    pub fn forget(&self, sha256: &str) {
        let mut e = self.entries.lock().expect("held artifacts");
        if let Some((_, n)) = e.by_sha.remove(sha256) {
            e.bytes -= n;
            e.order.retain(|s| s != sha256);
        }
    }

    /// The complete artifact `sha256` of `len` bytes stored at `path`: read
    /// once, however many downloads ask at the same time, and kept while the
    /// budget allows. Callers check `len <= MAX_HELD_ARTIFACT`.
    pub async fn load(&self, sha256: &str, path: PathBuf, len: u64) -> std::io::Result<Bytes> {
        let cell = {
            let mut e = self.entries.lock().expect("held artifacts");
            match e.by_sha.get(sha256) {
                Some((cell, _)) => cell.clone(),
                None => {
                    while e.bytes + len > HELD_BUDGET {
                        let Some(old) = e.order.pop_front() else {
                            break;
                        };
                        if let Some((_, n)) = e.by_sha.remove(&old) {
                            e.bytes -= n;
                        }
                    }
                    let cell = Arc::new(OnceCell::new());
                    e.by_sha.insert(sha256.to_string(), (cell.clone(), len));
                    e.order.push_back(sha256.to_string());
                    e.bytes += len;
                    cell
                }
            }
        };
        cell.get_or_try_init(|| async move {
            let data = tokio::task::spawn_blocking(move || std::fs::read(path))
                .await
                .map_err(std::io::Error::other)??;
            if data.len() as u64 != len {
                return Err(std::io::Error::other(format!(
                    "artifact {sha256} has {} bytes on disk, not {len}",
                    data.len()
                )));
            }
            Ok(Bytes::from(data))
        })
        .await
        .cloned()
    }

    /// Bytes held now (for tests).
    #[cfg(test)]
    fn held_bytes(&self) -> u64 {
        self.entries.lock().expect("held artifacts").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_once_and_serves_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"artifact bytes").unwrap();
        let held = Cache::default();
        assert!(held.get("a").is_none());
        let loads: Vec<_> = (0..8).map(|_| held.load("a", path.clone(), 14)).collect();
        for b in futures::future::join_all(loads).await {
            assert_eq!(&b.unwrap()[..], b"artifact bytes");
        }
        // Gone from disk, still served: it was read once and kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&held.get("a").unwrap()[..], b"artifact bytes");
        assert_eq!(
            &held.load("a", path, 14).await.unwrap()[..],
            b"artifact bytes"
        );
    }

    #[tokio::test]
    async fn a_short_file_is_an_error_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, b"short").unwrap();
        let held = Cache::default();
        let err = held.load("b", path.clone(), 99).await.unwrap_err();
        assert!(err.to_string().contains("not 99"), "{err}");
        assert!(held.get("b").is_none());
        assert!(held.load("b", dir.path().join("missing"), 5).await.is_err());
    }

    #[tokio::test]
    async fn the_oldest_goes_when_the_budget_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let held = Cache::default();
        let len = HELD_BUDGET / 2;
        for name in ["x", "y", "z"] {
            let path = dir.path().join(name);
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            held.load(name, path, len).await.unwrap();
        }
        assert!(held.get("x").is_none(), "the oldest stays past the budget");
        assert!(held.get("y").is_some() && held.get("z").is_some());
        assert_eq!(held.held_bytes(), 2 * len);
    }
}
