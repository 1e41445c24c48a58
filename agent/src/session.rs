//! The one live session to the server: connect over mutual TLS, say Hello, send
//! heartbeats, take desired state as it is pushed, renew the certificate in time,
//! and reconnect (with backoff and failover) whenever the session drops.
//!
//! An idle agent does no work but its heartbeat: the only timers are the heartbeat
//! interval and the certificate-renewal deadline, and everything else waits on the
//! network.

use std::future::Future;
use std::time::Duration;

use flotilla_proto::limits;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::{self, agent_message, server_message};
use flotilla_proto::tls;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::{self, Backoff};
use crate::cert::{self, CertInfo};
use crate::embed::{Observer, SessionEvent, SharedChannel};
use crate::facts;
use crate::hook::{RoleChange, RoleHook};
use crate::patch::Patches;
use crate::patch::pipeline::{Offer, PipelineConfig};
use crate::refusal::{self, Refusal};
use crate::state::{Desired, Identity, Ordering, Role, Store};
use crate::status::Status;
use crate::trust;
use renewal::{
    AdoptError, RENEW_RETRY_BASE, RENEW_RETRY_CAP, RenewCall, RenewFailure, request_renewal,
};

/// How long opening a session (connection made, waiting for the server's answer)
/// may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest heartbeat interval honoured, whatever the server asks: a bad value
/// must not turn every agent into a busy loop.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Kernel TCP keepalive: detects a vanished server without waking the agent
/// (while the connection is idle).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 PING to the server: heartbeats keep the connection busy, so TCP
/// keepalive never fires, and a server that vanished without closing the
/// connection would otherwise be noticed only after the kernel's retransmission
/// timeout (about 15 minutes). Four heartbeats apart, between 5 s and a minute
/// (a ping a minute costs about 1 byte/s); an answer must come within two
/// heartbeats, between 5 s and 20 s.
fn ping_timing(heartbeat: Duration) -> (Duration, Duration) {
    (
        (heartbeat * 4).clamp(Duration::from_secs(5), Duration::from_secs(60)),
        (heartbeat * 2).clamp(Duration::from_secs(5), Duration::from_secs(20)),
    )
}
/// Messages waiting to go to the server; heartbeats beyond it are skipped.
const OUTBOUND_QUEUE: usize = 8;

/// How one session attempt ended.
#[derive(Debug)]
enum Outcome {
    /// Never opened.
    Failed(String),
    /// Was open for `up_for`, then ended.
    Ended { up_for: Duration, reason: String },
    /// The certificate was renewed: reconnect at once with the new one.
    Renewed,
    /// The server refused the node.
    Rejected(String),
    /// Something local is broken.
    Fatal(RunError),
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Refused(reason) => Self::Rejected(reason),
            Refusal::Transient(reason) => Self::Failed(reason),
        }
    }
}

/// The running agent.
struct Agent {
    store: Store,
    node: Identity,
    cert: CertInfo,
    held: Desired,
    servers: Vec<String>,
    connected: bool,
    hooks: mpsc::UnboundedSender<RoleChange>,
    /// Where offered manifests go.
    offers: tokio::sync::watch::Sender<Offer>,
    observer: Option<Observer>,
    shared: Option<SharedChannel>,
    source_address: Option<std::net::IpAddr>,
    /// The host's facts changed (a new trust policy) since the server was told.
    facts_changed: bool,
    /// No desired state taken yet in this session: the first is the server's
    /// view now, taken whatever its revision (see `on_desired`).
    session_fresh: bool,
    /// The site service, when this agent serves its site's peers.
    site: Option<crate::site::Site>,
    /// What the site cache held when the server was last told.
    sent_cache: crate::site::CacheStats,
    /// The metrics textfile, when the host's operator asked for one.
    textfile: Option<std::sync::Arc<crate::textfile::Textfile>>,
}

/// Runs the agent until `shutdown` completes (then `Ok`) or the node is refused or
/// local state fails (then `Err`).
pub async fn run<F>(opts: RunOptions, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let store = Store::open(&opts.state_dir)?;
    run_with(store, opts, shutdown).await
}

