//! Serving an artifact's bytes as a stream of chunks from an offset (to an
//! agent, or to another replica): from memory when it is small, from disk
//! otherwise, through a small channel so a slow reader holds little.

use flotilla_proto::limits;
use flotilla_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::artifacts::ArtifactStore;
use crate::handoff::Handed;

pub type ChunkStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

/// Where an artifact download's bytes come from.
enum Body {
    /// Held in memory: chunks are slices of it.
    Memory(prost::bytes::Bytes),
    /// Too large to hold: read from disk (already at the request's offset).
    File(tokio::fs::File),
}

impl Body {
    /// Up to `max` bytes at `offset`; empty at the end.
    async fn read(&mut self, offset: u64, max: usize) -> std::io::Result<prost::bytes::Bytes> {
        match self {
            Body::Memory(b) => {
                let start = (offset as usize).min(b.len());
                Ok(b.slice(start..(start + max).min(b.len())))
            }
            Body::File(f) => {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; max];
                let n = f.read(&mut buf).await?;
                buf.truncate(n);
                Ok(buf.into())
            }
        }
    }
}

/// How long a stream waits for its reader to take the next chunk: a reader
/// that stops reading (while still answering HTTP/2 pings) gives back what
/// the stream holds — an open file, its places — instead of keeping it.
const SEND_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// The complete artifact `sha256` from `offset` on; `held` (places in the
/// downloads at once: the site's, the node's) is kept until the stream ends.
pub async fn serve(
    artifacts: &ArtifactStore,
    sha256: &str,
    offset: u64,
    held: impl Send + 'static,
) -> Result<ChunkStream, Status> {
    serve_within(artifacts, sha256, offset, held, SEND_WITHIN).await
}

