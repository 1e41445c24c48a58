//! AgentService: enrollment, the live session, certificate renewal, reports and
//! artifact fetch. Every call but Enroll identifies the node by its client
//! certificate, and refuses revoked or rejected nodes.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::limits;
use flotilla_proto::pb::{self, agent_message, server_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
}

/// The node a call comes from: the subject and serial of its client certificate.
struct Peer {
    node_id: String,
    serial: String,
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
    })
}

impl AgentApi {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            reports: super::rate::NodeRate::reports(),
        }
    }

    /// Identifies the calling node and checks it may still call.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let peer = peer_of(req)?;
        self.app
            .fleet
            .check_node_allowed(&peer.node_id, &peer.serial)
            .await?;
        Ok(peer.node_id)
    }
}

/// Where an artifact download's bytes come from.
enum Body {
    /// Held in memory: chunks are slices of it.
    Memory(prost::bytes::Bytes),
    /// Too large to hold: read from disk (already at the request's offset).
    File(tokio::fs::File),
}

impl Body {
    /// Up to `max` bytes at `offset`; empty at the end.
    async fn read(&mut self, offset: u64, max: usize) -> std::io::Result<prost::bytes::Bytes> {
        match self {
            Body::Memory(b) => {
                let start = (offset as usize).min(b.len());
                Ok(b.slice(start..(start + max).min(b.len())))
            }
            Body::File(f) => {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; max];
                let n = f.read(&mut buf).await?;
                buf.truncate(n);
                Ok(buf.into())
            }
        }
    }
}

/// What the outbound half of a session carries between messages.
struct Outbound {
    app: Arc<App>,
    peer: Peer,
    desired: tokio::sync::watch::Receiver<pb::DesiredState>,
    /// Cancelled when the node is revoked or a newer session replaces this one.
    replaced: CancellationToken,
    /// Cancelled when the inbound half ends (agent gone, silent, or done).
    ended: CancellationToken,
    first: bool,
    done: bool,
}

