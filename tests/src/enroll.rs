//! Joining over gRPC with a key the test holds, as a forger or a guesser would,
//! and calling the server as that node.

use flotilla_proto::pb::{self, agent_service_client::AgentServiceClient};
use flotilla_proto::token::JoinToken;
use tonic::transport::Channel;

use crate::Server;

/// A single-threaded runtime for calls made by hand, the crypto provider
/// installed.
pub fn runtime() -> tokio::runtime::Runtime {
    flotilla_proto::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Facts of a made-up host.
pub fn facts(machine: &str) -> pb::NodeFacts {
    pb::NodeFacts {
        hostname: machine.into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        agent_version: "0".into(),
        machine_id: machine.into(),
        trust_version: 0,
        ..Default::default()
    }
}

/// A node enrolled by hand: its id, certificate and key (PEM).
pub struct Enrolled {
    pub node_id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Enrolls `machine` from the local address `source` with `token` (its own
/// secret, or `secret`); returns the node id and a client calling as that node.
pub async fn enroll(
    server: &Server,
    source: &str,
    token: &JoinToken,
    secret: Option<&str>,
    machine: &str,
) -> Result<(String, AgentServiceClient<Channel>), tonic::Status> {
    let node = enroll_identity(server, source, token, secret, machine).await?;
    let client = node.client(server).await?;
    Ok((node.node_id, client))
}

impl Enrolled {
    /// A client of `server` calling as this node.
    pub async fn client(
        &self,
        server: &Server,
    ) -> Result<AgentServiceClient<Channel>, tonic::Status> {
        let channel = flotilla_proto::tls::endpoint(
            &server.url(),
            &server.ca_pem(),
            Some((&self.cert_pem, &self.key_pem)),
        )
        .expect("endpoint")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(AgentServiceClient::new(channel))
    }
}

/// [`enroll`], returning the node's identity rather than a client.
pub async fn enroll_identity(
    server: &Server,
    source: &str,
    token: &JoinToken,
    secret: Option<&str>,
    machine: &str,
) -> Result<Enrolled, tonic::Status> {
    let (url, ca) = (server.url(), server.ca_pem());
    let unavailable = |e: tonic::transport::Error| tonic::Status::unavailable(e.to_string());
    let anon = flotilla_proto::tls::endpoint(&url, &ca, None)
        .expect("endpoint")
        .local_address(Some(source.parse().expect("source address")))
        .connect()
        .await
        .map_err(unavailable)?;
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec();
    let joined = AgentServiceClient::new(anon)
        .enroll(pb::EnrollRequest {
            token_id: token.id.clone(),
            token_secret: secret.unwrap_or(&token.secret).to_string(),
            csr_der: csr,
            facts: Some(facts(machine)),
            labels: Default::default(),
            proof: None,
        })
        .await?
        .into_inner();
    Ok(Enrolled {
        node_id: joined.node_id,
        cert_pem: joined.certificate_pem,
        key_pem: key.serialize_pem(),
    })
}

/// A node's session held by hand: Hello, then a heartbeat every 100 ms until
/// the returned task is aborted; the desired states come on the stream.
pub async fn open_session(
    node: &mut AgentServiceClient<Channel>,
    machine: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tonic::Streaming<pb::ServerMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            last_revision: 0,
            facts: Some(facts(machine)),
        })),
    };
    tx.send(hello).await.expect("queue the hello");
    let beat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let msg = pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {})),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let states = node
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session opens")
        .into_inner();
    (beat, states)
}

/// The desired state on `states` that first offers patch `id` (within 30 s).
pub async fn offered(
    states: &mut tonic::Streaming<pb::ServerMessage>,
    id: &str,
) -> (pb::DesiredState, pb::SignedManifest) {
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let msg = states.message().await.unwrap().expect("a desired state");
            let Some(pb::server_message::Kind::Desired(d)) = msg.kind else {
                continue;
            };
            if let Some(m) = d.manifests.iter().find(|m| m.id == id).cloned() {
                return (d, m);
            }
        }
    })
    .await
    .expect("the patch is offered within 30s")
}

/// An admin client calling as the server's first credential, to send what
/// the CLI would refuse to send (or more of it than the CLI would).
pub async fn admin(
    server: &Server,
) -> pb::admin_service_client::AdminServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl tonic::service::Interceptor + use<>,
    >,
> {
    let file = std::fs::read_to_string(server.credential()).expect("credential file");
    let credential = file
        .lines()
        .find_map(|l| l.strip_prefix("credential = "))
        .expect("a credential line")
        .trim_matches('"')
        .to_string();
    let channel = flotilla_proto::tls::endpoint(&server.url(), &server.ca_pem(), None)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {credential}")
        .parse()
        .expect("header value");
    pb::admin_service_client::AdminServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        },
    )
}
