//! `flotilla-server`: initialise a data directory, or serve it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_server::config::{FileConfig, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "flotilla-server", version, about = "Flotilla control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the fleet's records live.
#[derive(clap::Args)]
struct StoreArgs {
    /// sled (in the data dir: one server process) or etcd [default: sled].
    #[arg(long, env = "FLOTILLA_STORE", value_name = "sled|etcd")]
    store: Option<String>,
    /// etcd client URLs, comma-separated (http://host:2379,...).
    #[arg(long, env = "FLOTILLA_ETCD_ENDPOINTS", value_name = "URLS")]
    etcd_endpoints: Option<String>,
    /// Key prefix of this fleet in etcd [default: /flotilla/].
    #[arg(long, env = "FLOTILLA_ETCD_PREFIX", value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// PEM file of the CA that signed etcd's certificates (https endpoints).
    #[arg(long, env = "FLOTILLA_ETCD_CA", value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd, PEM (with --etcd-key).
    #[arg(long, env = "FLOTILLA_ETCD_CERT", value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// Client key for etcd, PEM (with --etcd-cert).
    #[arg(long, env = "FLOTILLA_ETCD_KEY", value_name = "FILE")]
    etcd_key: Option<PathBuf>,
}

impl StoreArgs {
    /// The store these flags name (for the commands without a config file).
    fn config(self) -> anyhow::Result<flotilla_server::config::StoreConfig> {
        let mut settings = FileConfig::default();
        self.over(&mut settings);
        flotilla_server::config::StoreConfig::from_settings(&settings)
    }

    /// These flags over what `file` says.
    fn over(self, file: &mut FileConfig) {
        file.store = self.store.or(file.store.take());
        file.etcd_endpoints = self
            .etcd_endpoints
            .map(|e| vec![e])
            .or(file.etcd_endpoints.take());
        file.etcd_prefix = self.etcd_prefix.or(file.etcd_prefix.take());
        file.etcd_ca = self.etcd_ca.or(file.etcd_ca.take());
        file.etcd_cert = self.etcd_cert.or(file.etcd_cert.take());
        file.etcd_key = self.etcd_key.or(file.etcd_key.take());
    }
}

#[derive(Subcommand)]
enum CertCmd {
    /// Re-issue the server certificate from the fleet's CA (2 years), keeping its names, adding
    /// --name and removing --remove-name. A running server takes it without a restart.
    Renew {
        /// The server's data directory.
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = flotilla_server::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// A DNS name or IP address to add (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// A name to remove (repeatable).
        #[arg(long = "remove-name")]
        remove_names: Vec<String>,
    },
}

