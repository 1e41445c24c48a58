//! Sends queued reports to the server over the node's mutual-TLS channel,
//! rebuilding the channel (with the newest certificate, on the next server) after
//! a failure.

use std::sync::Arc;

use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use super::outbox::Report;
use crate::embed::SharedChannel;
use crate::state::Store;

/// A report sender shared by the outbox's retry loop.
#[derive(Clone)]
pub struct Reporter {
    store: Store,
    servers: Vec<String>,
    current: Arc<Mutex<(usize, Option<AgentServiceClient<Channel>>)>>,
    /// The session's connection, used while it is open (the fleet simulator).
    shared: Option<SharedChannel>,
    /// The local address report connections leave from (None: the system's choice).
    source_address: Option<std::net::IpAddr>,
}

impl Reporter {
    pub fn new(
        store: Store,
        servers: Vec<String>,
        source_address: Option<std::net::IpAddr>,
    ) -> Self {
        Self {
            store,
            servers,
            current: Arc::new(Mutex::new((0, None))),
            shared: None,
            source_address,
        }
    }

    /// Sends over the open session's connection when there is one.
    pub fn sharing(self, shared: Option<SharedChannel>) -> Self {
        Self { shared, ..self }
    }

    fn client(&self, index: usize) -> Result<AgentServiceClient<Channel>, tonic::Status> {
        let unavailable = |e: String| tonic::Status::unavailable(e);
        let identity = self
            .store
            .identity()
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(|| unavailable("no identity".into()))?;
        let url = &self.servers[index % self.servers.len()];
        let endpoint = flotilla_proto::tls::endpoint(
            url,
            &identity.ca_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .map_err(|e| unavailable(e.to_string()))?
        .local_address(self.source_address);
        Ok(AgentServiceClient::new(endpoint.connect_lazy()))
    }

    /// Sends one report; Ok means the server has it (now or from before).
    pub async fn send(&self, report: Report) -> Result<(), tonic::Status> {
        if let Some(channel) = self.shared.as_ref().and_then(SharedChannel::get) {
            // A failure needs no channel rebuilt: the session's own reconnect
            // replaces the shared one.
            let mut client = AgentServiceClient::new(channel);
            return client.report(report.to_proto()).await.map(|_| ());
        }
        if self.servers.is_empty() {
            return Err(tonic::Status::unavailable("no server configured"));
        }
        let mut client = {
            let mut cur = self.current.lock().await;
            if cur.1.is_none() {
                cur.1 = Some(self.client(cur.0)?);
            }
            cur.1.clone().expect("set above")
        };
        match client.report(report.to_proto()).await {
            Ok(_) => Ok(()),
            Err(status) => {
                // Next time: a fresh channel, on the next server.
                let mut cur = self.current.lock().await;
                cur.0 = (cur.0 + 1) % self.servers.len();
                cur.1 = None;
                Err(status)
            }
        }
    }
}
