//! `flotilla-agent`: joins a host to a Flotilla fleet and keeps its session.
//!
//! A thin command line over the `flotilla_agent` library: it resolves flags,
//! environment and config file, runs the library on a current-thread runtime (one
//! session needs no more), and turns errors into messages with context.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_agent::config::{self, FileConfig};
use flotilla_agent::{JoinOptions, RunOptions, Status, backoff};

/// Flotilla agent: joins a fleet with a token and keeps one live session to the server.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version)]
struct Cli {
    /// TOML config file (see packaging/config/agent.toml for every key).
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_AGENT_CONFIG",
        value_name = "PATH"
    )]
    config: Option<PathBuf>,

    /// Where the agent keeps its state [default: /var/lib/flotilla-agent].
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_AGENT_STATE_DIR",
        value_name = "DIR"
    )]
    state_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the fleet with a join token (once per host).
    Join(JoinArgs),
    /// Hold the session: heartbeats, desired state, certificate renewal.
    Run(RunArgs),
    /// Show what the agent holds and whether it is connected.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// Server URL (https://HOST:PORT); repeat for failover, tried in order.
    #[arg(
        long = "server",
        env = "FLOTILLA_AGENT_SERVERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    servers: Vec<String>,
    /// Join token (flt1.<id>.<secret>.<ca-sha256>).
    #[arg(
        long,
        env = "FLOTILLA_AGENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: String,
    /// Label to ask for, key=value; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Machine id to state instead of /etc/machine-id.
    #[arg(long, env = "FLOTILLA_AGENT_MACHINE_ID", value_name = "ID")]
    machine_id: Option<String>,
    /// minisign public key file to pin for patch signatures; repeatable. Without
    /// one the agent applies no patch.
    #[arg(long = "trusted-key", value_name = "PATH")]
    trusted_keys: Vec<PathBuf>,
    /// How many distinct pinned keys must sign each manifest [default: 1].
    #[arg(long, value_name = "N")]
    trust_threshold: Option<u32>,
    /// Join again from the state already in the state directory (stop the agent first):
    /// the host proves it holds its node's key and keeps the node, its patch journal
    /// and its downgrade memory.
    #[arg(long)]
    again: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Server URL to use instead of those given at join; repeatable.
    #[arg(
        long = "server",
        env = "FLOTILLA_AGENT_SERVERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    servers: Vec<String>,
    /// Program to run when the node's role changes.
    #[arg(long, env = "FLOTILLA_AGENT_ROLE_HOOK", value_name = "PATH")]
    role_hook: Option<PathBuf>,
    /// Longest wait between reconnect attempts [default: 30s].
    #[arg(long, env = "FLOTILLA_AGENT_MAX_BACKOFF", value_name = "DURATION", value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// Where the host's filesystem starts for patches [default: /].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Local address to connect to the server from (a host with several)
    /// [default: the system's choice].
    #[arg(long, env = "FLOTILLA_AGENT_SOURCE_ADDRESS", value_name = "IP")]
    source_address: Option<std::net::IpAddr>,
    /// Directory `files` patches may write under; repeatable [default: /opt, /usr/local].
    #[arg(long = "allow-path", value_name = "DIR")]
    allowed_paths: Vec<PathBuf>,
    /// Let patches run install and rollback scripts, and health checks through
    /// a shell or interpreter (sh, bash, python...) or a program that runs
    /// one (timeout, nice, sudo, xargs...) [default: off].
    #[arg(long)]
    allow_scripts: bool,
    /// Refuse every patch that has a health check. By default a health check
    /// may run, as the program it names run directly (a shell or interpreter
    /// only with --allow-scripts).
    #[arg(long)]
    no_health_checks: bool,
    /// Largest artifact accepted, in bytes [default: 1 GiB].
    #[arg(long, value_name = "BYTES")]
    max_artifact_bytes: Option<u64>,
    /// Longest a download may take [default: 30m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    download_deadline: Option<Duration>,
    /// Slowest a download may go, bytes per second over 10 s [default: 1024].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    min_download_rate: Option<u64>,
    /// Fastest a download may go, bytes per second, so the agent takes only
    /// its share of a thin uplink [default: no limit]. The deadline grows and
    /// the minimum rate falls to fit it.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    max_download_rate: Option<u64>,
    /// Serve this site's other agents (fetch each artifact once over the
    /// site's uplink and hand it to them); chosen before agents that only
    /// listen. Listens on --site-listen [default: 0.0.0.0:7444].
    #[arg(long)]
    serve_site: bool,
    /// Listen for this site's other agents on ADDR, so the server may choose
    /// this agent to serve its site when none is marked with --serve-site.
    #[arg(long, value_name = "ADDR")]
    site_listen: Option<std::net::SocketAddr>,
    /// The URL the site's peers reach this agent at [default: the listen
    /// address, or the address this host reaches the servers from].
    #[arg(long, value_name = "URL")]
    site_advertise: Option<String>,
    /// Most bytes the site cache holds [default: 4 GiB].
    #[arg(long, value_name = "BYTES")]
    site_cache_bytes: Option<u64>,
    /// Keep the agent's metrics in this node-exporter textfile (session,
    /// certificate expiry, the newest patch's phase, the last report)
    /// [default: none].
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Keep the backups of the newest N committed versions of each component
    /// (what `rollout abort --rollback` restores from); older ones are
    /// removed [default: 2, at least 1].
    #[arg(long, value_name = "N")]
    keep_backups: Option<usize>,
    /// Most bytes the download directory holds (complete downloads, kept as
    /// delta bases, and downloads in progress); a patch that would go past
    /// it is refused as `insufficient disk` before its download [default: 8 GiB].
    #[arg(long, value_name = "BYTES")]
    max_download_bytes: Option<u64>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print status.json as it is.
    #[arg(long)]
    json: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    config::parse_label(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    flotilla_proto::install_crypto_provider();
    flotilla_proto::telemetry::init_or_exit("info");
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", flotilla_proto::exit::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let file =
        FileConfig::load_optional(cli.config.as_deref()).context("cannot load the config")?;
    let state_dir = file.state_dir(cli.state_dir);
    match cli.command {
        Command::Join(args) => join(args, &file, state_dir),
        Command::Run(args) => run(args, &file, state_dir, cli.config.as_deref()),
        Command::Status(args) => status(&args, &state_dir),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn join(args: JoinArgs, file: &FileConfig, state_dir: PathBuf) -> Result<()> {
    let mut trusted_keys = Vec::new();
    for path in &args.trusted_keys {
        trusted_keys.push(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read trusted key {}", path.display()))?,
        );
    }
    anyhow::ensure!(
        !(trusted_keys.is_empty() && args.trust_threshold.is_some()),
        "--trust-threshold needs at least one --trusted-key"
    );
    let trust_threshold = args.trust_threshold.unwrap_or(1);
    if !trusted_keys.is_empty() {
        flotilla_proto::manifest::TrustPolicy::new(&trusted_keys, trust_threshold as usize)
            .context("the trusted keys given cannot be used")?;
    }
    let opts = JoinOptions {
        servers: file.servers(args.servers),
        token: args.token,
        labels: file.labels(args.labels),
        machine_id: args.machine_id,
        state_dir,
        trusted_keys,
        trust_threshold,
        again: args.again,
    };
    let joined = runtime()?
        .block_on(flotilla_agent::join(opts))
        .context("cannot join the fleet")?;
    if args.json {
        flotilla_proto::outln!("{}", serde_json::to_string(&joined)?);
    } else {
        flotilla_proto::outln!(
            "joined as node {} in group {} (role {})",
            joined.node_id,
            joined.group,
            joined.role
        );
        if joined.rejoined {
            flotilla_proto::outln!("(the server gave this host its existing node back)");
        }
    }
    Ok(())
}

fn run(
    args: RunArgs,
    file: &FileConfig,
    state_dir: PathBuf,
    config: Option<&std::path::Path>,
) -> Result<()> {
    let defaults = RunOptions::new(state_dir.clone());
    let allowed_paths = if !args.allowed_paths.is_empty() {
        args.allowed_paths
    } else {
        file.allowed_paths
            .clone()
            .unwrap_or(defaults.policy.allowed_paths.clone())
    };
    for p in &allowed_paths {
        anyhow::ensure!(
            p.is_absolute(),
            "allowed path {} must be absolute",
            p.display()
        );
    }
    let mut fetch = defaults.fetch.clone();
    if let Some(d) = args.download_deadline.or(file.download_deadline) {
        fetch.deadline = d;
    }
    if let Some(r) = args.min_download_rate.or(file.min_download_rate) {
        fetch.min_rate = r;
    }
    if let Some(r) = args.max_download_rate.or(file.max_download_rate) {
        fetch.max_rate = r;
    }
    let marked = args.serve_site || file.serve_site.unwrap_or(false);
    let site = match args.site_listen.or(file.site_listen) {
        None if !marked => None,
        listen => Some(flotilla_agent::site::SiteOptions {
            listen: listen.unwrap_or(std::net::SocketAddr::from((
                [0, 0, 0, 0],
                flotilla_agent::site::DEFAULT_PORT,
            ))),
            advertise: args.site_advertise.or(file.site_advertise.clone()),
            marked,
            cache_bytes: args
                .site_cache_bytes
                .or(file.site_cache_bytes)
                .unwrap_or(flotilla_agent::site::DEFAULT_CACHE_BYTES),
        }),
    };
    let opts = RunOptions {
        site,
        metrics_textfile: args.metrics_textfile.or(file.metrics_textfile.clone()),
        servers: file.servers(args.servers),
        role_hook: file.role_hook(args.role_hook),
        max_backoff: file.max_backoff(args.max_backoff, backoff::DEFAULT_CAP)?,
        root: args
            .root
            .or(file.root.clone())
            .unwrap_or(defaults.root.clone()),
        policy: flotilla_agent::install::LocalPolicy {
            allowed_paths,
            allow_scripts: args.allow_scripts || file.allow_scripts.unwrap_or(false),
            allow_health_checks: !args.no_health_checks && file.allow_health_checks.unwrap_or(true),
            max_artifact_bytes: args
                .max_artifact_bytes
                .or(file.max_artifact_bytes)
                .unwrap_or(defaults.policy.max_artifact_bytes),
        },
        fetch,
        // Reports and downloads ride on the session's connection while it is
        // open: no second and third TLS connection per host (measured: 1.5x the
        // server's CPU per patch and ~48 KiB of server memory per host).
        shared_channel: Some(flotilla_agent::embed::SharedChannel::new()),
        source_address: args.source_address.or(file.source_address),
        disk: flotilla_agent::patch::pipeline::DiskLimits {
            keep_backups: args
                .keep_backups
                .or(file.keep_backups)
                .unwrap_or(flotilla_agent::patch::pipeline::DEFAULT_KEEP_BACKUPS),
            max_download_bytes: args
                .max_download_bytes
                .or(file.max_download_bytes)
                .unwrap_or(flotilla_agent::patch::pipeline::DEFAULT_MAX_DOWNLOAD_BYTES),
        },
        // READY=1 for systemd (Type=notify) once the first session is up;
        // reconnects later say nothing. Nothing is sent without NOTIFY_SOCKET.
        observer: Some(flotilla_agent::embed::Observer::new({
            let ready = std::sync::Once::new();
            move |event| {
                if event == flotilla_agent::embed::SessionEvent::Opened {
                    ready.call_once(flotilla_proto::systemd::ready);
                }
            }
        })),
        ..defaults
    };
    anyhow::ensure!(
        opts.disk.keep_backups >= 1,
        "keep_backups must be at least 1: the newest version's backups are what a rollback restores"
    );
    opts.policy
        .check_own_files(&opts.root, &opts.state_dir, config)
        .map_err(anyhow::Error::msg)?;
    let rt = runtime()?;
    rt.block_on(async {
        let shutdown = shutdown_signal().context("cannot listen for stop signals")?;
        if let Some(interval) = flotilla_proto::systemd::watchdog_interval() {
            // The runtime has one thread, shared by the session, the patch
            // pipeline and the hooks' supervision: this task gets to ping only
            // when none of them blocks it. That is the wedge it detects (a
            // blocking call or a busy loop on the runtime); installs and
            // unpacking run on blocking threads and do not stop the pings.
            tokio::spawn(flotilla_proto::systemd::watchdog(interval, || async {
                true
            }));
        }
        flotilla_agent::run(opts, shutdown)
            .await
            .context("the agent stopped")
    })
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        flotilla_proto::systemd::stopping();
    })
}

fn status(args: &StatusArgs, state_dir: &std::path::Path) -> Result<()> {
    let status = Status::read(state_dir)?;
    if args.json {
        flotilla_proto::outln!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        flotilla_proto::exit::print(format_args!("{}", status.summary()));
    }
    Ok(())
}
