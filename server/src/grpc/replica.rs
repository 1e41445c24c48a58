//! ReplicaService: what the replicas of one fleet ask of each other (the
//! artifacts each holds). A call is taken only with a client certificate the
//! fleet's CA issued to a replica registered in the store now; node
//! certificates and stale replicas are refused.

use std::sync::Arc;

use flotilla_proto::pb;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::ca::REPLICA_CN_PREFIX;

pub struct ReplicaApi {
    pub app: Arc<App>,
}

impl ReplicaApi {
    /// The calling replica's id, once its certificate and registration check out.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let cert = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("replica calls need a replica's certificate"))?;
        let id = crate::ca::node_id_of(&cert)
            .and_then(|cn| cn.strip_prefix(REPLICA_CN_PREFIX).map(str::to_string))
            .ok_or_else(|| {
                Status::permission_denied("the client certificate does not name a replica")
            })?;
        let key = format!("{}{id}", crate::replica::REPLICAS);
        if self
            .app
            .db
            .raw()
            .get(&key)
            .await
            .map_err(crate::error::Error::from)?
            .is_none()
        {
            return Err(Status::permission_denied(format!(
                "replica {id} is not registered in the fleet's store"
            )));
        }
        self.app.connections.authenticated(req.remote_addr());
        Ok(id)
    }
}

#[tonic::async_trait]
impl pb::replica_service_server::ReplicaService for ReplicaApi {
    type FetchArtifactStream = super::artifact_stream::ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.authorize(&request).await?;
        let r = request.into_inner();
        crate::artifacts::check_sha256(&r.sha256)?;
        // Only what this replica holds itself: replicas never fetch for each
        // other, so a request cannot go round in circles.
        Ok(Response::new(
            super::artifact_stream::serve(&self.app.artifacts, &r.sha256, r.offset, ()).await?,
        ))
    }

    async fn hold_artifact(
        &self,
        request: Request<pb::HoldArtifactRequest>,
    ) -> Result<Response<pb::HoldArtifactResponse>, Status> {
        let from = self.authorize(&request).await?;
        let r = request.into_inner();
        self.app.artifacts.held(&r.sha256, r.size)?;
        self.app
            .peers
            .fetch(&self.app.artifacts, &r.sha256, r.size)
            .await?;
        tracing::info!(sha256 = %r.sha256, asked_by = %from, "artifact held for a publish");
        Ok(Response::new(pb::HoldArtifactResponse {}))
    }
}
