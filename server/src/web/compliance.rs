//! The compliance report (the numbers of `flotilla report compliance`) for
//! the fleet or one group, and the same as CSV.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::Web;
use super::layout::{self, PageError, badge, seg};
use super::session::Signed;
use crate::compliance::duration;

#[derive(Debug, Default, Deserialize)]
pub struct GroupQuery {
    #[serde(default)]
    group: String,
}

impl GroupQuery {
    fn group(&self) -> Option<&str> {
        (!self.group.is_empty()).then_some(self.group.as_str())
    }
}

/// Node rows shown; the CSV has every node.
const NODE_ROWS: usize = 500;

pub async fn page(
    State(web): State<Web>,
    signed: Signed,
    Query(q): Query<GroupQuery>,
) -> Result<Markup, PageError> {
    let report = web.app.fleet.compliance(q.group()).await?;
    let groups = web.app.fleet.group_statuses(None).await?;
    let body = html! {
        h1 { "Compliance" @if let Some(g) = q.group() { " of " (g) } }
        form.filters method="get" action="/compliance" {
            label { "Group" select name="group" {
                option value="" { "whole fleet" }
                @for g in &groups { option value=(g.name) selected[g.name == q.group] { (g.name) } }
            } }
            button type="submit" { "Show" }
            a href={ "/compliance.csv?group=" (seg(&q.group)) } download { "Download CSV" }
        }
        h2 { "Remediation by severity" }
        div.table { table #remediation {
            thead { tr {
                th scope="col" { "Severity" } th.num scope="col" { "Remediated" } th.num scope="col" { "Median" }
                th.num scope="col" { "95th percentile" } th.num scope="col" { "Outstanding" } th.num scope="col" { "Overdue" }
            } }
            tbody {
                @for s in &report.remediation {
                    tr {
                        th scope="row" { (s.severity.as_str()) }
                        td.num { (s.remediated) }
                        td.num { (s.median_secs.map(duration).unwrap_or_else(|| "—".into())) }
                        td.num { (s.p95_secs.map(duration).unwrap_or_else(|| "—".into())) }
                        td.num { (s.outstanding) } td.num { (s.overdue) }
                    }
                }
                @if report.remediation.is_empty() { tr { td colspan="6" { "No patch yet." } } }
            }
        } }
        @if !report.old_trust.is_empty() {
            p.problem { (report.old_trust.len()) " nodes hold a trust policy older than v" (report.trust_version) "." }
        }
        h2 { "Nodes" }
        p.muted { "Overdue first, then nodes missing patches, then compliant nodes." }
        div.table { table #compliance-nodes {
            thead { tr { th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Standing" } th scope="col" { "Missing" } } }
            tbody {
                @for n in report.nodes.iter().take(NODE_ROWS) {
                    tr {
                        td { a href={ "/nodes/" (seg(&n.id)) } { (n.id) } }
                        td { (n.group) }
                        td { (badge(if n.overdue { "overdue" } else if n.missing.is_empty() { "compliant" } else { "missing" })) }
                        td.text {
                            @for m in &n.missing {
                                (m.component) " " (m.version) " (" (m.severity.as_str())
                                @if m.overdue { ", overdue by " (duration(m.overdue_by_secs)) }
                                @if m.expired { ", expired" }
                                ") "
                            }
                        }
                    }
                }
            }
        } }
        @if report.nodes.len() > NODE_ROWS { p { "The first " (NODE_ROWS) " of " (report.nodes.len()) " shown; the CSV has all." } }
    };
    Ok(layout::page("Compliance", Some(&signed), body))
}

pub async fn csv(
    State(web): State<Web>,
    _signed: Signed,
    Query(q): Query<GroupQuery>,
) -> Result<Response, PageError> {
    let report = web.app.fleet.compliance(q.group()).await?;
    let name = format!(
        "attachment; filename=\"compliance-{}.csv\"",
        q.group().unwrap_or("fleet")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        crate::compliance::to_csv(&report),
    )
        .into_response())
}
