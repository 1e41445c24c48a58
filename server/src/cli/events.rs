//! `flotilla webhook add|list|remove` and `flotilla events`: the fleet's
//! events, pushed to receivers or followed from a terminal or script.

use std::path::PathBuf;

use anyhow::Context;
use flotilla_proto::pb;
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::{Output, time};

const KINDS: &str = "deficit, surplus, rollout.paused, rollout.completed, rollout.aborted, \
                     node.offline, node.joined, patch.failed";

#[derive(clap::Subcommand)]
pub enum WebhookCmd {
    /// POST the fleet's events to URL as JSON, signed with HMAC-SHA256
    /// (admin). It gets the events from now on, in order.
    Add {
        /// http:// or https:// URL of the receiver.
        url: String,
        /// The events it gets, comma-separated: deficit, surplus,
        /// rollout.paused, rollout.completed, rollout.aborted, node.offline,
        /// node.joined, patch.failed.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// A file holding the HMAC secret (at least 16 bytes; the receiver
        /// holds the same).
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
        /// PEM of the CA that signed the receiver's certificate (https; by
        /// default the server host's CA bundle).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// The webhooks, and where delivery to each stands.
    List,
    /// Stop sending to a webhook (admin).
    Remove {
        /// Its id (see `webhook list`).
        id: String,
    },
}

fn webhook_json(w: &pb::WebhookInfo) -> Value {
    json!({
        "id": w.id, "url": w.url, "events": w.events, "created_at_ms": w.created_at_ms,
        "created_by": w.created_by, "delivered_id": w.delivered_id, "newest_id": w.newest_id,
        "failures": w.failures, "last_error": w.last_error,
        "last_attempt_ms": w.last_attempt_ms, "dropped": w.dropped,
    })
}

pub async fn webhook(target: &Target, out: Output, cmd: WebhookCmd) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    match cmd {
        WebhookCmd::Add {
            url,
            events,
            secret_file,
            ca_file,
        } => {
            let secret = std::fs::read_to_string(&secret_file)
                .with_context(|| format!("cannot read {}", secret_file.display()))?;
            let ca_pem = match &ca_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                None => String::new(),
            };
            let w = c
                .add_webhook(pb::AddWebhookRequest {
                    url,
                    events,
                    secret: secret.trim_end_matches(['\n', '\r']).to_string(),
                    ca_pem,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(
                &format!(
                    "webhook {} added: {} gets {} from event {} on",
                    w.id,
                    w.url,
                    w.events.join(","),
                    w.newest_id + 1
                ),
                webhook_json(&w),
            );
        }
        WebhookCmd::List => {
            let r = c
                .list_webhooks(pb::ListWebhooksRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            out.table(
                &[
                    "ID",
                    "URL",
                    "EVENTS",
                    "DELIVERED",
                    "BEHIND",
                    "FAILURES",
                    "DROPPED",
                    "LAST ERROR",
                ],
                r.webhooks
                    .iter()
                    .map(|w| {
                        vec![
                            w.id.clone(),
                            w.url.clone(),
                            w.events.join(","),
                            w.delivered_id.to_string(),
                            w.newest_id.saturating_sub(w.delivered_id).to_string(),
                            w.failures.to_string(),
                            w.dropped.to_string(),
                            w.last_error.clone(),
                        ]
                    })
                    .collect(),
                Value::Array(r.webhooks.iter().map(webhook_json).collect()),
            );
        }
        WebhookCmd::Remove { id } => {
            let w = c
                .remove_webhook(pb::RemoveWebhookRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(
                &format!(
                    "webhook {} removed ({} events delivered)",
                    w.id, w.delivered_id
                ),
                webhook_json(&w),
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep following: print each new event as it is written.
    #[arg(long, short)]
    follow: bool,
    /// Start after this event id (e.g. the last one a script handled).
    #[arg(long, value_name = "ID")]
    after: Option<u64>,
    /// Without --after, start with this many of the newest events.
    #[arg(long, value_name = "N", default_value_t = 20)]
    last: u32,
    /// Only these kinds, comma-separated.
    #[arg(long, value_delimiter = ',', long_help = format!("Only these kinds, comma-separated: {KINDS}."))]
    kinds: Vec<String>,
}

/// Prints events one per line (JSON lines with --json), oldest first.
pub async fn events(target: &Target, out: Output, args: EventsArgs) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {
            after_id: args.after.unwrap_or(0),
            last: if args.after.is_some() { 0 } else { args.last },
            follow: args.follow,
            kinds: args.kinds,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(status_error)? {
        let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
        if out.json {
            flotilla_proto::outln!(
                "{}",
                json!({"id": e.id, "at_unix_ms": e.at_unix_ms, "kind": e.kind, "subject": e.subject, "data": data})
            );
        } else {
            flotilla_proto::outln!(
                "{:>6}  {}  {:<17}  {:<20}  {}",
                e.id,
                time(e.at_unix_ms / 1000),
                e.kind,
                e.subject,
                super::output::detail(&e.data)
            );
        }
    }
    Ok(())
}
