//! What every service of a running server shares.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::audit::AuditLog;
use crate::ca::CertAuthority;
use crate::config::ServerConfig;
use crate::fleet::Fleet;
use crate::store::Db;

pub struct App {
    pub cfg: ServerConfig,
    pub db: Db,
    pub fleet: Arc<Fleet>,
    pub ca: CertAuthority,
    pub audit: AuditLog,
    /// The fleet's events, for webhooks and followers.
    pub events: crate::events::EventLog,
    pub artifacts: ArtifactStore,
    /// The other replicas' artifacts, fetched when this one lacks one.
    pub peers: crate::artifacts::peers::Peers,
    /// Failed joins: slowed, counted and audited.
    pub join_guard: crate::guess_guard::GuessGuard,
    pub auth_guard: crate::guess_guard::GuessGuard,
    /// Cancelled when the server stops: long-lived streams end so shutdown can finish.
    pub shutdown: CancellationToken,
    /// The open connections: a service that has authenticated its caller
    /// tells it so, which ends the connection's pending deadline.
    pub connections: Arc<crate::connections::Registry>,
}