fn desired_message(d: pb::DesiredState) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(server_message::Kind::Desired(d)),
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
            let d = o.desired.borrow_and_update().clone();
            return Some((Ok(desired_message(d)), o));
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
                    let d = o.desired.borrow_and_update().clone();
                    Some((Ok(desired_message(d)), o))
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
        loop {
            tokio::select! {
                _ = app.shutdown.cancelled() => break,
                _ = replaced.cancelled() => break,
                () = &mut deadline => {
                    tracing::info!(node = %node_id, "no heartbeat in {allowed:?}; closing session");
                    break;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(_)) => deadline.as_mut().reset(tokio::time::Instant::now() + allowed),
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
        let source = request.remote_addr().map(|a| a.ip());
        let pb::EnrollRequest {
            token_id,
            token_secret,
            csr_der,
            facts,
            labels,
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
            },
        )
        .await?;
        let role = crate::fleet::role_to_pb(joined.node.status, joined.node.role);
        Ok(Response::new(pb::EnrollResponse {
            node_id: joined.node.id,
            certificate_pem: joined.certificate_pem,
            ca_certificate_pem: self.app.ca.cert_pem().to_string(),
            group: joined.node.group,
            role: role as i32,
            rejoined: joined.rejoined,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = peer_of(&request)?;
        self.app
            .fleet
            .check_node_allowed(&peer.node_id, &peer.serial)
            .await?;
        let node_id = peer.node_id.clone();
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
        let node_id = self.authorize(&request).await?;
        let csr = request.into_inner().csr_der;
        let cert = self
            .app
            .ca
            .issue_node_cert(&csr, &node_id, self.app.cfg.node_cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.app
            .fleet
            .set_certificate(&node_id, &cert.serial_hex, cert.not_after)
            .await?;
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
        if pb::PatchPhase::try_from(r.phase).is_err() || r.phase == 0 {
            return Err(Status::invalid_argument(format!(
                "unknown patch phase {}",
                r.phase
            )));
        }
        let rec = ReportRecord {
            report_id: r.report_id.clone(),
            node_id: node_id.clone(),
            manifest_id: r.manifest_id,
            phase: r.phase,
            at_ms: r.at_unix_ms,
            error: r.error,
            log_tail: r.log_tail,
        };
        let recorded = crate::patches::record_report(&self.app, &node_id, rec).await?;
        Ok(Response::new(pb::ReportResponse { recorded }))
    }

    type FetchArtifactStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.authorize(&request).await?;
        let r = request.into_inner();
        if r.sha256.len() != 64 || !r.sha256.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(Status::invalid_argument(
                "sha256 must be 64 lower-case hex characters",
            ));
        }
        let (mut body, len) = match self.app.artifacts.in_memory(&r.sha256).await? {
            Some(bytes) => {
                let len = bytes.len() as u64;
                (Body::Memory(bytes), len)
            }
            None => {
                let path = self.app.artifacts.path(&r.sha256);
                let file = tokio::fs::File::open(&path).await.map_err(|_| {
                    Status::not_found(format!("no artifact with sha256 {}", r.sha256))
                })?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .len();
                (Body::File(file), len)
            }
        };
        if r.offset > len {
            return Err(Status::out_of_range(format!(
                "offset {} is past the artifact's end ({len} bytes)",
                r.offset
            )));
        }
        if let Body::File(file) = &mut body {
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(r.offset))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        tracing::debug!(sha256 = %r.sha256, offset = r.offset, "artifact fetch");

        #[cfg(feature = "fault-injection")]
        mod fault {
            //! TEST-ONLY fault injection (cargo feature `fault-injection`, never in a
            //! shipped build): `FLOTILLA_FAULT_ARTIFACT_RATE` (bytes/s) throttles every
            //! artifact stream; `FLOTILLA_FAULT_ARTIFACT_CUT_AFTER` (bytes) breaks the
            //! first stream this process serves with `Unavailable` after that many bytes.
            use std::sync::atomic::{AtomicBool, Ordering};
            use std::time::Duration;

            static CUT_DONE: AtomicBool = AtomicBool::new(false);

            fn env(name: &str) -> Option<u64> {
                std::env::var(name).ok()?.trim().parse().ok()
            }

            pub struct Faults {
                rate: Option<u64>,
                cut_left: Option<u64>,
            }

            impl Faults {
                pub fn for_stream() -> Self {
                    let rate = env("FLOTILLA_FAULT_ARTIFACT_RATE").filter(|r| *r > 0);
                    let cut_left = env("FLOTILLA_FAULT_ARTIFACT_CUT_AFTER")
                        .filter(|_| !CUT_DONE.swap(true, Ordering::SeqCst));
                    if rate.is_some() || cut_left.is_some() {
                        tracing::warn!(?rate, ?cut_left, "fault injection: artifact stream");
                    }
                    Self { rate, cut_left }
                }

                /// How many bytes to read next, or the cut.
                pub fn next_len(&self, max: usize) -> Result<usize, tonic::Status> {
                    let mut n = max as u64;
                    if let Some(rate) = self.rate {
                        n = n.min((rate / 10).max(1));
                    }
                    if let Some(left) = self.cut_left {
                        if left == 0 {
                            tracing::warn!("fault injection: cutting the artifact stream");
                            return Err(tonic::Status::unavailable("fault injection: cut"));
                        }
                        n = n.min(left);
                    }
                    Ok(n as usize)
                }

                /// Accounts `n` bytes read, sleeping as long as they take at the rate.
                pub async fn sent(&mut self, n: usize) {
                    if let Some(left) = self.cut_left.as_mut() {
                        *left = left.saturating_sub(n as u64);
                    }
                    if let Some(rate) = self.rate {
                        let nanos = (n as u128 * 1_000_000_000 / u128::from(rate)) as u64;
                        tokio::time::sleep(Duration::from_nanos(nanos)).await;
                    }
                }
            }
        }
        #[cfg(feature = "fault-injection")]
        let mut faults = fault::Faults::for_stream();

        // A small channel bounds what a slow downloader holds on the server.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut offset = r.offset;
            loop {
                #[cfg(feature = "fault-injection")]
                let want = match faults.next_len(limits::ARTIFACT_CHUNK_BYTES) {
                    Ok(n) => n,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                #[cfg(not(feature = "fault-injection"))]
                let want = limits::ARTIFACT_CHUNK_BYTES;
                match body.read(offset, want).await {
                    Ok(data) if data.is_empty() => break,
                    Ok(data) => {
                        let n = data.len();
                        #[cfg(feature = "fault-injection")]
                        faults.sent(n).await;
                        let chunk = pb::ArtifactChunk { offset, data };
                        offset += n as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::Body;

    /// Reads `body` to its end from `offset` in chunks of `max`.
    async fn read_all(mut body: Body, mut offset: u64, max: usize) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            let data = body.read(offset, max).await.unwrap();
            if data.is_empty() {
                return chunks;
            }
            offset += data.len() as u64;
            chunks.push(data.to_vec());
        }
    }

    #[tokio::test]
    async fn memory_and_file_bodies_give_the_same_chunks_from_an_offset() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifact");
        std::fs::write(&path, &bytes).unwrap();
        let held = read_all(Body::Memory(bytes.clone().into()), 100, 256).await;
        let mut file = tokio::fs::File::open(&path).await.unwrap();
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(100)).await.unwrap();
        let from_disk = read_all(Body::File(file), 100, 256).await;
        assert_eq!(held, from_disk);
        assert_eq!(
            held.iter().map(Vec::len).collect::<Vec<_>>(),
            [256, 256, 256, 132]
        );
        assert_eq!(held.concat(), bytes[100..]);
        // At the end (a resume of a complete download): nothing, not an error.
        assert!(
            read_all(Body::Memory(bytes.into()), 1000, 256)
                .await
                .is_empty()
        );
    }
}
