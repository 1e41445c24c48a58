//! Who may do what, and what was done: who-am-i, operator credentials and
//! the audit log (its entries and its chain's check). The trait impl in
//! `admin.rs` delegates here.

use flotilla_proto::{limits, pb};
use tonic::{Request, Response, Status};

use super::admin::AdminApi;
use crate::credentials;
use crate::model::OperatorRole;

fn credential_info(c: crate::model::CredentialRecord) -> pb::CredentialInfo {
    pb::CredentialInfo {
        id: c.id,
        name: c.name,
        role: c.role.as_str().to_string(),
        created_at: c.created_at,
        revoked: c.revoked,
        expires_at: c.expires_at,
        rotated_at: c.rotated_at,
    }
}

pub async fn who_am_i(
    api: &AdminApi,
    request: Request<pb::WhoAmIRequest>,
) -> Result<Response<pb::WhoAmIResponse>, Status> {
    let caller = api.caller(&request, OperatorRole::Viewer).await?;
    Ok(Response::new(pb::WhoAmIResponse {
        name: caller.name,
        role: caller.role.as_str().to_string(),
    }))
}

pub async fn list_audit(
    api: &AdminApi,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let r = request.into_inner();
    let limit = match r.limit {
        0 => 100,
        n => n.min(limits::MAX_AUDIT_PAGE),
    } as usize;
    let entries = if r.after_seq > 0 || r.since_unix_ms > 0 {
        api.app
            .audit
            .page(r.after_seq, r.since_unix_ms, limit)
            .await?
    } else {
        api.app.audit.tail(limit).await?
    };
    Ok(Response::new(pb::ListAuditResponse {
        entries: entries
            .into_iter()
            .map(|e| pb::AuditEntry {
                seq: e.seq,
                at_unix_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                detail: e.detail.to_string(),
                prev: e.prev,
                sha256: e.sha256,
            })
            .collect(),
    }))
}

pub async fn verify_audit(
    api: &AdminApi,
    request: Request<pb::VerifyAuditRequest>,
) -> Result<Response<pb::VerifyAuditResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let anchors: Vec<crate::audit::chain::Head> = request
        .into_inner()
        .anchors
        .into_iter()
        .map(|a| crate::audit::chain::Head {
            seq: a.seq,
            sha256: a.sha256,
        })
        .collect();
    if anchors.len() > 1000 {
        return Err(Status::invalid_argument("at most 1000 anchors"));
    }
    Ok(Response::new(
        match api.app.audit.verify(&anchors).await? {
            Ok(ok) => pb::VerifyAuditResponse {
                intact: true,
                entries: ok.entries,
                chained_from: ok.chained_from.unwrap_or(0),
                newest: ok.newest.map(|h| pb::AuditAnchor {
                    seq: h.seq,
                    sha256: h.sha256,
                }),
                ..Default::default()
            },
            Err(broken) => pb::VerifyAuditResponse {
                intact: false,
                broken_seq: broken.seq,
                broken_reason: broken.reason,
                ..Default::default()
            },
        },
    ))
}

pub async fn create_credential(
    api: &AdminApi,
    request: Request<pb::CreateCredentialRequest>,
) -> Result<Response<pb::CreateCredentialResponse>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let r = request.into_inner();
    let role = OperatorRole::parse(&r.role).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown role {:?}: use viewer, operator, publisher or admin",
            r.role
        ))
    })?;
    let (bearer, rec) = credentials::create(&api.app.db, &r.name, role, r.ttl_secs).await?;
    api.audit(
        &caller,
        crate::audit::Action::CredentialCreate,
        &rec.name,
        serde_json::json!({ "id": rec.id, "role": role.as_str(), "expires_at": rec.expires_at }),
    )
    .await?;
    Ok(Response::new(pb::CreateCredentialResponse {
        credential: bearer,
        info: Some(credential_info(rec)),
    }))
}

pub async fn list_credentials(
    api: &AdminApi,
    request: Request<pb::ListCredentialsRequest>,
) -> Result<Response<pb::ListCredentialsResponse>, Status> {
    api.caller(&request, OperatorRole::Admin).await?;
    let creds = credentials::list(&api.app.db).await?;
    Ok(Response::new(pb::ListCredentialsResponse {
        credentials: creds.into_iter().map(credential_info).collect(),
    }))
}

pub async fn revoke_credential(
    api: &AdminApi,
    request: Request<pb::RevokeCredentialRequest>,
) -> Result<Response<pb::CredentialInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let name = request.into_inner().name;
    let rec = credentials::revoke(&api.app.db, &name).await?;
    api.audit(
        &caller,
        crate::audit::Action::CredentialRevoke,
        &rec.name,
        serde_json::json!({ "id": rec.id, "role": rec.role.as_str() }),
    )
    .await?;
    Ok(Response::new(credential_info(rec)))
}

pub async fn rotate_credential(
    api: &AdminApi,
    request: Request<pb::RotateCredentialRequest>,
) -> Result<Response<pb::CreateCredentialResponse>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let r = request.into_inner();
    let (bearer, rec) = credentials::rotate(&api.app.db, &r.name, r.ttl_secs).await?;
    api.audit(
        &caller,
        crate::audit::Action::CredentialRotate,
        &rec.name,
        serde_json::json!({ "id": rec.id, "role": rec.role.as_str(), "expires_at": rec.expires_at }),
    )
    .await?;
    Ok(Response::new(pb::CreateCredentialResponse {
        credential: bearer,
        info: Some(credential_info(rec)),
    }))
}
