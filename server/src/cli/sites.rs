//! `flotilla sites`: the sites of the groups, their nodes and their downloads.

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
    out.table(
        &["GROUP", "SITE", "NODES", "ONLINE", "DOWNLOADING", "MAX"],
        r.sites
            .iter()
            .map(|s| {
                vec![
                    s.group.clone(),
                    format!("{}={}", s.label, s.site),
                    s.nodes.to_string(),
                    s.online.to_string(),
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
                    })
                })
                .collect(),
        ),
    );
    Ok(())
}
