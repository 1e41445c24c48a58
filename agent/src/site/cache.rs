//! The site cache of an agent that serves its site: artifacts by digest,
//! fetched from the servers once for the whole site (one fill per artifact at
//! a time, whoever asks), readable by peers while they arrive, bounded in
//! bytes and evicted least recently used. An artifact its own host still
//! holds (hard-linked from its downloads) is never evicted.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use flotilla_proto::manifest::Artifact;
use flotilla_proto::transfer::Transfer;
use tokio::sync::watch;

use crate::patch::fetch::{self, FetchError, FetchLimits};
use crate::uplink::Uplink;

/// Where a fill stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    Running,
    Done,
    Failed(String),
}

/// What the cache holds: files and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub files: u32,
    pub bytes: u64,
}

/// The cache of one serving agent.
pub struct SiteCache {
    dir: PathBuf,
    /// The host's own downloads: an artifact found there is linked, not fetched.
    host_dir: PathBuf,
    max_bytes: u64,
    uplink: Uplink,
    limits: FetchLimits,
    /// The host's artifact size cap, which the cache obeys too.
    cap: u64,
    /// Fills in progress, by digest.
    fills: Mutex<HashMap<String, watch::Receiver<Fill>>>,
    /// Digests whose cached file was checked since the agent started (filled
    /// by it, or hashed before it was first served).
    verified: Mutex<std::collections::HashSet<String>>,
    stats: watch::Sender<CacheStats>,
}

impl std::fmt::Debug for SiteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Takes a fill's entry out of the table however the fill ends (a cancelled
/// filler included), so a later caller starts a new one.
struct FillGuard<'a> {
    cache: &'a SiteCache,
    sha256: String,
    tx: watch::Sender<Fill>,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        self.tx.send_if_modified(|f| {
            if *f == Fill::Running {
                *f = Fill::Failed("the fill was cut short".into());
                true
            } else {
                false
            }
        });
        self.cache.table().remove(&self.sha256);
    }
}

/// An open cached file for a peer, and, while it is being filled, the fill.
pub struct Reader {
    pub file: tokio::fs::File,
    pub fill: Option<watch::Receiver<Fill>>,
}

