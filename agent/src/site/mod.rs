//! Serving a site: an agent started with a site address listens for the other
//! agents of its site, fetches each artifact from the servers once into its
//! site cache and hands it to them. The server chooses which agent serves
//! (one the host's operator marked, else the longest enrolled that listens)
//! and tells the others in their desired state; every byte is checked by the
//! peer against the signed manifest, so a serving agent is trusted for
//! nothing but availability.

pub mod cache;
pub mod peers;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use flotilla_proto::pb;
use tokio::task::JoinHandle;

use crate::patch::fetch::FetchLimits;
use crate::uplink::Uplink;
pub use cache::{CacheStats, SiteCache};

/// Most bytes a site cache holds unless the host's operator says otherwise.
pub const DEFAULT_CACHE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// The port a site service listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7444;
/// How long a peer's TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Handshakes in progress at once.
const MAX_HANDSHAKES: usize = 64;

/// How this agent serves its site (set by the host's operator).
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// Where to listen for peers.
    pub listen: SocketAddr,
    /// The URL peers reach it at (None: `https://<the address towards the
    /// servers>:<port>` when listening on every address, else the listen
    /// address).
    pub advertise: Option<String>,
    /// Marked to serve its site: chosen before agents that only listen.
    pub marked: bool,
    /// Most bytes the site cache holds.
    pub cache_bytes: u64,
}

/// A running site service.
pub struct Site {
    /// Where peers reach it.
    pub url: String,
    pub marked: bool,
    pub cache: Arc<SiteCache>,
    task: JoinHandle<()>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the site service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot listen for site peers on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the site cache {path}: {source}")]
    Cache {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve the site: {0}")]
    Setup(String),
}

/// Starts the site service: the cache under `state_dir`, the listener, and
/// the TLS service on it. `host_dir` holds the host's own downloads.
pub async fn start(
    opts: &SiteOptions,
    uplink: Uplink,
    limits: FetchLimits,
    cap: u64,
    state_dir: &Path,
    host_dir: &Path,
) -> Result<Site, SiteError> {
    let identity = uplink
        .store
        .identity()
        .map_err(|e| SiteError::Setup(e.to_string()))?
        .ok_or_else(|| SiteError::Setup("the agent has no identity".into()))?;
    let dir = state_dir.join("site-cache");
    let cache = SiteCache::open(
        dir.clone(),
        host_dir.to_path_buf(),
        opts.cache_bytes,
        uplink.clone(),
        limits,
        cap,
    )
    .map_err(|source| SiteError::Cache { path: dir, source })?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| SiteError::Listen {
            addr: opts.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| SiteError::Listen {
        addr: opts.listen,
        source,
    })?;
    let url = match &opts.advertise {
        Some(url) => url.clone(),
        None => {
            let ip = match bound.ip() {
                ip if ip.is_unspecified() => address_towards(&uplink.servers).await?,
                ip => ip,
            };
            format!("https://{}", SocketAddr::new(ip, bound.port()))
        }
    };
    flotilla_proto::tls::host_port(&url).map_err(|e| SiteError::Setup(e.to_string()))?;
    let tls =
        serve::tls_config(uplink.store.clone(), &identity.ca_pem).map_err(SiteError::Setup)?;
    let api = serve::SiteApi::new(cache.clone(), uplink);
    let incoming = serve::incoming(listener, serve::MAX_CONNECTIONS, serve::MAX_PER_SOURCE);
    let task = tokio::spawn(async move {
        // The server's bounds on each connection (streams, windows, frames,
        // headers, resets); a peer gone without closing it frees its slot.
        let served = flotilla_proto::http2::limits(tonic::transport::Server::builder())
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .add_service(pb::site_service_server::SiteServiceServer::new(api))
            .serve_with_incoming(flotilla_proto::tls::accept(
                incoming,
                tls,
                HANDSHAKE_TIMEOUT,
                MAX_HANDSHAKES,
            ))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the site service stopped");
        }
    });
    tracing::info!(%url, listen = %bound, marked = opts.marked, "serving this site's peers");
    Ok(Site {
        url,
        marked: opts.marked,
        cache,
        task,
    })
}

/// The local address this host reaches the first server from: where its
/// site's peers, on the same network, reach it too. No packet is sent.
async fn address_towards(servers: &[String]) -> Result<IpAddr, SiteError> {
    let url = servers
        .first()
        .ok_or_else(|| SiteError::Setup("no server to find the local address towards".into()))?;
    let (host, port) =
        flotilla_proto::tls::host_port(url).map_err(|e| SiteError::Setup(e.to_string()))?;
    let server = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| SiteError::Setup(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| SiteError::Setup(format!("{host} has no address")))?;
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any)
        .await
        .map_err(|e| SiteError::Setup(e.to_string()))?;
    socket
        .connect(server)
        .await
        .map_err(|e| SiteError::Setup(format!("no route towards {host}: {e}")))?;
    socket
        .local_addr()
        .map(|a| a.ip())
        .map_err(|e| SiteError::Setup(e.to_string()))
}

impl Site {
    /// This agent's site facts for the server.
    pub fn facts(&self, facts: &mut pb::NodeFacts) {
        let stats = *self.cache.stats().borrow();
        facts.site_url = self.url.clone();
        facts.serve_site = self.marked;
        facts.site_cache_files = stats.files;
        facts.site_cache_bytes = stats.bytes;
    }
}
