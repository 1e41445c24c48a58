//! Server configuration: a TOML file, environment variables and flags, with flags
//! winning over the environment, the environment over the file, the file over
//! defaults. The precedence of flags and environment is clap's; this module merges
//! the file underneath.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Settings as read from a TOML file; every field optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub offline_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub startup_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub node_cert_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub clone_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub reenroll_within: Option<Duration>,
    pub max_connections_per_sec: Option<u32>,
    /// Connections open at once (default: the open-files limit less a reserve).
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub max_pending_per_source: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pending_timeout: Option<Duration>,
    /// Where the fleet's records live: `sled` (in the data dir) or `etcd`.
    pub store: Option<String>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    /// PEM file of the CA that signed etcd's certificates (https endpoints).
    pub etcd_ca: Option<PathBuf>,
    /// This server's client certificate and key for etcd, PEM.
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// The `https://host:port` other replicas (and operators) reach this
    /// server on; its host must be one of the server certificate's names.
    pub advertise_url: Option<String>,
    /// Replicas that must hold each artifact before a publish is acknowledged.
    pub artifact_copies: Option<u32>,
    /// Artifact bytes per second this server sends in all, to agents and
    /// replicas (default: no cap).
    pub max_artifact_rate: Option<u32>,
    /// Nodes of one site downloading from this server at once (default: no cap).
    pub max_site_downloads: Option<u32>,
    /// Where to serve Prometheus metrics over plain HTTP (default: nowhere).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where to serve the dashboard over HTTPS (default: nowhere).
    pub web_listen: Option<std::net::SocketAddr>,
    /// How long an artifact stays after the last patch naming it expired, or
    /// after it was written when no patch names it (default 30 days).
    #[serde(default, with = "humantime_serde")]
    pub artifact_retention: Option<Duration>,
    /// How long an event waits for a webhook that does not take it before it
    /// is dropped (with an audit entry); default 24 hours.
    #[serde(default, with = "humantime_serde")]
    pub webhook_max_age: Option<Duration>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The settings a running server uses.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub heartbeat_interval: Duration,
    pub offline_grace: Duration,
    pub startup_grace: Duration,
    pub node_cert_lifetime: Duration,
    /// A node joined less than this ago is held by the host that joined it:
    /// another host claiming its machine id without its key gets a new node.
    pub clone_window: Duration,
    /// How long after its certificate expired a node may still renew it by
    /// proving its key (no token).
    pub reenroll_within: Duration,
    /// New connections (TLS handshakes) let in per second; 0: no limit.
    pub max_connections_per_sec: u32,
    /// Connections open at once; None: the open-files limit less a reserve.
    pub max_connections: Option<usize>,
    /// Connections one source address may hold; 0: no limit.
    pub max_connections_per_source: usize,
    /// Connections one source may hold while pending (before their peer has
    /// proven who it is, see `connections`); 0: no limit.
    pub max_pending_per_source: usize,
    pub tls_handshake_timeout: Duration,
    /// How long a connection may stay pending.
    pub pending_timeout: Duration,
    pub store: StoreConfig,
    /// See [`FileConfig::advertise_url`]; None: from the listen address.
    pub advertise_url: Option<String>,
    /// See [`FileConfig::artifact_copies`]; None: 2 once there are 2 replicas.
    pub artifact_copies: Option<u32>,
    /// See [`FileConfig::max_artifact_rate`]; 0: no cap.
    pub max_artifact_rate: u32,
    /// See [`FileConfig::max_site_downloads`]; 0: no cap.
    pub max_site_downloads: u32,
    /// See [`FileConfig::metrics_listen`].
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// See [`FileConfig::web_listen`].
    pub web_listen: Option<std::net::SocketAddr>,
    /// See [`FileConfig::artifact_retention`].
    pub artifact_retention: Duration,
    /// See [`FileConfig::webhook_max_age`].
    pub webhook_max_age: Duration,
}

/// Where the fleet's records live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// sled, in `<data-dir>/db`: one server process.
    Sled,
    /// etcd (cargo feature `etcd`), every key under `prefix`.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        /// Set when the endpoints are `https`.
        tls: Option<EtcdTlsPaths>,
    },
}

/// TLS to etcd: the CA of etcd's certificates, and a client certificate when
/// etcd requires one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTlsPaths {
    pub ca: Option<PathBuf>,
    /// Certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

pub const DEFAULT_ETCD_PREFIX: &str = "/flotilla/";

