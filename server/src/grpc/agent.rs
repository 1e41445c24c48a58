//! AgentService: enrollment, the live session, certificate renewal, reports and
//! artifact fetch. Every call but Enroll identifies the node by its client
//! certificate, and refuses revoked or rejected nodes.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::limits;
use flotilla_proto::pb::{self, agent_message, server_message};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::app::App;
use crate::enroll::{self, JoinRequest};
use crate::error::Error;
use crate::model::ReportRecord;

type SessionStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

pub struct AgentApi {
    pub app: Arc<App>,
    /// How fast each node's reports are taken.
    reports: super::rate::NodeRate,
    /// How fast each node's certificate renewals are.
    renewals: super::rate::NodeRate,
    /// How fast each node opens sessions (each may store its facts).
    sessions: super::rate::NodeRate,
    /// Artifact downloads each node has open at once.
    downloads: crate::slots::KeyedSlots,
}

/// Artifact downloads one node may have open at once: an agent downloads a
/// patch's artifacts one after another, and a serving agent fills its site
/// cache a few at a time.
pub const DOWNLOADS_PER_NODE: usize = 8;

/// The node a call comes from: the subject, serial and validity (Unix
/// seconds) of its client certificate, and its status now.
struct Peer {
    node_id: String,
    serial: String,
    not_before: i64,
    not_after: i64,
    status: crate::model::NodeStatus,
}

fn peer_of<T>(req: &Request<T>) -> Result<Peer, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("this call needs the node's client certificate (join first)")
    })?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first)
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    let node_id = crate::ca::node_id_of(first)
        .filter(|id| id.starts_with("node-"))
        .ok_or_else(|| Status::unauthenticated("the client certificate does not name a node"))?;
    Ok(Peer {
        node_id,
        serial: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        status: crate::model::NodeStatus::Pending,
    })
}

impl AgentApi {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            reports: super::rate::NodeRate::reports(),
            renewals: super::rate::NodeRate::renewals(app.cfg.node_cert_lifetime),
            sessions: super::rate::NodeRate::sessions(),
            downloads: crate::slots::KeyedSlots::new(DOWNLOADS_PER_NODE),
            app,
        }
    }

    /// Identifies the calling node and checks it may still call: its
    /// connection is then an authenticated one (see `connections`).
    async fn authorized_peer<T>(&self, req: &Request<T>) -> Result<Peer, Status> {
        let mut peer = peer_of(req)?;
        peer.status = self
            .app
            .fleet
            .check_node_allowed(&peer.node_id, &peer.serial)
            .await?
            .status;
        self.app.connections.authenticated(req.remote_addr());
        Ok(peer)
    }

    /// [`Self::authorized_peer`]'s node id.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        Ok(self.authorized_peer(req).await?.node_id)
    }
}

fn key_proof(p: pb::KeyProof) -> crate::key_proof::KeyProof {
    crate::key_proof::KeyProof {
        node_id: p.node_id,
        at_unix: p.at_unix,
        signature: p.signature,
    }
}

/// Least time between two records of facts a session sends.
const FACTS_INTERVAL: Duration = Duration::from_secs(5);

/// What the outbound half of a session carries between messages.
struct Outbound {
    app: Arc<App>,
    peer: Peer,
    desired: tokio::sync::watch::Receiver<crate::fleet::Desired>,
    /// Cancelled when the node is revoked or a newer session replaces this one.
    replaced: CancellationToken,
    /// Cancelled when the inbound half ends (agent gone, silent, or done).
    ended: CancellationToken,
    first: bool,
    done: bool,
}

fn desired_message(d: &crate::fleet::Desired) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(server_message::Kind::Desired(d.into())),
    }
}