impl SiteCache {
    /// The cache in `dir` (created if missing), holding at most `max_bytes`.
    pub fn open(
        dir: PathBuf,
        host_dir: PathBuf,
        max_bytes: u64,
        uplink: Uplink,
        limits: FetchLimits,
        cap: u64,
    ) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&dir)?;
        let cache = Arc::new(Self {
            dir,
            host_dir,
            max_bytes,
            uplink,
            limits,
            cap,
            fills: Mutex::new(HashMap::new()),
            verified: Mutex::new(std::collections::HashSet::new()),
            stats: watch::channel(CacheStats::default()).0,
        });
        cache.evict();
        Ok(cache)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Fill>>> {
        self.fills.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checked(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the complete file for `sha256` holds those bytes: hashed once
    /// per run before it is first served (a file damaged on disk while the
    /// agent was down is removed, to be fetched again, not handed out).
    async fn intact(&self, sha256: &str) -> std::io::Result<bool> {
        if self.checked().contains(sha256) {
            return Ok(true);
        }
        let path = self.path(sha256);
        let (actual, _) = fetch::file_sha256(&path).await?;
        if actual == sha256 {
            self.checked().insert(sha256.to_string());
            return Ok(true);
        }
        tracing::warn!(artifact = %sha256, %actual, "a cached artifact does not match its digest; removing it");
        tokio::fs::remove_file(&path).await?;
        Ok(false)
    }

    /// What the cache holds now (changes after every fill and eviction).
    pub fn stats(&self) -> watch::Receiver<CacheStats> {
        self.stats.subscribe()
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// The artifact in the cache, complete and verified: fetched from the
    /// servers unless it is there (or filling, then waited for), counted in
    /// `transfer` when this call fetches it.
    pub async fn fill(&self, a: &Artifact, transfer: &mut Transfer) -> Result<PathBuf, FetchError> {
        loop {
            let waiting = {
                let mut table = self.table();
                match table.get(&a.sha256) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(Fill::Running);
                        table.insert(a.sha256.clone(), rx);
                        Ok(FillGuard {
                            cache: self,
                            sha256: a.sha256.clone(),
                            tx,
                        })
                    }
                }
            };
            let guard = match waiting {
                Ok(guard) => guard,
                Err(mut rx) => {
                    let ended = rx
                        .wait_for(|f| *f != Fill::Running)
                        .await
                        .map(|f| f.clone());
                    match ended {
                        Ok(Fill::Done) if self.path(&a.sha256).is_file() => {
                            return Ok(self.path(&a.sha256));
                        }
                        Ok(Fill::Failed(why)) => {
                            return Err(FetchError::Server {
                                name: a.name.clone(),
                                server: "the site cache".into(),
                                offset: 0,
                                code: tonic::Code::Unavailable,
                                message: why,
                            });
                        }
                        // The filler went away: take over.
                        _ => continue,
                    }
                }
            };
            let result = self.fetch(a, transfer).await;
            if result.is_ok() {
                self.checked().insert(a.sha256.clone());
            }
            guard.tx.send_replace(match &result {
                Ok(_) => Fill::Done,
                Err(e) => Fill::Failed(e.to_string()),
            });
            drop(guard);
            self.evict();
            return result;
        }
    }

    /// Starts filling `a` in the background unless it is here or filling.
    pub fn start_fill(self: &Arc<Self>, a: Artifact) {
        if self.path(&a.sha256).is_file() || self.table().contains_key(&a.sha256) {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let mut transfer = Transfer::default();
            if let Err(e) = cache.fill(&a, &mut transfer).await {
                tracing::warn!(artifact = %a.sha256, error = %e, "cannot fill the site cache");
            }
        });
    }

    /// One fetch into the cache: linked from the host's downloads when it
    /// holds the artifact, else from the servers. The fetcher checks either.
    async fn fetch(&self, a: &Artifact, transfer: &mut Transfer) -> Result<PathBuf, FetchError> {
        let here = self.path(&a.sha256);
        let host = self.host_dir.join(&a.sha256);
        if !here.exists() && host.is_file() {
            let _ = std::fs::hard_link(&host, &here);
        }
        let source = self.uplink.source().map_err(|e| FetchError::NoServers {
            name: format!("{} ({e})", a.name),
        })?;
        fetch::fetch(&source, a, &self.dir, self.cap, &self.limits, transfer).await
    }

    /// The cached artifact `sha256` for a peer: complete (and intact), or
    /// being filled (read it as it grows). None when it is neither.
    pub async fn reader(&self, sha256: &str) -> std::io::Result<Option<Reader>> {
        let fill = self.table().get(sha256).cloned();
        let done = self.path(sha256);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match tokio::fs::File::open(&done).await {
                Ok(file) => {
                    if !self.intact(sha256).await? {
                        return Ok(None);
                    }
                    // Recently used: last to be evicted.
                    let _ = file.set_modified(SystemTime::now()).await;
                    return Ok(Some(Reader { file, fill: None }));
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            let Some(fill) = &fill else {
                return Ok(None);
            };
            match tokio::fs::File::open(self.dir.join(format!("{sha256}.part"))).await {
                Ok(file) => {
                    return Ok(Some(Reader {
                        file,
                        fill: Some(fill.clone()),
                    }));
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
            // The fill has not opened its file yet, or just renamed it.
            if *fill.borrow() != Fill::Running || tokio::time::Instant::now() >= deadline {
                if *fill.borrow() == Fill::Done {
                    continue;
                }
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Removes the least recently used artifacts while the cache holds more
    /// than its limit, sparing those being filled and those the host's own
    /// downloads hold too; then publishes what it holds. Partial files (a
    /// fill that failed keeps its bytes to resume from) count and go too:
    /// fills cut short, however many, cannot grow the cache past its limit.
    fn evict(&self) {
        let filling: Vec<String> = self.table().keys().cloned().collect();
        let mut files = cached_files(&self.dir);
        let mut bytes: u64 = files.iter().map(|f| f.size).sum();
        files.sort_by_key(|f| f.used);
        let mut count = files.iter().filter(|f| !f.partial).count();
        for f in &files {
            if bytes <= self.max_bytes {
                break;
            }
            if f.links > 1 || filling.contains(&f.sha256) {
                continue;
            }
            if std::fs::remove_file(self.dir.join(f.name())).is_ok() {
                tracing::info!(artifact = %f.sha256, bytes = f.size, partial = f.partial, "evicted from the site cache");
                bytes -= f.size;
                if !f.partial {
                    count -= 1;
                }
            }
        }
        self.stats.send_replace(CacheStats {
            files: u32::try_from(count).unwrap_or(u32::MAX),
            bytes,
        });
    }
}

/// A file in the cache: complete, or partial (`<sha256>.part`).
struct Cached {
    sha256: String,
    partial: bool,
    size: u64,
    used: SystemTime,
    links: u64,
}

impl Cached {
    fn name(&self) -> String {
        if self.partial {
            format!("{}.part", self.sha256)
        } else {
            self.sha256.clone()
        }
    }
}

fn cached_files(dir: &Path) -> Vec<Cached> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (sha256, partial) = match name.strip_suffix(".part") {
                Some(sha256) => (sha256.to_string(), true),
                None => (name, false),
            };
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let meta = e.metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            Some(Cached {
                sha256,
                partial,
                size: meta.len(),
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                links: meta.nlink(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
