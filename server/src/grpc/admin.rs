//! AdminService: operator calls, each authenticated by a bearer credential, checked
//! against the role it needs, and (when it changes state) audited before it is
//! acknowledged.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::{limits, pb};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::credentials::{self, Caller};
use crate::error::Error;
use crate::model::{NodeRecord, NodeStatus, OperatorRole, TokenRecord};
use crate::tokens::{self, TokenSpec};

pub struct AdminApi {
    pub app: Arc<App>,
}

fn token_info(t: TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        group: t.group,
        created_at: t.created_at,
        expires_at: t.expires_at,
        max_uses: t.max_uses,
        uses: t.uses,
        labels: t.labels.into_iter().collect(),
        requires_approval: t.requires_approval,
        revoked: t.revoked,
        description: t.description,
        created_by: t.created_by,
        trust_sha256: t.trust_sha256,
        new_node_for_clones: t.clones_new_node,
    }
}

fn statuses(all: Vec<crate::fleet::GroupStatus>) -> Vec<pb::GroupStatus> {
    all.into_iter().map(Into::into).collect()
}

fn node_info((n, online, last_seen): (NodeRecord, bool, i64)) -> pb::NodeInfo {
    pb::NodeInfo {
        role: super::views::role(n.status, n.role) as i32,
        id: n.id,
        group: n.group,
        status: n.status.as_str().to_string(),
        online,
        facts: Some(n.facts.into()),
        labels: n.labels.into_iter().collect(),
        joined_at: n.joined_at,
        last_seen,
        certificate_serial: n.cert_serial,
        certificate_not_after: n.cert_not_after,
        token_id: n.token_id,
        installed: n.installed.into_iter().collect(),
    }
}

impl AdminApi {
    /// The authenticated caller, if its role allows `needed`. Every refusal
    /// is counted against the source and audited with its reason, at most
    /// once per source and minute (with the count since the last), and within
    /// a budget for all sources together (see `guess_guard`).
    pub(super) async fn caller<T>(
        &self,
        req: &Request<T>,
        needed: OperatorRole,
    ) -> Result<Caller, Status> {
        let source = req.remote_addr().map(|a| a.ip());
        let (id, result) = self.authenticate(req, needed).await;
        let Err(e) = result else {
            // Only a credential that checked out (and allows the call) ends
            // the connection's pending time (see `connections`).
            if req
                .extensions()
                .get::<crate::connections::OtherListener>()
                .is_none()
            {
                self.app.connections.authenticated(req.remote_addr());
            }
            return result.map_err(Status::from);
        };
        // Only refusals of the credential or role count; a store that does
        // not answer is told as itself, without an audit entry it could not
        // write either. Never answered "too many": operator calls are not
        // slowed.
        if !e.is_refusal() {
            return Err(e.into());
        }
        if let Some(report) = self.app.auth_guard.failed(source, id.as_deref()).report {
            // What the peer sent is bounded before it is kept.
            let reason = limits::clip(&e.to_string(), 256);
            let credential = limits::clip(id.as_deref().unwrap_or(""), 16);
            report
                .tell(
                    &self.app.audit,
                    crate::audit::Action::AuthFailed,
                    "refused operator call",
                    &credential,
                    "reason",
                    &reason,
                )
                .await;
        }
        Err(e.into())
    }