/// [`run`] on a store the caller opened: the fleet simulator keeps many agents in
/// one database (see [`Store::open_shared`]).
pub async fn run_with<F>(store: Store, opts: RunOptions, shutdown: F) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let node = store.identity()?.ok_or_else(|| RunError::NotJoined {
        state_dir: opts.state_dir.clone(),
    })?;
    let held = store.desired()?.unwrap_or(Desired::initial(Role::Pending));
    let servers = if opts.servers.is_empty() {
        node.servers.clone()
    } else {
        opts.servers.clone()
    };
    if servers.is_empty() {
        return Err(RunError::NoServers);
    }
    for url in &servers {
        tls::host_port(url)?;
    }
    let cert = cert::cert_info(&node.cert_pem)?;
    if cert.not_after <= cert::unix_now() {
        tracing::warn!(
            not_after = cert.not_after,
            "the node certificate has expired; the server will probably refuse it"
        );
    }

    let hook = opts
        .role_hook
        .as_ref()
        .map(|p| RoleHook::new(p, opts.hook_timeout));
    let (hooks, worker) = spawn_hook_worker(store.clone(), hook);
    // A role change persisted before a crash, whose hook never ran, runs now.
    let hooked = store.hooked_role()?;
    if hooked != Some(held.role) {
        let _ = hooks.send(RoleChange {
            node_id: node.node_id.clone(),
            group: node.group.clone(),
            role: held.role,
            previous_role: hooked,
            desired_count: held.desired_count,
        });
    }

    let site = match &opts.site {
        Some(site) => Some(
            crate::site::start(
                site,
                crate::uplink::Uplink {
                    store: store.clone(),
                    servers: servers.clone(),
                    shared: opts.shared_channel.clone(),
                    source_address: opts.source_address,
                },
                opts.fetch.clone(),
                opts.policy.max_artifact_bytes,
                &opts.state_dir,
                &crate::patch::pipeline::artifact_dir(&opts.state_dir),
            )
            .await?,
        ),
        None => None,
    };
    let textfile = opts
        .metrics_textfile
        .clone()
        .map(|p| std::sync::Arc::new(crate::textfile::Textfile::new(p)));
    let patches = Patches::start(
        store.clone(),
        PipelineConfig {
            root: opts.root.clone(),
            policy: opts.policy.clone(),
            work_dir: opts.state_dir.clone(),
            fetch: opts.fetch.clone(),
            servers: servers.clone(),
            executor: opts.executor,
            shared: opts.shared_channel.clone(),
            source_address: opts.source_address,
            site_cache: site.as_ref().map(|s| s.cache.clone()),
            textfile: textfile.clone(),
            disk: opts.disk.clone(),
        },
    )?;
    let mut agent = Agent {
        store,
        node,
        cert,
        held,
        servers,
        connected: false,
        hooks,
        offers: patches.offers.clone(),
        observer: opts.observer.clone(),
        shared: opts.shared_channel.clone(),
        source_address: opts.source_address,
        facts_changed: false,
        session_fresh: false,
        site,
        sent_cache: crate::site::CacheStats::default(),
        textfile,
    };
    tracing::info!(node_id = %agent.node.node_id, group = %agent.node.group, role = %agent.held.role, revision = agent.held.revision, "agent starting");
    agent.publish_status();
    let result = agent.reconnect_loop(opts.max_backoff, shutdown).await;
    agent.set_connected(false);
    patches.stop().await;
    // A hook cut short here has not been recorded as handled: it runs again at the
    // next start. Waiting for the aborted worker makes sure its hook process is
    // killed and its handle on the database released before `run` returns.
    worker.abort();
    let _ = worker.await;
    match &result {
        Ok(()) => tracing::info!("agent stopped"),
        Err(e) => tracing::error!(error = %e, "agent stopping"),
    }
    result
}

