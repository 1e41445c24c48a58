//! The artifact fetcher: a streamed, resumable, size-capped download, hashed as it
//! arrives, failing over between servers.
//!
//! Bytes go to `<dir>/<sha256>.part`; a partial file left by an earlier broken
//! download (even one cut by a crash) is hashed once and the download resumes from
//! its end. Only a complete file whose SHA-256 matches the manifest is renamed to
//! `<dir>/<sha256>`. A server that sends more than declared, or bytes with the wrong
//! digest, is not retried; one that stalls, trickles or breaks off is, on the next
//! server, from where the download stands. Two fetches of the same artifact into
//! the same directory must not run at once.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use flotilla_proto::manifest::Artifact;
use flotilla_proto::pb::{self, agent_service_client::AgentServiceClient};
use flotilla_proto::transfer::Transfer;
use tokio::time::{Instant, sleep_until};
use tonic::transport::Channel;

use crate::backoff::Backoff;
use download::{Download, Failure, complete_file};

mod download;
mod rate;
#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

/// Ceiling of the first delay between attempts.
const RETRY_BASE: Duration = Duration::from_millis(250);
/// Cap on the delay between attempts.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// Downloads in flight in one process. A host's agent fetches one artifact at a
/// time; a process that runs thousands of agents (the fleet simulator) would
/// otherwise run out of descriptors, each download holding its file and, at the
/// end, its directory open.
static IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1024);

/// A boxed, sendable future (what [`ArtifactSource::fetch`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long and how slowly a download may go on.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The whole download, from the first request.
    pub deadline: Duration,
    /// Bytes per second an attempt must keep up (0: no floor).
    pub min_rate: u64,
    /// The window `min_rate` is judged over; also the longest wait for any chunk.
    pub rate_window: Duration,
    /// Attempts in all, over all servers.
    pub max_attempts: u32,
    /// Most bytes per second a download may take (0: no limit): the host's
    /// share of a thin uplink.
    pub max_rate: u64,
    /// Ceiling of the first wait before a download that failed for a reason
    /// that may pass is tried again; it doubles up to [`RETRY_ROUND_CAP`].
    pub retry_after: Duration,
}

/// Cap on the wait between two tries of a download that keeps failing.
pub const RETRY_ROUND_CAP: Duration = Duration::from_secs(300);

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30 * 60),
            min_rate: 1024,
            rate_window: Duration::from_secs(10),
            max_attempts: 6,
            max_rate: 0,
            retry_after: Duration::from_secs(5),
        }
    }
}

impl FetchLimits {
    /// The limits for an artifact of `size` bytes. Under a rate limit, the
    /// deadline grows to at least twice the time the limit itself needs (plus a
    /// minute), and the minimum rate falls to at most half the limit: a slow
    /// download stays bounded, and the limit alone never fails one.
    pub fn for_size(&self, size: u64) -> Self {
        let mut limits = self.clone();
        if self.max_rate > 0 {
            let needed = Duration::from_secs(size.div_ceil(self.max_rate));
            limits.deadline = self
                .deadline
                .max(needed.saturating_mul(2) + Duration::from_secs(60));
            limits.min_rate = self.min_rate.min(self.max_rate / 2);
        }
        limits
    }
}

