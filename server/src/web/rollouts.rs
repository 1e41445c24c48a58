//! A rollout's page, kept live over server-sent events (no reloads): waves
//! per group, the capacity floor, sites, each node's phase and failure; and
//! pause, resume and abort (with or without rollback), each confirmed on a
//! page of its own before it is sent as the CLI's call.

use std::convert::Infallible;
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use flotilla_proto::pb;
use flotilla_proto::pb::admin_service_server::AdminService;
use maud::{Markup, html};
use serde::Deserialize;

use super::Web;
use super::layout::{self, PageError, at_ms, badge, seg};
use super::session::{ActionForm, Signed};
use crate::model::OperatorRole;

/// Node rows shown on the page; the rest are on the nodes page, filtered.
const NODE_ROWS: usize = 100;
/// How often a live page looks again when nothing announced a change (a
/// node's phase between release and outcome wakes no rollout event).
const LOOK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Pause,
    Resume,
    Abort,
    AbortRollback,
}

impl Act {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "abort" => Some(Self::Abort),
            "abort-rollback" => Some(Self::AbortRollback),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::AbortRollback => "abort-rollback",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Self::Pause => "Pause",
            Self::Resume => "Resume",
            Self::Abort => "Abort",
            Self::AbortRollback => "Abort and roll back",
        }
    }
    fn explain(self) -> &'static str {
        match self {
            Self::Pause => "No further node starts the patch; nodes already applying finish.",
            Self::Resume => "Nodes are released again, wave by wave, within the capacity floor.",
            Self::Abort => {
                "No further node starts the patch, for good; nodes that have it keep it."
            }
            Self::AbortRollback => {
                "No further node starts the patch, for good, and every node that committed it rolls it back."
            }
        }
    }
    /// How its button looks: aborting is the one that cannot be taken back.
    fn class(self) -> &'static str {
        match self {
            Self::Pause => "",
            Self::Resume => "primary",
            Self::Abort | Self::AbortRollback => "danger",
        }
    }
    /// Offered for a rollout in `state`.
    fn offered(state: &str) -> &'static [Act] {
        match state {
            "running" => &[Act::Pause, Act::Abort, Act::AbortRollback],
            "paused" => &[Act::Resume, Act::Abort, Act::AbortRollback],
            "completed" => &[Act::AbortRollback],
            _ => &[],
        }
    }
}

async fn snapshot(web: &Web, signed: &Signed, id: &str) -> Result<Markup, PageError> {
    let r = web
        .api
        .get_rollout(signed.request(pb::GetRolloutRequest {
            patch_id: id.to_string(),
        }))
        .await?
        .into_inner();
    let status = web
        .api
        .patch_status(signed.request(pb::PatchStatusRequest { id: id.to_string() }))
        .await?
        .into_inner();
    let groups: Vec<String> = r.groups.iter().map(|g| g.group.clone()).collect();
    let sites = web.app.fleet.site_progress(id, &groups).await;
    Ok(live_section(&r, &status, &sites, signed))
}

/// A short digest of a rendering of the live section: the page carries the
/// one it was drawn with, and each update its own (as the event's id), so
/// the script replaces nothing that did not change (a button is not swapped
/// under a finger).
fn version(html: &str) -> String {
    flotilla_proto::sha256_hex(html.as_bytes())[..16].to_string()
}

/// Where one wave stands, in the CLI's words.
fn wave_mark(w: &pb::WaveProgress) -> &'static str {
    if w.done_at_ms > 0 {
        "done"
    } else if w.started_at_ms > 0 {
        "started"
    } else {
        "pending"
    }
}

