//! What running an agent takes (`RunOptions`, with the host's defaults) and why
//! it may stop (`RunError`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_proto::tls::TlsError;

use crate::backoff;
use crate::cert::CertError;
use crate::embed::{Observer, SharedChannel};
use crate::hook;
use crate::install::{Executor, LocalPolicy};
use crate::patch::fetch::FetchLimits;
use crate::state::StateError;

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the state is.
    pub state_dir: PathBuf,
    /// Server URLs to use instead of the ones stored at join (none: the stored ones).
    pub servers: Vec<String>,
    /// Program to run on role changes.
    pub role_hook: Option<PathBuf>,
    /// How long the role hook may run.
    pub hook_timeout: Duration,
    /// Cap on the reconnect backoff.
    pub max_backoff: Duration,
    /// Where the host's filesystem starts for patches ("/" unless several agents
    /// share one machine).
    pub root: PathBuf,
    /// What this host lets patches do.
    pub policy: LocalPolicy,
    /// Download deadline and minimum rate.
    pub fetch: FetchLimits,
    /// What applies patches ([`Executor::Host`]; the simulator's agents change nothing).
    pub executor: Executor,
    /// Told of every session event (the fleet simulator; none for a real agent).
    pub observer: Option<Observer>,
    /// Lets reports and downloads use the session's connection while it is
    /// open (`flotilla-agent run` and the simulator set it; without it they
    /// open their own connections).
    pub shared_channel: Option<SharedChannel>,
    /// The local address connections to the server leave from (None: the
    /// system's choice). A host with several addresses picks one; the fleet
    /// simulator spreads its agents over loopback addresses, each with its own
    /// ephemeral ports towards the server.
    pub source_address: Option<IpAddr>,
    /// Serve this site's other agents (None: this agent does not listen for
    /// them).
    pub site: Option<crate::site::SiteOptions>,
    /// Where to keep a node-exporter textfile of the agent's metrics (None:
    /// nowhere).
    pub metrics_textfile: Option<PathBuf>,
    /// How much disk downloads and backups may take.
    pub disk: crate::patch::pipeline::DiskLimits,
}

/// Install paths allowed when the host's operator names none.
pub const DEFAULT_ALLOWED_PATHS: &[&str] = &["/opt", "/usr/local"];
/// Artifact size cap when the host's operator sets none.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 1024 * 1024 * 1024;

impl Default for LocalPolicy {
    fn default() -> Self {
        Self {
            allowed_paths: DEFAULT_ALLOWED_PATHS.iter().map(PathBuf::from).collect(),
            allow_scripts: false,
            allow_health_checks: true,
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
        }
    }
}

impl RunOptions {
    /// Defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            servers: Vec::new(),
            role_hook: None,
            hook_timeout: hook::DEFAULT_TIMEOUT,
            max_backoff: backoff::DEFAULT_CAP,
            root: PathBuf::from("/"),
            policy: LocalPolicy::default(),
            fetch: FetchLimits::default(),
            executor: Executor::Host,
            observer: None,
            shared_channel: None,
            source_address: None,
            site: None,
            metrics_textfile: None,
            disk: Default::default(),
        }
    }
}

/// Why the agent stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("not joined: run `flotilla-agent join` first (no identity in {state_dir})")]
    NotJoined { state_dir: PathBuf },
    #[error("no server to connect to: pass --server https://HOST:PORT")]
    NoServers,
    #[error(transparent)]
    State(#[from] StateError),
    #[error("invalid server URL or TLS material: {0}")]
    Tls(#[from] TlsError),
    #[error("the node's stored certificate is unusable: {0} (join again with a new token)")]
    Cert(#[from] CertError),
    #[error(transparent)]
    Site(#[from] crate::site::SiteError),
    #[error(
        "the server refused this node: {0}. The node was probably revoked or removed, or \
         its certificate expired while the agent was stopped; remove the state directory \
         and join again with a new token"
    )]
    Rejected(String),
}
