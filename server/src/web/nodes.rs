//! Nodes: the list (search and filters, paged on the server so it stays fast
//! at 10k nodes), one node's page (labels, certificate, installed versions,
//! its last reports with their log tails), and the nodes waiting for
//! approval with accept and reject.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use flotilla_proto::pb;
use flotilla_proto::pb::admin_service_server::AdminService;
use flotilla_proto::phase::Phase;
use maud::{Markup, html};
use serde::Deserialize;

use super::Web;
use super::layout::{self, PageError, at_ms, at_secs, badge, pager, seg};
use super::session::{ActionForm, Signed};
use crate::fleet::search::{NodeQuery, NodeRow, NodeState, PhaseFilter};
use crate::model::{NodePatchRecord, NodeStatus, OperatorRole, Role, keys};

const PAGE_SIZE: usize = 50;
/// Reports shown on a node's page: its newest patches.
const REPORTS: usize = 20;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    patch: String,
    #[serde(default)]
    phase: String,
    #[serde(default)]
    page: usize,
}

impl ListQuery {
    fn to_query(&self) -> Result<NodeQuery, PageError> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let state = match self.state.as_str() {
            "" => None,
            s => Some(
                NodeState::parse(s)
                    .ok_or_else(|| PageError::bad_request(format!("unknown state {s:?}")))?,
            ),
        };
        let phase = match self.phase.as_str() {
            "" => None,
            "none" => Some(PhaseFilter::None),
            p => Some(PhaseFilter::Is(Phase::parse(p).ok_or_else(|| {
                PageError::bad_request(format!("unknown phase {p:?}"))
            })?)),
        };
        let label = opt(self.label.trim()).map(|l| match l.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
            None => (l, None),
        });
        Ok(NodeQuery {
            text: flotilla_proto::limits::clip(&self.q, 256),
            group: opt(&self.group),
            label,
            state,
            patch: opt(&self.patch),
            phase,
            offset: self.page.saturating_mul(PAGE_SIZE),
            limit: PAGE_SIZE,
        })
    }

    /// This list's address on page `page`.
    fn href(&self, page: usize) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("q", &self.q),
            ("group", &self.group),
            ("label", &self.label),
            ("state", &self.state),
            ("patch", &self.patch),
            ("phase", &self.phase),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", seg(v)));
            }
        }
        if page > 0 {
            parts.push(format!("page={page}"));
        }
        format!("/nodes?{}", parts.join("&"))
    }
}

fn node_rows(rows: &[NodeRow], with_phase: bool) -> Markup {
    html! {
        div.table { table #nodes {
            thead { tr {
                th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Status" }
                th scope="col" { "Host" } th scope="col" { "Labels" }
                @if with_phase { th scope="col" { "Patch phase" } }
                th scope="col" { "Last seen" }
            } }
            tbody {
                @for r in rows {
                    tr {
                        td { a href={ "/nodes/" (seg(&r.node.id)) } { (r.node.id) } }
                        td { (r.node.group) }
                        td {
                            (badge(r.node.status.as_str()))
                            @if r.node.status == NodeStatus::Accepted {
                                " " (badge(if r.online { "online" } else { "offline" }))
                                " " (match r.node.role { Role::Active => "active", Role::Standby => "standby" })
                            }
                        }
                        td.text { (r.node.facts.hostname) }
                        td.text.labels {
                            @for (k, v) in &r.node.labels { span.label { (k) "=" (v) } " " }
                        }
                        @if with_phase {
                            td { @if let Some((p, _)) = &r.phase { (badge(p.as_str())) } @else { "—" } }
                        }
                        td { (at_secs(r.last_seen)) }
                    }
                }
                @if rows.is_empty() { tr { td colspan="7" { "No node matches." } } }
            }
        } }
    }
}