/// Runs role hooks one at a time, in order, off the session's path so heartbeats
/// go on while a hook runs. Records each handled role.
fn spawn_hook_worker(
    store: Store,
    hook: Option<RoleHook>,
) -> (
    mpsc::UnboundedSender<RoleChange>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<RoleChange>();
    let worker = tokio::spawn(async move {
        while let Some(change) = rx.recv().await {
            match &hook {
                Some(hook) => {
                    hook.run(&change).await;
                }
                None => tracing::debug!(role = %change.role, "no role hook configured"),
            }
            if let Err(e) = store.save_hooked_role(change.role) {
                tracing::warn!(error = %e, "cannot record that the role hook ran");
            }
        }
    });
    (tx, worker)
}

fn heartbeat_timer(interval_ms: u32) -> Interval {
    let period = Duration::from_millis(u64::from(interval_ms)).max(MIN_HEARTBEAT);
    // The Hello just sent counts as the first sign of life: first tick one period on.
    let mut timer = tokio::time::interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

fn message(kind: agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

impl Agent {
    /// Sessions, one after another, until shutdown or a fatal outcome.
    async fn reconnect_loop<F: Future<Output = ()>>(
        &mut self,
        max_backoff: Duration,
        shutdown: F,
    ) -> Result<(), RunError> {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(backoff::BASE, max_backoff);
        let mut index = 0;
        // A refusal stops the agent only once every server has been tried
        // since the first one and none accepted the node (one replica, or
        // whoever holds one server's key, cannot stop an agent another
        // server still takes; an unreachable one does not keep it going).
        let mut refused: Option<String> = None;
        let mut tried = std::collections::BTreeSet::new();
        let distinct: std::collections::BTreeSet<&String> = self.servers.iter().collect();
        let distinct = distinct.len();
        loop {
            let url = self.servers[index].clone();
            let outcome = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                outcome = self.session(&url) => outcome,
            };
            if let Some(observer) = &self.observer {
                observe(observer, self.connected, &outcome);
            }
            self.set_connected(false);
            match outcome {
                Outcome::Renewed => {
                    (refused, tried) = (None, Default::default());
                    tracing::info!(%url, "reconnecting with the renewed certificate");
                    continue;
                }
                Outcome::Rejected(reason) => {
                    tried.insert(url.clone());
                    if tried.len() >= distinct {
                        return Err(RunError::Rejected(reason));
                    }
                    tracing::warn!(
                        %url, %reason,
                        "this server refused the node; trying the others before stopping"
                    );
                    refused.get_or_insert(reason);
                    index = (index + 1) % self.servers.len();
                }
                Outcome::Fatal(e) => return Err(e),
                Outcome::Ended { up_for, reason } => {
                    (refused, tried) = (None, Default::default());
                    tracing::warn!(%url, up_for = ?up_for, %reason, "session ended");
                    // A session that lasted proves this server healthy: retry it
                    // first. One that did not counts as a failed attempt.
                    if !backoff.session_ended(up_for) {
                        index = (index + 1) % self.servers.len();
                    }
                }
                Outcome::Failed(reason) => {
                    tracing::warn!(%url, %reason, "cannot open a session");
                    if let Some(refusal) = &refused {
                        tried.insert(url.clone());
                        if tried.len() >= distinct {
                            return Err(RunError::Rejected(refusal.clone()));
                        }
                    }
                    index = (index + 1) % self.servers.len();
                }
            }
            let delay = backoff.next_delay();
            tracing::info!(delay = ?delay, next = %self.servers[index], "reconnecting");
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One session with `url`, from connect to its end.
    async fn session(&mut self, url: &str) -> Outcome {
        if cert::unix_now() >= self.cert.not_after {
            return self.reenroll(url).await;
        }
        let endpoint = match tls::endpoint(
            url,
            &self.node.ca_pem,
            Some((&self.node.cert_pem, &self.node.key_pem)),
        ) {
            Ok(e) => {
                let heartbeat = Duration::from_millis(u64::from(self.held.heartbeat_interval_ms));
                let (every, within) = ping_timing(heartbeat);
                e.local_address(self.source_address)
                    .tcp_keepalive(Some(TCP_KEEPALIVE))
                    .http2_keep_alive_interval(every)
                    .keep_alive_timeout(within)
                    .keep_alive_while_idle(true)
            }
            Err(e) => return Outcome::Fatal(e.into()),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return refusal::classify_error(&e).prefixed(url).into(),
        };
        let mut client = AgentServiceClient::new(channel.clone())
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let hello = message(agent_message::Kind::Hello(pb::Hello {
            last_revision: self.held.revision,
            facts: Some(self.facts()),
        }));
        self.facts_changed = false;
        self.session_fresh = true;
        // A fresh queue always has room.
        let _ = tx.try_send(hello);
        let opening = tokio::time::timeout(OPEN_TIMEOUT, client.session(ReceiverStream::new(rx)));
        let mut inbound = match opening.await {
            Err(_) => {
                return Outcome::Failed(format!(
                    "{url}: no answer to the session request within {OPEN_TIMEOUT:?}"
                ));
            }
            Ok(Err(status)) => return refusal::classify_status(&status).prefixed(url).into(),
            Ok(Ok(response)) => response.into_inner(),
        };
        let opened = Instant::now();
        self.set_connected(true);
        if let Some(shared) = &self.shared {
            shared.set(Some(channel.clone()));
        }
        if let Some(observer) = &self.observer {
            observer.notify(SessionEvent::Opened);
        }
        tracing::info!(%url, node_id = %self.node.node_id, "session open");

        let mut heartbeat = heartbeat_timer(self.held.heartbeat_interval_ms);
        let renewal = tokio::time::sleep(self.until_renewal());
        tokio::pin!(renewal);
        let mut renewing: Option<RenewCall> = None;
        let mut renew_backoff = Backoff::new(RENEW_RETRY_BASE, RENEW_RETRY_CAP);
        let ended = |reason: String| Outcome::Ended {
            up_for: opened.elapsed(),
            reason,
        };
        loop {
            tokio::select! {
                received = inbound.message() => match received {
                    Ok(Some(msg)) => {
                        let before = self.held.heartbeat_interval_ms;
                        if let Err(e) = self.on_server_message(msg) {
                            return Outcome::Fatal(e);
                        }
                        if self.facts_changed {
                            // The server learns what the host holds now (the
                            // next Hello says it too, if this is lost).
                            let facts = self.facts();
                            if tx.try_send(message(agent_message::Kind::Facts(facts))).is_ok() {
                                self.facts_changed = false;
                            }
                        }
                        if self.held.heartbeat_interval_ms != before {
                            heartbeat = heartbeat_timer(self.held.heartbeat_interval_ms);
                        }
                    }
                    Ok(None) => return ended("the server closed the session".into()),
                    Err(status) => match refusal::classify_status(&status) {
                        Refusal::Refused(reason) => return Outcome::Rejected(reason),
                        Refusal::Transient(reason) => return ended(reason),
                    },
                },
                _ = heartbeat.tick() => {
                    if let Some(site) = &self.site
                        && *site.cache.stats().borrow() != self.sent_cache
                    {
                        // What the site cache holds, for `flotilla sites`.
                        let _ = tx.try_send(message(agent_message::Kind::Facts(self.facts())));
                    }
                    match tx.try_send(message(agent_message::Kind::Heartbeat(pb::Heartbeat {}))) {
                        Ok(()) => tracing::trace!("heartbeat"),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!("the server is not reading; heartbeat skipped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return ended("the request stream closed".into());
                        }
                    }
                }
                () = &mut renewal, if renewing.is_none() => {
                    if cert::unix_now() < self.cert.renew_at() {
                        // Woke early (a capped timer, or the clock was set back).
                        renewal.as_mut().reset(Instant::now() + self.until_renewal());
                    } else {
                        tracing::info!(not_after = self.cert.not_after, "renewing the node certificate");
                        renewing = Some(Box::pin(request_renewal(client.clone())));
                    }
                }
                result = async {
                    match renewing.as_mut() {
                        Some(call) => call.await,
                        None => std::future::pending().await,
                    }
                }, if renewing.is_some() => {
                    renewing = None;
                    let failure = match result {
                        Ok((key, pem)) => match self.adopt_certificate(key, pem) {
                            Ok(()) => return Outcome::Renewed,
                            Err(AdoptError::Fatal(e)) => return Outcome::Fatal(e),
                            Err(AdoptError::Unusable(reason)) => reason,
                        },
                        Err(RenewFailure::Rejected(reason)) => return Outcome::Rejected(reason),
                        Err(RenewFailure::Retry(reason)) => reason,
                    };
                    let delay = renew_backoff.next_delay().max(Duration::from_secs(1));
                    tracing::warn!(reason = %failure, retry_in = ?delay, "certificate renewal failed");
                    renewal.as_mut().reset(Instant::now() + delay);
                }
            }
        }
    }

    /// Takes in one message from the server.
    fn on_server_message(&mut self, msg: pb::ServerMessage) -> Result<(), RunError> {
        let Some(server_message::Kind::Desired(desired)) = msg.kind else {
            tracing::debug!("ignoring a server message of an unknown kind");
            return Ok(());
        };
        self.on_desired(&desired)
    }

    /// Takes in a desired state: ignores an older one, persists a newer one (flushed)
    /// before acting on it, then queues the role hook if the role changed.
    fn on_desired(&mut self, msg: &pb::DesiredState) -> Result<(), RunError> {
        if !msg.node_id.is_empty() && msg.node_id != self.node.node_id {
            let for_node = limits::clip(&msg.node_id, 256);
            tracing::warn!(for_node = %for_node.escape_debug(), "ignoring desired state meant for another node");
            return Ok(());
        }
        // The group reaches the identity, logs and the role hook's environment:
        // a message whose group is no group name is malformed, all of it.
        if !msg.group.is_empty()
            && let Err(e) = limits::check_name("group", &msg.group, limits::MAX_GROUP_NAME_LEN)
        {
            tracing::warn!(error = %limits::clip(&e.to_string(), 512), "ignoring a malformed desired state");
            return Ok(());
        }
        // Before the manifests are offered: they may be signed by the new keys.
        // Taken from any desired state, older or not: each version proves itself.
        if let Some(next) = trust::adopt(&self.node, &msg.trust) {
            self.store.save_identity(&next)?;
            self.node = next;
            self.facts_changed = true;
            self.publish_status();
        }
        if let Some(observer) = &self.observer {
            observer.notify(SessionEvent::Desired {
                revision: msg.revision,
                manifests: &msg.manifests,
            });
        }
        // The heartbeat interval is session configuration, not revisioned state:
        // take it from any desired state, so a server that lowered it is obeyed
        // even when nothing else changed.
        if msg.heartbeat_interval_ms > 0 {
            self.held.heartbeat_interval_ms = msg.heartbeat_interval_ms.max(100);
        }
        // Revisions order one server's pushes. The first of a session is that
        // server's view now, taken even when its revision is lower than the
        // one held: a server restored from a backup counts from less, and a
        // revision once pushed too high (u64::MAX) must not make every later
        // one look stale forever.
        let order = match self.held.order(msg.revision) {
            Ordering::Older if self.session_fresh => {
                tracing::warn!(
                    held = self.held.revision,
                    received = msg.revision,
                    "the server's desired state has a lower revision than the one held \
                     (a server restored from a backup?); taking it as the server's view now"
                );
                Ordering::Newer
            }
            order => order,
        };
        self.session_fresh = false;
        if order != Ordering::Older {
            // Offered even at the same revision: after a restart the pipeline needs
            // the offer again, and it never starts a manifest twice.
            self.offer(msg);
        }
        match order {
            Ordering::Older => {
                tracing::debug!(
                    held = self.held.revision,
                    received = msg.revision,
                    "ignoring an older desired state"
                );
                return Ok(());
            }
            Ordering::Same => {
                tracing::trace!(revision = msg.revision, "desired state unchanged");
                return Ok(());
            }
            Ordering::Newer => {}
        }
        let Some(next) = Desired::from_proto(msg, self.held.heartbeat_interval_ms) else {
            tracing::warn!(
                revision = msg.revision,
                role = msg.role,
                "ignoring a desired state with no valid role"
            );
            return Ok(());
        };
        let previous = self.held;
        if !msg.group.is_empty() && msg.group != self.node.group {
            let mut node = self.node.clone();
            node.group = msg.group.clone();
            self.store.save_identity_and_desired(&node, &next)?;
            tracing::info!(from = %self.node.group, to = %node.group, "node moved to another group");
            self.node = node;
        } else {
            self.store.save_desired(&next)?;
        }
        self.held = next;
        tracing::info!(
            revision = next.revision, role = %next.role, desired_count = next.desired_count,
            unmanaged = next.unmanaged, heartbeat_ms = next.heartbeat_interval_ms,
            "new desired state"
        );
        if next.role != previous.role {
            tracing::info!(from = %previous.role, to = %next.role, "role changed");
            let _ = self.hooks.send(RoleChange {
                node_id: self.node.node_id.clone(),
                group: self.node.group.clone(),
                role: next.role,
                previous_role: Some(previous.role),
                desired_count: next.desired_count,
            });
        }
        self.publish_status();
        Ok(())
    }

    /// The host's facts as the server is told them.
    fn facts(&mut self) -> pb::NodeFacts {
        let mut facts = facts::node_facts(&self.node.machine_id, self.node.trust_version);
        if let Some(site) = &self.site {
            site.facts(&mut facts);
            self.sent_cache = crate::site::CacheStats {
                files: facts.site_cache_files,
                bytes: facts.site_cache_bytes,
            };
        }
        facts
    }

    fn offer(&self, msg: &pb::DesiredState) {
        let offer = Offer {
            manifests: msg.manifests.clone(),
            prefetch: msg.prefetch.clone(),
            rollback: msg.rollback.clone(),
            target: flotilla_proto::manifest::NodeTarget {
                group: if msg.group.is_empty() {
                    self.node.group.clone()
                } else {
                    msg.group.clone()
                },
                labels: msg.labels.clone().into_iter().collect(),
                os: std::env::consts::OS.to_string(),
                arch: std::env::consts::ARCH.to_string(),
            },
            site_peers: msg.site_peers.clone(),
        };
        let _ = self.offers.send(offer);
    }

    fn set_connected(&mut self, connected: bool) {
        if self.connected != connected {
            self.connected = connected;
            if let (false, Some(shared)) = (connected, &self.shared) {
                shared.set(None);
            }
            self.publish_status();
        }
    }

    /// Rewrites status.json. Failing to is logged, not fatal: it is a report, and
    /// the session matters more.
    fn publish_status(&self) {
        if let Some(t) = &self.textfile {
            t.session(self.connected, self.cert.not_after);
        }
        let written = Status::new(&self.node, &self.held, &self.servers, self.connected)
            .map_err(|e| e.to_string())
            .and_then(|s| s.write(self.store.dir()).map_err(|e| e.to_string()));
        if let Err(error) = written {
            tracing::warn!(%error, "cannot update status.json");
        }
    }
}

/// Tells `observer` how a session attempt ended: an open one ended, or one that
/// never opened failed.
fn observe(observer: &Observer, was_open: bool, outcome: &Outcome) {
    let reason = match outcome {
        Outcome::Failed(r) | Outcome::Rejected(r) | Outcome::Ended { reason: r, .. } => r.clone(),
        Outcome::Renewed => "reconnecting with a renewed certificate".into(),
        Outcome::Fatal(e) => e.to_string(),
    };
    observer.notify(if was_open {
        SessionEvent::Ended { reason: &reason }
    } else {
        SessionEvent::Failed { reason: &reason }
    });
}

mod options;
mod renewal;

pub use options::{DEFAULT_ALLOWED_PATHS, DEFAULT_MAX_ARTIFACT_BYTES, RunError, RunOptions};

#[cfg(test)]
mod tests;
