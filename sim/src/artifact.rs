//! Artifact benchmarks: the agent's own hashing path over a file, many agents
//! downloading one artifact at once through the agent's fetcher (mutual TLS,
//! streamed, hashed while it arrives, written and fsynced), and the baseline for
//! the latter: the same bytes over plain loopback TCP (`raw-serve` / `raw-fetch`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_agent::patch::fetch::{self, ClientSource, FetchLimits};
use flotilla_proto::manifest::Artifact;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::fleet::Fleet;
use crate::procstat::{self, ProcSample, Target};
use crate::stats::Summary;

/// Read and write buffer of the raw copy (socat's default is 8 KiB; larger is
/// kinder to the baseline).
const RAW_BUFFER: usize = 64 << 10;

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1 << 20) as f64 / secs
    } else {
        0.0
    }
}

#[derive(Debug, Serialize)]
pub struct HashReport {
    pub file: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub matches: Option<bool>,
    /// Seconds of each run, in order.
    pub runs_secs: Vec<f64>,
    pub best_mib_per_s: f64,
    pub median_mib_per_s: f64,
    /// Whether this CPU has the SHA extensions (sha2 picks them at run time).
    pub cpu_sha_ni: bool,
}

/// Hashes `file` `repeat` times with the agent's digest routine.
pub async fn hash(file: &Path, expect: Option<&str>, repeat: u32) -> anyhow::Result<HashReport> {
    let mut runs = Vec::new();
    let mut digest = (String::new(), 0);
    for _ in 0..repeat.clamp(1, 20) {
        let t = Instant::now();
        digest = fetch::file_sha256(file)
            .await
            .with_context(|| format!("cannot hash {}", file.display()))?;
        runs.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let bytes = digest.1;
    Ok(HashReport {
        file: file.to_path_buf(),
        bytes,
        matches: expect.map(|e| e.eq_ignore_ascii_case(&digest.0)),
        sha256: digest.0,
        best_mib_per_s: mib_per_s(bytes, sorted[0]),
        median_mib_per_s: mib_per_s(bytes, sorted[sorted.len() / 2]),
        runs_secs: runs,
        cpu_sha_ni: cpu_sha_ni(),
    })
}

#[derive(Debug, Serialize)]
pub struct RebuildReport {
    pub delta_bytes: u64,
    pub target_bytes: u64,
    pub target_sha256: String,
    /// Seconds of each rebuild, in order.
    pub runs_secs: Vec<f64>,
    /// Of the rebuilt artifact, per second of the median run.
    pub median_mib_per_s: f64,
}

/// Rebuilds `target` (its digest and size taken from the file) from `delta`
/// and `base` `repeat` times with the agent's delta routine, into a temp dir.
pub async fn rebuild(
    base: &Path,
    delta: &Path,
    target: &Path,
    repeat: u32,
) -> anyhow::Result<RebuildReport> {
    let (base_sha, _) = fetch::file_sha256(base)
        .await
        .with_context(|| format!("cannot hash {}", base.display()))?;
    let (sha256, size) = fetch::file_sha256(target)
        .await
        .with_context(|| format!("cannot hash {}", target.display()))?;
    let delta_bytes = std::fs::metadata(delta)
        .with_context(|| format!("cannot read {}", delta.display()))?
        .len();
    let artifact = Artifact {
        name: "target".into(),
        sha256: sha256.clone(),
        size,
    };
    // Beside the target (same filesystem), removed after each run.
    let out = target.with_extension("rebuilt.d");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut runs = Vec::new();
    for _ in 0..repeat.clamp(1, 20) {
        let t = Instant::now();
        let rebuilt =
            flotilla_agent::patch::delta::rebuild(base, &base_sha, delta, &artifact, &out)
                .await
                .context("rebuild")?;
        runs.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(rebuilt)?;
    }
    std::fs::remove_dir(&out)?;
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(RebuildReport {
        delta_bytes,
        target_bytes: size,
        target_sha256: sha256,
        median_mib_per_s: mib_per_s(size, sorted[sorted.len() / 2]),
        runs_secs: runs,
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_sha_ni() -> bool {
    std::arch::is_x86_feature_detected!("sha")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_sha_ni() -> bool {
    false
}

#[derive(Debug, Default, Serialize)]
pub struct FetchReport {
    pub downloads: usize,
    pub ok: usize,
    pub errors: Vec<String>,
    pub bytes: u64,
    pub wall_secs: f64,
    pub mib_per_s: f64,
    pub per_download: Option<Summary>,
    pub server_cpu_ms: Option<u64>,
    pub client_cpu_ms: Option<u64>,
}

/// Every agent of `fleet` (already enrolled) downloads `artifact` at once through
/// the agent's fetcher into its own directory under `out_dir`; each file is
/// removed once complete. Bounded by `timeout`.
pub async fn fetch_all(
    fleet: &Fleet,
    servers: &[String],
    artifact: Artifact,
    out_dir: &Path,
    server: Option<&Target>,
    timeout: Duration,
) -> anyhow::Result<FetchReport> {
    let url = servers.first().context("no server")?.clone();
    let mut jobs = Vec::new();
    for (i, store) in fleet.stores() {
        let id = store
            .identity()?
            .with_context(|| format!("agent {i} has no identity"))?;
        let endpoint =
            flotilla_proto::tls::endpoint(&url, &id.ca_pem, Some((&id.cert_pem, &id.key_pem)))?;
        let client = AgentServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES);
        jobs.push((i, ClientSource::new(vec![(url.clone(), client)])));
    }
    let before = cpu_samples(server);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, source) in jobs {
        let (a, dir) = (artifact.clone(), out_dir.join(format!("a{i}")));
        set.spawn(async move {
            let t = Instant::now();
            let limits = FetchLimits::default();
            let done =
                fetch::fetch(&source, &a, &dir, a.size, &limits, &mut Default::default()).await;
            let took = t.elapsed();
            let _ = tokio::fs::remove_dir_all(&dir).await;
            (i, took, done.map(|_| a.size).map_err(|e| e.to_string()))
        });
    }
    let names = Names {
        who: "agent",
        one: "download",
        many: "downloads",
    };
    Ok(gather(set, names, started, timeout, server, before).await)
}

/// What a transfer run calls its parties in error messages.
struct Names {
    who: &'static str,
    one: &'static str,
    many: &'static str,
}

/// The server's and this process's CPU counters now.
fn cpu_samples(server: Option<&Target>) -> (Option<ProcSample>, Option<ProcSample>) {
    (
        server.and_then(Target::sample),
        procstat::sample(std::process::id()),
    )
}

/// Waits for the transfers in `set` (index, time taken, bytes or error) until
/// `timeout` after `started`, aborts the rest, and reports them with the CPU
/// both sides spent since `before`.
async fn gather(
    mut set: JoinSet<(usize, Duration, Result<u64, String>)>,
    names: Names,
    started: Instant,
    timeout: Duration,
    server: Option<&Target>,
    before: (Option<ProcSample>, Option<ProcSample>),
) -> FetchReport {
    let deadline = started + timeout;
    let mut r = FetchReport::default();
    let mut times = Vec::new();
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        r.downloads += 1;
        match done {
            Ok((_, took, Ok(n))) => {
                r.ok += 1;
                r.bytes += n;
                times.push(took.as_millis() as i64);
            }
            Ok((i, _, Err(e))) => r.errors.push(format!("{} {i}: {e}", names.who)),
            Err(e) => r.errors.push(format!("a {} task failed: {e}", names.one)),
        }
    }
    if !set.is_empty() {
        r.errors.push(format!(
            "{} {} did not finish within {timeout:?}",
            set.len(),
            names.many
        ));
        set.abort_all();
    }
    r.wall_secs = started.elapsed().as_secs_f64();
    r.mib_per_s = mib_per_s(r.bytes, r.wall_secs);
    r.per_download = Summary::of(&times);
    let after = cpu_samples(server);
    r.server_cpu_ms = cpu_delta(&before.0, &after.0);
    r.client_cpu_ms = cpu_delta(&before.1, &after.1);
    r
}

fn cpu_delta(a: &Option<ProcSample>, b: &Option<ProcSample>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) if a.pid == b.pid => Some(b.cpu_ms.saturating_sub(a.cpu_ms)),
        _ => None,
    }
}

