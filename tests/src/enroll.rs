//! Joining over gRPC with a key the test holds, as a forger or a guesser would,
//! and calling the server as that node.

use flotilla_proto::pb::{self, agent_service_client::AgentServiceClient};
use flotilla_proto::token::JoinToken;
use tonic::transport::Channel;

use crate::Server;

/// Facts of a made-up host.
pub fn facts(machine: &str) -> pb::NodeFacts {
    pb::NodeFacts {
        hostname: machine.into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        agent_version: "0".into(),
        machine_id: machine.into(),
        trust_version: 0,
    }
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
    let channel = flotilla_proto::tls::endpoint(
        &url,
        &ca,
        Some((&joined.certificate_pem, &key.serialize_pem())),
    )
    .expect("endpoint")
    .connect()
    .await
    .map_err(unavailable)?;
    Ok((joined.node_id, AgentServiceClient::new(channel)))
}