/// The server's half of a session: the desired state now, then on every
/// change, and a closing status when the server stops or the session is
/// replaced. A stream over the session's watch channel, not a task with a
/// queue: an idle session should cost the server as little as possible.
fn outbound(o: Outbound) -> SessionStream {
    Box::pin(futures::stream::unfold(o, |mut o| async move {
        if o.done {
            return None;
        }
        if o.first {
            o.first = false;
            let m = desired_message(&o.desired.borrow_and_update());
            return Some((Ok(m), o));
        }
        tokio::select! {
            _ = o.app.shutdown.cancelled() => {
                o.done = true;
                Some((Err(Status::unavailable("the server is shutting down")), o))
            }
            _ = o.replaced.cancelled() => {
                let status = match o.app.fleet.check_node_allowed(&o.peer.node_id, &o.peer.serial).await {
                    Err(e) => Status::from(e),
                    Ok(_) => Status::aborted("replaced by a newer session of this node"),
                };
                o.done = true;
                Some((Err(status), o))
            }
            _ = o.ended.cancelled() => None,
            changed = o.desired.changed() => match changed {
                Err(_) => None,
                Ok(()) => {
                    let d = o.desired.borrow_and_update();
                    // From the change that made it to its leaving for the node.
                    metrics::histogram!("flotilla_push_seconds").record(d.made_at.0.elapsed());
                    let m = desired_message(&d);
                    drop(d);
                    Some((Ok(m), o))
                }
            },
        }
    }))
}