pub async fn list(
    State(web): State<Web>,
    signed: Signed,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    let query = q.to_query()?;
    let groups = web.app.fleet.group_statuses(None).await?;
    if let Some(g) = &query.group {
        // An unknown group is named, as the CLI names it.
        web.app.fleet.group_config(g).await?;
    }
    let found = web.app.fleet.find_nodes(&query).await;
    let patches = web.app.fleet.patch_infos().await;
    let last = found.total.div_ceil(PAGE_SIZE).max(1) - 1;
    let body = html! {
        h1 { "Nodes" }
        form.filters method="get" action="/nodes" role="search" {
            label { "Search" input type="search" name="q" value=(q.q) placeholder="id, host or label"; }
            label { "Group" select name="group" {
                option value="" { "all" }
                @for g in &groups { option value=(g.name) selected[g.name == q.group] { (g.name) } }
            } }
            label { "Label" input type="text" name="label" value=(q.label) placeholder="site=eu-1"; }
            label { "State" select name="state" {
                option value="" { "any" }
                @for s in NodeState::ALL { option value=(s.as_str()) selected[s.as_str() == q.state] { (s.as_str()) } }
            } }
            label { "Patch" select name="patch" {
                option value="" { "any" }
                @for p in &patches { option value=(p.record.id) selected[p.record.id == q.patch] { (p.manifest.component) " " (p.manifest.version) } }
            } }
            label { "Phase" select name="phase" {
                option value="" { "any" }
                option value="none" selected[q.phase == "none"] { "no report" }
                @for p in Phase::ALL { option value=(p.as_str()) selected[p.as_str() == q.phase] { (p.as_str()) } }
            } }
            button type="submit" { "Filter" }
        }
        p #node-count role="status" {
            (found.total) " nodes match"
            @if found.total > PAGE_SIZE { "; page " (q.page.min(last) + 1) " of " (last + 1) }
            "."
        }
        (node_rows(&found.rows, true))
        (pager(
            (q.page > 0).then(|| q.href(q.page.min(last + 1) - 1)),
            (q.page < last).then(|| q.href(q.page + 1)),
        ))
    };
    Ok(layout::page("Nodes", Some(&signed), body))
}

pub async fn node(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let info = web
        .api
        .get_node(signed.request(pb::GetNodeRequest { id: id.clone() }))
        .await?
        .into_inner();
    let facts = info.facts.clone().unwrap_or_default();
    let mut labels: Vec<_> = info.labels.iter().collect();
    labels.sort();
    let mut installed: Vec<_> = info.installed.iter().collect();
    installed.sort();
    let mut reports: Vec<(String, String, NodePatchRecord)> = Vec::new();
    // The newest patches first; a node that reported on none of the last
    // hundred costs a hundred reads, not one per patch ever published.
    for p in web.app.fleet.patch_infos().await.into_iter().take(100) {
        if reports.len() >= REPORTS {
            break;
        }
        if let Some(r) = web
            .app
            .db
            .get::<NodePatchRecord>(&keys::patch_state(&p.record.id, &id))
            .await
            .map_err(PageError::internal)?
        {
            reports.push((
                p.record.id.clone(),
                format!("{} {}", p.manifest.component, p.manifest.version),
                r,
            ));
        }
    }
    let pending = info.status == "pending";
    let body = html! {
        h1 { "Node " (info.id) }
        dl.facts {
            dt { "Group" } dd { (info.group) }
            dt { "Status" } dd { (badge(&info.status)) " " (badge(if info.online { "online" } else { "offline" })) }
            dt { "Host" } dd { (facts.hostname) " · " (facts.os) " · " (facts.arch) }
            dt { "Agent" } dd { (facts.agent_version) " · trust policy v" (facts.trust_version) }
            dt { "Joined" } dd { (at_secs(info.joined_at)) " with token " code { (info.token_id) } }
            dt { "Last seen" } dd { (at_secs(info.last_seen)) }
            dt { "Certificate" } dd { "serial " code { (info.certificate_serial) } ", expires " (at_secs(info.certificate_not_after)) }
            @if !facts.site_url.is_empty() { dt { "Serves its site at" } dd { (facts.site_url) } }
        }
        @if pending && signed.may(OperatorRole::Operator) { (decide_buttons(&signed, &info.id)) }
        h2 { "Labels" }
        @if labels.is_empty() { p { "None." } } @else {
            div.table { table { tbody { @for (k, v) in &labels { tr { th scope="row" { (k) } td.text { (v) } } } } } }
        }
        h2 { "Installed versions" }
        @if installed.is_empty() { p { "None reported." } } @else {
            div.table { table { tbody { @for (c, v) in &installed { tr { th scope="row" { (c) } td { (v) } } } } } }
        }
        h2 { "Last reports" }
        @if reports.is_empty() { p { "No report yet." } }
        @for (pid, name, r) in &reports {
            h3 { a href={ "/patches/" (seg(pid)) } { (name) } " " (badge(&r.phase)) }
            p.muted { "first " (at_ms(r.first_at_ms)) ", last " (at_ms(r.updated_at_ms)) }
            @if !r.error.is_empty() { p.problem { (r.error) } }
            @if !r.log_tail.is_empty() { pre aria-label="log tail" { (r.log_tail) } }
        }
    };
    Ok(layout::page(
        &format!("Node {}", info.id),
        Some(&signed),
        body,
    ))
}

