//! A patch's page: its manifest's fields and exact text, its signatures by
//! key id, its rollout, each node's status, and its bytes by source (servers,
//! site peers, deltas).

use axum::extract::{Path, State};
use flotilla_proto::pb;
use flotilla_proto::pb::admin_service_server::AdminService;
use maud::{Markup, html};

use super::Web;
use super::layout::{self, PageError, at_ms, at_secs, badge, seg};
use super::session::Signed;
use crate::model::{PatchRecord, keys};
use flotilla_proto::transfer::bytes;

/// Node rows shown; the rest on the nodes page.
const NODE_ROWS: usize = 200;

/// The key id a minisign signature names, as minisign prints it.
fn key_id(signature: &str) -> String {
    match minisign::SignatureBox::from_string(signature) {
        Ok(b) => b
            .keynum()
            .iter()
            .rev()
            .map(|b| format!("{b:02X}"))
            .collect(),
        Err(_) => "(unreadable)".into(),
    }
}

pub async fn page(
    State(web): State<Web>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let status = web
        .api
        .patch_status(signed.request(pb::PatchStatusRequest { id: id.clone() }))
        .await?
        .into_inner();
    let p = status
        .patch
        .clone()
        .ok_or_else(|| PageError::not_found(format!("no patch with id {id}")))?;
    let record: Option<PatchRecord> = web
        .app
        .db
        .get(&keys::patch(&id))
        .await
        .map_err(PageError::internal)?;
    let signatures: Vec<String> = record
        .as_ref()
        .map(|r| r.signatures.iter().map(|s| key_id(s)).collect())
        .unwrap_or_default();
    let manifest = String::from_utf8_lossy(&p.manifest).to_string();
    let pretty = serde_json::from_str::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(manifest);
    let (mut server, mut peer, mut delta) = (0u64, 0u64, 0u64);
    for n in &status.nodes {
        if let Some(t) = &n.transfer {
            server += t.server_bytes;
            peer += t.peer_bytes;
            delta += t.delta_bytes;
        }
    }
    let mut counts: Vec<_> = status.counts.iter().collect();
    counts.sort();
    let body = html! {
        h1 { "Patch " (p.component) " " (p.version) }
        dl.facts {
            dt { "Id" } dd { code { (p.id) } }
            dt { "Severity" } dd { (badge(&p.severity)) @if p.emergency { " " (badge("emergency")) } }
            dt { "Issued" } dd { (at_secs(p.issued_at)) }
            dt { "Expires" } dd { (at_secs(p.expires_at)) }
            dt { "Published" } dd { (at_secs(p.published_at)) " by " (p.published_by) }
            dt { "Targeted nodes" } dd { (p.targeted) }
            dt { "Rollout" } dd {
                @if p.rollout_state.is_empty() { "none" }
                @else { a href={ "/rollouts/" (seg(&p.id)) } { (badge(&p.rollout_state)) } }
            }
            dt { "Signatures" } dd {
                (signatures.len()) " — key ids: "
                @for (i, k) in signatures.iter().enumerate() { @if i > 0 { ", " } code { (k) } }
            }
            dt { "Bytes received by nodes" } dd {
                "from servers " (bytes(server)) ", from site peers " (bytes(peer)) ", of which deltas " (bytes(delta))
                "; this server sent " (bytes(status.served_bytes))
            }
        }
        h2 { "Artifacts" }
        div.table { table {
            thead { tr { th scope="col" { "Name" } th scope="col" { "SHA-256" } th.num scope="col" { "Size" } } }
            tbody { @for a in &p.artifacts { tr { td { (a.name) } td { code { (a.sha256) } } td.num { (bytes(a.size)) } } } }
        } }
        h2 { "Node status" }
        p { @for (phase, n) in &counts { (badge(phase)) " " (n) "  " } }
        div.table { table {
            thead { tr { th scope="col" { "Node" } th scope="col" { "Group" } th scope="col" { "Phase" } th scope="col" { "Updated" } th scope="col" { "Error" } } }
            tbody {
                @for n in status.nodes.iter().take(NODE_ROWS) {
                    tr {
                        td { a href={ "/nodes/" (seg(&n.node_id)) } { (n.node_id) } }
                        td { (n.group) } td { (badge(&n.phase)) } td { (at_ms(n.updated_at_ms)) }
                        td.text { (flotilla_proto::limits::clip(&n.error, 300)) }
                    }
                }
            }
        } }
        @if status.nodes.len() > NODE_ROWS {
            p { a href={ "/nodes?patch=" (seg(&p.id)) } { "All " (status.nodes.len()) " on the nodes page" } }
        }
        h2 { "Manifest, as signed" }
        pre { (pretty) }
    };
    Ok(layout::page(
        &format!("Patch {}", p.version),
        Some(&signed),
        body,
    ))
}
