//! `flotilla-sim`: a fleet of real agent sessions in one process, for measuring a
//! server (see docs/BENCHMARKS.md for usage), and the artifact benchmarks' helpers.

mod artifact;
mod fleet;
mod procstat;
mod report;
mod scenario;
mod stats;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flotilla_proto::manifest::Artifact;

use fleet::{Fleet, FleetConfig};
use procstat::Target;

#[derive(Parser)]
#[command(version, about = "Flotilla fleet simulator and benchmark helpers")]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run N simulated agents: join, connect, idle, a patch, a server restart.
    Run(RunArgs),
    /// Hash a file with the agent's digest routine.
    Hash {
        file: PathBuf,
        /// Expected SHA-256 (hex), checked.
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// Rebuild TARGET from DELTA and BASE with the agent's delta routine
    /// (checked against TARGET's digest), timed.
    Rebuild {
        base: PathBuf,
        delta: PathBuf,
        /// The artifact the delta should rebuild (its digest and size are checked).
        target: PathBuf,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
    },
    /// N enrolled agents download one artifact at once through the agent's fetcher.
    Fetch(FetchArgs),
    /// Serve a file over plain TCP to each connection (the baseline of `fetch`).
    RawServe {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Where to write the address listened on.
        #[arg(long)]
        addr_file: PathBuf,
        #[arg(long, default_value_t = 100)]
        max_connections: usize,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Read from a raw-serve, N connections at once.
    RawFetch {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long)]
        out_dir: PathBuf,
        #[command(flatten)]
        server: ServerProc,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// The agents: where they live and how they join.
#[derive(Args)]
struct FleetArgs {
    /// Server URL the agents join and connect to; given several (replicas
    /// of one fleet), agent i prefers the (i mod K)-th and fails over to the
    /// others in turn.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// Shared database and per-agent directories; identities there are reused
    /// (tmpfs recommended: the agents fsync every step).
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    agents: u32,
    /// Join token for agents not yet enrolled (`flotilla token create --group G --max-uses N`).
    #[arg(long, env = "FLOTILLA_SIM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// minisign public key file(s) every agent pins at join.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    trust_threshold: u32,
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    join_timeout: Duration,
    /// Spread the sessions over this many loopback source addresses (127.0.0.1,
    /// .2, …; agent i uses the (i mod K)-th): each has its own ~28k ephemeral
    /// ports towards the server, which one address runs out of past ~28k agents.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=250))]
    source_addresses: u8,
}

/// The server process to read from /proc.
#[derive(Args)]
struct ServerProc {
    #[arg(long, conflicts_with = "server_pid_file")]
    server_pid: Option<u32>,
    /// File holding the server's pid, re-read at each sample (follows a restart).
    #[arg(long)]
    server_pid_file: Option<PathBuf>,
}

impl ServerProc {
    fn target(&self) -> Option<Target> {
        match (&self.server_pid, &self.server_pid_file) {
            (Some(p), _) => Some(Target::Pid(*p)),
            (None, Some(f)) => Some(Target::PidFile(f.clone())),
            (None, None) => None,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    server: ServerProc,
    /// The server's data directory (its db size is read over the idle window).
    #[arg(long)]
    server_data_dir: Option<PathBuf>,
    /// Sessions started per second (0: all at once).
    #[arg(long, default_value_t = 1000.0)]
    start_rate: f64,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Heartbeats only, for this long (0: skip).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// The patch to time on every agent.
    #[arg(long)]
    manifest_id: Option<String>,
    /// Shell command that publishes it; the clock starts just before it runs.
    #[arg(long, requires = "manifest_id", conflicts_with = "published_at_ms")]
    publish_cmd: Option<String>,
    /// Or: when it was published elsewhere, Unix ms.
    #[arg(long, requires = "manifest_id")]
    published_at_ms: Option<i64>,
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    patch_timeout: Duration,
    /// Pause between the `patch-start` mark and the publish, for a tracer
    /// watching the marks to attach first.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    publish_delay: Duration,
    /// Then wait for the server to be restarted (by whoever watches --marks) and
    /// time the reconnection.
    #[arg(long)]
    restart: bool,
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    restart_wait: Duration,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    reconnect_timeout: Duration,
    /// Append `<phase> <unix-ms>` here as each phase begins.
    #[arg(long)]
    marks: Option<PathBuf>,
    /// Agents open their own report and download connections, as a real agent
    /// does (up to three per agent), instead of using the session's.
    #[arg(long)]
    separate_channels: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Cap on the reconnect backoff (the agent's default: 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
}

#[derive(Args)]
struct FetchArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    server: ServerProc,
    #[arg(long)]
    sha256: String,
    #[arg(long)]
    size: u64,
    /// Where downloads go (removed as each completes).
    #[arg(long)]
    out_dir: PathBuf,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn fleet_config(a: &FleetArgs, shared: bool, max_backoff: Duration) -> anyhow::Result<FleetConfig> {
    let mut keys = Vec::new();
    for path in &a.trusted_keys {
        keys.push(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read trusted key {}", path.display()))?,
        );
    }
    Ok(FleetConfig {
        servers: a.servers.clone(),
        state_dir: a.state_dir.clone(),
        agents: a.agents as usize,
        token: a.token.clone(),
        trusted_keys: keys,
        trust_threshold: a.trust_threshold,
        join_concurrency: a.join_concurrency,
        join_timeout: a.join_timeout,
        source_addresses: a.source_addresses,
        shared_channel: shared,
        max_backoff,
    })
}

fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        flotilla_proto::outln!("{}", serde_json::to_string_pretty(value)?);
    } else {
        flotilla_proto::exit::print(format_args!("{}", text()));
    }
    Ok(())
}

fn fetch_text(what: &str, r: &artifact::FetchReport) -> String {
    format!(
        "{what}: {} of {} complete, {} MiB in {:.2} s = {:.1} MiB/s; per download {}; \
         CPU server {} ms, client {} ms{}\n",
        r.ok,
        r.downloads,
        r.bytes >> 20,
        r.wall_secs,
        r.mib_per_s,
        r.per_download
            .as_ref()
            .map_or("n/a".into(), stats::Summary::line),
        r.server_cpu_ms.map_or("n/a".into(), |v| v.to_string()),
        r.client_cpu_ms.map_or("n/a".into(), |v| v.to_string()),
        r.errors
            .first()
            .map_or(String::new(), |e| format!("; first error: {e}"))
    )
}

// The agent library writes its state with blocking, flushed sled calls (right
// for one agent on its host). Thousands of agents on the default one worker per
// core would stall every session while a flush waits on the disk; with more
// workers the flushes of many agents overlap and share sled's fsyncs.
#[tokio::main(worker_threads = 8)]
async fn main() -> anyhow::Result<()> {
    flotilla_proto::install_crypto_provider();
    // The agents' own warnings (every reconnect logs one) would swamp the log.
    flotilla_proto::telemetry::init_or_exit("flotilla_sim=info,error");
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => {
            let cfg = fleet_config(&a.fleet, !a.separate_channels, a.max_backoff)?;
            let sc = scenario::Scenario {
                start_rate: a.start_rate.max(0.0),
                connect_timeout: a.connect_timeout,
                settle: a.settle,
                idle: a.idle,
                server: a.server.target(),
                server_data_dir: a.server_data_dir,
                publish_cmd: a.publish_cmd,
                published_at_ms: a.published_at_ms,
                manifest_id: a.manifest_id,
                patch_timeout: a.patch_timeout,
                publish_delay: a.publish_delay,
                restart: a.restart,
                restart_wait: a.restart_wait,
                reconnect_timeout: a.reconnect_timeout,
                marks: a.marks,
            };
            let report = scenario::run(cfg, sc).await?;
            if let Some(path) = &a.report_json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            print(cli.json, &report, || report.text())
        }
        Cmd::Rebuild {
            base,
            delta,
            target,
            repeat,
        } => {
            let r = artifact::rebuild(&base, &delta, &target, repeat).await?;
            print(cli.json, &r, || {
                format!(
                    "agent delta rebuild: {} delta bytes -> {} bytes, median {:.0} MiB/s over {} runs\n",
                    r.delta_bytes,
                    r.target_bytes,
                    r.median_mib_per_s,
                    r.runs_secs.len()
                )
            })
        }
        Cmd::Hash {
            file,
            sha256,
            repeat,
        } => {
            let r = artifact::hash(&file, sha256.as_deref(), repeat).await?;
            print(cli.json, &r, || {
                format!(
                    "agent digest routine: {} bytes, best {:.0} MiB/s, median {:.0} MiB/s over {} runs; \
                     sha256 {}{}; CPU SHA extensions: {}\n",
                    r.bytes,
                    r.best_mib_per_s,
                    r.median_mib_per_s,
                    r.runs_secs.len(),
                    r.sha256,
                    r.matches.map_or(String::new(), |m| format!(
                        " ({})",
                        if m { "matches" } else { "MISMATCH" }
                    )),
                    r.cpu_sha_ni
                )
            })
        }
        Cmd::Fetch(a) => {
            let cfg = fleet_config(&a.fleet, false, Duration::from_secs(30))?;
            let servers = cfg.servers.clone();
            let mut fleet = Fleet::open(cfg)?;
            let joined = fleet.enrol().await?;
            anyhow::ensure!(
                joined.failed == 0,
                "{} agents could not join: {:?}",
                joined.failed,
                joined.errors
            );
            let artifact = Artifact {
                name: "artifact".into(),
                sha256: a.sha256.to_ascii_lowercase(),
                size: a.size,
            };
            let target = a.server.target();
            let r = artifact::fetch_all(
                &fleet,
                &servers,
                artifact,
                &a.out_dir,
                target.as_ref(),
                a.timeout,
            )
            .await?;
            fleet.stop(Duration::from_secs(10)).await;
            print(cli.json, &r, || fetch_text("agent fetcher over mTLS", &r))
        }
        Cmd::RawServe {
            file,
            listen,
            addr_file,
            max_connections,
            timeout,
        } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            std::fs::write(&addr_file, listener.local_addr()?.to_string())
                .with_context(|| format!("cannot write {}", addr_file.display()))?;
            let served = artifact::raw_serve(listener, file, max_connections, timeout).await?;
            // Its own cost, read before it exits (nobody else can afterwards).
            let me = procstat::sample(std::process::id());
            let out = serde_json::json!({ "served": served, "process": me });
            print(cli.json, &out, || {
                format!("raw-serve: {served} copies served; {me:?}\n")
            })
        }
        Cmd::RawFetch {
            addr,
            clients,
            out_dir,
            server,
            timeout,
        } => {
            let target = server.target();
            let r = artifact::raw_fetch(&addr, clients, &out_dir, target.as_ref(), timeout).await?;
            print(cli.json, &r, || fetch_text("raw loopback TCP", &r))
        }
    }
}