fn decide_buttons(signed: &Signed, id: &str) -> Markup {
    html! {
        div.actions {
            @for (action, label, class) in [("accept", "Accept", "primary"), ("reject", "Reject", "danger")] {
                form method="post" action={ "/nodes/" (seg(id)) "/decide" } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="action" value=(action);
                    button type="submit" class=(class) aria-label={ (label) " " (id) } { (label) }
                }
            }
        }
    }
}

pub async fn approvals(State(web): State<Web>, signed: Signed) -> Result<Markup, PageError> {
    let found = web
        .app
        .fleet
        .find_nodes(&NodeQuery {
            state: Some(NodeState::Pending),
            limit: 500,
            ..Default::default()
        })
        .await;
    let operator = signed.may(OperatorRole::Operator);
    let body = html! {
        h1 { "Pending approvals" }
        p { (found.total) " nodes joined with a token that needs approval and wait for an operator." }
        div.table { table #approvals {
            thead { tr {
                th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Host" }
                th scope="col" { "Labels" } th scope="col" { "Joined" }
                @if operator { th scope="col" { "Decision" } }
            } }
            tbody {
                @for r in &found.rows {
                    tr {
                        td { a href={ "/nodes/" (seg(&r.node.id)) } { (r.node.id) } }
                        td { (r.node.group) }
                        td.text { (r.node.facts.hostname) }
                        td.text { @for (k, v) in &r.node.labels { (k) "=" (v) " " } }
                        td { (at_secs(r.node.joined_at)) }
                        @if operator { td { (decide_buttons(&signed, &r.node.id)) } }
                    }
                }
                @if found.rows.is_empty() { tr { td colspan="6" { "Nobody is waiting." } } }
            }
        } }
        @if found.total > found.rows.len() { p { "The first " (found.rows.len()) " shown." } }
    };
    Ok(layout::page("Approvals", Some(&signed), body))
}

/// Accepts or rejects a pending node, as `flotilla nodes accept|reject`.
pub async fn decide(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, PageError> {
    signed.check_csrf(&form.csrf)?;
    let req = signed.request(pb::NodeActionRequest { id: id.clone() });
    match form.action.as_str() {
        "accept" => web.api.accept_node(req).await?,
        "reject" => web.api.reject_node(req).await?,
        _ => {
            return Err(PageError::bad_request(
                "the action must be accept or reject",
            ));
        }
    };
    Ok(Redirect::to("/approvals").into_response())
}
