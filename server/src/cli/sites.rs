//! `flotilla sites`: the sites of the groups, their nodes, the agent serving
//! each one's artifacts and its cache, and their downloads from the servers.

use flotilla_proto::pb;
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::Output;

pub async fn list(target: &Target, out: Output, group: Option<String>) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let r = c
        .list_sites(pb::ListSitesRequest {
            group: group.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let cap = |max: u32| {
        if max == 0 {
            "-".to_string()
        } else {
            max.to_string()
        }
    };
    let serving = |s: &pb::SiteInfo| match (s.serving_node.is_empty(), s.serving_marked) {
        (true, _) => "-".to_string(),
        (false, true) => s.serving_node.clone(),
        (false, false) => format!("{} (chosen)", s.serving_node),
    };
    let cache = |s: &pb::SiteInfo| {
        if s.serving_node.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{} files, {}",
                s.cache_files,
                flotilla_proto::transfer::bytes(s.cache_bytes)
            )
        }
    };
    out.table(
        &[
            "GROUP",
            "SITE",
            "NODES",
            "ONLINE",
            "SERVED BY",
            "CACHE",
            "DOWNLOADING",
            "MAX",
        ],
        r.sites
            .iter()
            .map(|s| {
                vec![
                    s.group.clone(),
                    format!("{}={}", s.label, s.site),
                    s.nodes.to_string(),
                    s.online.to_string(),
                    serving(s),
                    cache(s),
                    s.downloads.to_string(),
                    cap(s.max_downloads),
                ]
            })
            .collect(),
        Value::Array(
            r.sites
                .iter()
                .map(|s| {
                    json!({
                        "group": s.group, "label": s.label, "site": s.site, "nodes": s.nodes,
                        "online": s.online, "downloads": s.downloads, "max_downloads": s.max_downloads,
                        "serving_node": s.serving_node, "serving_url": s.serving_url,
                        "serving_marked": s.serving_marked, "cache_files": s.cache_files,
                        "cache_bytes": s.cache_bytes,
                    })
                })
                .collect(),
        ),
    );
    Ok(())
}
