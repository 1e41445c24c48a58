//! One download in progress: the `.part` file, its hash so far, the attempts that
//! stream into it, and the files already on disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Artifact;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep_until, timeout_at};

use super::rate::{RateWindow, Throttle};
use super::{ArtifactSource, FetchError, FetchLimits};

/// Read buffer when hashing a file already on disk.
const HASH_BUFFER: usize = 1 << 20;

/// How an attempt ended badly: worth another attempt, or not.
pub(super) enum Failure {
    Retry(FetchError),
    Fatal(FetchError),
}

/// True if `path` holds the artifact, complete and with the right digest. A file of
/// the wrong size or digest is removed.
pub(super) async fn complete_file(path: &Path, artifact: &Artifact) -> std::io::Result<bool> {
    match tokio::fs::metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
        Ok(meta) if meta.len() == artifact.size => {
            let (hasher, _) = hash_file(path.to_path_buf()).await?;
            if hex::encode(hasher.finalize()) == artifact.sha256 {
                return Ok(true);
            }
        }
        Ok(_) => {}
    }
    tracing::warn!(path = %path.display(), "removing a downloaded artifact that does not match its manifest");
    tokio::fs::remove_file(path).await?;
    Ok(false)
}

/// Hashes a file on a blocking thread: (hasher fed with its bytes, its length).
pub(super) async fn hash_file(path: PathBuf) -> std::io::Result<(Sha256, u64)> {
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_BUFFER];
        let mut len = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => result?,
            };
            if n == 0 {
                return Ok((hasher, len));
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// One download in progress: the `.part` file, its hash so far, its length.
pub(super) struct Download<'a> {
    artifact: &'a Artifact,
    part: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    pub(super) received: u64,
    /// Whether the bytes so far include some found on disk at the start.
    pub(super) from_disk: bool,
}

