//! The fleet at a glance: groups (desired, online, active, standby,
//! deficit), rollouts in flight, nodes overdue on a patch by their SLA, and
//! nodes waiting for approval.

use axum::extract::State;
use flotilla_proto::pb;
use flotilla_proto::pb::admin_service_server::AdminService;
use maud::{Markup, html};

use super::Web;
use super::layout::{self, PageError, at_ms, badge, seg};
use super::session::Signed;

/// Rollout states that are still moving (or held).
pub fn in_flight(state: &str) -> bool {
    !matches!(state, "completed" | "aborted")
}

pub async fn page(web: axum::extract::State<Web>, signed: Signed) -> Result<Markup, PageError> {
    let State(web) = web;
    let groups = web.app.fleet.group_statuses(None).await?;
    let rollouts = web
        .api
        .list_rollouts(signed.request(pb::ListRolloutsRequest {}))
        .await?
        .into_inner()
        .rollouts;
    let report = web.app.fleet.compliance(None).await?;
    let pending: u32 = groups.iter().map(|g| g.pending).sum();
    let overdue: Vec<_> = report.nodes.iter().filter(|n| n.overdue).collect();
    let flying: Vec<_> = rollouts.iter().filter(|r| in_flight(&r.state)).collect();
    let body = html! {
        h1 { "Fleet overview" }
        ul.cards aria-label="Totals" {
            li { b { (groups.iter().map(|g| g.online).sum::<u32>()) " / " (groups.iter().map(|g| g.total).sum::<u32>()) } "nodes online" }
            li { b { (groups.iter().map(|g| g.deficit).sum::<u32>()) } "deficit (nodes short of desired)" }
            li { b { (flying.len()) } "rollouts in flight" }
            li { b { (overdue.len()) } "nodes overdue on a patch" }
            li { b { a href="/approvals" { (pending) } } "nodes waiting for approval" }
        }
        h2 #groups { "Groups" }
        div.table {
            table {
                caption.muted { "Desired count, and where each group's nodes stand now" }
                thead { tr {
                    th scope="col" { "Group" } th.num scope="col" { "Desired" } th.num scope="col" { "Online" }
                    th.num scope="col" { "Active (healthy)" } th.num scope="col" { "Standby" }
                    th.num scope="col" { "Pending" } th.num scope="col" { "Deficit" }
                } }
                tbody {
                    @for g in &groups {
                        tr {
                            th scope="row" { a href={ "/nodes?group=" (seg(&g.name)) } { (g.name) } }
                            td.num { @if let Some(d) = g.desired { (d) } @else { "all" } }
                            td.num { (g.online) " / " (g.total) }
                            td.num { (g.active) " (" (g.healthy_active) ")" }
                            td.num { (g.standby) }
                            td.num { (g.pending) }
                            td.num { @if g.deficit > 0 { (badge(&format!("{} short", g.deficit))) } @else { "0" } }
                        }
                    }
                    @if groups.is_empty() { tr { td colspan="7" { "No groups yet." } } }
                }
            }
        }
        h2 #rollouts { "Rollouts in flight" }
        (rollout_table(&flying))
        h2 #overdue { "Overdue patches" }
        @if overdue.is_empty() {
            p { "No node is past its SLA on any patch." }
        } @else {
            div.table { table {
                thead { tr { th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Missing (most overdue first)" } } }
                tbody {
                    @for n in overdue.iter().take(50) {
                        tr {
                            td { a href={ "/nodes/" (seg(&n.id)) } { (n.id) } }
                            td { (n.group) }
                            td.text {
                                @for m in n.missing.iter().filter(|m| m.overdue) {
                                    a href={ "/patches/" (seg(&m.patch_id)) } { (m.component) " " (m.version) }
                                    " " (badge(m.severity.as_str())) " overdue by " (crate::compliance::duration(m.overdue_by_secs)) ". "
                                }
                            }
                        }
                    }
                }
            } }
            @if overdue.len() > 50 { p { (overdue.len() - 50) " more on the " a href="/compliance" { "compliance page" } "." } }
        }
    };
    Ok(layout::page("Overview", Some(&signed), body))
}

/// Rollouts as a table, each linked to its page.
pub fn rollout_table(rollouts: &[&pb::RolloutInfo]) -> Markup {
    html! {
        @if rollouts.is_empty() {
            p { "None." }
        } @else {
            div.table { table {
                thead { tr {
                    th scope="col" { "Patch" } th scope="col" { "State" } th.num scope="col" { "Committed" }
                    th.num scope="col" { "Failed" } th.num scope="col" { "Targeted" } th scope="col" { "Started" }
                } }
                tbody {
                    @for r in rollouts {
                        tr {
                            td { a href={ "/rollouts/" (seg(&r.patch_id)) } { (r.component) " " (r.version) }
                                 @if r.emergency { " " (badge("emergency")) } }
                            td { (badge(&r.state)) }
                            td.num { (r.groups.iter().map(|g| g.committed).sum::<u32>()) }
                            td.num { (r.groups.iter().map(|g| g.failed).sum::<u32>()) }
                            td.num { (r.groups.iter().map(|g| g.targeted).sum::<u32>()) }
                            td { (at_ms(r.started_at_ms)) }
                        }
                    }
                }
            } }
        }
    }
}
