//! Setting up a data directory (`init`) and serving it (`run`): bind, then run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use flotilla_proto::{limits, pb};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::app::App;
use crate::audit::AuditLog;
use crate::ca::{CertAuthority, TlsPaths};
use crate::config::{ServerConfig, StoreConfig};
use crate::credential_file::CredentialFile;
use crate::fleet::{Fleet, FleetConfig};
use crate::model::OperatorRole;
use crate::store::{Db, SledStore};

/// What `init` created.
#[derive(Debug)]
pub struct Initialized {
    pub ca_fingerprint: String,
    pub credential_path: PathBuf,
}

/// Opens the fleet's store for the server whose CA is `ca_pem`: sled in the
/// data dir, or etcd, which every replica of the fleet shares. The CA must
/// be the fleet's, and no restore or migration may be loading the prefix.
async fn open_db(data_dir: &Path, store: &StoreConfig, ca_pem: &str) -> anyhow::Result<Db> {
    let db = open_store_as(data_dir, store, None, Some(ca_pem)).await?;
    // Timed and counted for the metrics (a no-op without --metrics-listen).
    Ok(Db::new(Arc::new(crate::store::metered::Metered::new(
        db.raw().clone(),
    ))))
}

/// Opens the fleet's store; on etcd, `hold` names the run (a restore, a
/// migration) that claims the prefix while it loads it; without it, it only
/// reads and writes (a backup beside running servers).
pub(crate) async fn open_store(
    data_dir: &Path,
    store: &StoreConfig,
    hold: Option<&str>,
) -> anyhow::Result<Db> {
    open_store_as(data_dir, store, hold, None).await
}

#[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
async fn open_store_as(
    data_dir: &Path,
    store: &StoreConfig,
    hold: Option<&str>,
    ca_pem: Option<&str>,
) -> anyhow::Result<Db> {
    match store {
        StoreConfig::Sled => {
            let store = SledStore::open(&data_dir.join("db"))
                .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
            let db = Db::new(Arc::new(store));
            if let Some(ca) = ca_pem {
                crate::replica::init::claim_fleet_ca(&db, ca).await?;
            }
            Ok(db)
        }
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let tls = match tls {
                Some(paths) => Some(etcd_tls(paths)?),
                None => None,
            };
            let store = crate::store::EtcdStore::connect(endpoints, prefix, tls).await?;
            if let Some(ca) = ca_pem {
                // A run that ended lets go at once; one that died, within
                // the hold's lease.
                let deadline = tokio::time::Instant::now()
                    + crate::store::etcd_store::HOLD_TTL
                    + std::time::Duration::from_secs(2);
                while let Some(holder) = store.holder().await? {
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "etcd prefix {prefix} is being loaded ({holder}): start the server once that is done"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                crate::replica::init::claim_fleet_ca(&Db::new(Arc::new(store.clone())), ca).await?;
            }
            if let Some(what) = hold {
                store.hold_for(what).await?;
            }
            Ok(Db::new(Arc::new(store)))
        }
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd { .. } => anyhow::bail!(
            "this flotilla-server was built without the etcd store (cargo feature `etcd`)"
        ),
    }
}

/// The URL this server is reached on, from the address it listens on: this
/// machine's name when that is every interface.
fn advertised(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("https://{}:{}", crate::replica::hostname(), addr.port())
    } else {
        format!("https://{addr}")
    }
}

/// Reads the PEM files of TLS to etcd.
#[cfg(feature = "etcd")]
fn etcd_tls(paths: &crate::config::EtcdTlsPaths) -> anyhow::Result<crate::store::EtcdTls> {
    let read = |what: &str, p: &Path| {
        std::fs::read(p).with_context(|| format!("cannot read the etcd {what} {}", p.display()))
    };
    Ok(crate::store::EtcdTls {
        ca: paths.ca.as_deref().map(|p| read("CA", p)).transpose()?,
        identity: match &paths.identity {
            Some((c, k)) => Some((read("client certificate", c)?, read("client key", k)?)),
            None => None,
        },
    })
}