impl AgentApi {
    /// The agent's half of a session: heartbeats keep it alive; silence past
    /// three intervals, the agent leaving, a replacement or shutdown end it.
    async fn watch_inbound(
        app: Arc<App>,
        node_id: String,
        mut inbound: Streaming<pb::AgentMessage>,
        session_id: u64,
        replaced: CancellationToken,
        ended: CancellationToken,
    ) {
        let allowed = app.cfg.heartbeat_interval * 3 + Duration::from_secs(1);
        // Only messages from the agent move the deadline, not our own pushes.
        let deadline = tokio::time::sleep(allowed);
        tokio::pin!(deadline);
        // Facts sent during the session are recorded at most once per
        // FACTS_INTERVAL: the newest waits for its turn, older ones are dropped.
        let mut facts: Option<crate::model::Facts> = None;
        let facts_turn = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(facts_turn);
        loop {
            tokio::select! {
                _ = app.shutdown.cancelled() => break,
                _ = replaced.cancelled() => break,
                () = &mut deadline => {
                    tracing::info!(node = %node_id, "no heartbeat in {allowed:?}; closing session");
                    break;
                }
                () = &mut facts_turn, if facts.is_some() => {
                    let f = facts.take().expect("guarded");
                    if let Err(e) = app.fleet.update_facts(&node_id, f).await {
                        tracing::warn!(node = %node_id, error = %e, "cannot record the node's facts");
                    }
                    facts_turn.as_mut().reset(tokio::time::Instant::now() + FACTS_INTERVAL);
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        deadline.as_mut().reset(tokio::time::Instant::now() + allowed);
                        if let Some(agent_message::Kind::Facts(f)) = m.kind {
                            let f: crate::model::Facts = f.into();
                            match enroll::check_facts(&f) {
                                Ok(()) => facts = Some(f),
                                Err(e) => {
                                    tracing::info!(node = %node_id, error = %e, "facts refused; closing session");
                                    break;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %node_id, %status, "session stream error");
                        break;
                    }
                },
            }
        }
        ended.cancel();
        app.fleet.close_session(&node_id, session_id).await;
        tracing::debug!(node = %node_id, "session ended");
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let addr = request.remote_addr();
        let source = addr.map(|a| a.ip());
        let pb::EnrollRequest {
            token_id,
            token_secret,
            csr_der,
            facts,
            labels,
            proof,
        } = request.into_inner();
        let facts = facts.ok_or_else(|| Status::invalid_argument("facts are missing"))?;
        let joined = enroll::join(
            &self.app,
            JoinRequest {
                source,
                token_id,
                token_secret,
                csr_der,
                facts: facts.into(),
                labels: labels.into_iter().collect(),
                proof: proof.map(key_proof),
            },
        )
        .await?;
        // A join that succeeded proved the token: its connection may stay.
        self.app.connections.authenticated(addr);
        let role = super::views::role(joined.node.status, joined.node.role);
        let trust = crate::trust::for_join(&self.app.db, &joined.trust_sha256).await?;
        Ok(Response::new(pb::EnrollResponse {
            node_id: joined.node.id,
            certificate_pem: joined.certificate_pem,
            ca_certificate_pem: self.app.ca.cert_pem().to_string(),
            group: joined.node.group,
            role: role as i32,
            rejoined: joined.rejoined,
            trust: trust.iter().map(Into::into).collect(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = self.authorized_peer(&request).await?;
        let node_id = peer.node_id.clone();
        self.sessions.check(&node_id)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(agent_message::Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ));
            }
        };
        if let Some(facts) = hello.facts {
            let facts: crate::model::Facts = facts.into();
            enroll::check_facts(&facts)?;
            self.app.fleet.update_facts(&node_id, facts).await?;
        }
        let grant = self.app.fleet.open_session(&node_id).await?;
        tracing::debug!(node = %node_id, last_revision = hello.last_revision, "session opened");
        let ended = CancellationToken::new();
        tokio::spawn(Self::watch_inbound(
            self.app.clone(),
            node_id,
            inbound,
            grant.id,
            grant.cancel.clone(),
            ended.clone(),
        ));
        Ok(Response::new(outbound(Outbound {
            app: self.app.clone(),
            peer,
            desired: grant.desired,
            replaced: grant.cancel,
            ended,
            first: true,
            done: false,
        })))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let peer = self.authorized_peer(&request).await?;
        let node_id = peer.node_id;
        // Each renewal is a CA signature, a store write and an audit entry
        // kept for good: a node no operator has accepted gets the one its
        // agent needs while it waits (a refusal takes nothing from its rate).
        if peer.status != crate::model::NodeStatus::Accepted {
            super::renewal::check_pending(
                &node_id,
                peer.not_before,
                peer.not_after,
                crate::model::now_secs(),
            )?;
        }
        self.renewals.check(&node_id)?;
        let csr = request.into_inner().csr_der;
        let cert = self
            .app
            .ca
            .issue_node_cert(&csr, &node_id, self.app.cfg.node_cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.app.fleet.set_certificate(&node_id, &cert).await?;
        self.app
            .audit
            .record(
                &format!("node:{node_id}"),
                crate::audit::Action::NodeRenew,
                &node_id,
                serde_json::json!({ "certificate_serial": cert.serial_hex }),
            )
            .await?;
        Ok(Response::new(pb::RenewCertificateResponse {
            certificate_pem: cert.pem,
        }))
    }

    async fn reenroll(
        &self,
        request: Request<pb::ReenrollRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let addr = request.remote_addr();
        let source = addr.map(|a| a.ip());
        let r = request.into_inner();
        let p = r
            .proof
            .ok_or_else(|| Status::invalid_argument("a proof of the node's key is missing"))?;
        let proof = key_proof(p);
        let cert = enroll::reenroll(&self.app, source, &r.csr_der, &proof).await?;
        // The node's key checked out.
        self.app.connections.authenticated(addr);
        Ok(Response::new(pb::RenewCertificateResponse {
            certificate_pem: cert.pem,
        }))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let node_id = self.authorize(&request).await?;
        self.reports.check(&node_id)?;
        let r = request.into_inner();
        flotilla_proto::limits::check_name("report id", &r.report_id, 64).map_err(Error::from)?;
        flotilla_proto::limits::check_name("manifest id", &r.manifest_id, 128)
            .map_err(Error::from)?;
        if r.error.len() > limits::MAX_REPORT_TEXT || r.log_tail.len() > limits::MAX_REPORT_TEXT {
            return Err(Status::invalid_argument(format!(
                "report error and log tail are limited to {} bytes each",
                limits::MAX_REPORT_TEXT
            )));
        }
        let phase = pb::PatchPhase::try_from(r.phase)
            .ok()
            .and_then(flotilla_proto::phase::Phase::from_proto)
            .ok_or_else(|| Status::invalid_argument(format!("unknown patch phase {}", r.phase)))?;
        let rec = ReportRecord {
            report_id: r.report_id.clone(),
            node_id: node_id.clone(),
            manifest_id: r.manifest_id,
            phase,
            at_ms: r.at_unix_ms,
            error: r.error,
            log_tail: r.log_tail,
            transfer: r
                .transfer
                .map(flotilla_proto::transfer::Transfer::from_proto),
        };
        let phase_name = phase.as_str();
        let recorded = crate::patches::record_report(&self.app, &node_id, rec).await?;
        if recorded {
            metrics::counter!("flotilla_reports_total", "phase" => phase_name).increment(1);
        }
        Ok(Response::new(pb::ReportResponse { recorded }))
    }

    type FetchArtifactStream = super::artifact_stream::ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let peer = self.authorized_peer(&request).await?;
        let node_id = peer.node_id;
        // A pending node is offered nothing, so it fetches nothing.
        if peer.status != crate::model::NodeStatus::Accepted {
            return Err(Status::permission_denied(format!(
                "node {node_id} is waiting for an operator's approval: it downloads nothing until accepted"
            )));
        }
        let mine = self.downloads.take(&node_id).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "node {node_id} has {} artifact downloads open already; try again when one ends",
                self.downloads.max_per_key()
            ))
        })?;
        let r = request.into_inner();
        crate::artifacts::check_sha256(&r.sha256)?;
        // A site's nodes share its uplink: so many download at once (the
        // fleet is asked only when there is a cap).
        let sites = &self.app.artifacts.sites;
        // The agent serving its site fetches for all of it: never queued
        // behind the site's others.
        let site = match sites.max() {
            0 => None,
            _ if self.app.fleet.serves_its_site(&node_id).await => None,
            _ => self.app.fleet.site_of(&node_id).await,
        };
        let slot = match site {
            Some(site) => Some(sites.take(&site).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "site {site}: {} downloads at once already; try again shortly",
                    sites.max()
                ))
            })?),
            None => None,
        };
        // Not here yet (published on another replica): fetched from one that
        // holds it, only for an artifact of a published patch.
        if self.app.artifacts.complete_size(&r.sha256).is_none()
            && let Some(size) = self.app.fleet.artifact_size(&r.sha256).await
        {
            self.app
                .peers
                .fetch(&self.app.artifacts, &r.sha256, size)
                .await?;
        }
        Ok(Response::new(
            super::artifact_stream::serve(&self.app.artifacts, &r.sha256, r.offset, (slot, mine))
                .await?,
        ))
    }

    async fn authorize_site_peer(
        &self,
        request: Request<pb::AuthorizeSitePeerRequest>,
    ) -> Result<Response<pb::AuthorizeSitePeerResponse>, Status> {
        let peer = self.authorized_peer(&request).await?;
        let node_id = peer.node_id;
        // Only accepted nodes serve a site: a pending one has no business
        // asking what its peers were offered.
        if peer.status != crate::model::NodeStatus::Accepted {
            return Err(Status::permission_denied(format!(
                "node {node_id} is waiting for an operator's approval: it serves no site peers until accepted"
            )));
        }
        let r = request.into_inner();
        crate::artifacts::check_sha256(&r.sha256)?;
        limits::check_text("peer node id", &r.peer_node_id, limits::MAX_FACT_LEN)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let size = self
            .app
            .fleet
            .authorize_site_peer(&node_id, &r.peer_node_id, &r.sha256)
            .await?;
        Ok(Response::new(pb::AuthorizeSitePeerResponse { size }))
    }
}
