//! The rollout half of AdminService: rollout control and watching, group
//! maintenance windows and rollout defaults, and the compliance report. The
//! trait impl in `admin.rs` delegates here.

use std::pin::Pin;

use flotilla_proto::{limits, pb};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::admin::AdminApi;
use crate::error::Error;
use crate::model::OperatorRole;

/// Least time between two snapshots of a watched rollout.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

pub type RolloutStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutInfo, Status>> + Send>>;

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no rollout for patch {id}"))
}

pub async fn list_rollouts(
    api: &AdminApi,
    request: Request<pb::ListRolloutsRequest>,
) -> Result<Response<pb::ListRolloutsResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    Ok(Response::new(pb::ListRolloutsResponse {
        rollouts: api
            .app
            .fleet
            .rollout_infos()
            .await
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

pub async fn get_rollout(
    api: &AdminApi,
    request: Request<pb::GetRolloutRequest>,
) -> Result<Response<pb::RolloutInfo>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let id = request.into_inner().patch_id;
    api.app
        .fleet
        .rollout_info(&id)
        .await
        .map(|r| Response::new(r.into()))
        .ok_or_else(|| not_found(&id))
}

pub async fn pause_rollout(
    api: &AdminApi,
    request: Request<pb::RolloutActionRequest>,
) -> Result<Response<pb::RolloutInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Operator).await?;
    let id = request.into_inner().patch_id;
    let info = api.app.fleet.pause_rollout(&id, &caller.name).await?;
    api.audit(
        &caller,
        crate::audit::Action::RolloutPause,
        &id,
        serde_json::json!({}),
    )
    .await?;
    Ok(Response::new(info.into()))
}

pub async fn resume_rollout(
    api: &AdminApi,
    request: Request<pb::RolloutActionRequest>,
) -> Result<Response<pb::RolloutInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Operator).await?;
    let id = request.into_inner().patch_id;
    let info = api.app.fleet.resume_rollout(&id).await?;
    api.audit(
        &caller,
        crate::audit::Action::RolloutResume,
        &id,
        serde_json::json!({}),
    )
    .await?;
    Ok(Response::new(info.into()))
}

pub async fn abort_rollout(
    api: &AdminApi,
    request: Request<pb::AbortRolloutRequest>,
) -> Result<Response<pb::RolloutInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Operator).await?;
    let r = request.into_inner();
    let info = api
        .app
        .fleet
        .abort_rollout(&r.patch_id, r.rollback, &caller.name)
        .await?;
    api.audit(
        &caller,
        crate::audit::Action::RolloutAbort,
        &r.patch_id,
        serde_json::json!({ "rollback": r.rollback }),
    )
    .await?;
    Ok(Response::new(info.into()))
}

/// Sends the rollout now and on every change (equal states are sent once),
/// until it ends or the caller goes away.
pub async fn watch_rollout(
    api: &AdminApi,
    request: Request<pb::GetRolloutRequest>,
) -> Result<Response<RolloutStream>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let id = request.into_inner().patch_id;
    let fleet = api.app.fleet.clone();
    let shutdown = api.app.shutdown.clone();
    // Subscribe before the first snapshot so no change falls between them.
    let mut events = fleet.subscribe_rollouts();
    let first = fleet
        .rollout_info(&id)
        .await
        .ok_or_else(|| not_found(&id))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut last = first;
        let mut shown_at = tokio::time::Instant::now();
        if tx.send(Ok(last.clone().into())).await.is_err() {
            return;
        }
        loop {
            if last.state.ended() && last.groups.iter().all(|g| g.applying == 0) {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            // Nodes finishing arrive in bursts (thousands a second in a fleet-wide
            // patch): one snapshot per interval, with everything up to then.
            tokio::time::sleep_until(shown_at + WATCH_INTERVAL).await;
            while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
                events.try_recv()
            {}
            shown_at = tokio::time::Instant::now();
            let Some(now) = fleet.rollout_info(&id).await else {
                return;
            };
            if now != last {
                last = now;
                if tx.send(Ok(last.clone().into())).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

pub async fn configure_group(
    api: &AdminApi,
    request: Request<pb::ConfigureGroupRequest>,
) -> Result<Response<pb::GroupConfig>, Status> {
    let caller = api.caller(&request, OperatorRole::Operator).await?;
    let r = request.into_inner();
    limits::check_name("group", &r.name, limits::MAX_GROUP_NAME_LEN).map_err(Error::from)?;
    let r = crate::fleet::GroupSettings::try_from(r)?;
    let config: pb::GroupConfig = api.app.fleet.configure_group(&r).await?.into();
    api.audit(
        &caller,
        crate::audit::Action::GroupConfigure,
        &r.name,
        serde_json::json!({
            "timezone": config.timezone,
            "windows": config.windows,
            "sla": config.sla,
            "rollout": config.rollout.as_ref().map(|p| serde_json::json!({
                "waves": p.waves,
                "bake_secs": p.bake_secs,
                "max_applying": p.max_applying,
                "failure_threshold": p.failure_threshold,
                "spread_label": p.spread_label,
            })),
        }),
    )
    .await?;
    Ok(Response::new(config))
}

pub async fn get_group_config(
    api: &AdminApi,
    request: Request<pb::GetGroupConfigRequest>,
) -> Result<Response<pb::GroupConfig>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let name = request.into_inner().name;
    Ok(Response::new(
        api.app.fleet.group_config(&name).await?.into(),
    ))
}

pub async fn compliance_report(
    api: &AdminApi,
    request: Request<pb::ComplianceReportRequest>,
) -> Result<Response<pb::ComplianceReportResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let group = request.into_inner().group;
    let group = (!group.is_empty()).then_some(group);
    let report = api.app.fleet.compliance(group.as_deref()).await?;
    Ok(Response::new(pb::ComplianceReportResponse {
        report_json: crate::compliance::to_json(&report),
    }))
}

pub async fn list_sites(
    api: &AdminApi,
    request: Request<pb::ListSitesRequest>,
) -> Result<Response<pb::ListSitesResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let group = request.into_inner().group;
    if !group.is_empty() {
        // An unknown group is NotFound, as everywhere.
        api.app.fleet.group_config(&group).await?;
    }
    let slots = &api.app.artifacts.sites;
    let sites = api
        .app
        .fleet
        .sites((!group.is_empty()).then_some(group.as_str()))
        .await
        .into_iter()
        .map(|s| pb::SiteInfo {
            downloads: slots.in_flight(&format!("{}/{}", s.group, s.site)) as u32,
            max_downloads: slots.max() as u32,
            group: s.group,
            label: s.label,
            site: s.site,
            nodes: s.nodes,
            online: s.online,
            serving_node: s
                .serving
                .as_ref()
                .map(|a| a.node_id.clone())
                .unwrap_or_default(),
            serving_url: s
                .serving
                .as_ref()
                .map(|a| a.url.clone())
                .unwrap_or_default(),
            serving_marked: s.serving.as_ref().is_some_and(|a| a.marked),
            cache_files: s.serving.as_ref().map_or(0, |a| a.cache_files),
            cache_bytes: s.serving.as_ref().map_or(0, |a| a.cache_bytes),
        })
        .collect();
    Ok(Response::new(pb::ListSitesResponse { sites }))
}
