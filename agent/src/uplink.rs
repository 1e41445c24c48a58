//! The agent's way to the servers outside the session's own stream: the
//! session's connection while it is open and shared, then every server with
//! the node's current certificate (downloads, and a serving agent's questions
//! about its site's peers).

use std::net::IpAddr;

use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use crate::embed::SharedChannel;
use crate::patch::fetch::ClientSource;
use crate::state::Store;

/// Where the servers are and how to reach them.
#[derive(Clone)]
pub struct Uplink {
    pub store: Store,
    /// Server URLs, in order.
    pub servers: Vec<String>,
    pub shared: Option<SharedChannel>,
    /// The local address connections leave from (None: the system's choice).
    pub source_address: Option<IpAddr>,
}

impl Uplink {
    /// Clients as (name, client): the open session's connection first, when
    /// it is shared, then every server with the node's current certificate,
    /// so a call goes on elsewhere when the session's server goes away.
    pub fn clients(&self) -> Result<Vec<(String, AgentServiceClient<Channel>)>, String> {
        let mut clients = Vec::new();
        if let Some(channel) = self.shared.as_ref().and_then(SharedChannel::get) {
            let client = AgentServiceClient::new(channel)
                .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES);
            clients.push(("the session's server".to_string(), client));
        }
        let identity = match self.store.identity() {
            Ok(Some(identity)) => identity,
            // The session's connection alone will do.
            _ if !clients.is_empty() => return Ok(clients),
            Ok(None) => return Err("the agent has no identity".into()),
            Err(e) => return Err(e.to_string()),
        };
        for url in &self.servers {
            let endpoint = flotilla_proto::tls::endpoint(
                url,
                &identity.ca_pem,
                Some((&identity.cert_pem, &identity.key_pem)),
            )
            .map_err(|e| e.to_string())?
            .local_address(self.source_address);
            let client = AgentServiceClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES);
            clients.push((url.clone(), client));
        }
        Ok(clients)
    }

    /// The servers as an artifact source.
    pub fn source(&self) -> Result<ClientSource, String> {
        self.clients().map(ClientSource::new)
    }
}
