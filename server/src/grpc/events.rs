//! The events half of AdminService: webhooks and following the fleet's
//! events. The trait impl in `admin.rs` delegates here.

use std::pin::Pin;
use std::time::Duration;

use flotilla_proto::pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::admin::AdminApi;
use crate::events::webhooks::{self, WebhookRecord};
use crate::events::{Event, parse_kinds};
use crate::model::OperatorRole;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::FleetEvent, Status>> + Send>>;

/// How long an event stream waits for its reader to take the next event.
const SEND_WITHIN: Duration = Duration::from_secs(60);

/// Most events one answer or catch-up sends before the live ones.
const MAX_LAST: u32 = 1000;

async fn info(api: &AdminApi, rec: WebhookRecord) -> Result<pb::WebhookInfo, Status> {
    let st = webhooks::state(&api.app, &rec.id).await?;
    Ok(pb::WebhookInfo {
        id: rec.id,
        url: rec.url,
        events: rec.events,
        created_at_ms: rec.created_at_ms,
        created_by: rec.created_by,
        delivered_id: st.delivered,
        newest_id: api.app.events.newest().await?,
        failures: st.failures,
        last_error: st.last_error,
        last_attempt_ms: st.last_attempt_ms,
        dropped: st.dropped,
    })
}

pub async fn add_webhook(
    api: &AdminApi,
    request: Request<pb::AddWebhookRequest>,
) -> Result<Response<pb::WebhookInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let r = request.into_inner();
    let rec = webhooks::add(
        &api.app,
        &r.url,
        &r.events,
        &r.secret,
        &r.ca_pem,
        &caller.name,
    )
    .await?;
    api.audit(
        &caller,
        crate::audit::Action::WebhookAdd,
        &rec.id,
        serde_json::json!({ "url": rec.url, "events": rec.events, "own_ca": !rec.ca_pem.is_empty() }),
    )
    .await?;
    Ok(Response::new(info(api, rec).await?))
}

pub async fn list_webhooks(
    api: &AdminApi,
    request: Request<pb::ListWebhooksRequest>,
) -> Result<Response<pb::ListWebhooksResponse>, Status> {
    api.caller(&request, OperatorRole::Viewer).await?;
    let mut out = Vec::new();
    for rec in webhooks::list(&api.app).await? {
        out.push(info(api, rec).await?);
    }
    Ok(Response::new(pb::ListWebhooksResponse { webhooks: out }))
}

pub async fn remove_webhook(
    api: &AdminApi,
    request: Request<pb::RemoveWebhookRequest>,
) -> Result<Response<pb::WebhookInfo>, Status> {
    let caller = api.caller(&request, OperatorRole::Admin).await?;
    let id = request.into_inner().id;
    let st = webhooks::state(&api.app, &id).await?;
    let rec = webhooks::remove(&api.app, &id).await?;
    api.audit(
        &caller,
        crate::audit::Action::WebhookRemove,
        &rec.id,
        serde_json::json!({ "url": rec.url, "delivered_id": st.delivered }),
    )
    .await?;
    let mut info = info(api, rec).await?;
    info.delivered_id = st.delivered;
    Ok(Response::new(info))
}

fn to_pb(e: Event) -> pb::FleetEvent {
    pb::FleetEvent {
        id: e.id,
        at_unix_ms: e.at_ms,
        kind: e.kind,
        subject: e.subject,
        data: e.data.to_string(),
    }
}

pub async fn watch_events(
    api: &AdminApi,
    request: Request<pb::WatchEventsRequest>,
) -> Result<Response<EventStream>, Status> {
    let caller = api.caller(&request, OperatorRole::Viewer).await?;
    let place = api.app.events.followers.take(&caller.name).ok_or_else(|| {
        Status::resource_exhausted(format!(
            "credential {} has {} event streams open already: close one first",
            caller.name,
            api.app.events.followers.max_per_key()
        ))
    })?;
    let r = request.into_inner();
    let kinds = parse_kinds(&r.kinds)?;
    let log = api.app.events.clone();
    let shutdown = api.app.shutdown.clone();
    let newest = log.newest().await?;
    let mut after = if r.after_id > 0 {
        r.after_id
    } else {
        newest.saturating_sub(u64::from(r.last.min(MAX_LAST)))
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let _place = place;
        loop {
            let appended = log.appended.notified();
            let batch = match log.after(after, MAX_LAST as usize).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let caught_up = batch.is_empty();
            for e in batch {
                after = e.id;
                if !kinds.is_empty() && !kinds.contains(&e.kind) {
                    continue;
                }
                // A follower that stops reading gives its place back.
                let sent = crate::handoff::hand(&tx, Ok(to_pb(e)), SEND_WITHIN).await;
                if sent != crate::handoff::Handed::Taken {
                    return;
                }
            }
            if !caught_up {
                continue;
            }
            if !r.follow {
                return;
            }
            // Local appends wake at once; other replicas' are polled.
            tokio::select! {
                _ = tx.closed() => return,
                () = shutdown.cancelled() => return,
                () = appended => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
