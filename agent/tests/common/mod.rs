//! An in-process fake of the server's AgentService, with its own CA, for testing the
//! agent's side of the protocol without the real server.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_agent::{JoinOptions, Status};
use flotilla_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use flotilla_proto::pb::{self, agent_message, server_message};
use flotilla_proto::token::JoinToken;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status as GrpcStatus, Streaming};

pub struct Fake {
    pub issuer: Issuer<'static, KeyPair>,
    pub token: JoinToken,
    pub cert_lifetime: Duration,
    pub serial: AtomicU64,
    pub enrolls: AtomicUsize,
    pub sessions: AtomicUsize,
    pub renewals: AtomicUsize,
    pub heartbeats: AtomicUsize,
    pub hellos: Mutex<Vec<pb::Hello>>,
    pub revoked: AtomicBool,
    pub push: broadcast::Sender<Result<pb::ServerMessage, GrpcStatus>>,
}

impl Fake {
    pub fn issue(&self, csr_der: &[u8], cn: &str) -> Result<String, GrpcStatus> {
        let mut csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| GrpcStatus::invalid_argument(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.distinguished_name = rcgen::DistinguishedName::new();
        csr.params.distinguished_name.push(DnType::CommonName, cn);
        csr.params.not_before = now - time::Duration::seconds(1);
        csr.params.not_after = now + self.cert_lifetime;
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.serial_number = Some(
            self.serial
                .fetch_add(1, SeqCst)
                .to_be_bytes()
                .to_vec()
                .into(),
        );
        Ok(csr
            .signed_by(&self.issuer)
            .map_err(|e| GrpcStatus::internal(e.to_string()))?
            .pem())
    }
}

#[derive(Clone)]
pub struct Service(Arc<Fake>);

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, GrpcStatus>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, GrpcStatus>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, GrpcStatus> {
        let req = request.into_inner();
        if req.token_id != self.0.token.id || req.token_secret != self.0.token.secret {
            return Err(GrpcStatus::permission_denied("join token is not valid"));
        }
        if req.facts.as_ref().map(|f| f.machine_id.as_str()) != Some("machine-1") {
            return Err(GrpcStatus::invalid_argument("unexpected machine id"));
        }
        self.0.enrolls.fetch_add(1, SeqCst);
        Ok(Response::new(pb::EnrollResponse {
            node_id: "node-1".into(),
            certificate_pem: self.0.issue(&req.csr_der, "node-1")?,
            ca_certificate_pem: String::new(),
            group: "depots".into(),
            role: pb::Role::Active as i32,
            rejoined: false,
            trust: Vec::new(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, GrpcStatus> {
        if request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(GrpcStatus::unauthenticated("client certificate required"));
        }
        if self.0.revoked.load(SeqCst) {
            return Err(GrpcStatus::permission_denied("node node-1 is revoked"));
        }
        let mut inbound = request.into_inner();
        let Some(pb::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(GrpcStatus::invalid_argument("Hello first"));
        };
        self.0.hellos.lock().unwrap().push(hello);
        self.0.sessions.fetch_add(1, SeqCst);
        let (tx, rx) = mpsc::channel(16);
        let mut pushes = self.0.push.subscribe();
        let fake = self.0.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(_)) })) => {
                            fake.heartbeats.fetch_add(1, SeqCst);
                        }
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                    push = pushes.recv() => match push {
                        Ok(item) => if tx.send(item).await.is_err() { return },
                        Err(_) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, GrpcStatus> {
        if request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(GrpcStatus::unauthenticated("client certificate required"));
        }
        self.0.renewals.fetch_add(1, SeqCst);
        let pem = self.0.issue(&request.into_inner().csr_der, "node-1")?;
        Ok(Response::new(pb::RenewCertificateResponse {
            certificate_pem: pem,
        }))
    }

    async fn reenroll(
        &self,
        _request: Request<pb::ReenrollRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, GrpcStatus> {
        // This stand-in keeps no node keys: the real server's check is tested
        // end to end.
        Err(GrpcStatus::permission_denied("not renewable here"))
    }

    async fn report(
        &self,
        _: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, GrpcStatus> {
        Err(GrpcStatus::unimplemented("not in this fake"))
    }

    type FetchArtifactStream = ChunkStream;

    async fn fetch_artifact(
        &self,
        _: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<ChunkStream>, GrpcStatus> {
        Err(GrpcStatus::unimplemented("not in this fake"))
    }

    async fn authorize_site_peer(
        &self,
        _: Request<pb::AuthorizeSitePeerRequest>,
    ) -> Result<Response<pb::AuthorizeSitePeerResponse>, GrpcStatus> {
        Err(GrpcStatus::unimplemented("not in this fake"))
    }
}

/// Starts a fake server on 127.0.0.1; returns it and its URL.
pub async fn start(cert_lifetime: Duration) -> (Arc<Fake>, String) {
    flotilla_proto::install_crypto_provider();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake flotilla CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let fingerprint = flotilla_proto::sha256_hex(ca_cert.der());
    let fake = Arc::new(Fake {
        issuer,
        token: JoinToken::generate(&fingerprint, None),
        cert_lifetime,
        serial: AtomicU64::new(1),
        enrolls: AtomicUsize::new(0),
        sessions: AtomicUsize::new(0),
        renewals: AtomicUsize::new(0),
        heartbeats: AtomicUsize::new(0),
        hellos: Mutex::new(Vec::new()),
        revoked: AtomicBool::new(false),
        push: broadcast::channel(16).0,
    });
    // The chain carries the CA, so the agent can pin it by fingerprint.
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, server_key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(ca_cert.pem()))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let service = AgentServiceServer::new(Service(fake.clone()));
    tokio::spawn(async move {
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (fake, url)
}

/// A URL where nothing listens.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
}

pub fn join_opts(servers: Vec<String>, token: &JoinToken, state_dir: &Path) -> JoinOptions {
    JoinOptions {
        servers,
        token: token.to_string(),
        labels: [("zone".to_string(), "eu-1".to_string())].into(),
        machine_id: Some("machine-1".into()),
        state_dir: state_dir.to_path_buf(),
        trusted_keys: Vec::new(),
        trust_threshold: 1,
        again: false,
    }
}

pub fn desired(revision: u64, role: pb::Role) -> Result<pb::ServerMessage, GrpcStatus> {
    Ok(pb::ServerMessage {
        kind: Some(server_message::Kind::Desired(pb::DesiredState {
            revision,
            node_id: "node-1".into(),
            group: "depots".into(),
            desired_count: 1,
            unmanaged: false,
            role: role as i32,
            heartbeat_interval_ms: 100,
            ..Default::default()
        })),
    })
}

/// Polls `check` until it holds or `secs` pass.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn status(dir: &Path) -> Option<Status> {
    Status::read(dir).ok()
}

pub fn hook_script(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("hook.log");
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$FLOTILLA_NODE_ID $FLOTILLA_PREVIOUS_ROLE>$FLOTILLA_ROLE \
             $FLOTILLA_DESIRED_COUNT\" >> '{}'\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    (hook, log)
}
