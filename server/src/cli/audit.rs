//! `flotilla audit`: the newest entries, a check of the log's hash chain
//! (on the server, or of an export away from it), and an export as JSON
//! lines for a SIEM.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use flotilla_proto::pb;
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::{Output, time};
use crate::audit::chain::{self, Head};
use crate::model::AuditRecord;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    /// How many of the newest entries.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
}

#[derive(clap::Subcommand)]
enum AuditCmd {
    /// Check the hash chain: every entry unchanged, none removed or inserted
    /// since it was written. Names the first broken entry and exits 1.
    Verify {
        /// An entry recorded by an earlier check or export (SEQ:SHA256, as
        /// this command prints the newest): finds a chain rewritten from
        /// there on. Repeatable.
        #[arg(long, value_name = "SEQ:SHA256", value_parser = parse_anchor)]
        anchor: Vec<Head>,
        /// Check an export (`audit export`) instead of the server's log; needs
        /// no server.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Write entries as JSON lines, oldest first, each as stored (with its
    /// hashes, so `audit verify --file` can check the export).
    Export {
        /// Only entries from this time on: RFC 3339 (2026-12-01T00:00:00Z) or
        /// an age (24h, 30d) [default: all].
        #[arg(long, value_name = "TIME", value_parser = parse_since)]
        since: Option<i64>,
        /// Write to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn parse_anchor(s: &str) -> Result<Head, String> {
    let (seq, sha) = s
        .split_once(':')
        .ok_or_else(|| "an anchor is SEQ:SHA256".to_string())?;
    let seq = seq
        .parse()
        .map_err(|_| format!("{seq:?} is not an entry number"))?;
    if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("the anchor's hash must be 64 hex characters".into());
    }
    Ok(Head {
        seq,
        sha256: sha.to_ascii_lowercase(),
    })
}

/// Unix milliseconds of an RFC 3339 time, or of now minus an age.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let age = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor an age like 24h"))?;
    Ok(crate::model::now_ms() - age.as_millis() as i64)
}

fn record(e: pb::AuditEntry) -> AuditRecord {
    AuditRecord {
        seq: e.seq,
        at_ms: e.at_unix_ms,
        actor: e.actor,
        action: e.action,
        target: e.target,
        detail: serde_json::from_str(&e.detail).unwrap_or(Value::Null),
        prev: e.prev,
        sha256: e.sha256,
    }
}

pub async fn audit(target: &Target, out: Output, args: AuditArgs) -> anyhow::Result<()> {
    match args.cmd {
        None => list(target, out, args.limit).await,
        Some(AuditCmd::Verify { anchor, file }) => verify(target, out, &anchor, file).await,
        Some(AuditCmd::Export { since, out: file }) => export(target, since, file).await,
    }
}

async fn list(target: &Target, out: Output, limit: u32) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let r = c
        .list_audit(pb::ListAuditRequest {
            limit,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    out.table(
        &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        r.entries
            .iter()
            .map(|e| {
                vec![
                    e.seq.to_string(),
                    time(e.at_unix_ms / 1000),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    super::output::detail(&e.detail),
                ]
            })
            .collect(),
        Value::Array(
            r.entries
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq, "at_unix_ms": e.at_unix_ms, "actor": e.actor,
                        "action": e.action, "target": e.target,
                        "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null),
                        "sha256": e.sha256,
                    })
                })
                .collect(),
        ),
    );
    Ok(())
}

/// Every entry from `since_ms` on, page by page, oldest first.
async fn export(
    target: &Target,
    since_ms: Option<i64>,
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let mut w: Box<dyn Write> = match &file {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut after = 0;
    loop {
        let page = c
            .list_audit(pb::ListAuditRequest {
                limit: flotilla_proto::limits::MAX_AUDIT_PAGE,
                after_seq: after,
                // Without a time, every entry: the first page starts after 0.
                since_unix_ms: since_ms.unwrap_or(0).max(1),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        for e in page.entries {
            let line = serde_json::to_string(&record(e)).expect("audit entry serialises");
            if let Err(e) = writeln!(w, "{line}") {
                // A closed pipe (`| head`) ends the export quietly.
                if e.kind() == std::io::ErrorKind::BrokenPipe && file.is_none() {
                    return Ok(());
                }
                return Err(e).context("cannot write the export");
            }
        }
    }
    match w.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && file.is_none() => Ok(()),
        r => r.context("cannot write the export"),
    }
}

/// A server's check of its log, as the chain module states it.
pub(super) fn verdict(r: pb::VerifyAuditResponse) -> Result<chain::Intact, chain::Broken> {
    if r.intact {
        Ok(chain::Intact {
            entries: r.entries,
            chained_from: (r.chained_from > 0).then_some(r.chained_from),
            newest: r.newest.map(|n| Head {
                seq: n.seq,
                sha256: n.sha256,
            }),
        })
    } else {
        Err(chain::Broken {
            seq: r.broken_seq,
            reason: r.broken_reason,
        })
    }
}

async fn verify(
    target: &Target,
    out: Output,
    anchors: &[Head],
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (verdict, source) = match &file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut entries = Vec::new();
            for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let rec: AuditRecord = serde_json::from_str(&line).with_context(|| {
                    format!("{} line {}: not an audit entry", path.display(), n + 1)
                })?;
                entries.push(rec);
            }
            let whole = entries.first().is_some_and(|e| e.seq == 1);
            (
                chain::verify(&entries, None, anchors, whole),
                path.display().to_string(),
            )
        }
        None => {
            let (mut c, _) = target.admin().await?;
            let r = c
                .verify_audit(pb::VerifyAuditRequest {
                    anchors: anchors
                        .iter()
                        .map(|a| pb::AuditAnchor {
                            seq: a.seq,
                            sha256: a.sha256.clone(),
                        })
                        .collect(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let verdict = verdict(r);
            (verdict, "the server's audit log".to_string())
        }
    };
    match verdict {
        Ok(ok) => {
            let mut human = format!("{source}: intact, {} entries", ok.entries);
            match ok.chained_from {
                Some(1) => {}
                Some(n) => human.push_str(&format!(
                    " (chained from entry {n}; those before it predate the chain and are covered only by the link from entry {n})"
                )),
                None => human.push_str(" (none is chained)"),
            }
            if let Some(h) = &ok.newest {
                human.push_str(&format!(
                    "\nnewest: entry {} sha256 {}\nto check a later log against it: flotilla audit verify --anchor {}:{}",
                    h.seq, h.sha256, h.seq, h.sha256
                ));
            }
            out.object(
                &human,
                json!({
                    "intact": true, "entries": ok.entries, "chained_from": ok.chained_from,
                    "newest": ok.newest.map(|h| json!({"seq": h.seq, "sha256": h.sha256})),
                }),
            );
            Ok(())
        }
        Err(broken) => {
            if out.json {
                out.object(
                    "",
                    json!({"intact": false, "broken": {"seq": broken.seq, "reason": broken.reason}}),
                );
            }
            bail!(
                "{source} is broken at entry {}: {}",
                broken.seq,
                broken.reason
            )
        }
    }
}
