//! `flotilla artifacts gc`: what the artifact retention policy lets go, and
//! removing it now instead of at the server's next hourly collection.

use flotilla_proto::pb;
use flotilla_proto::transfer::bytes;
use serde_json::json;

use super::connect::{Target, status_error};
use super::output::Output;

#[derive(clap::Subcommand)]
pub enum ArtifactsCmd {
    /// Remove the artifacts no unexpired patch (nor a running or paused
    /// rollout) needs, once the retention period has passed (admin; with
    /// --dry-run, viewer). Applies to the replica answering.
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn artifacts(target: &Target, out: Output, cmd: ArtifactsCmd) -> anyhow::Result<()> {
    let ArtifactsCmd::Gc { dry_run } = cmd;
    let (mut c, _) = target.admin().await?;
    let r = c
        .collect_artifacts(pb::CollectArtifactsRequest { dry_run })
        .await
        .map_err(status_error)?
        .into_inner();
    let freed: u64 = r.collected.iter().map(|a| a.size).sum();
    let retention = humantime::format_duration(std::time::Duration::from_secs(r.retention_secs));
    let summary = format!(
        "{} {} file(s), {}; {} kept ({}); retention {retention}",
        if dry_run { "would remove" } else { "removed" },
        r.collected.len(),
        bytes(freed),
        r.kept,
        bytes(r.kept_bytes),
    );
    let json = json!({
        "dry_run": r.dry_run,
        "retention_secs": r.retention_secs,
        "collected": r.collected.iter().map(|a| json!({
            "sha256": a.sha256, "size": a.size, "partial": a.partial, "why": a.why,
        })).collect::<Vec<_>>(),
        "collected_bytes": freed,
        "kept": r.kept,
        "kept_bytes": r.kept_bytes,
    });
    if out.json || r.collected.is_empty() {
        out.object(&summary, json);
        return Ok(());
    }
    out.table(
        &["SHA256", "SIZE", "WHY"],
        r.collected
            .iter()
            .map(|a| vec![a.sha256.clone(), bytes(a.size), a.why.clone()])
            .collect(),
        json,
    );
    flotilla_proto::outln!("{summary}");
    Ok(())
}
