//! `flotilla rollout ...`, the rollout flags of `patch publish`, `group config`
//! and `report compliance`.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use flotilla_proto::pb;
use serde_json::{Value, json};

use super::connect::{Target, status_error};
use super::output::Output;

/// How a patch is rolled out; unset flags take the groups' defaults.
#[derive(Args, Debug, Default, Clone)]
pub struct PolicyArgs {
    /// Cumulative wave sizes, counts or percentages: "1,10%,50%,100%".
    #[arg(long)]
    pub waves: Option<String>,
    /// How long a finished wave must stay healthy before the next starts ("10m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bake: Option<Duration>,
    /// Most nodes of a group applying at once.
    #[arg(long)]
    pub max_applying: Option<u32>,
    /// Failures that pause the rollout: a count ("2") or a percentage ("5%").
    #[arg(long)]
    pub failure_threshold: Option<String>,
    /// Node label to spread each wave over ("site"): the canary takes one node per value.
    #[arg(long)]
    pub spread_label: Option<String>,
    /// Targeted nodes download and verify as soon as the patch is published;
    /// installs still wait for their wave and window [default: where the group
    /// has maintenance windows, never in an emergency].
    #[arg(long, conflicts_with = "no_download_ahead")]
    pub download_ahead: bool,
    /// Nodes download only when their install is released.
    #[arg(long)]
    pub no_download_ahead: bool,
}

impl PolicyArgs {
    pub fn to_pb(&self) -> Option<pb::RolloutPolicy> {
        let p = pb::RolloutPolicy {
            waves: self.waves.iter().cloned().collect(),
            bake_secs: self.bake.map(|d| d.as_secs()),
            max_applying: self.max_applying,
            failure_threshold: self.failure_threshold.clone(),
            spread_label: self.spread_label.clone(),
            download_ahead: match (self.download_ahead, self.no_download_ahead) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        };
        (p != pb::RolloutPolicy::default()).then_some(p)
    }
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Every rollout, newest first.
    List,
    /// One rollout's state and its progress per group and wave.
    Show {
        /// The patch id (the rollout's name).
        patch: String,
    },
    /// Start no new node until resumed.
    Pause {
        /// The patch id (the rollout's name).
        patch: String,
    },
    /// Go on after a pause; failures seen so far no longer count.
    Resume {
        /// The patch id (the rollout's name).
        patch: String,
    },
    /// Start no new node, for good.
    Abort {
        /// The patch id (the rollout's name).
        patch: String,
        /// Nodes that committed the patch undo it with its signed rollback plan.
        #[arg(long)]
        rollback: bool,
    },
    /// Print the progress on every change until the rollout ends.
    Watch {
        /// The patch id (the rollout's name).
        patch: String,
    },
}

pub fn policy_json(p: Option<&pb::RolloutPolicy>) -> Value {
    let p = p.cloned().unwrap_or_default();
    json!({
        "waves": p.waves, "bake_secs": p.bake_secs, "max_applying": p.max_applying,
        "failure_threshold": p.failure_threshold, "spread_label": p.spread_label,
        "download_ahead": p.download_ahead,
    })
}