    /// The bearer's credential id (when it has the shape of one) and the
    /// caller, or why not.
    async fn authenticate<T>(
        &self,
        req: &Request<T>,
        needed: OperatorRole,
    ) -> (Option<String>, Result<Caller, Error>) {
        if let Some(credentials::Authenticated(caller)) = req.extensions().get() {
            return (None, caller.require(needed).map(|()| caller.clone()));
        }
        let header = match req.metadata().get("authorization") {
            None => {
                return (
                    None,
                    Err(Error::Unauthenticated(
                        "no operator credential sent (use --credential or FLOTILLA_CREDENTIAL)"
                            .into(),
                    )),
                );
            }
            Some(h) => h.to_str().ok(),
        };
        let Some(bearer) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return (
                None,
                Err(Error::Unauthenticated(
                    "authorization must be \"Bearer <credential>\"".into(),
                )),
            );
        };
        let id = credentials::bearer_id(bearer).map(str::to_string);
        // Never slowed: a right secret always gets in, so nobody can lock an
        // operator out by guessing against their credential (a secret of
        // ~165 bits needs no slowing to stay unguessable).
        let result = match credentials::authenticate(&self.app.db, bearer).await {
            Ok(caller) => caller.require(needed).map(|()| caller),
            Err(e) => Err(e),
        };
        (id, result)
    }

    pub(super) async fn audit(
        &self,
        caller: &Caller,
        action: crate::audit::Action,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), Status> {
        self.app
            .audit
            .record(&caller.name, action, target, detail)
            .await?;
        Ok(())
    }

    fn node_id(id: &str) -> Result<(), Status> {
        limits::check_name("node id", id, 64).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    async fn node_action(
        &self,
        request: Request<pb::NodeActionRequest>,
        to: NodeStatus,
        action: crate::audit::Action,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let id = request.into_inner().id;
        Self::node_id(&id)?;
        self.app.fleet.set_node_status(&id, to).await?;
        self.audit(&caller, action, &id, serde_json::json!({}))
            .await?;
        self.node_info_of(&id).await
    }

    async fn node_info_of(&self, id: &str) -> Result<Response<pb::NodeInfo>, Status> {
        let info = self
            .app
            .fleet
            .node(id)
            .await
            .ok_or_else(|| Status::not_found(format!("node {id} not found")))?;
        Ok(Response::new(node_info(info)))
    }
}

type GroupStream = Pin<Box<dyn Stream<Item = Result<pb::GroupStatus, Status>> + Send>>;

