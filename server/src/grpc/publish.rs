//! The publishing half of AdminService: trust policy, artifact uploads, patches
//! and their status. The trait impl in `admin.rs` delegates here.

use std::collections::HashMap;

use flotilla_proto::pb;
use tonic::{Request, Response, Status, Streaming};

use super::admin::AdminApi;
use crate::model::OperatorRole;
use crate::trust::PolicyRecord;

/// Largest chunk of one upload message.
const MAX_UPLOAD_CHUNK: usize = 1024 * 1024;

fn trust_pb(t: &PolicyRecord) -> Result<pb::TrustPolicy, Status> {
    let doc = t.doc()?;
    Ok(pb::TrustPolicy {
        sha256: doc.sha256(),
        public_keys: doc.keys,
        threshold: doc.threshold,
        version: t.version,
    })
}

pub async fn set_trust(
    api: &AdminApi,
    request: Request<pb::TrustPolicy>,
) -> Result<Response<pb::TrustPolicy>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let r = request.into_inner();
    let doc = crate::trust::first_document(&r.public_keys, r.threshold)?;
    let record = crate::trust::set_first(&api.app.db, &doc, &caller.name).await?;
    api.audit(
        &caller,
        crate::audit::Action::TrustSet,
        "fleet",
        serde_json::json!({ "version": record.version, "keys": doc.keys, "threshold": doc.threshold, "sha256": doc.sha256() }),
    )
    .await?;
    Ok(Response::new(trust_pb(&record)?))
}

pub async fn get_trust(
    api: &AdminApi,
    request: Request<pb::GetTrustRequest>,
) -> Result<Response<pb::TrustPolicy>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let record = crate::trust::current(&api.app.db)
        .await?
        .ok_or_else(|| Status::not_found("no trust policy is set (flotilla trust set)"))?;
    Ok(Response::new(trust_pb(&record)?))
}

/// A signed rotation of the trust policy: checked against the newest version
/// (exactly the next one, signed by a threshold of its keys and of its own),
/// stored, and sent to every agent in its desired state.
pub async fn publish_trust(
    api: &AdminApi,
    request: Request<pb::SignedTrustPolicy>,
) -> Result<Response<pb::TrustPolicy>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let r = request.into_inner();
    let signed = flotilla_proto::trust::SignedPolicy::from(r);
    let record = crate::trust::publish_next(&api.app.db, &signed, &caller.name).await?;
    let doc = record.doc()?;
    api.audit(
        &caller,
        crate::audit::Action::TrustRotate,
        "fleet",
        serde_json::json!({
            "version": record.version,
            "keys": doc.keys,
            "threshold": doc.threshold,
            "sha256": doc.sha256(),
            "signatures": record.signatures.len(),
        }),
    )
    .await?;
    Ok(Response::new(trust_pb(&record)?))
}

pub async fn artifact_status(
    api: &AdminApi,
    request: Request<pb::ArtifactStatusRequest>,
) -> Result<Response<pb::ArtifactStatusResponse>, Status> {
    api.caller(&request, OperatorRole::Publisher).await?;
    let r = request.into_inner();
    let held = api.app.artifacts.held(&r.sha256, r.size)?;
    Ok(Response::new(pb::ArtifactStatusResponse {
        sha256: r.sha256,
        size: r.size,
        received: held.received,
        complete: held.complete,
    }))
}

pub async fn collect_artifacts(
    api: &AdminApi,
    request: Request<pb::CollectArtifactsRequest>,
) -> Result<Response<pb::CollectArtifactsResponse>, Status> {
    let dry_run = request.get_ref().dry_run;
    let needed = if dry_run {
        OperatorRole::Viewer
    } else {
        OperatorRole::Admin
    };
    let caller = api.caller(&request, needed).await?;
    let retention = api.app.cfg.artifact_retention;
    let out =
        crate::artifacts::gc::collect(&api.app.artifacts, &api.app.db, retention, dry_run).await?;
    if !dry_run {
        api.audit(
            &caller,
            crate::audit::Action::ArtifactGc,
            "artifacts",
            crate::artifacts::gc::audit_detail(&out, retention),
        )
        .await?;
    }
    Ok(Response::new(pb::CollectArtifactsResponse {
        collected: out
            .collected
            .into_iter()
            .map(|c| pb::CollectedArtifact {
                sha256: c.sha256,
                size: c.size,
                partial: c.partial,
                why: c.why,
            })
            .collect(),
        kept: out.kept,
        kept_bytes: out.kept_bytes,
        retention_secs: retention.as_secs(),
        dry_run,
    }))
}

