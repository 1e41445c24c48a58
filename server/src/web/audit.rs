//! The audit log, newest first, filtered by actor, action and target, in
//! pages.

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::Web;
use super::layout::{self, PageError, at_ms, pager, seg};
use super::session::Signed;

const PAGE_SIZE: usize = 100;
/// Entries one page request reads at most: a filter that matches little
/// shows what it found so far, and a link that searches on.
const MAX_READ: u64 = 10_000;
/// Longest filter text looked for (longer is cut, as on the nodes page).
const MAX_FILTER: usize = 256;

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
    let q = AuditQuery {
        actor: clip_filter(&q.actor),
        action: clip_filter(&q.action),
        target: clip_filter(&q.target),
        before: q.before,
    };
    let (actor, target) = (q.actor.to_lowercase(), q.target.to_lowercase());
    let action_prefix = format!("{}.", q.action);
    let contains =
        |hay: &str, needle: &str| needle.is_empty() || hay.to_lowercase().contains(needle);
    let keep = |e: &crate::model::AuditRecord| {
        contains(&e.actor, &actor)
            && contains(&e.target, &target)
            && (q.action.is_empty() || e.action == q.action || e.action.starts_with(&action_prefix))
    };
    let found = web
        .app
        .audit
        .back(q.before, PAGE_SIZE, MAX_READ, keep)
        .await?;
    let page = found.entries;
    let more = found.next > 1;
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
        @if more && page.len() < PAGE_SIZE {
            p.muted { "Searched back to entry " (found.next) ": older entries on the next page." }
        }
        (pager(
            (q.before > 0).then(|| q.href(0)),
            more.then(|| q.href(found.next)),
        ))
        p.muted { "The log is hash-chained: " code { "flotilla audit verify" } " checks it." }
    };
    Ok(layout::page("Audit", Some(&signed), body))
}

/// A filter as looked for: at most [`MAX_FILTER`] bytes, cut at a character.
fn clip_filter(s: &str) -> String {
    let mut end = s.len().min(MAX_FILTER);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
