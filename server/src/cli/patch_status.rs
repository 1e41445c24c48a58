//! `flotilla patch status`: where each targeted node stands with a patch, how
//! the nodes downloaded it, and what the server sent of it.

use std::time::Duration;

use anyhow::bail;
use flotilla_proto::pb;
use flotilla_proto::phase::Phase;
use flotilla_proto::transfer::{self, Transfer};
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::Output;
use super::patch::info_json;

/// A node's final word on a patch (a node an aborted rollout never started
/// will not start it either).
fn is_outcome(phase: &str) -> bool {
    phase == "not started (aborted)" || Phase::parse(phase).is_some_and(Phase::is_final)
}

/// Prints a patch's status; with `wait`, first waits (up to that long) until
/// every targeted node reached an outcome.
pub(super) async fn status(
    target: &Target,
    out: Output,
    id: String,
    wait: Option<Duration>,
    every_node: bool,
) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        let r = c
            .patch_status(pb::PatchStatusRequest { id: id.clone() })
            .await
            .map_err(status_error)?
            .into_inner();
        let done = r.nodes.iter().all(|n| is_outcome(&n.phase));
        let waiting = deadline.is_some_and(|d| !done && std::time::Instant::now() < d);
        if !waiting {
            print_status(out, &r, every_node);
            if deadline.is_some() && !done {
                bail!("not every node reached an outcome in time");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_status(out: Output, r: &pb::PatchStatusResponse, every_node: bool) {
    let p = r.patch.clone().unwrap_or_default();
    let transfer = |n: &pb::NodePatchState| n.transfer.clone().map(Transfer::from_proto);
    let nodes: Vec<Value> = r
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id, "group": n.group, "phase": n.phase, "first_at_ms": n.first_at_ms,
                "updated_at_ms": n.updated_at_ms, "error": n.error, "log_tail": n.log_tail,
                "transfer": transfer(n),
            })
        })
        .collect();
    let json = json!({
        "patch": info_json(&p), "counts": r.counts, "nodes": nodes, "served_bytes": r.served_bytes,
    });
    if out.json {
        flotilla_proto::outln!("{}", serde_json::to_string_pretty(&json).expect("json"));
        return;
    }
    let mut counts: Vec<_> = r.counts.iter().collect();
    counts.sort();
    flotilla_proto::outln!(
        "{} ({} {}): {}",
        p.id,
        p.component,
        p.version,
        counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(line) = downloads_line(r) {
        flotilla_proto::outln!("{line}");
    }
    if every_node {
        out.table(
            &["NODE", "GROUP", "PHASE", "BYTES FROM", "ATTEMPTS", "ERROR"],
            r.nodes
                .iter()
                .map(|n| {
                    let t = transfer(n);
                    vec![
                        n.node_id.clone(),
                        n.group.clone(),
                        n.phase.clone(),
                        t.as_ref().map_or_else(|| "-".into(), Transfer::sources),
                        t.as_ref()
                            .map_or_else(|| "-".into(), |t| t.attempts.to_string()),
                        n.error.clone(),
                    ]
                })
                .collect(),
            Value::Null,
        );
        return;
    }
    let failing: Vec<_> = r
        .nodes
        .iter()
        .filter(|n| Phase::parse(&n.phase).is_some_and(Phase::is_failure))
        .collect();
    if !failing.is_empty() {
        out.table(
            &["NODE", "GROUP", "PHASE", "REASON"],
            failing
                .iter()
                .map(|n| {
                    vec![
                        n.node_id.clone(),
                        n.group.clone(),
                        n.phase.clone(),
                        n.error.clone(),
                    ]
                })
                .collect(),
            Value::Null,
        );
    }
}

/// Where a patch's nodes got their bytes, in one line (None before any
/// node reported a download).
pub fn downloads_line(r: &pb::PatchStatusResponse) -> Option<String> {
    let downloads: Vec<Transfer> = r
        .nodes
        .iter()
        .filter_map(|n| n.transfer.clone().map(Transfer::from_proto))
        .collect();
    if downloads.is_empty() {
        return None;
    }
    let sum = |f: fn(&Transfer) -> u64| downloads.iter().map(f).sum::<u64>();
    let retried = downloads.iter().filter(|t| !t.failures.is_empty()).count();
    Some(format!(
        "downloads: {} node(s); from servers {}, from site peers {}, as deltas {}; {retried} node(s) retried; \
         this server sent {}",
        downloads.len(),
        transfer::bytes(sum(|t| t.server_bytes)),
        transfer::bytes(sum(|t| t.peer_bytes)),
        transfer::bytes(sum(|t| t.delta_bytes)),
        transfer::bytes(r.served_bytes),
    ))
}