// Parsed once per process: the size of `Run`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Create the CA, the server certificate and a first admin credential.
    Init {
        /// Data directory to create.
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = flotilla_server::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// DNS name or IP address agents use to reach the server (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Name of the first admin credential.
        #[arg(long, default_value = "admin")]
        admin_name: String,
        /// Server URL to record in the admin credential file.
        #[arg(long)]
        server_url: Option<String>,
        /// Make a new replica of an existing fleet (on etcd) instead: the
        /// fleet's CA from this bundle (`flotilla-server export-ca` on a
        /// replica), a server certificate of its own for --name.
        #[arg(long, value_name = "CA_BUNDLE", conflicts_with_all = ["admin_name", "server_url"])]
        replica_of: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write the fleet's CA (certificate and private key) to a file, for
    /// `init --replica-of` on a new replica. Carry it over yourself: it is
    /// the CA key.
    ExportCa {
        /// The data directory of a server of the fleet.
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = flotilla_server::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// The server's TLS certificate.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Back up a fleet: its records as of one moment, its CA and server
    /// certificate, its artifacts. A running sled server keeps running.
    Backup {
        /// The server's data directory.
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = flotilla_server::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The backup file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Restore a backup into a new data directory (and its records into the
    /// store given: sled in the data dir, or an empty etcd prefix).
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (absent or empty).
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Copy the records of a stopped sled server into an empty etcd prefix.
    Migrate {
        /// The sled server's data directory (its TLS files and artifacts stay
        /// there, for the servers on etcd).
        #[arg(long)]
        from_data_dir: PathBuf,
        /// etcd client URLs, comma-separated.
        #[arg(long, value_name = "URLS")]
        to_etcd: String,
        /// Key prefix of the fleet in etcd [default: /flotilla/].
        #[arg(long, value_name = "PREFIX")]
        etcd_prefix: Option<String>,
        /// PEM file of the CA that signed etcd's certificates.
        #[arg(long, value_name = "FILE")]
        etcd_ca: Option<PathBuf>,
        /// Client certificate for etcd, PEM (with --etcd-key).
        #[arg(long, value_name = "FILE")]
        etcd_cert: Option<PathBuf>,
        /// Client key for etcd, PEM (with --etcd-cert).
        #[arg(long, value_name = "FILE")]
        etcd_key: Option<PathBuf>,
    },
    /// Serve gRPC over TLS.
    Run {
        /// TOML config file; flags and environment variables win over it.
        #[arg(long, env = "FLOTILLA_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
        /// Data directory made by `init` [default: /var/lib/flotilla-server].
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on (port 0 picks a free one; see <data-dir>/server.addr)
        /// [default: 127.0.0.1:7443].
        #[arg(long, env = "FLOTILLA_LISTEN")]
        listen: Option<SocketAddr>,
        /// How often agents heartbeat [default: 15s].
        #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
        heartbeat_interval: Option<Duration>,
        /// How long an active node may be offline before a standby replaces it
        /// [default: 60s].
        #[arg(long, env = "FLOTILLA_OFFLINE_GRACE", value_parser = humantime::parse_duration)]
        offline_grace: Option<Duration>,
        /// After a start, how long no node is declared lost [default: twice the
        /// offline grace, at least 1m].
        #[arg(long, env = "FLOTILLA_STARTUP_GRACE", value_parser = humantime::parse_duration)]
        startup_grace: Option<Duration>,
        /// Lifetime of node certificates (default 30 days).
        #[arg(long, env = "FLOTILLA_NODE_CERT_LIFETIME", value_parser = humantime::parse_duration)]
        node_cert_lifetime: Option<Duration>,
        /// A node joined less than this ago belongs to the host that joined it: another host
        /// with its machine id but not its key gets a new node (default 10m).
        #[arg(long, env = "FLOTILLA_CLONE_WINDOW", value_parser = humantime::parse_duration)]
        clone_window: Option<Duration>,
        /// How long after its certificate expired a node may still renew it with its key
        /// alone, no token (default 180 days).
        #[arg(long, env = "FLOTILLA_REENROLL_WITHIN", value_parser = humantime::parse_duration)]
        reenroll_within: Option<Duration>,
        /// New connections (TLS handshakes) let in per second, so a reconnect
        /// storm is taken in turn (default 1000; 0: no limit).
        #[arg(long, env = "FLOTILLA_MAX_CONNECTIONS_PER_SEC")]
        max_connections_per_sec: Option<u32>,
        /// Connections open at once (default: the open-files limit, raised to
        /// its hard limit at start, less 1024 kept for the store and operators,
        /// or less half of it below 2048).
        #[arg(long, env = "FLOTILLA_MAX_CONNECTIONS")]
        max_connections: Option<usize>,
        /// Connections one source (an IPv4 address, an IPv6 /64) may hold
        /// (default 8192; 0: no limit).
        #[arg(long, env = "FLOTILLA_MAX_CONNECTIONS_PER_SOURCE")]
        max_connections_per_source: Option<usize>,
        /// Connections one source (an IPv4 address, an IPv6 /64) may hold
        /// before their peer proves who it is: a node or replica certificate,
        /// an operator credential, a join that succeeded (default 64; 0: no
        /// limit).
        #[arg(long, env = "FLOTILLA_MAX_PENDING_PER_SOURCE")]
        max_pending_per_source: Option<usize>,
        /// Deadline of a TLS handshake, on the gRPC and the dashboard's
        /// listener (default 5s).
        #[arg(long, env = "FLOTILLA_TLS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
        tls_handshake_timeout: Option<Duration>,
        /// How long a connection may stay without its peer proving who it is,
        /// whatever requests it makes (default 20s); on the dashboard's
        /// listener, without showing a session.
        #[arg(long, env = "FLOTILLA_PENDING_TIMEOUT", value_parser = humantime::parse_duration)]
        pending_timeout: Option<Duration>,
        /// The https://host:port other replicas and operators reach this server
        /// on; its host must be a name of the server certificate (default: the
        /// listen address, this machine's name when it listens on all).
        #[arg(long, env = "FLOTILLA_ADVERTISE_URL")]
        advertise_url: Option<String>,
        /// Replicas that must hold each artifact before a publish is
        /// acknowledged (default 2 when 2 or more replicas run, else 1).
        #[arg(long, env = "FLOTILLA_ARTIFACT_COPIES")]
        artifact_copies: Option<u32>,
        /// Artifact bytes per second this server sends in all, to agents and
        /// replicas (default: no cap), so downloads leave room on its uplink.
        #[arg(long, env = "FLOTILLA_MAX_ARTIFACT_RATE", value_name = "BYTES_PER_SEC")]
        max_artifact_rate: Option<u32>,
        /// Nodes of one site (the value of its group's site label) that may
        /// download from this server at once; the others try again shortly
        /// (default: no cap).
        #[arg(long, env = "FLOTILLA_MAX_SITE_DOWNLOADS", value_name = "N")]
        max_site_downloads: Option<u32>,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no
        /// credential: listen on a private address) [default: off].
        #[arg(long, env = "FLOTILLA_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Serve the dashboard at https://ADDR/ with the server's certificate
        /// (operators sign in with their credential) [default: off].
        #[arg(long, env = "FLOTILLA_WEB_LISTEN", value_name = "ADDR")]
        web_listen: Option<std::net::SocketAddr>,
        /// How long an artifact stays once the last patch naming it has
        /// expired, or once written when no patch names it (an upload never
        /// published) [default: 30d]. Checked hourly.
        #[arg(long, env = "FLOTILLA_ARTIFACT_RETENTION", value_parser = humantime::parse_duration)]
        artifact_retention: Option<Duration>,
        /// How long an event waits for a webhook receiver that does not take
        /// it before it is dropped, with an audit entry [default: 24h].
        #[arg(long, env = "FLOTILLA_WEBHOOK_MAX_AGE", value_parser = humantime::parse_duration)]
        webhook_max_age: Option<Duration>,
    },
}

fn main() -> std::process::ExitCode {
    flotilla_proto::install_crypto_provider();
    flotilla_proto::telemetry::init_or_exit("info");
    let cli = Cli::parse();
    let done = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(real_main(cli)));
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", flotilla_proto::exit::error_text(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            names,
            admin_name,
            server_url,
            replica_of,
            store,
        } => {
            let store = store.config()?;
            if let Some(bundle) = replica_of {
                let fingerprint = flotilla_server::replica::init::init_replica(
                    &data_dir, &names, &bundle, &store,
                )
                .await?;
                flotilla_proto::outln!("initialised replica {}", data_dir.display());
                flotilla_proto::outln!("CA fingerprint (sha256): {fingerprint}");
                return Ok(());
            }
            let done =
                flotilla_server::server::init(&data_dir, &names, &admin_name, server_url, &store)
                    .await?;
            flotilla_proto::outln!("initialised {}", data_dir.display());
            flotilla_proto::outln!("CA fingerprint (sha256): {}", done.ca_fingerprint);
            flotilla_proto::outln!("admin credential: {}", done.credential_path.display());
            Ok(())
        }
        Command::Cert(CertCmd::Renew {
            data_dir,
            names,
            remove_names,
        }) => {
            let paths = flotilla_server::ca::TlsPaths::in_dir(&data_dir);
            let pem = std::fs::read_to_string(&paths.server_cert)
                .with_context(|| format!("cannot read {}", paths.server_cert.display()))?;
            let der = flotilla_proto::tls::first_pem_der(&pem)?;
            let mut all = flotilla_server::tls::cert_facts(&der)?.names;
            for n in names {
                if !all.contains(&n) {
                    all.push(n);
                }
            }
            if let Some(missing) = remove_names.iter().find(|r| !all.contains(r)) {
                anyhow::bail!("the server certificate has no name {missing:?} to remove");
            }
            all.retain(|n| !remove_names.contains(n));
            let f = flotilla_server::tls::renew(&paths, &all)?;
            flotilla_proto::outln!(
                "server certificate renewed: serial {}, names {}, valid until {}; a running server takes it within seconds (no restart), and its agents keep their sessions",
                f.serial_hex,
                f.names.join(", "),
                flotilla_proto::when::unix_secs(f.not_after)
            );
            Ok(())
        }
        Command::ExportCa {
            data_dir,
            out,
            force,
        } => {
            let fingerprint = flotilla_server::replica::init::export_ca(&data_dir, &out, force)?;
            flotilla_proto::outln!(
                "wrote the fleet's CA (sha256 {fingerprint}) to {}: it holds the CA key, carry it to the new replica yourself and remove it after",
                out.display()
            );
            Ok(())
        }
        Command::Backup {
            data_dir,
            out,
            store,
        } => {
            let store = store.config()?;
            let info = flotilla_server::maintenance::backup(&data_dir, &store, &out).await?;
            flotilla_proto::outln!(
                "backup {}: {} records (store revision {}, sha256 {}), {} artifacts",
                out.display(),
                info.records.count,
                info.revision,
                info.records.sha256,
                info.artifacts
            );
            Ok(())
        }
        Command::Restore {
            from,
            data_dir,
            store,
        } => {
            let store = store.config()?;
            let (info, loaded) =
                flotilla_server::maintenance::restore(&from, &data_dir, &store).await?;
            flotilla_proto::outln!(
                "restored {} into {}: {} records (sha256 {}, checked), {} artifacts, taken {}",
                from.display(),
                data_dir.display(),
                loaded.count,
                loaded.sha256,
                info.artifacts,
                info.created_at
            );
            Ok(())
        }
        Command::Migrate {
            from_data_dir,
            to_etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
        } => {
            let prefix_flag = etcd_prefix
                .as_ref()
                .map(|p| format!(" --etcd-prefix {p}"))
                .unwrap_or_default();
            let to = flotilla_server::config::StoreConfig::from_settings(&FileConfig {
                store: Some("etcd".into()),
                etcd_endpoints: Some(vec![to_etcd.clone()]),
                etcd_prefix,
                etcd_ca,
                etcd_cert,
                etcd_key,
                ..FileConfig::default()
            })?;
            let moved = flotilla_server::maintenance::migrate(&from_data_dir, &to).await?;
            flotilla_proto::outln!(
                "migrated {} records (sha256 {}, checked in etcd); run the server with \
                 --store etcd --etcd-endpoints {to_etcd}{prefix_flag} --data-dir {}",
                moved.count,
                moved.sha256,
                from_data_dir.display()
            );
            Ok(())
        }
        Command::Run {
            config,
            store,
            data_dir,
            listen,
            heartbeat_interval,
            offline_grace,
            startup_grace,
            node_cert_lifetime,
            clone_window,
            reenroll_within,
            max_connections_per_sec,
            max_connections,
            max_connections_per_source,
            max_pending_per_source,
            tls_handshake_timeout,
            pending_timeout,
            advertise_url,
            artifact_copies,
            max_artifact_rate,
            max_site_downloads,
            metrics_listen,
            web_listen,
            artifact_retention,
            webhook_max_age,
        } => {
            let mut file = match config {
                Some(path) => FileConfig::load(&path)?,
                None => FileConfig::default(),
            };
            // Flags and environment (already merged by clap) win over the file.
            file.data_dir = data_dir.or(file.data_dir);
            file.listen = listen.or(file.listen);
            file.heartbeat_interval = heartbeat_interval.or(file.heartbeat_interval);
            file.offline_grace = offline_grace.or(file.offline_grace);
            file.startup_grace = startup_grace.or(file.startup_grace);
            file.node_cert_lifetime = node_cert_lifetime.or(file.node_cert_lifetime);
            file.clone_window = clone_window.or(file.clone_window);
            file.reenroll_within = reenroll_within.or(file.reenroll_within);
            file.max_connections_per_sec = max_connections_per_sec.or(file.max_connections_per_sec);
            file.max_connections = max_connections.or(file.max_connections);
            file.max_connections_per_source =
                max_connections_per_source.or(file.max_connections_per_source);
            file.max_pending_per_source = max_pending_per_source.or(file.max_pending_per_source);
            file.tls_handshake_timeout = tls_handshake_timeout.or(file.tls_handshake_timeout);
            file.pending_timeout = pending_timeout.or(file.pending_timeout);
            file.advertise_url = advertise_url.or(file.advertise_url);
            file.artifact_copies = artifact_copies.or(file.artifact_copies);
            file.max_artifact_rate = max_artifact_rate.or(file.max_artifact_rate);
            file.max_site_downloads = max_site_downloads.or(file.max_site_downloads);
            file.metrics_listen = metrics_listen.or(file.metrics_listen);
            file.web_listen = web_listen.or(file.web_listen);
            file.artifact_retention = artifact_retention.or(file.artifact_retention);
            file.webhook_max_age = webhook_max_age.or(file.webhook_max_age);
            store.over(&mut file);
            let cfg = ServerConfig::merge(file)?;
            let listener = flotilla_server::admission::listen(cfg.listen)
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("stopping");
                stop.cancel();
            });
            flotilla_server::server::run(cfg, listener, shutdown).await
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