/// Creates the CA, the server certificate for `names`, and a first admin
/// credential (written to `<data-dir>/admin.credential`).
pub async fn init(
    data_dir: &Path,
    names: &[String],
    admin_name: &str,
    server_url: Option<String>,
    store: &StoreConfig,
) -> anyhow::Result<Initialized> {
    crate::data_dir::owner_only_from_now();
    crate::data_dir::create(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let ca = CertAuthority::create(&TlsPaths::in_dir(data_dir), names)?;
    let db = open_db(data_dir, store, ca.cert_pem()).await?;
    let (bearer, rec) = crate::credentials::create(&db, admin_name, OperatorRole::Admin, 0).await?;
    let audit = AuditLog::open(db.clone()).await?;
    audit
        .record(
            "server",
            crate::audit::Action::ServerInit,
            admin_name,
            serde_json::json!({ "ca_fingerprint": ca.fingerprint(), "credential_id": rec.id }),
        )
        .await?;
    let credential_path = data_dir.join("admin.credential");
    CredentialFile {
        credential: bearer,
        ca_certificate: ca.cert_pem().to_string(),
        server: server_url,
    }
    .save(&credential_path)?;
    drop(db);
    crate::data_dir::restrict(data_dir)
        .with_context(|| format!("cannot make {} owner-only", data_dir.display()))?;
    Ok(Initialized {
        ca_fingerprint: ca.fingerprint().to_string(),
        credential_path,
    })
}

/// Open files below which the server refuses to start: its store, artifact
/// transfers, operators and more than a handful of sessions cannot share
/// fewer.
pub const MIN_OPEN_FILES: u64 = 256;
/// Below this many connections (from the open-files limit) the server warns
/// at start: a fleet of thousands of agents needs a descriptor each.
const LOW_CONNECTIONS: usize = 4096;
/// How to raise the limit, for messages.
const RAISE_NOFILE: &str = "raise the hard open-files limit (LimitNOFILE= in the systemd unit, \
     which the package sets to 65536; `ulimit -Hn`; /etc/security/limits.conf)";

/// Connections and the descriptors kept back from them, for an open-files
/// limit of `nofile`: 1,024 kept for the store, artifact files and logs, or
/// half of the limit when it is smaller (a limit of 1,024 gives 512
/// connections rather than none).
fn split_nofile(nofile: u64) -> (usize, u64) {
    let reserve = crate::connections::DESCRIPTOR_RESERVE.min(nofile / 2);
    let connections = usize::try_from(nofile - reserve).unwrap_or(usize::MAX);
    (connections, reserve)
}

/// The connection limits: the open-files limit is raised to its hard limit
/// first, and what connections may take of it keeps a reserve for the store,
/// artifact files and operators; pending connections may hold half of that.
/// A limit too low to serve is an error; a low one is warned of loudly.
fn connection_limits(cfg: &ServerConfig) -> anyhow::Result<crate::connections::Limits> {
    let nofile = crate::connections::raise_nofile_limit();
    let (from_nofile, reserve) = split_nofile(nofile);
    let max_connections = match cfg.max_connections {
        Some(n) => {
            if n > from_nofile {
                tracing::warn!(
                    open_files = nofile,
                    max_connections = n,
                    reserve,
                    "--max-connections {n} is more than the open-files limit ({nofile}) leaves \
                     after {reserve} descriptors for the store and files ({from_nofile}): a flood \
                     can leave the server without descriptors for its store. Lower \
                     --max-connections, or {RAISE_NOFILE}"
                );
            }
            n
        }
        None => {
            anyhow::ensure!(
                nofile >= MIN_OPEN_FILES,
                "the open-files limit is {nofile}, fewer than the {MIN_OPEN_FILES} the server \
                 needs for its store, artifact files and connections: {RAISE_NOFILE} (65536 \
                 serves a large fleet)"
            );
            if from_nofile < LOW_CONNECTIONS {
                tracing::warn!(
                    open_files = nofile,
                    max_connections = from_nofile,
                    reserve,
                    "the open-files limit ({nofile}) leaves room for only {from_nofile} \
                     connections: more agents than that cannot all hold sessions, and a \
                     connection flood fills it sooner. For a fleet, {RAISE_NOFILE}, e.g. to 65536"
                );
            }
            from_nofile
        }
    };
    let limits = crate::connections::Limits {
        max_connections,
        max_per_source: cfg.max_connections_per_source,
        max_pending_per_source: cfg.max_pending_per_source,
        max_pending: (max_connections / 2).max(8),
        pending_timeout: cfg.pending_timeout,
    };
    tracing::info!(
        open_files = nofile,
        reserve,
        max_connections,
        max_per_source = limits.max_per_source,
        max_pending = limits.max_pending,
        max_pending_per_source = limits.max_pending_per_source,
        "connection limits"
    );
    Ok(limits)
}

/// Serves the data directory on `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    crate::data_dir::owner_only_from_now();
    crate::data_dir::restrict(&cfg.data_dir)
        .with_context(|| format!("cannot make {} owner-only", cfg.data_dir.display()))?;
    let paths = TlsPaths::in_dir(&cfg.data_dir);
    let ca = CertAuthority::load(&paths).with_context(|| {
        format!(
            "no usable CA in {} (run `flotilla-server init` first)",
            cfg.data_dir.display()
        )
    })?;
    let server_cert = crate::tls::ServerCert::load(&paths)?;
    // This data dir's CA must be the fleet's (recorded at the first start).
    let db = open_db(&cfg.data_dir, &cfg.store, ca.cert_pem()).await?;
    crate::trust::migrate_legacy(&db).await?;
    let fleet = Fleet::load(
        db.clone(),
        FleetConfig {
            heartbeat_interval: cfg.heartbeat_interval,
            offline_grace: cfg.offline_grace,
            startup_grace: cfg.startup_grace,
        },
    )
    .await?;
    let audit = AuditLog::open(db.clone()).await?;
    let replica_id = crate::replica::Replica::new_id();
    let peers = crate::artifacts::peers::Peers::new(
        db.clone(),
        replica_id.clone(),
        CertAuthority::load(&paths).context("cannot load the CA")?,
    );
    let events = crate::events::EventLog::new(db.clone());
    let connections = crate::connections::Registry::new(connection_limits(&cfg)?);
    let app = Arc::new(App {
        connections: connections.clone(),
        events,
        join_guard: crate::guess_guard::GuessGuard::joins(),
        auth_guard: crate::guess_guard::GuessGuard::authentications(),
        cfg: cfg.clone(),
        db,
        fleet: fleet.clone(),
        ca,
        audit,
        artifacts: crate::artifacts::ArtifactStore::open(&cfg.data_dir)?
            .with_max_rate(cfg.max_artifact_rate)
            .with_max_site_downloads(cfg.max_site_downloads),
        peers,
        shutdown: shutdown.clone(),
    });
    // Local maintenance (a backup while running) through <data-dir>/control.sock.
    // Serving goes on without it (a data dir path too long for a socket
    // name, say): only a backup of the running server needs it.
    let control =
        crate::maintenance::control::serve(&cfg.data_dir, app.db.raw().clone(), shutdown.clone())
            .inspect_err(|e| {
                tracing::error!(error = %e, "no control socket: `flotilla-server backup` cannot reach this server while it runs")
            })
            .ok();
    // This server as a replica of the fleet: registered in the store, and
    // leading the singletons once elected (at once when it is alone).
    let url = match &cfg.advertise_url {
        Some(u) => u.clone(),
        None => listener.local_addr().map(advertised).unwrap_or_default(),
    };
    let (leadership, replica) = crate::replica::Replica::start(
        app.db.clone(),
        replica_id,
        url,
        fleet.held(),
        shutdown.clone(),
    );
    fleet.lead_with(leadership);
    // Every replica's writes reach this one's view through the store.
    let follower = tokio::spawn(fleet.clone().run_follower(shutdown.clone()));
    let reconciler = tokio::spawn(fleet.clone().run_reconciler(shutdown.clone()));
    let rollouts = tokio::spawn(fleet.clone().run_rollouts(shutdown.clone()));
    let artifact_gc = tokio::spawn(crate::artifacts::gc::run(app.clone(), shutdown.clone()));
    let events = tokio::spawn(crate::events::detect::run(app.clone(), shutdown.clone()));
    let webhooks = tokio::spawn(crate::events::webhooks::run(app.clone(), shutdown.clone()));

    // Enroll and the admin calls come without a client certificate; every
    // other agent call checks for one. The certificate is taken again when it
    // is renewed, without a restart.
    let tls = crate::tls::server_config(server_cert.clone(), app.ca.cert_pem())?;
    let cert_keeper = {
        let app = app.clone();
        tokio::spawn(crate::tls::keep_current(
            server_cert.clone(),
            paths.clone(),
            shutdown.clone(),
            move |f, how| {
                let app = app.clone();
                tokio::spawn(async move {
                    let detail = serde_json::json!({ "serial": f.serial_hex, "names": f.names, "not_after": f.not_after, "how": how });
                    if let Err(e) = app
                        .audit
                        .record(
                            "server",
                            crate::audit::Action::ServerCertRenew,
                            "server",
                            detail,
                        )
                        .await
                    {
                        tracing::error!("cannot audit the server certificate's renewal: {e}");
                    }
                });
            },
        ))
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::agent_service_server::AgentServiceServer<crate::grpc::agent::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<pb::admin_service_server::AdminServiceServer<crate::grpc::admin::AdminApi>>()
        .await;
    // What `grpcurl` needs to call any service without the .proto files
    // (the descriptors are public: the protocol is documented). Only the
    // services this server serves are listed (agents serve SiteService).
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in [
            "flotilla.v1.AgentService",
            "flotilla.v1.AdminService",
            "flotilla.v1.ReplicaService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            b = b.with_service_name(name);
        }
        b
    };
    let reflection_alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    // Each service tells `connections` when it has authenticated its caller
    // (see `connections`): no request alone ends a connection's pending time.
    let agent = pb::agent_service_server::AgentServiceServer::new(
        crate::grpc::agent::AgentApi::new(app.clone()),
    )
    .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    let replicas =
        pb::replica_service_server::ReplicaServiceServer::new(crate::grpc::replica::ReplicaApi {
            app: app.clone(),
        })
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    let admin = pb::admin_service_server::AdminServiceServer::new(crate::grpc::admin::AdminApi {
        app: app.clone(),
    })
    .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);

    if let Some(at) = cfg.metrics_listen {
        let handle = crate::metrics::install()?;
        let metrics = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("cannot listen for metrics on {at}"))?;
        let bound = metrics.local_addr()?;
        crate::ca::write_atomic(
            &cfg.metrics_addr_file(),
            bound.to_string().as_bytes(),
            false,
        )?;
        tracing::info!(addr = %bound, "serving metrics at http://{bound}/metrics");
        tokio::spawn(crate::metrics::serve(
            metrics,
            handle,
            app.clone(),
            shutdown.clone(),
        ));
    }

    if let Some(at) = cfg.web_listen {
        let web = crate::web::bind(at).await?;
        let bound = web.local_addr()?;
        crate::ca::write_atomic(&cfg.web_addr_file(), bound.to_string().as_bytes(), false)?;
        tracing::info!(addr = %bound, "serving the dashboard at https://{bound}/");
        tokio::spawn(crate::web::serve(
            web,
            crate::tls::web_config(server_cert.clone()),
            app.clone(),
            crate::web::Deadlines {
                handshake: cfg.tls_handshake_timeout,
                pending: cfg.pending_timeout,
            },
            shutdown.clone(),
        ));
    }

    let addr = listener.local_addr()?;
    crate::ca::write_atomic(&cfg.addr_file(), addr.to_string().as_bytes(), false)?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "flotilla-server listening");

    let serving = http2_limits(Server::builder())
        .layer(crate::connections::PendingCallsLayer::new(
            connections.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(agent)
        .add_service(admin)
        .add_service(replicas)
        .serve_with_incoming_shutdown(
            flotilla_proto::tls::accept(
                crate::admission::incoming(listener, cfg.max_connections_per_sec, connections),
                tls,
                cfg.tls_handshake_timeout,
                crate::tls::MAX_HANDSHAKES,
            ),
            shutdown.cancelled(),
        );
    let notifier = notify_systemd(&app.db, &shutdown);
    serving.await.context("gRPC server failed")?;
    shutdown.cancel();
    let _ = notifier.await;
    let _ = follower.await;
    let _ = reconciler.await;
    let _ = rollouts.await;
    let _ = artifact_gc.await;
    let _ = events.await;
    let _ = webhooks.await;
    if let Some(control) = control {
        let _ = control.await;
    }
    let _ = replica.await;
    let _ = cert_keeper.await;
    tracing::info!("flotilla-server stopped");
    Ok(())
}

/// The fleet's bounds on each HTTP/2 connection (see `flotilla_proto::http2`;
/// a request that has authenticated nobody is also one of
/// `connections::PENDING_CALLS`, and its connection is closed at its pending
/// deadline whatever it has in flight), and pings that find a peer gone
/// silent (a host powered off keeps its TCP connection open for the
/// kernel's hours): closed when one goes unanswered.
fn http2_limits(server: Server) -> Server {
    flotilla_proto::http2::limits(server)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
}

/// Tells systemd (a `Type=notify` unit) the server is ready, called as the
/// gRPC server is about to take its first connection: the listener is bound
/// and everything it serves is loaded. Then STOPPING=1 once `shutdown` begins,
/// and watchdog pings while the store answers. Nothing is sent without
/// NOTIFY_SOCKET.
fn notify_systemd(db: &Db, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
    flotilla_proto::systemd::ready();
    let stopping = shutdown.clone();
    let db = db.clone();
    tokio::spawn(async move {
        let watchdog = async {
            match flotilla_proto::systemd::watchdog_interval() {
                // A wedged server is one whose store no longer answers a read
                // of one key in time (sled stuck on its lock or on disk I/O,
                // an etcd client hung), or whose runtime no longer runs this
                // task. A read that fails in time does not count: etcd being
                // down is logged and retried, and a restart would not bring
                // it back.
                Some(interval) => {
                    flotilla_proto::systemd::watchdog(interval, || {
                        let db = db.clone();
                        async move {
                            let _ = db.raw().get(WATCHDOG_PROBE_KEY).await;
                            true
                        }
                    })
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopping.cancelled() => flotilla_proto::systemd::stopping(),
            _ = watchdog => {}
        }
    })
}

/// The key the watchdog's probe reads: no record has it, so the read is as
/// cheap as the store allows.
const WATCHDOG_PROBE_KEY: &str = "watchdog-probe";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_keeps_a_reserve_and_half_of_a_small_one() {
        // Large limits keep the full reserve...
        assert_eq!(split_nofile(65_536), (64_512, 1024));
        assert_eq!(split_nofile(2048), (1024, 1024));
        // ...small ones half, so 1,024 (a common hard limit) still serves.
        assert_eq!(split_nofile(1024), (512, 512));
        assert_eq!(split_nofile(MIN_OPEN_FILES), (128, 128));
    }
}
