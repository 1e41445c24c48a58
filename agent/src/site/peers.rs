//! The site peers an agent is told of, as an artifact source: each reached
//! over mutual TLS with this node's certificate, its own checked against the
//! name of the node the server named (see `flotilla_proto::site`).

use std::time::Duration;

use flotilla_proto::pb::{self, site_service_client::SiteServiceClient};
use tonic::transport::Channel;

use crate::patch::fetch::{ArtifactSource, BoxFuture};
use crate::state::Identity;

/// How long connecting to a peer may take: it is on the local network.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The peers of one download, in the server's order.
#[derive(Clone)]
pub struct PeerSource {
    peers: Vec<(String, SiteServiceClient<Channel>)>,
}

impl PeerSource {
    /// Clients for `peers` (those whose URL is unusable are left out).
    pub fn new(
        peers: &[pb::SitePeer],
        identity: &Identity,
        source_address: Option<std::net::IpAddr>,
    ) -> Self {
        let peers = peers
            .iter()
            .filter(|p| p.node_id != identity.node_id)
            .filter_map(|p| {
                let endpoint = flotilla_proto::tls::endpoint_named(
                    &p.url,
                    &flotilla_proto::site::server_name(&p.node_id),
                    &identity.ca_pem,
                    Some((&identity.cert_pem, &identity.key_pem)),
                )
                .map_err(|e| tracing::warn!(peer = %p.node_id, error = %e, "unusable site peer"))
                .ok()?
                .connect_timeout(CONNECT_TIMEOUT)
                .local_address(source_address);
                let client = SiteServiceClient::new(endpoint.connect_lazy())
                    .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES);
                Some((format!("site peer {} ({})", p.node_id, p.url), client))
            })
            .collect();
        Self { peers }
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

impl ArtifactSource for PeerSource {
    fn fetch(
        &self,
        peer: usize,
        sha256: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<tonic::Streaming<pb::ArtifactChunk>, tonic::Status>> {
        let client = self.peers.get(peer).map(|(_, c)| c.clone());
        let request = pb::FetchArtifactRequest {
            sha256: sha256.to_string(),
            offset,
        };
        Box::pin(async move {
            let mut client =
                client.ok_or_else(|| tonic::Status::invalid_argument(format!("no peer {peer}")))?;
            Ok(client.fetch_artifact(request).await?.into_inner())
        })
    }

    fn servers(&self) -> usize {
        self.peers.len()
    }

    fn describe(&self, peer: usize) -> String {
        self.peers
            .get(peer)
            .map_or_else(|| format!("site peer #{peer}"), |(name, _)| name.clone())
    }

    fn is_peer(&self) -> bool {
        true
    }
}
