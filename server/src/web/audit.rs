//! The audit log, newest first, filtered by actor, action and target, in
//! pages.

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::Web;
use super::layout::{self, PageError, at_ms, pager, seg};
use super::session::Signed;

const PAGE_SIZE: usize = 100;

#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: String,
    /// Entries older than this seq (the next page).
    #[serde(default)]
    before: u64,
}

impl AuditQuery {
    fn href(&self, before: u64) -> String {
        format!(
            "/audit?actor={}&action={}&target={}&before={before}",
            seg(&self.actor),
            seg(&self.action),
            seg(&self.target)
        )
    }
}

pub async fn page(
    State(web): State<Web>,
    signed: Signed,
    Query(q): Query<AuditQuery>,
) -> Result<Markup, PageError> {
    let all = web.app.audit.tail(usize::MAX).await?;
    let contains = |hay: &str, needle: &str| {
        needle.is_empty() || hay.to_lowercase().contains(&needle.to_lowercase())
    };
    let mut shown = all
        .iter()
        .rev()
        .filter(|e| q.before == 0 || e.seq < q.before)
        .filter(|e| contains(&e.actor, &q.actor) && contains(&e.target, &q.target))
        .filter(|e| {
            q.action.is_empty()
                || e.action == q.action
                || e.action.starts_with(&format!("{}.", q.action))
        });
    let page: Vec<_> = shown.by_ref().take(PAGE_SIZE).collect();
    let more = shown.next().is_some();
    let body = html! {
        h1 { "Audit log" }
        form.filters method="get" action="/audit" role="search" {
            label { "Actor" input type="text" name="actor" value=(q.actor); }
            label { "Action" select name="action" {
                option value="" { "any" }
                @for a in crate::audit::Action::ALL { option value=(a.as_str()) selected[a.as_str() == q.action] { (a.as_str()) } }
            } }
            label { "Target" input type="text" name="target" value=(q.target); }
            button type="submit" { "Filter" }
        }
        div.table { table #audit {
            thead { tr {
                th.num scope="col" { "Seq" } th scope="col" { "When" } th scope="col" { "Actor" }
                th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Detail" }
            } }
            tbody {
                @for e in &page {
                    tr {
                        td.num { (e.seq) } td { (at_ms(e.at_ms)) } td.text { (e.actor) }
                        td { code { (e.action) } } td.text { (e.target) }
                        td.text { (flotilla_proto::limits::clip(&e.detail.to_string(), 500)) }
                    }
                }
                @if page.is_empty() { tr { td colspan="6" { "No entry matches." } } }
            }
        } }
        (pager(
            (q.before > 0).then(|| q.href(0)),
            more.then(|| q.href(page.last().map_or(0, |e| e.seq))),
        ))
        p.muted { "The log is hash-chained: " code { "flotilla audit verify" } " checks it." }
    };
    Ok(layout::page("Audit", Some(&signed), body))
}