/// Where artifacts come from: one or more servers, each able to stream an artifact
/// from an offset.
pub trait ArtifactSource: Send + Sync {
    /// Opens the stream of artifact `sha256` from `offset` on server `server`
    /// (`0..servers()`).
    fn fetch(
        &self,
        server: usize,
        sha256: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<tonic::Streaming<pb::ArtifactChunk>, tonic::Status>>;
    /// How many servers there are.
    fn servers(&self) -> usize;
    /// A server's name for messages (its URL).
    fn describe(&self, server: usize) -> String;
    /// Whether these are a site's peers rather than the fleet's servers (their
    /// bytes are counted apart).
    fn is_peer(&self) -> bool {
        false
    }
}

/// An [`ArtifactSource`] over gRPC clients, one per server (with whatever TLS their
/// channels carry).
#[derive(Clone)]
pub struct ClientSource {
    servers: Vec<(String, AgentServiceClient<Channel>)>,
}

impl ClientSource {
    /// Servers as (URL, client), tried in this order.
    pub fn new(servers: Vec<(String, AgentServiceClient<Channel>)>) -> Self {
        Self { servers }
    }
}

impl ArtifactSource for ClientSource {
    fn fetch(
        &self,
        server: usize,
        sha256: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<tonic::Streaming<pb::ArtifactChunk>, tonic::Status>> {
        let client = self.servers.get(server).map(|(_, c)| c.clone());
        let request = pb::FetchArtifactRequest {
            sha256: sha256.to_string(),
            offset,
        };
        Box::pin(async move {
            let mut client = client
                .ok_or_else(|| tonic::Status::invalid_argument(format!("no server {server}")))?;
            Ok(client.fetch_artifact(request).await?.into_inner())
        })
    }

    fn servers(&self) -> usize {
        self.servers.len()
    }

    fn describe(&self, server: usize) -> String {
        self.servers
            .get(server)
            .map_or_else(|| format!("server #{server}"), |(url, _)| url.clone())
    }
}

/// Why an artifact could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("artifact {name}: sha256 {sha256:?} is not 64 lower-case hex characters")]
    BadDigest { name: String, sha256: String },
    #[error(
        "artifact {name} declares {size} bytes; this host accepts at most {cap} (raise the agent's artifact size cap to allow it)"
    )]
    TooLarge { name: String, size: u64, cap: u64 },
    #[error("artifact {name}: no server to fetch it from")]
    NoServers { name: String },
    #[error("artifact {name}: cannot {action} {path}: {source}")]
    Io {
        name: String,
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact {name} from {server}, at byte {offset}: {code:?}: {message}")]
    Server {
        name: String,
        server: String,
        offset: u64,
        code: tonic::Code,
        message: String,
    },
    #[error("artifact {name} from {server}: chunk at offset {got}, expected {expected}")]
    Protocol {
        name: String,
        server: String,
        expected: u64,
        got: u64,
    },
    #[error("artifact {name} from {server}: stream ended after {received} of {size} bytes")]
    Truncated {
        name: String,
        server: String,
        received: u64,
        size: u64,
    },
    #[error(
        "artifact {name} from {server}: more bytes than the declared {size}; partial download deleted"
    )]
    Oversized {
        name: String,
        server: String,
        size: u64,
    },
    #[error(
        "artifact {name}: sha256 is {actual} but the manifest says {expected}; download deleted (bytes from {from})"
    )]
    DigestMismatch {
        name: String,
        expected: String,
        actual: String,
        /// Who sent the bytes (the last source of the download).
        from: String,
    },
    #[error(
        "artifact {name}: not complete within {deadline:?}; {received} of {size} bytes received"
    )]
    DeadlineExceeded {
        name: String,
        deadline: Duration,
        received: u64,
        size: u64,
    },
    #[error(
        "artifact {name} from {server}: {rate} bytes/s over the last {window:?}, below the minimum of {min_rate} bytes/s"
    )]
    TooSlow {
        name: String,
        server: String,
        rate: u64,
        min_rate: u64,
        window: Duration,
    },
}

/// The SHA-256 (lower-case hex) and length of the file at `path`, read on a
/// blocking thread with the buffer and hasher the fetcher checks a resumed or
/// already complete download with (benchmarks time this path).
pub async fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    let (hasher, len) = download::hash_file(path.to_path_buf()).await?;
    Ok((hex::encode(hasher.finalize()), len))
}

impl FetchError {
    /// True when trying again later may go through: the network, a server or
    /// peer that was down, slow or cut off. False when the same request would
    /// fail the same way: the manifest's artifact refused here, bytes that are
    /// not the signed ones from the server itself, a local disk error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::BadDigest { .. }
            | Self::TooLarge { .. }
            | Self::NoServers { .. }
            | Self::Io { .. }
            | Self::Oversized { .. }
            | Self::DigestMismatch { .. } => false,
            // A request the server calls malformed will stay malformed; any
            // other answer (unavailable, not found on this replica yet,
            // overloaded, a certificate being renewed) may change.
            Self::Server { code, .. } => *code != tonic::Code::InvalidArgument,
            Self::Protocol { .. }
            | Self::Truncated { .. }
            | Self::DeadlineExceeded { .. }
            | Self::TooSlow { .. } => true,
        }
    }

    /// True for a local disk that is full (space may be freed).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// Fetches `artifact` into `dir` (created if missing) and returns the path of the