/// [`serve`], a reader that takes no chunk for `send_within` ending it.
async fn serve_within(
    artifacts: &ArtifactStore,
    sha256: &str,
    offset: u64,
    held: impl Send + 'static,
    send_within: std::time::Duration,
) -> Result<ChunkStream, Status> {
    let (mut body, len) = match artifacts.in_memory(sha256).await? {
        Some(bytes) => {
            let len = bytes.len() as u64;
            (Body::Memory(bytes), len)
        }
        None => {
            let path = artifacts.path(sha256);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|_| Status::not_found(format!("no artifact with sha256 {sha256}")))?;
            let len = file
                .metadata()
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .len();
            (Body::File(file), len)
        }
    };
    if offset > len {
        return Err(Status::out_of_range(format!(
            "offset {} is past the artifact's end ({len} bytes)",
            offset
        )));
    }
    if let Body::File(file) = &mut body {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    tracing::debug!(%sha256, offset, "artifact fetch");

    #[cfg(feature = "fault-injection")]
    mod fault {
        //! TEST-ONLY fault injection (cargo feature `fault-injection`, never in a
        //! shipped build): `FLOTILLA_FAULT_ARTIFACT_RATE` (bytes/s) throttles every
        //! artifact stream; `FLOTILLA_FAULT_ARTIFACT_CUT_AFTER` (bytes) breaks the
        //! first stream this process serves with `Unavailable` after that many
        //! bytes; `FLOTILLA_FAULT_ARTIFACT_REFUSE_FIRST` (count) answers that many
        //! first requests with `Unavailable`, as a server that is briefly down.
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::Duration;

        static CUT_DONE: AtomicBool = AtomicBool::new(false);
        static REFUSED: AtomicU64 = AtomicU64::new(0);

        /// `Unavailable` for the first requests, as configured.
        pub fn refuse() -> Result<(), tonic::Status> {
            let Some(first) = env("FLOTILLA_FAULT_ARTIFACT_REFUSE_FIRST") else {
                return Ok(());
            };
            let n = REFUSED.fetch_add(1, Ordering::SeqCst);
            if n < first {
                tracing::warn!(
                    request = n + 1,
                    of = first,
                    "fault injection: refusing an artifact fetch"
                );
                return Err(tonic::Status::unavailable("fault injection: refused"));
            }
            Ok(())
        }

        fn env(name: &str) -> Option<u64> {
            std::env::var(name).ok()?.trim().parse().ok()
        }

        pub struct Faults {
            rate: Option<u64>,
            cut_left: Option<u64>,
        }

        impl Faults {
            pub fn for_stream() -> Self {
                let rate = env("FLOTILLA_FAULT_ARTIFACT_RATE").filter(|r| *r > 0);
                let cut_left = env("FLOTILLA_FAULT_ARTIFACT_CUT_AFTER")
                    .filter(|_| !CUT_DONE.swap(true, Ordering::SeqCst));
                if rate.is_some() || cut_left.is_some() {
                    tracing::warn!(?rate, ?cut_left, "fault injection: artifact stream");
                }
                Self { rate, cut_left }
            }

            /// How many bytes to read next, or the cut.
            pub fn next_len(&self, max: usize) -> Result<usize, tonic::Status> {
                let mut n = max as u64;
                if let Some(rate) = self.rate {
                    n = n.min((rate / 10).max(1));
                }
                if let Some(left) = self.cut_left {
                    if left == 0 {
                        tracing::warn!("fault injection: cutting the artifact stream");
                        return Err(tonic::Status::unavailable("fault injection: cut"));
                    }
                    n = n.min(left);
                }
                Ok(n as usize)
            }

            /// Accounts `n` bytes read, sleeping as long as they take at the rate.
            pub async fn sent(&mut self, n: usize) {
                if let Some(left) = self.cut_left.as_mut() {
                    *left = left.saturating_sub(n as u64);
                }
                if let Some(rate) = self.rate {
                    let nanos = (n as u128 * 1_000_000_000 / u128::from(rate)) as u64;
                    tokio::time::sleep(Duration::from_nanos(nanos)).await;
                }
            }
        }
    }
    #[cfg(feature = "fault-injection")]
    fault::refuse()?;
    #[cfg(feature = "fault-injection")]
    let mut faults = fault::Faults::for_stream();

    // A small channel bounds what a slow downloader holds on the server.
    let (tx, rx) = mpsc::channel(2);
    let meter = artifacts.meter.clone();
    let sha256 = sha256.to_string();
    tokio::spawn(async move {
        let _held = held;
        let mut offset = offset;
        let chunk = meter.chunk(limits::ARTIFACT_CHUNK_BYTES);
        loop {
            #[cfg(feature = "fault-injection")]
            let want = match faults.next_len(chunk) {
                Ok(n) => n,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            };
            #[cfg(not(feature = "fault-injection"))]
            let want = chunk;
            match body.read(offset, want).await {
                Ok(data) if data.is_empty() => break,
                Ok(data) => {
                    let n = data.len();
                    meter.send(&sha256, n).await;
                    #[cfg(feature = "fault-injection")]
                    faults.sent(n).await;
                    let chunk = pb::ArtifactChunk { offset, data };
                    offset += n as u64;
                    match crate::handoff::hand(&tx, Ok(chunk), send_within).await {
                        Handed::Taken => {}
                        Handed::ReaderGone => break,
                        Handed::Stalled => {
                            tracing::info!(%sha256, offset, "an artifact download stopped reading; ending it");
                            break;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    break;
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::Body;
    use std::time::Duration;
    use tokio_stream::StreamExt;

    /// Reads `body` to its end from `offset` in chunks of `max`.
    async fn read_all(mut body: Body, mut offset: u64, max: usize) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            let data = body.read(offset, max).await.unwrap();
            if data.is_empty() {
                return chunks;
            }
            offset += data.len() as u64;
            chunks.push(data.to_vec());
        }
    }

    #[tokio::test]
    async fn memory_and_file_bodies_give_the_same_chunks_from_an_offset() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifact");
        std::fs::write(&path, &bytes).unwrap();
        let held = read_all(Body::Memory(bytes.clone().into()), 100, 256).await;
        let mut file = tokio::fs::File::open(&path).await.unwrap();
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(100)).await.unwrap();
        let from_disk = read_all(Body::File(file), 100, 256).await;
        assert_eq!(held, from_disk);
        assert_eq!(
            held.iter().map(Vec::len).collect::<Vec<_>>(),
            [256, 256, 256, 132]
        );
        assert_eq!(held.concat(), bytes[100..]);
        // At the end (a resume of a complete download): nothing, not an error.
        assert!(
            read_all(Body::Memory(bytes.into()), 1000, 256)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_download_whose_reader_stops_reading_ends_and_gives_back_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::artifacts::ArtifactStore::open(dir.path()).unwrap();
        // Past the 8 MiB held in memory: served from an open file.
        let sha = "ab".repeat(32);
        let len = 9 << 20;
        std::fs::write(store.path(&sha), vec![7u8; len]).unwrap();
        // The places a download holds: given back when the sender is dropped.
        let (held, given_back) = tokio::sync::oneshot::channel::<()>();
        let mut stream = super::serve_within(&store, &sha, 0, held, Duration::from_millis(200))
            .await
            .unwrap();
        // Never read while the deadline passes (the test's own limit is far
        // longer: only that it ends is checked).
        let ended = tokio::time::timeout(Duration::from_secs(30), given_back).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the stalled download still holds its places"
        );
        // What was queued before it ended is still delivered, then the end:
        // a cut short download, which the agent resumes from its offset.
        let mut got = 0;
        while let Some(chunk) = stream.next().await {
            got += chunk.unwrap().data.len();
        }
        assert!(got > 0 && got < len, "{got} of {len} bytes");
    }
}