impl StoreConfig {
    /// From the `store` and `etcd_*` settings.
    pub fn from_settings(file: &FileConfig) -> anyhow::Result<Self> {
        let etcd_only = file.etcd_endpoints.is_some()
            || file.etcd_ca.is_some()
            || file.etcd_cert.is_some()
            || file.etcd_key.is_some();
        match file.store.as_deref().unwrap_or("sled") {
            "sled" => {
                anyhow::ensure!(
                    !etcd_only,
                    "etcd settings are given but the store is sled: add --store etcd"
                );
                Ok(Self::Sled)
            }
            "etcd" => {
                let endpoints: Vec<String> = file
                    .etcd_endpoints
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .flat_map(|e| e.split(','))
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect();
                anyhow::ensure!(
                    !endpoints.is_empty(),
                    "the etcd store needs --etcd-endpoints URL[,URL...]"
                );
                for e in &endpoints {
                    anyhow::ensure!(
                        e.starts_with("http://") || e.starts_with("https://"),
                        "etcd endpoint {e:?} must start with http:// or https://"
                    );
                }
                let prefix = file
                    .etcd_prefix
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
                anyhow::ensure!(
                    prefix.starts_with('/') && prefix.ends_with('/') && prefix.len() > 1,
                    "the etcd prefix {prefix:?} must start and end with '/' (like /flotilla/)"
                );
                let https = endpoints
                    .iter()
                    .filter(|e| e.starts_with("https://"))
                    .count();
                anyhow::ensure!(
                    https == 0 || https == endpoints.len(),
                    "etcd endpoints mix http:// and https://: use one for all"
                );
                let identity = match (&file.etcd_cert, &file.etcd_key) {
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    (None, None) => None,
                    _ => anyhow::bail!("--etcd-cert and --etcd-key go together"),
                };
                let tls = if https > 0 {
                    Some(EtcdTlsPaths {
                        ca: file.etcd_ca.clone(),
                        identity,
                    })
                } else {
                    anyhow::ensure!(
                        file.etcd_ca.is_none() && identity.is_none(),
                        "etcd TLS files are given but the endpoints are http://: use https:// URLs"
                    );
                    None
                };
                Ok(Self::Etcd {
                    endpoints,
                    prefix,
                    tls,
                })
            }
            other => anyhow::bail!("unknown store {other:?}: use sled or etcd"),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/flotilla-server";
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
pub const DEFAULT_OFFLINE_GRACE: Duration = Duration::from_secs(60);
/// See `ServerConfig::clone_window`.
pub const DEFAULT_CLONE_WINDOW: Duration = Duration::from_secs(600);
/// See `ServerConfig::reenroll_within`: 180 days.
pub const DEFAULT_REENROLL_WITHIN: Duration = Duration::from_secs(180 * 24 * 3600);
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Well under what one core handshakes per second, so a reconnect storm leaves
/// room for the sessions already up.
pub const DEFAULT_MAX_CONNECTIONS_PER_SEC: u32 = 1000;
/// Sessions one address may hold: a large site behind one NAT address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 8192;
/// Connections one source may hold while pending: well above
/// what a reconnecting site has in handshake at once at the admission rate.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_WEBHOOK_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_ARTIFACT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

impl ServerConfig {
    /// Settings for a data dir with every default; tests start from here.
    pub fn new(data_dir: PathBuf) -> Self {
        Self::merge(FileConfig {
            data_dir: Some(data_dir),
            ..FileConfig::default()
        })
        .expect("the defaults are valid")
    }

    /// Fills what `file` leaves out with defaults. A startup grace left out is
    /// twice the offline grace, and at least a minute, so that after a restart
    /// every agent's backoff has had time to bring it back.
    pub fn merge(file: FileConfig) -> anyhow::Result<Self> {
        let offline_grace = file.offline_grace.unwrap_or(DEFAULT_OFFLINE_GRACE);
        let store = StoreConfig::from_settings(&file)?;
        Ok(Self {
            store,
            data_dir: file.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            listen: file
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            heartbeat_interval: file.heartbeat_interval.unwrap_or(DEFAULT_HEARTBEAT),
            offline_grace,
            startup_grace: file
                .startup_grace
                .unwrap_or_else(|| (offline_grace * 2).max(Duration::from_secs(60))),
            node_cert_lifetime: file
                .node_cert_lifetime
                .unwrap_or(DEFAULT_NODE_CERT_LIFETIME),
            clone_window: file.clone_window.unwrap_or(DEFAULT_CLONE_WINDOW),
            reenroll_within: file.reenroll_within.unwrap_or(DEFAULT_REENROLL_WITHIN),
            max_connections_per_sec: file
                .max_connections_per_sec
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SEC),
            max_connections: file.max_connections,
            max_connections_per_source: file
                .max_connections_per_source
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SOURCE),
            max_pending_per_source: file
                .max_pending_per_source
                .unwrap_or(DEFAULT_MAX_PENDING_PER_SOURCE),
            tls_handshake_timeout: file
                .tls_handshake_timeout
                .unwrap_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT),
            pending_timeout: file.pending_timeout.unwrap_or(DEFAULT_PENDING_TIMEOUT),
            advertise_url: file.advertise_url,
            artifact_copies: file.artifact_copies,
            max_artifact_rate: file.max_artifact_rate.unwrap_or(0),
            max_site_downloads: file.max_site_downloads.unwrap_or(0),
            metrics_listen: file.metrics_listen,
            web_listen: file.web_listen,
            artifact_retention: file
                .artifact_retention
                .unwrap_or(DEFAULT_ARTIFACT_RETENTION),
            webhook_max_age: file.webhook_max_age.unwrap_or(DEFAULT_WEBHOOK_MAX_AGE),
        })
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.advertise_url {
            flotilla_proto::tls::host_port(url)
                .map_err(|e| anyhow::anyhow!("--advertise-url: {e}"))?;
        }
        anyhow::ensure!(
            self.artifact_copies != Some(0),
            "artifact copies must be at least 1"
        );
        anyhow::ensure!(
            self.heartbeat_interval >= Duration::from_millis(100),
            "heartbeat interval must be at least 100ms"
        );
        anyhow::ensure!(
            self.node_cert_lifetime >= Duration::from_secs(3),
            "node certificate lifetime must be at least 3s"
        );
        anyhow::ensure!(
            self.max_connections.is_none_or(|n| n >= 16),
            "max connections must be at least 16"
        );
        anyhow::ensure!(
            self.tls_handshake_timeout >= Duration::from_millis(100)
                && self.pending_timeout >= self.tls_handshake_timeout,
            "the TLS handshake timeout must be at least 100ms, and the pending timeout at least as long"
        );
        Ok(())
    }