/// complete, verified file, `<dir>/<sha256>`. Refuses an artifact declared larger
/// than `cap` before asking any server. Each attempt is counted in `transfer`
/// (with why it failed) and so is every byte received.
pub async fn fetch(
    source: &dyn ArtifactSource,
    artifact: &Artifact,
    dir: &Path,
    cap: u64,
    limits: &FetchLimits,
    transfer: &mut Transfer,
) -> Result<PathBuf, FetchError> {
    let name = artifact.name.clone();
    let sha = &artifact.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(FetchError::BadDigest {
            name,
            sha256: sha.clone(),
        });
    }
    if artifact.size > cap {
        return Err(FetchError::TooLarge {
            name,
            size: artifact.size,
            cap,
        });
    }
    let io = |action: &'static str, path: &Path| {
        let (name, path) = (name.clone(), path.to_path_buf());
        move |source| FetchError::Io {
            name,
            action,
            path,
            source,
        }
    };
    let _slot = IN_FLIGHT
        .acquire()
        .await
        .expect("the semaphore is never closed");
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io("create directory", dir))?;
    let done = dir.join(sha);
    if complete_file(&done, artifact)
        .await
        .map_err(io("check", &done))?
    {
        tracing::debug!(artifact = %name, path = %done.display(), "artifact already downloaded");
        return Ok(done);
    }
    let servers = source.servers();
    if servers == 0 {
        return Err(FetchError::NoServers { name });
    }

    let limits = &limits.for_size(artifact.size);
    let mut dl = Download::open(artifact, dir.join(format!("{sha}.part"))).await?;
    let deadline = Instant::now() + limits.deadline;
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let mut server = 0;
    let mut last_server = 0;
    let mut attempts = 0;
    let mut last = None;
    loop {
        if dl.received == artifact.size {
            match dl.finish(&done, dir).await? {
                Ok(()) => {
                    tracing::info!(artifact = %name, bytes = artifact.size, "artifact downloaded and verified");
                    return Ok(done);
                }
                Err(actual) if dl.from_disk => {
                    // The bytes found on disk may be what is wrong (a torn write
                    // before a crash): start over once from the servers.
                    tracing::warn!(artifact = %name, %actual, "resumed download has the wrong digest; starting over");
                    dl.restart().await?;
                    continue;
                }
                Err(actual) => {
                    dl.discard().await;
                    let e = FetchError::DigestMismatch {
                        name,
                        expected: sha.clone(),
                        actual,
                        from: source.describe(last_server),
                    };
                    transfer.failed(&e.to_string());
                    return Err(e);
                }
            }
        }
        if attempts >= limits.max_attempts.max(1) {
            dl.sync().await?;
            return Err(last.unwrap_or(FetchError::NoServers { name }));
        }
        if attempts > 0 {
            sleep_until((Instant::now() + backoff.next_delay()).min(deadline)).await;
        }
        attempts += 1;
        let before = dl.received;
        let result = dl.attempt(source, server, limits, deadline).await;
        let got = dl.received.saturating_sub(before);
        if got > 0 {
            last_server = server;
        }
        if source.is_peer() {
            transfer.peer_bytes += got;
        } else {
            transfer.server_bytes += got;
        }
        match result {
            Ok(()) => transfer.succeeded(),
            Err(Failure::Retry(e)) => {
                transfer.failed(&e.to_string());
                tracing::warn!(artifact = %name, attempt = attempts, error = %e, "artifact download attempt failed");
                dl.sync().await?;
                last = Some(e);
                server = (server + 1) % servers;
            }
            Err(Failure::Fatal(e)) => {
                transfer.failed(&e.to_string());
                if matches!(e, FetchError::Oversized { .. }) {
                    dl.discard().await;
                } else {
                    dl.sync().await?;
                }
                return Err(e);
            }
        }
    }
}