impl<'a> Download<'a> {
    /// Opens `part`, resuming from what it holds unless that is longer than the
    /// artifact.
    pub(super) async fn open(artifact: &'a Artifact, part: PathBuf) -> Result<Self, FetchError> {
        let io = |action: &'static str| {
            let (name, path) = (artifact.name.clone(), part.clone());
            move |source| FetchError::Io {
                name,
                action,
                path,
                source,
            }
        };
        let (hasher, received) = match tokio::fs::metadata(&part).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Sha256::new(), 0),
            Err(e) => return Err(io("check")(e)),
            Ok(meta) if meta.len() > artifact.size => {
                tracing::warn!(path = %part.display(), "partial download is longer than the artifact; starting over");
                tokio::fs::remove_file(&part).await.map_err(io("remove"))?;
                (Sha256::new(), 0)
            }
            Ok(_) => hash_file(part.clone()).await.map_err(io("read"))?,
        };
        if received > 0 {
            tracing::info!(artifact = %artifact.name, offset = received, "resuming a partial download");
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(io("open"))?;
        Ok(Self {
            artifact,
            part,
            file,
            hasher,
            received,
            from_disk: received > 0,
        })
    }

    fn io_error(&self, action: &'static str, source: std::io::Error) -> FetchError {
        FetchError::Io {
            name: self.artifact.name.clone(),
            action,
            path: self.part.clone(),
            source,
        }
    }

    /// One request to `server`, streamed to the file until it ends or fails.
    pub(super) async fn attempt(
        &mut self,
        source: &dyn ArtifactSource,
        server: usize,
        limits: &FetchLimits,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let a = self.artifact;
        let describe = || source.describe(server);
        let mut rate = RateWindow::new(limits, Instant::now());
        let mut throttle = Throttle::new(limits.max_rate, Instant::now());
        let by = |rate: &RateWindow| {
            rate.read_by(Instant::now())
                .map_or(deadline, |t| t.min(deadline))
        };
        let offset = self.received;
        let opened = timeout_at(by(&rate), source.fetch(server, &a.sha256, offset)).await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(status)) => return Err(Failure::Retry(self.status(describe(), &status))),
            Err(_) => return Err(self.stalled(&mut rate, deadline, limits, describe())),
        };
        loop {
            let chunk = match timeout_at(by(&rate), stream.message()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) if self.received == a.size => return Ok(()),
                Ok(Ok(None)) => {
                    return Err(Failure::Retry(FetchError::Truncated {
                        name: a.name.clone(),
                        server: describe(),
                        received: self.received,
                        size: a.size,
                    }));
                }
                Ok(Err(status)) => return Err(Failure::Retry(self.status(describe(), &status))),
                Err(_) => return Err(self.stalled(&mut rate, deadline, limits, describe())),
            };
            if chunk.offset != self.received {
                return Err(Failure::Retry(FetchError::Protocol {
                    name: a.name.clone(),
                    server: describe(),
                    expected: self.received,
                    got: chunk.offset,
                }));
            }
            let len = chunk.data.len() as u64;
            if a.size - self.received < len {
                return Err(Failure::Fatal(FetchError::Oversized {
                    name: a.name.clone(),
                    server: describe(),
                    size: a.size,
                }));
            }
            self.file
                .write_all(&chunk.data)
                .await
                .map_err(|e| Failure::Fatal(self.io_error("write", e)))?;
            self.hasher.update(&chunk.data);
            self.received += len;
            let now = Instant::now();
            rate.record(now, len);
            if let Err(bytes) = rate.check(now) {
                return Err(Failure::Retry(self.too_slow(
                    &rate,
                    bytes,
                    limits,
                    describe(),
                )));
            }
            if let Some(until) = throttle.after(now, len) {
                sleep_until(until.min(deadline)).await;
            }
        }
    }

    /// An error for a failed request or stream.
    fn status(&self, server: String, status: &tonic::Status) -> FetchError {
        FetchError::Server {
            name: self.artifact.name.clone(),
            server,
            offset: self.received,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Nothing arrived in time: the deadline passed, or a whole window went by.
    fn stalled(
        &self,
        rate: &mut RateWindow,
        deadline: Instant,
        limits: &FetchLimits,
        server: String,
    ) -> Failure {
        let now = Instant::now();
        if now >= deadline {
            return Failure::Fatal(FetchError::DeadlineExceeded {
                name: self.artifact.name.clone(),
                deadline: limits.deadline,
                received: self.received,
                size: self.artifact.size,
            });
        }
        let bytes = rate.check(now).err().unwrap_or(0);
        Failure::Retry(self.too_slow(rate, bytes, limits, server))
    }

    fn too_slow(
        &self,
        rate: &RateWindow,
        bytes: u64,
        limits: &FetchLimits,
        server: String,
    ) -> FetchError {
        FetchError::TooSlow {
            name: self.artifact.name.clone(),
            server,
            rate: rate.rate(bytes),
            min_rate: limits.min_rate,
            window: limits.rate_window,
        }
    }

    /// Makes what was received durable, so the resume offset is real.
    pub(super) async fn sync(&mut self) -> Result<(), FetchError> {
        self.file
            .flush()
            .await
            .map_err(|e| self.io_error("write", e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| self.io_error("sync", e))
    }

    /// With every byte in: `Ok(Ok(()))` once the file is verified, synced and renamed
    /// to `done`; `Ok(Err(actual digest))` if the digest is wrong (nothing moved).
    pub(super) async fn finish(
        &mut self,
        done: &Path,
        dir: &Path,
    ) -> Result<Result<(), String>, FetchError> {
        let actual = hex::encode(self.hasher.clone().finalize());
        if actual != self.artifact.sha256 {
            return Ok(Err(actual));
        }
        self.sync().await?;
        let dir_error = |action: &'static str| {
            let (name, path) = (self.artifact.name.clone(), dir.to_path_buf());
            move |source| FetchError::Io {
                name,
                action,
                path,
                source,
            }
        };
        tokio::fs::rename(&self.part, done)
            .await
            .map_err(dir_error("move the download into"))?;
        let handle = tokio::fs::File::open(dir)
            .await
            .map_err(dir_error("open"))?;
        handle.sync_all().await.map_err(dir_error("sync"))?;
        Ok(Ok(()))
    }

    /// Empties the file to download from the start.
    pub(super) async fn restart(&mut self) -> Result<(), FetchError> {
        self.file
            .set_len(0)
            .await
            .map_err(|e| self.io_error("truncate", e))?;
        self.hasher = Sha256::new();
        self.received = 0;
        self.from_disk = false;
        Ok(())
    }

    /// Deletes the partial file (its bytes are known bad).
    pub(super) async fn discard(&mut self) {
        if let Err(e) = tokio::fs::remove_file(&self.part).await {
            tracing::warn!(path = %self.part.display(), error = %e, "cannot delete a bad partial download");
        }
    }
}