/// Serves `file` to every connection on `listener`, whole, then closes it; stops
/// after `max_connections` or `timeout`.
pub async fn raw_serve(
    listener: tokio::net::TcpListener,
    file: PathBuf,
    max_connections: usize,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut set = JoinSet::new();
    let mut accepted = 0;
    while accepted < max_connections {
        let Ok(conn) = tokio::time::timeout_at(deadline, listener.accept()).await else {
            break;
        };
        let (mut sock, _) = conn?;
        accepted += 1;
        let file = file.clone();
        set.spawn(async move {
            let mut f = tokio::fs::File::open(&file).await?;
            let mut buf = vec![0u8; RAW_BUFFER];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                sock.write_all(&buf[..n]).await?;
            }
            sock.shutdown().await
        });
    }
    let mut failed = 0;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        if !matches!(r, Ok(Ok(()))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {accepted} raw copies failed");
    }
    Ok(accepted)
}

/// `clients` connections to `addr` at once, each reading everything into its own
/// file under `out_dir` (fsynced, then removed), as the agent's fetcher writes.
pub async fn raw_fetch(
    addr: &str,
    clients: usize,
    out_dir: &Path,
    server: Option<&Target>,
    timeout: Duration,
) -> anyhow::Result<FetchReport> {
    tokio::fs::create_dir_all(out_dir).await?;
    let before = cpu_samples(server);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..clients {
        let (addr, path) = (addr.to_string(), out_dir.join(format!("c{i}")));
        set.spawn(async move {
            let t = Instant::now();
            let copied: std::io::Result<u64> = async {
                let mut sock = tokio::net::TcpStream::connect(&addr).await?;
                let mut f = tokio::fs::File::create(&path).await?;
                let mut buf = vec![0u8; RAW_BUFFER];
                let mut total = 0u64;
                loop {
                    let n = sock.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n]).await?;
                    total += n as u64;
                }
                f.sync_all().await?;
                Ok(total)
            }
            .await;
            let _ = tokio::fs::remove_file(&path).await;
            (i, t.elapsed(), copied.map_err(|e| e.to_string()))
        });
    }
    let names = Names {
        who: "client",
        one: "copy",
        many: "copies",
    };
    Ok(gather(set, names, started, timeout, server, before).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_raw_copy_moves_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, vec![7u8; 200_000]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serve = tokio::spawn(raw_serve(
            listener,
            file.clone(),
            3,
            Duration::from_secs(20),
        ));
        let r = raw_fetch(
            &addr,
            3,
            &dir.path().join("out"),
            None,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!((r.ok, r.bytes), (3, 600_000), "{:?}", r.errors);
        assert_eq!(serve.await.unwrap().unwrap(), 3);
        // Nothing left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn hashing_reports_the_digest_and_a_rate() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let r = hash(&file, Some(want), 2).await.unwrap();
        assert_eq!(r.sha256, want);
        assert_eq!(r.matches, Some(true));
        assert_eq!((r.bytes, r.runs_secs.len()), (3, 2));
        assert_eq!(
            hash(&file, Some("00"), 1).await.unwrap().matches,
            Some(false)
        );
    }
}