fn rollout_json(r: &pb::RolloutInfo) -> Value {
    json!({
        "patch_id": r.patch_id, "state": r.state, "reason": r.reason,
        "emergency": r.emergency, "force": r.force, "rollback": r.rollback,
        "component": r.component, "version": r.version, "severity": r.severity,
        "policy": policy_json(r.policy.as_ref()),
        "started_at_ms": r.started_at_ms, "updated_at_ms": r.updated_at_ms,
        "failures": r.failures,
        "groups": r.groups.iter().map(|g| json!({
            "group": g.group, "wave": g.wave, "waves": g.waves, "targeted": g.targeted,
            "released": g.released, "committed": g.committed, "failed": g.failed,
            "applying": g.applying, "waiting_for": g.waiting_for, "bake_until_ms": g.bake_until_ms,
            "in_service": g.in_service, "min_in_service": g.min_in_service,
            "lowest_in_service": g.lowest_in_service,
            "waves_progress": g.waves_progress.iter().map(|w| json!({
                "index": w.index, "size": w.size,
                "started_at_ms": w.started_at_ms, "done_at_ms": w.done_at_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// What a group's rollout waits for, in words.
pub(crate) fn waiting_text(g: &pb::RolloutGroup) -> String {
    let at = |ms: i64| super::output::time(ms / 1000);
    match g.waiting_for.as_str() {
        "" => String::new(),
        "wave" => "waiting for its released nodes to finish".into(),
        "bake" => format!("baking until {}", at(g.bake_until_ms)),
        "window" if g.window_opens_at_ms > 0 => format!(
            "waiting for the maintenance window (opens {})",
            at(g.window_opens_at_ms)
        ),
        "window" => "waiting for the maintenance window".into(),
        "capacity" => "waiting for capacity (the capacity guard or --max-applying)".into(),
        "busy" => "waiting for nodes busy with another patch".into(),
        "offline" => "waiting for offline nodes to come back".into(),
        "paused" | "aborted" | "done" => g.waiting_for.clone(),
        other => format!("waiting for {other}"),
    }
}

fn group_line(g: &pb::RolloutGroup) -> String {
    let wait = match waiting_text(g) {
        t if t.is_empty() => t,
        t => format!(", {t}"),
    };
    let waves: Vec<String> = g
        .waves_progress
        .iter()
        .map(|w| {
            let mark = if w.done_at_ms > 0 {
                "done"
            } else if w.started_at_ms > 0 {
                "started"
            } else {
                "pending"
            };
            format!("{}:{}({mark})", w.index + 1, w.size)
        })
        .collect();
    format!(
        "  {}: wave {}/{} [{}], {}/{} released, {} committed, {} failed, {} applying, in service {} (floor {}){}",
        g.group,
        g.wave + 1,
        g.waves,
        waves.join(" "),
        g.released,
        g.targeted,
        g.committed,
        g.failed,
        g.applying,
        g.in_service,
        g.min_in_service,
        wait
    )
}

fn human(r: &pb::RolloutInfo) -> String {
    let mut s = format!(
        "rollout {} ({} {}, {}){}: {}{}",
        r.patch_id,
        r.component,
        r.version,
        r.severity,
        if r.emergency {
            if r.force {
                " EMERGENCY, FORCED"
            } else {
                " EMERGENCY"
            }
        } else {
            ""
        },
        r.state,
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        }
    );
    for g in &r.groups {
        s.push('\n');
        s.push_str(&group_line(g));
    }
    s
}

pub async fn rollout(target: &Target, out: Output, cmd: RolloutCmd) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let shown = match &cmd {
        RolloutCmd::Show { patch } => Some(patch.clone()),
        _ => None,
    };
    let info = match cmd {
        RolloutCmd::List => {
            let r = c
                .list_rollouts(pb::ListRolloutsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let rows = r
                .rollouts
                .iter()
                .map(|r| {
                    let (released, targeted, committed, failed) =
                        r.groups.iter().fold((0, 0, 0, 0), |a, g| {
                            (
                                a.0 + g.released,
                                a.1 + g.targeted,
                                a.2 + g.committed,
                                a.3 + g.failed,
                            )
                        });
                    vec![
                        r.patch_id.clone(),
                        format!("{} {}", r.component, r.version),
                        r.state.clone(),
                        if r.emergency {
                            "yes".into()
                        } else {
                            "-".into()
                        },
                        format!("{released}/{targeted}"),
                        committed.to_string(),
                        failed.to_string(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            out.table(
                &[
                    "PATCH",
                    "VERSION",
                    "STATE",
                    "EMERGENCY",
                    "RELEASED",
                    "COMMITTED",
                    "FAILED",
                    "REASON",
                ],
                rows,
                Value::Array(r.rollouts.iter().map(rollout_json).collect()),
            );
            return Ok(());
        }
        RolloutCmd::Show { patch } => {
            c.get_rollout(pb::GetRolloutRequest { patch_id: patch })
                .await
        }
        RolloutCmd::Pause { patch } => {
            c.pause_rollout(pb::RolloutActionRequest { patch_id: patch })
                .await
        }
        RolloutCmd::Resume { patch } => {
            c.resume_rollout(pb::RolloutActionRequest { patch_id: patch })
                .await
        }
        RolloutCmd::Abort { patch, rollback } => {
            c.abort_rollout(pb::AbortRolloutRequest {
                patch_id: patch,
                rollback,
            })
            .await
        }
        RolloutCmd::Watch { patch } => {
            let mut stream = c
                .watch_rollout(pb::GetRolloutRequest { patch_id: patch })
                .await
                .map_err(status_error)?
                .into_inner();
            use std::io::Write;
            while let Some(r) = stream.message().await.map_err(status_error)? {
                if out.json {
                    flotilla_proto::outln!("{}", rollout_json(&r));
                } else {
                    flotilla_proto::outln!("{}\n", human(&r));
                }
                std::io::stdout().flush()?;
            }
            return Ok(());
        }
    }
    .map_err(status_error)?
    .into_inner();
    let mut text = human(&info);
    if let Some(patch) = shown
        && !out.json
    {
        // Where the nodes' bytes came from (per node: `patch status --nodes`).
        let status = c
            .patch_status(pb::PatchStatusRequest { id: patch })
            .await
            .map_err(status_error)?
            .into_inner();
        if let Some(line) = super::patch_status::downloads_line(&status) {
            text.push('\n');
            text.push_str(&line);
        }
    }
    out.object(&text, rollout_json(&info));
    Ok(())
}

/// `flotilla group config NAME ...`: windows, rollout defaults, SLA.
#[derive(Args, Debug)]
pub struct GroupConfigArgs {
    /// The group (it must exist).
    pub name: String,
    /// IANA time zone of the windows ("Europe/Berlin").
    #[arg(long)]
    pub timezone: Option<String>,
    /// A maintenance window, repeatable, replacing the current ones ("mon-fri 22:00-04:00").
    #[arg(long = "window")]
    pub windows: Vec<String>,
    /// Remove every window: rollouts may start nodes at any time.
    #[arg(long, conflicts_with = "windows")]
    pub clear_windows: bool,
    /// SLA days per severity ("critical=30,high=90").
    #[arg(long)]
    pub sla: Option<String>,
    /// The node label whose value is a node's site [default: site].
    #[arg(long)]
    pub site_label: Option<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn group_config(target: &Target, out: Output, a: GroupConfigArgs) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let unchanged = a.timezone.is_none()
        && a.windows.is_empty()
        && !a.clear_windows
        && a.sla.is_none()
        && a.site_label.is_none()
        && a.policy.to_pb().is_none();
    let g = if unchanged {
        c.get_group_config(pb::GetGroupConfigRequest { name: a.name })
            .await
    } else {
        c.configure_group(pb::ConfigureGroupRequest {
            name: a.name,
            timezone: a.timezone,
            windows: a.windows,
            clear_windows: a.clear_windows,
            rollout: a.policy.to_pb(),
            sla: a.sla,
            site_label: a.site_label,
        })
        .await
    }
    .map_err(status_error)?
    .into_inner();
    let p = g.rollout.clone().unwrap_or_default();
    let human = format!(
        "group {}\n  time zone: {}\n  windows: {} (now {})\n  rollout: waves {}, bake {}s, max applying {}, failure threshold {}, spread {}, download ahead {}\n  sla days: {}\n  site label: {}",
        g.name,
        g.timezone,
        if g.windows.is_empty() {
            "any time".to_string()
        } else {
            g.windows.join("; ")
        },
        if g.window_open { "open" } else { "closed" },
        if p.waves.is_empty() {
            "100%".to_string()
        } else {
            p.waves.join(",")
        },
        p.bake_secs.unwrap_or(0),
        p.max_applying.map_or("-".to_string(), |m| m.to_string()),
        p.failure_threshold.as_deref().unwrap_or("1"),
        p.spread_label.as_deref().unwrap_or("-"),
        match p.download_ahead {
            Some(true) => "on",
            Some(false) => "off",
            None if g.windows.is_empty() => "off (no windows)",
            None => "on (windows)",
        },
        g.sla,
        g.site_label
    );
    out.object(
        &human,
        json!({
            "name": g.name, "timezone": g.timezone, "windows": g.windows,
            "window_open": g.window_open, "sla": g.sla, "rollout": policy_json(g.rollout.as_ref()),
            "site_label": g.site_label,
        }),
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum ReportCmd {
    /// Per node: installed versions, missing patches against the group's SLA.
    Compliance {
        /// Only this group's nodes.
        #[arg(long)]
        group: Option<String>,
        /// Tables for people, JSON or CSV for tools.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write a signed, dated evidence file instead (the JSON report with
        /// when, from which server, by whom, and the audit log's checked
        /// head), signed with this minisign secret key into
        /// FILE.<key-id>.minisig beside it. Needs --out.
        #[arg(long, value_name = "KEY", requires = "out")]
        sign: Option<std::path::PathBuf>,
        /// The evidence file to write (with --sign).
        #[arg(long, value_name = "FILE", requires = "sign")]
        out: Option<std::path::PathBuf>,
        /// The signing key's password, from this file (else asked for).
        #[arg(long, value_name = "FILE", requires = "sign")]
        password_file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub async fn report(target: &Target, out: Output, cmd: ReportCmd) -> anyhow::Result<()> {
    let ReportCmd::Compliance {
        group,
        format,
        sign,
        out: evidence,
        password_file,
    } = cmd;
    let (mut c, cred) = target.admin().await?;
    let r = c
        .compliance_report(pb::ComplianceReportRequest {
            group: group.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let report: crate::compliance::Report = serde_json::from_str(&r.report_json)?;
    if let (Some(key), Some(path)) = (sign, evidence) {
        anyhow::ensure!(
            format != Format::Csv,
            "an evidence file is JSON: leave out --format csv"
        );
        let who = c
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        let audit = c
            .verify_audit(pb::VerifyAuditRequest::default())
            .await
            .map_err(status_error)?
            .into_inner();
        let audit = super::audit::verdict(audit);
        let server = target.server.clone().or(cred.server).unwrap_or_default();
        let doc = crate::compliance::evidence::document(
            &report,
            &server,
            &who.name,
            group.as_deref(),
            &audit,
        );
        crate::ca::write_atomic(&path, doc.as_bytes(), false)?;
        return super::patch::sign_file(&path, &key, password_file.as_deref(), out, |_| Ok(()));
    }
    // --json is the same as --format json.
    let format = if out.json { Format::Json } else { format };
    match format {
        Format::Table => {
            flotilla_proto::exit::print(format_args!("{}", crate::compliance::to_table(&report)))
        }
        Format::Json => flotilla_proto::outln!("{}", crate::compliance::to_json(&report)),
        Format::Csv => {
            flotilla_proto::exit::print(format_args!("{}", crate::compliance::to_csv(&report)))
        }
    }
    Ok(())
}