/// The checks a group's name and counts pass before any change.
fn check_group_counts(
    name: &str,
    desired: u32,
    max_unavailable: Option<u32>,
) -> Result<(), Status> {
    limits::check_name("group", name, limits::MAX_GROUP_NAME_LEN).map_err(Error::from)?;
    if desired > limits::MAX_DESIRED {
        return Err(Status::invalid_argument(format!(
            "desired count {desired} is above the limit of {}",
            limits::MAX_DESIRED
        )));
    }
    if max_unavailable.is_some_and(|m| m > limits::MAX_DESIRED) {
        return Err(Status::invalid_argument("max unavailable is too large"));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        super::access::who_am_i(self, request).await
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        let spec = TokenSpec {
            group: r.group,
            ttl_secs: r.ttl_secs,
            max_uses: r.max_uses,
            labels: r.labels.into_iter().collect(),
            requires_approval: r.requires_approval,
            description: r.description,
            clones_new_node: r.new_node_for_clones,
        };
        let policy = crate::trust::current(&self.app.db).await?;
        let pin = match (r.pin_trust, &policy) {
            (Some(false), _) => None,
            (_, Some(p)) => Some(p.doc()?.sha256()),
            (Some(true), None) => {
                return Err(Status::failed_precondition(
                    "no trust policy to pin: an admin sets one first (flotilla trust set)",
                ));
            }
            (None, None) => None,
        };
        let (token, rec) = tokens::create(
            &self.app.db,
            spec,
            self.app.ca.fingerprint(),
            pin.as_deref(),
            &caller.name,
        )
        .await?;
        self.app.fleet.ensure_group(&rec.group).await?;
        self.audit(
            &caller,
            crate::audit::Action::TokenCreate,
            &rec.id,
            serde_json::json!({
                "group": rec.group,
                "max_uses": rec.max_uses,
                "expires_at": rec.expires_at,
                "requires_approval": rec.requires_approval,
                "trust_sha256": rec.trust_sha256,
            }),
        )
        .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.to_string(),
            info: Some(token_info(rec)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        let tokens = tokens::list(&self.app.db).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let id = request.into_inner().id;
        let rec = tokens::revoke(&self.app.db, &id).await?;
        self.audit(
            &caller,
            crate::audit::Action::TokenRevoke,
            &id,
            serde_json::json!({}),
        )
        .await?;
        Ok(Response::new(token_info(rec)))
    }

    async fn extend_token(
        &self,
        request: Request<pb::ExtendTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        let rec = tokens::extend(&self.app.db, &r.id, r.ttl_secs, r.max_uses).await?;
        self.audit(
            &caller,
            crate::audit::Action::TokenExtend,
            &r.id,
            serde_json::json!({ "expires_at": rec.expires_at, "max_uses": rec.max_uses }),
        )
        .await?;
        Ok(Response::new(token_info(rec)))
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::GroupStatus>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        check_group_counts(&r.name, r.desired.unwrap_or(0), r.max_unavailable)?;
        let status = self
            .app
            .fleet
            .create_group(&r.name, r.desired, r.max_unavailable)
            .await?;
        self.audit(
            &caller,
            crate::audit::Action::GroupCreate,
            &r.name,
            serde_json::json!({ "desired": r.desired, "max_unavailable": status.max_unavailable }),
        )
        .await?;
        Ok(Response::new(status.into()))
    }

    async fn set_group(
        &self,
        request: Request<pb::SetGroupRequest>,
    ) -> Result<Response<pb::GroupStatus>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        check_group_counts(&r.name, r.desired, r.max_unavailable)?;
        let status = self
            .app
            .fleet
            .set_group(&r.name, r.desired, r.max_unavailable, r.create)
            .await?;
        self.audit(
            &caller,
            crate::audit::Action::GroupSet,
            &r.name,
            serde_json::json!({ "desired": r.desired, "max_unavailable": status.max_unavailable }),
        )
        .await?;
        Ok(Response::new(status.into()))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let name = request.into_inner().name;
        limits::check_name("group", &name, limits::MAX_GROUP_NAME_LEN).map_err(Error::from)?;
        // A token that is not revoked can still add a node (an expired or
        // used-up one can be extended), which would bring the group back.
        let live: Vec<String> = tokens::list(&self.app.db)
            .await?
            .into_iter()
            .filter(|t| t.group == name && !t.revoked)
            .map(|t| t.id)
            .collect();
        if !live.is_empty() {
            return Err(Status::failed_precondition(format!(
                "group {name} has {} join token(s) that are not revoked ({}): revoke them first",
                live.len(),
                live.join(", ")
            )));
        }
        self.app.fleet.delete_group(&name).await?;
        self.audit(
            &caller,
            crate::audit::Action::GroupDelete,
            &name,
            serde_json::json!({}),
        )
        .await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: statuses(self.app.fleet.group_statuses(None).await?),
        }))
    }

    type WatchGroupsStream = GroupStream;

    async fn watch_groups(
        &self,
        request: Request<pb::WatchGroupsRequest>,
    ) -> Result<Response<Self::WatchGroupsStream>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        let only = request.into_inner().group;
        let only = (!only.is_empty()).then_some(only);
        let fleet = self.app.fleet.clone();
        let shutdown = self.app.shutdown.clone();
        // Subscribe before the snapshot so no change falls between them.
        let mut events = fleet.subscribe_groups();
        let snapshot = fleet.group_statuses(only.as_deref()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            for s in snapshot {
                if tx.send(Ok(s.into())).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                    ev = events.recv() => match ev {
                        Ok(s) => {
                            if only.as_deref().is_some_and(|o| o != s.name) {
                                continue;
                            }
                            if tx.send(Ok(s.into())).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Fell behind: send the current state of everything watched.
                            match fleet.group_statuses(only.as_deref()).await {
                                Ok(all) => {
                                    for s in all {
                                        if tx.send(Ok(s.into())).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                                Err(e) => {
                                    let _ = tx.send(Err(e.into())).await;
                                    return;
                                }
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        let group = request.into_inner().group;
        let nodes = self
            .app
            .fleet
            .nodes((!group.is_empty()).then_some(group.as_str()))
            .await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(node_info).collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        let id = request.into_inner().id;
        Self::node_id(&id)?;
        self.node_info_of(&id).await
    }

    async fn accept_node(
        &self,
        request: Request<pb::NodeActionRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        self.node_action(
            request,
            NodeStatus::Accepted,
            crate::audit::Action::NodeAccept,
        )
        .await
    }

    async fn set_node_labels(
        &self,
        request: Request<pb::SetNodeLabelsRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        Self::node_id(&r.id)?;
        let set: BTreeMap<String, String> = r.set.into_iter().collect();
        limits::check_labels(set.iter()).map_err(Error::from)?;
        if r.remove.len() > limits::MAX_LABELS {
            return Err(Status::invalid_argument("too many labels to remove"));
        }
        let node = self
            .app
            .fleet
            .set_node_labels(&r.id, &set, &r.remove)
            .await?;
        self.audit(
            &caller,
            crate::audit::Action::NodeLabels,
            &r.id,
            serde_json::json!({ "set": set, "remove": r.remove, "labels": node.labels }),
        )
        .await?;
        self.node_info_of(&r.id).await
    }

    async fn move_node(
        &self,
        request: Request<pb::MoveNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let caller = self.caller(&request, OperatorRole::Operator).await?;
        let r = request.into_inner();
        Self::node_id(&r.id)?;
        limits::check_name("group", &r.group, limits::MAX_GROUP_NAME_LEN).map_err(Error::from)?;
        let before = self.app.fleet.node(&r.id).await.map(|(n, _, _)| n.group);
        self.app.fleet.move_node(&r.id, &r.group).await?;
        self.audit(
            &caller,
            crate::audit::Action::NodeMove,
            &r.id,
            serde_json::json!({ "from": before, "to": r.group }),
        )
        .await?;
        self.node_info_of(&r.id).await
    }

    async fn reject_node(
        &self,
        request: Request<pb::NodeActionRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        self.node_action(
            request,
            NodeStatus::Rejected,
            crate::audit::Action::NodeReject,
        )
        .await
    }

    async fn revoke_node(
        &self,
        request: Request<pb::NodeActionRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        self.node_action(
            request,
            NodeStatus::Revoked,
            crate::audit::Action::NodeRevoke,
        )
        .await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        super::access::list_audit(self, request).await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        super::access::verify_audit(self, request).await
    }

    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Result<Response<pb::CreateCredentialResponse>, Status> {
        super::access::create_credential(self, request).await
    }

    async fn list_replicas(
        &self,
        request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.caller(&request, OperatorRole::Viewer).await?;
        let replicas = crate::replica::list(&self.app.db)
            .await
            .map_err(crate::error::Error::from)?;
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: replicas
                .into_iter()
                .map(|(r, leader)| pb::ReplicaInfo {
                    id: r.id,
                    url: r.url,
                    host: r.host,
                    pid: r.pid,
                    started_at_ms: r.started_at_ms,
                    sessions: r.sessions,
                    version: r.version,
                    leader,
                })
                .collect(),
        }))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        super::access::list_credentials(self, request).await
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::CredentialInfo>, Status> {
        super::access::revoke_credential(self, request).await
    }

    async fn rotate_credential(
        &self,
        request: Request<pb::RotateCredentialRequest>,
    ) -> Result<Response<pb::CreateCredentialResponse>, Status> {
        super::access::rotate_credential(self, request).await
    }

    async fn set_trust(
        &self,
        request: Request<pb::TrustPolicy>,
    ) -> Result<Response<pb::TrustPolicy>, Status> {
        super::publish::set_trust(self, request).await
    }

    async fn get_trust(
        &self,
        request: Request<pb::GetTrustRequest>,
    ) -> Result<Response<pb::TrustPolicy>, Status> {
        super::publish::get_trust(self, request).await
    }

    async fn publish_trust(
        &self,
        request: Request<pb::SignedTrustPolicy>,
    ) -> Result<Response<pb::TrustPolicy>, Status> {
        super::publish::publish_trust(self, request).await
    }

    async fn artifact_status(
        &self,
        request: Request<pb::ArtifactStatusRequest>,
    ) -> Result<Response<pb::ArtifactStatusResponse>, Status> {
        super::publish::artifact_status(self, request).await
    }

    async fn upload_artifact(
        &self,
        request: Request<tonic::Streaming<pb::ArtifactUpload>>,
    ) -> Result<Response<pb::ArtifactStatusResponse>, Status> {
        super::publish::upload_artifact(self, request).await
    }

    async fn add_webhook(
        &self,
        request: Request<pb::AddWebhookRequest>,
    ) -> Result<Response<pb::WebhookInfo>, Status> {
        super::events::add_webhook(self, request).await
    }

    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        super::events::list_webhooks(self, request).await
    }

    async fn remove_webhook(
        &self,
        request: Request<pb::RemoveWebhookRequest>,
    ) -> Result<Response<pb::WebhookInfo>, Status> {
        super::events::remove_webhook(self, request).await
    }

    type WatchEventsStream = super::events::EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        super::events::watch_events(self, request).await
    }

    async fn collect_artifacts(
        &self,
        request: Request<pb::CollectArtifactsRequest>,
    ) -> Result<Response<pb::CollectArtifactsResponse>, Status> {
        super::publish::collect_artifacts(self, request).await
    }

    async fn publish_patch(
        &self,
        request: Request<pb::PublishPatchRequest>,
    ) -> Result<Response<pb::PatchInfo>, Status> {
        let started = std::time::Instant::now();
        let published = super::publish::publish_patch(self, request).await;
        if published.is_ok() {
            metrics::histogram!("flotilla_publish_seconds").record(started.elapsed());
        }
        published
    }

    async fn list_patches(
        &self,
        request: Request<pb::ListPatchesRequest>,
    ) -> Result<Response<pb::ListPatchesResponse>, Status> {
        super::publish::list_patches(self, request).await
    }

    async fn get_patch(
        &self,
        request: Request<pb::GetPatchRequest>,
    ) -> Result<Response<pb::PatchInfo>, Status> {
        super::publish::get_patch(self, request).await
    }

    async fn patch_status(
        &self,
        request: Request<pb::PatchStatusRequest>,
    ) -> Result<Response<pb::PatchStatusResponse>, Status> {
        super::publish::patch_status(self, request).await
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        super::rollout::list_rollouts(self, request).await
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutInfo>, Status> {
        super::rollout::get_rollout(self, request).await
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutInfo>, Status> {
        super::rollout::pause_rollout(self, request).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutInfo>, Status> {
        super::rollout::resume_rollout(self, request).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::AbortRolloutRequest>,
    ) -> Result<Response<pb::RolloutInfo>, Status> {
        super::rollout::abort_rollout(self, request).await
    }

    type WatchRolloutStream = super::rollout::RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        super::rollout::watch_rollout(self, request).await
    }

    async fn configure_group(
        &self,
        request: Request<pb::ConfigureGroupRequest>,
    ) -> Result<Response<pb::GroupConfig>, Status> {
        super::rollout::configure_group(self, request).await
    }

    async fn get_group_config(
        &self,
        request: Request<pb::GetGroupConfigRequest>,
    ) -> Result<Response<pb::GroupConfig>, Status> {
        super::rollout::get_group_config(self, request).await
    }

    async fn compliance_report(
        &self,
        request: Request<pb::ComplianceReportRequest>,
    ) -> Result<Response<pb::ComplianceReportResponse>, Status> {
        super::rollout::compliance_report(self, request).await
    }

    async fn list_sites(
        &self,
        request: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        super::rollout::list_sites(self, request).await
    }
}