pub async fn upload_artifact(
    api: &AdminApi,
    request: Request<Streaming<pb::ArtifactUpload>>,
) -> Result<Response<pb::ArtifactStatusResponse>, Status> {
    let caller = api.caller(&request, OperatorRole::Publisher).await?;
    let mut stream = request.into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("empty upload"))?;
    let (sha256, size) = (first.sha256.clone(), first.size);
    let mut offset = first.offset;
    let mut next = Some(first);
    let store = &api.app.artifacts;
    // Whatever arrived is kept (and fsynced) even if the stream breaks, so the
    // next upload resumes from there.
    let result: Result<(), Status> = async {
        while let Some(msg) = next.take() {
            if msg.data.len() > MAX_UPLOAD_CHUNK {
                return Err(Status::invalid_argument(format!(
                    "upload chunks are limited to {MAX_UPLOAD_CHUNK} bytes"
                )));
            }
            let held = store.append(&sha256, size, offset, &msg.data)?;
            offset = held.received;
            next = stream.message().await?;
        }
        Ok(())
    }
    .await;
    let settled = store.settle(&sha256, size);
    result?;
    let held = settled?;
    if held.complete {
        api.audit(
            &caller,
            crate::audit::Action::ArtifactUpload,
            &sha256,
            serde_json::json!({ "size": size }),
        )
        .await?;
    }
    Ok(Response::new(pb::ArtifactStatusResponse {
        sha256,
        size,
        received: held.received,
        complete: held.complete,
    }))
}

pub async fn publish_patch(
    api: &AdminApi,
    request: Request<pb::PublishPatchRequest>,
) -> Result<Response<pb::PatchInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Publisher).await?;
    let r = request.into_inner();
    if r.force && !r.emergency {
        return Err(Status::invalid_argument(
            "--force only goes with --emergency: a normal rollout always keeps the capacity guard",
        ));
    }
    let policy = super::views::policy_spec(r.rollout.as_ref())?;
    let rollout = crate::fleet::RolloutRequest {
        policy: policy.clone(),
        emergency: r.emergency,
        force: r.force,
    };
    let (record, manifest) = crate::patches::publish(
        &api.app,
        r.manifest,
        r.signatures,
        r.deltas,
        &caller.name,
        rollout,
    )
    .await?;
    api.audit(
        &caller,
        if r.emergency {
            crate::audit::Action::PatchPublishEmergency
        } else {
            crate::audit::Action::PatchPublish
        },
        &record.id,
        serde_json::json!({
            "component": manifest.component,
            "version": manifest.version,
            "severity": manifest.severity.as_str(),
            "signatures": record.signatures.len(),
            "deltas": delta_count(&record.deltas),
            "emergency": r.emergency,
            "force": r.force,
            "rollout": policy,
        }),
    )
    .await?;
    let info = api
        .app
        .fleet
        .patch_info(&record.id)
        .await
        .ok_or_else(|| Status::internal("patch vanished after publish"))?;
    Ok(Response::new(info.into()))
}

/// How many deltas a stored delta index lists (for the audit log).
fn delta_count(index: &str) -> usize {
    if index.is_empty() {
        return 0;
    }
    flotilla_proto::delta::DeltaIndex::parse(index.as_bytes()).map_or(0, |i| i.deltas.len())
}

pub async fn list_patches(
    api: &AdminApi,
    request: Request<pb::ListPatchesRequest>,
) -> Result<Response<pb::ListPatchesResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    Ok(Response::new(pb::ListPatchesResponse {
        patches: api
            .app
            .fleet
            .patch_infos()
            .await
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

pub async fn get_patch(
    api: &AdminApi,
    request: Request<pb::GetPatchRequest>,
) -> Result<Response<pb::PatchInfo>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let id = request.into_inner().id;
    api.app
        .fleet
        .patch_info(&id)
        .await
        .map(|p| Response::new(p.into()))
        .ok_or_else(|| Status::not_found(format!("no patch with id {id}")))
}

pub async fn patch_status(
    api: &AdminApi,
    request: Request<pb::PatchStatusRequest>,
) -> Result<Response<pb::PatchStatusResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let id = request.into_inner().id;
    let (info, nodes) = crate::patches::status(&api.app, &id).await?;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for n in &nodes {
        *counts.entry(n.phase.clone()).or_default() += 1;
    }
    // Its artifacts and its delta files (a stored index always parses).
    let deltas = flotilla_proto::delta::DeltaIndex::parse(info.record.deltas.as_bytes())
        .map(|i| i.deltas)
        .unwrap_or_default();
    let served_bytes = info
        .manifest
        .artifacts
        .iter()
        .map(|a| &a.sha256)
        .chain(deltas.iter().map(|d| &d.sha256))
        .map(|sha| api.app.artifacts.meter.sent(sha))
        .sum();
    Ok(Response::new(pb::PatchStatusResponse {
        patch: Some(info.into()),
        counts,
        nodes: nodes.into_iter().map(Into::into).collect(),
        served_bytes,
    }))
}