/// The part of the page that the live stream replaces.
fn live_section(
    r: &pb::RolloutInfo,
    status: &pb::PatchStatusResponse,
    sites: &crate::fleet::search::SiteProgress,
    signed: &Signed,
) -> Markup {
    let mut nodes: Vec<&pb::NodePatchState> = status.nodes.iter().collect();
    // Failures first, then nodes still moving, then the finished.
    let rank = |p: &str| match p {
        "failed" | "rolled_back" | "rejected" => 0,
        "committed" | "superseded" => 2,
        _ => 1,
    };
    nodes.sort_by(|a, b| {
        rank(&a.phase)
            .cmp(&rank(&b.phase))
            .then(b.updated_at_ms.cmp(&a.updated_at_ms))
            .then(a.node_id.cmp(&b.node_id))
    });
    let phases: std::collections::BTreeSet<&String> =
        sites.sites.values().flat_map(|m| m.keys()).collect();
    html! {
        dl.facts {
            dt { "State" } dd #rollout-state { (badge(&r.state)) @if !r.reason.is_empty() { " " (r.reason) } }
            dt { "Failures" } dd { (r.failures) }
            dt { "Started" } dd { (at_ms(r.started_at_ms)) }
            dt { "Updated" } dd { (at_ms(r.updated_at_ms)) }
            @if r.rollback { dt { "Rollback" } dd { "nodes that committed roll it back" } }
        }
        @if signed.may(OperatorRole::Operator) && !Act::offered(&r.state).is_empty() {
            div.actions {
                @for act in Act::offered(&r.state) {
                    form method="get" action={ "/rollouts/" (seg(&r.patch_id)) "/confirm" } {
                        input type="hidden" name="action" value=(act.as_str());
                        button type="submit" class=(act.class()) data-act=(act.as_str()) { (act.label()) "…" }
                    }
                }
            }
        }
        h2 { "Groups and waves" }
        div.table { table {
            thead { tr {
                th scope="col" { "Group" } th scope="col" { "Wave" } th.num scope="col" { "Targeted" }
                th.num scope="col" { "Released" } th.num scope="col" { "Applying" } th.num scope="col" { "Committed" }
                th.num scope="col" { "Failed" } th.num scope="col" { "In service / floor" } th scope="col" { "Waiting for" }
            } }
            tbody {
                @for g in &r.groups {
                    tr {
                        th scope="row" { (g.group) }
                        td {
                            ((g.wave + 1).min(g.waves)) " of " (g.waves)
                            ul.waves {
                                @for w in &g.waves_progress {
                                    li { (w.index + 1) ": " (w.size) " nodes, " (wave_mark(w)) }
                                }
                            }
                        }
                        td.num { (g.targeted) } td.num { (g.released) } td.num { (g.applying) }
                        td.num { (g.committed) } td.num { (g.failed) }
                        td.num { (g.in_service) " / " (g.min_in_service) }
                        // The CLI's words for it (`rollout show`).
                        td { (crate::cli::rollout::waiting_text(g)) }
                    }
                }
            }
        } }
        h2 { "Sites" }
        div.table { table {
            thead { tr { th scope="col" { "Site" } @for p in &phases { th.num scope="col" { (p) } } } }
            tbody {
                @for (site, counts) in &sites.sites {
                    tr {
                        th scope="row" { (site) }
                        @for p in &phases { td.num { (counts.get(*p).copied().unwrap_or(0)) } }
                    }
                }
            }
        } }
        h2 { "Nodes" }
        p.muted {
            (status.nodes.len()) " nodes targeted or reporting. "
            @if status.nodes.len() > NODE_ROWS { "Failures and nodes still moving first; the first " (NODE_ROWS) " shown. " }
            a href={ "/nodes?patch=" (seg(&r.patch_id)) } { "All of them on the nodes page" } "."
        }
        div.table { table #rollout-nodes {
            thead { tr { th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Phase" } th scope="col" { "Updated" } th scope="col" { "Failure" } } }
            tbody {
                @for n in nodes.iter().take(NODE_ROWS) {
                    tr data-node=(n.node_id) {
                        td { a href={ "/nodes/" (seg(&n.node_id)) } { (n.node_id) } }
                        td { (n.group) }
                        td.phase { (badge(&n.phase)) }
                        td { (at_ms(n.updated_at_ms)) }
                        td.text { (flotilla_proto::limits::clip(&n.error, 300)) }
                    }
                }
            }
        } }
    }
}

pub async fn page(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let r = web
        .api
        .get_rollout(signed.request(pb::GetRolloutRequest {
            patch_id: id.clone(),
        }))
        .await?
        .into_inner();
    let live = snapshot(&web, &signed, &id).await?.into_string();
    let body = html! {
        h1 { "Rollout of " (r.component) " " (r.version) @if r.emergency { " " (badge("emergency")) } }
        p.muted {
            "Patch " a href={ "/patches/" (seg(&id)) } { (id) } " · severity " (r.severity)
            " · " span #live-status.live-status role="status" aria-live="polite" { "loading" }
        }
        section #live data-live={ "/rollouts/" (seg(&id)) "/live" } data-live-status="live-status"
            data-live-version=(version(&live)) aria-live="polite" {
            (maud::PreEscaped(live))
        }
    };
    Ok(layout::page(
        &format!("Rollout {}", r.version),
        Some(&signed),
        body,
    ))
}

/// How long a live stream waits for its reader to take the next event: a
/// browser that stops reading gives its place back, and its session's
/// checks (sign-out, expiry) are not held up behind it.
const SEND_WITHIN: Duration = Duration::from_secs(30);

/// Queues `event` for the stream's reader; false when the reader is gone or
/// has not read for [`SEND_WITHIN`] (the stream then ends).
async fn send(tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>, event: Event) -> bool {
    crate::handoff::hand(tx, Ok(event), SEND_WITHIN).await == crate::handoff::Handed::Taken
}

/// The live section again each time it changes: on a rollout event, or a
/// look each second (node phases between release and outcome).
pub async fn live(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let slot = web
        .streams
        .take(signed.session_key())
        .map_err(|why| PageError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, why))?;
    let first = snapshot(&web, &signed, &id).await?.into_string();
    let mut events = web.app.fleet.subscribe_rollouts();
    let shutdown = web.app.shutdown.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(4);
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = first;
        if !send(&tx, Event::default().event("update").data(&last)).await {
            return;
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LOOK_EVERY) => {}
                ev = events.recv() => match ev {
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            // The session is checked again: a sign-out, an expiry or a
            // revoked credential ends the stream.
            if signed.still_valid(&web).await.is_err() {
                send(&tx, Event::default().event("end").data("signed out")).await;
                return;
            }
            let now = match snapshot(&web, &signed, &id).await {
                Ok(m) => m.into_string(),
                Err(_) => {
                    send(&tx, Event::default().event("end").data("ended")).await;
                    return;
                }
            };
            if now != last {
                last = now;
                if !send(&tx, Event::default().event("update").data(&last)).await {
                    return;
                }
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct ConfirmQuery {
    #[serde(default)]
    action: String,
}

/// The page that asks before an action is sent.
pub async fn confirm(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<ConfirmQuery>,
) -> Result<Markup, PageError> {
    let act = Act::parse(&q.action).ok_or_else(|| PageError::bad_request("unknown action"))?;
    let r = web
        .api
        .get_rollout(signed.request(pb::GetRolloutRequest {
            patch_id: id.clone(),
        }))
        .await?
        .into_inner();
    let body = html! {
        h1 { (act.label()) " the rollout of " (r.component) " " (r.version) "?" }
        p { (act.explain()) }
        p.muted { "It is now " (r.state) "; this is recorded in the audit log under your name." }
        div.actions {
            form method="post" action={ "/rollouts/" (seg(&id)) "/act" } {
                input type="hidden" name="csrf" value=(signed.csrf);
                input type="hidden" name="action" value=(act.as_str());
                button type="submit" #confirm class=(act.class()) { "Yes, " (act.label().to_lowercase()) }
            }
            a href={ "/rollouts/" (seg(&id)) } { "Cancel" }
        }
    };
    Ok(layout::page("Confirm", Some(&signed), body))
}

/// Sends a confirmed action as the CLI's call (its role check and audit).
pub async fn act(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, PageError> {
    signed.check_csrf(&form.csrf)?;
    let act = Act::parse(&form.action).ok_or_else(|| PageError::bad_request("unknown action"))?;
    let patch_id = id.clone();
    match act {
        Act::Pause => {
            web.api
                .pause_rollout(signed.request(pb::RolloutActionRequest { patch_id }))
                .await?;
        }
        Act::Resume => {
            web.api
                .resume_rollout(signed.request(pb::RolloutActionRequest { patch_id }))
                .await?;
        }
        Act::Abort | Act::AbortRollback => {
            web.api
                .abort_rollout(signed.request(pb::AbortRolloutRequest {
                    patch_id,
                    rollback: act == Act::AbortRollback,
                }))
                .await?;
        }
    }
    Ok(Redirect::to(&format!("/rollouts/{}", seg(&id))).into_response())
}