    /// Where the bound address is written once the server listens.
    pub fn addr_file(&self) -> PathBuf {
        self.data_dir.join("server.addr")
    }

    /// Where the dashboard's address is written once it listens.
    pub fn web_addr_file(&self) -> PathBuf {
        self.data_dir.join("web.addr")
    }

    /// Where the metrics address is written once it listens.
    pub fn metrics_addr_file(&self) -> PathBuf {
        self.data_dir.join("metrics.addr")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the packaged example shows (commented out) is one the server
    /// reads, with a value it accepts.
    #[test]
    fn the_packaged_example_parses_with_every_key_set() {
        let example = include_str!("../../packaging/config/server.toml");
        let set = flotilla_proto::config_example::with_every_key_set(example);
        let c: FileConfig = toml::from_str(&set).unwrap_or_else(|e| panic!("{e}\n{set}"));
        assert!(
            c.artifact_retention.is_some() && c.metrics_listen.is_some() && c.web_listen.is_some()
        );
    }

    #[test]
    fn file_fills_defaults_and_refuses_unknown_keys() {
        let f: FileConfig =
            toml::from_str("offline_grace = \"5s\"\nlisten = \"127.0.0.1:9\"").unwrap();
        let c = ServerConfig::merge(f).unwrap();
        assert_eq!(c.store, StoreConfig::Sled);
        assert_eq!(c.offline_grace, Duration::from_secs(5));
        assert_eq!(c.startup_grace, Duration::from_secs(60));
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT);
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }

    #[test]
    fn the_etcd_store_needs_endpoints_and_a_clean_prefix() {
        let s = |store: &str, e: Option<&str>, p: Option<&str>| {
            StoreConfig::from_settings(&FileConfig {
                store: Some(store.into()),
                etcd_endpoints: e.map(|e| vec![e.to_string()]),
                etcd_prefix: p.map(str::to_string),
                ..FileConfig::default()
            })
        };
        assert_eq!(
            s("etcd", Some("http://a:2379, http://b:2379"), None).unwrap(),
            StoreConfig::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
                prefix: DEFAULT_ETCD_PREFIX.into(),
                tls: None,
            }
        );
        assert!(s("etcd", None, None).is_err());
        assert!(s("etcd", Some("a:2379"), None).is_err());
        assert!(s("etcd", Some("http://a:2379"), Some("flotilla")).is_err());
        assert!(s("sled", Some("http://a:2379"), None).is_err());
        assert!(s("redis", None, None).is_err());
        assert!(s("etcd", Some("https://a:2379,http://b:2379"), None).is_err());
    }

    #[test]
    fn etcd_tls_files_need_https_endpoints_and_come_as_a_pair() {
        let f = |e: &str, ca: bool, cert: bool, key: bool| {
            StoreConfig::from_settings(&FileConfig {
                store: Some("etcd".into()),
                etcd_endpoints: Some(vec![e.into()]),
                etcd_ca: ca.then(|| "ca.pem".into()),
                etcd_cert: cert.then(|| "c.pem".into()),
                etcd_key: key.then(|| "k.pem".into()),
                ..FileConfig::default()
            })
        };
        let StoreConfig::Etcd { tls, .. } = f("https://a:2379", true, true, true).unwrap() else {
            panic!("not etcd")
        };
        assert_eq!(
            tls,
            Some(EtcdTlsPaths {
                ca: Some("ca.pem".into()),
                identity: Some(("c.pem".into(), "k.pem".into())),
            })
        );
        // https with the system's defaults only is allowed; files over http are not.
        assert!(f("https://a:2379", false, false, false).is_ok());
        assert!(f("http://a:2379", true, false, false).is_err());
        assert!(f("https://a:2379", true, true, false).is_err());
        let sled = StoreConfig::from_settings(&FileConfig {
            etcd_ca: Some("ca.pem".into()),
            ..FileConfig::default()
        });
        assert!(sled.is_err());
    }
}
