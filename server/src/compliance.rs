//! The compliance report: per node, the published patches it lacks and how long
//! each has been outstanding against its group's SLA; fleet-wide time to
//! remediate per severity. Pure computation over inputs the caller gathers from
//! the server state, plus the table, JSON and CSV renderers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use flotilla_proto::manifest::Severity;
use serde::{Deserialize, Serialize};

const MS_PER_DAY: i64 = 86_400_000;
/// Highest severity first, as every listing shows them.
const SEVERITIES: [Severity; 4] = [
    Severity::Critical,
    Severity::High,
    Severity::Medium,
    Severity::Low,
];

/// One node, as the report sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeInput {
    pub id: String,
    pub group: String,
    pub joined_at_ms: i64,
    /// The trust policy version the node's agent holds (0: not reported).
    pub trust_version: u64,
    /// component -> installed version
    pub installed: BTreeMap<String, String>,
}

/// One published patch and who has committed it.
#[derive(Debug, Clone)]
pub struct PatchInput {
    pub id: String,
    pub component: String,
    pub version: String,
    pub severity: Severity,
    /// When the fix was issued (the signed `issued_at`): outstanding time
    /// counts from it; time to remediate from it or the node's join, if later.
    pub issued_at_ms: i64,
    /// It expired: a node that lacks it can no longer take it (a new patch
    /// must be published).
    pub expired: bool,
    /// ids of the nodes this patch targets
    pub targeted: BTreeSet<String>,
    /// node id -> when the node committed this patch (ms)
    pub committed_at_ms: BTreeMap<String, i64>,
}

/// SLA in days per severity for one group; `Sla::default()` = critical 30, high 90, medium 180, low 365.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sla {
    pub critical_days: u32,
    pub high_days: u32,
    pub medium_days: u32,
    pub low_days: u32,
}

impl Default for Sla {
    /// Critical within 30 days is what PCI DSS asks; the rest are common practice.
    fn default() -> Self {
        Sla {
            critical_days: 30,
            high_days: 90,
            medium_days: 180,
            low_days: 365,
        }
    }
}

impl Sla {
    pub fn days(&self, s: Severity) -> u32 {
        match s {
            Severity::Critical => self.critical_days,
            Severity::High => self.high_days,
            Severity::Medium => self.medium_days,
            Severity::Low => self.low_days,
        }
    }

    /// parse "critical=30,high=90" (unnamed severities keep their default)
    pub fn parse(spec: &str) -> Result<Sla, String> {
        let mut sla = Sla::default();
        let mut seen = BTreeSet::new();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, days) = item
                .split_once('=')
                .ok_or_else(|| format!("SLA entry {item:?}: expected SEVERITY=DAYS"))?;
            let (name, days) = (name.trim().to_ascii_lowercase(), days.trim());
            let severity = SEVERITIES
                .into_iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| {
                    format!(
                        "SLA entry {item:?}: unknown severity {name:?} (critical, high, medium, low)"
                    )
                })?;
            if !seen.insert(severity) {
                return Err(format!("SLA entry {item:?}: {name} is given twice"));
            }
            let days: u32 = days
                .parse()
                .map_err(|_| format!("SLA entry {item:?}: {days:?} is not a number of days"))?;
            // Zero would make every patch overdue the moment it is published.
            if days == 0 {
                return Err(format!("SLA entry {item:?}: days must be at least 1"));
            }
            match severity {
                Severity::Critical => sla.critical_days = days,
                Severity::High => sla.high_days = days,
                Severity::Medium => sla.medium_days = days,
                Severity::Low => sla.low_days = days,
            }
        }
        Ok(sla)
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub generated_at_ms: i64,
    /// Overdue nodes first (most overdue first), then nodes missing patches,
    /// then compliant nodes; ties by id.
    pub nodes: Vec<NodeCompliance>,
    /// One entry per severity that has any patch, most severe first.
    pub remediation: Vec<SeverityStats>,
    /// The fleet's trust policy version (0: none set).
    #[serde(default)]
    pub trust_version: u64,
    /// Nodes whose agents hold an older trust policy (or have not said which
    /// they hold): they refuse patches signed only by newer keys.
    #[serde(default)]
    pub old_trust: Vec<String>,
}

/// Where one node stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeCompliance {
    pub id: String,
    pub group: String,
    pub installed: BTreeMap<String, String>,
    /// Most overdue first, then most severe, then longest outstanding.
    pub missing: Vec<MissingPatch>,
    /// True when any missing patch is past its SLA.
    pub overdue: bool,
    /// The trust policy version its agent holds (0: not reported).
    #[serde(default)]
    pub trust_version: u64,
}

/// A patch a node lacks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MissingPatch {
    pub patch_id: String,
    pub component: String,
    pub version: String,
    pub severity: Severity,
    /// When the patch was issued.
    pub outstanding_since_ms: i64,
    pub outstanding_secs: i64,
    pub sla_days: u32,
    pub overdue: bool,
    /// How far past the SLA; 0 when not overdue.
    pub overdue_by_secs: i64,
    /// The patch expired before the node took it.
    #[serde(default)]
    pub expired: bool,
}

/// Time to remediate and the backlog for one severity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeverityStats {
    pub severity: Severity,
    /// Committed (patch, node) pairs.
    pub remediated: u64,
    /// Nearest-rank median of the time to remediate; None when nothing was.
    pub median_secs: Option<i64>,
    /// Nearest-rank 95th percentile; None when nothing was remediated.
    pub p95_secs: Option<i64>,
    /// (patch, node) pairs still missing.
    pub outstanding: u64,
    /// Of those, the ones past their SLA.
    pub overdue: u64,
}

/// Builds the report. Only the nodes given are counted, in the node list and in
/// the remediation stats alike, so a caller reporting on one group passes only
/// that group's nodes.
pub fn compute(
    nodes: &[NodeInput],
    patches: &[PatchInput],
    sla_of_group: &dyn Fn(&str) -> Sla,
    now_ms: i64,
    trust_version: u64,
) -> Report {
    let mut slas: BTreeMap<&str, Sla> = BTreeMap::new();
    let mut out: Vec<NodeCompliance> = nodes
        .iter()
        .map(|node| {
            let sla = slas
                .entry(node.group.as_str())
                .or_insert_with(|| sla_of_group(&node.group));
            let mut missing: Vec<MissingPatch> = patches
                .iter()
                .filter(|p| lacks(node, p))
                .map(|p| missing_patch(p, sla, now_ms))
                .collect();
            missing.sort_by(|a, b| {
                b.overdue_by_secs
                    .cmp(&a.overdue_by_secs)
                    .then(b.severity.cmp(&a.severity))
                    .then(b.outstanding_secs.cmp(&a.outstanding_secs))
                    .then(a.patch_id.cmp(&b.patch_id))
            });
            NodeCompliance {
                id: node.id.clone(),
                group: node.group.clone(),
                installed: node.installed.clone(),
                overdue: missing.iter().any(|m| m.overdue),
                missing,
                trust_version: node.trust_version,
            }
        })
        .collect();
    out.sort_by_cached_key(|n| {
        let worst = n
            .missing
            .iter()
            .map(|m| m.overdue_by_secs)
            .max()
            .unwrap_or(0);
        let rank = if n.overdue {
            0
        } else if !n.missing.is_empty() {
            1
        } else {
            2
        };
        (rank, Reverse(worst), n.id.clone())
    });

    let joined: BTreeMap<&str, i64> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.joined_at_ms))
        .collect();
    let remediation = SEVERITIES
        .into_iter()
        .filter(|&s| patches.iter().any(|p| p.severity == s))
        .map(|severity| {
            let mut times: Vec<i64> = patches
                .iter()
                .filter(|p| p.severity == severity)
                .flat_map(|p| {
                    p.committed_at_ms.iter().filter_map(|(node, &at)| {
                        let since = p.issued_at_ms.max(*joined.get(node.as_str())?);
                        Some(at.saturating_sub(since).max(0) / 1000)
                    })
                })
                .collect();
            times.sort_unstable();
            let missing = out
                .iter()
                .flat_map(|n| &n.missing)
                .filter(|m| m.severity == severity);
            SeverityStats {
                severity,
                remediated: times.len() as u64,
                median_secs: nearest_rank(&times, 50),
                p95_secs: nearest_rank(&times, 95),
                outstanding: missing.clone().count() as u64,
                overdue: missing.filter(|m| m.overdue).count() as u64,
            }
        })
        .collect();

    let mut old_trust: Vec<String> = nodes
        .iter()
        .filter(|n| n.trust_version < trust_version)
        .map(|n| n.id.clone())
        .collect();
    old_trust.sort();
    Report {
        generated_at_ms: now_ms,
        nodes: out,
        remediation,
        trust_version,
        old_trust,
    }
}

/// Targeted, not committed, and not already at or past the patch's version
/// (a later patch of the same component supersedes it).
fn lacks(node: &NodeInput, patch: &PatchInput) -> bool {
    if !patch.targeted.contains(&node.id) || patch.committed_at_ms.contains_key(&node.id) {
        return false;
    }
    let Some(installed) = node.installed.get(&patch.component) else {
        return true;
    };
    // The same text is the same version even when it is not semver.
    if *installed == patch.version {
        return false;
    }
    match (
        semver::Version::parse(installed),
        semver::Version::parse(&patch.version),
    ) {
        (Ok(have), Ok(want)) => have < want,
        _ => true,
    }
}

fn missing_patch(patch: &PatchInput, sla: &Sla, now_ms: i64) -> MissingPatch {
    // Exposure counts from the fix's release even on a node that joined later:
    // a new host built from an old image is out of compliance at once.
    let since = patch.issued_at_ms;
    let outstanding_ms = now_ms.saturating_sub(since).max(0);
    let sla_days = sla.days(patch.severity);
    let sla_ms = i64::from(sla_days) * MS_PER_DAY;
    let overdue = outstanding_ms > sla_ms;
    MissingPatch {
        patch_id: patch.id.clone(),
        component: patch.component.clone(),
        version: patch.version.clone(),
        severity: patch.severity,
        outstanding_since_ms: since,
        outstanding_secs: outstanding_ms / 1000,
        sla_days,
        overdue,
        overdue_by_secs: if overdue {
            (outstanding_ms - sla_ms) / 1000
        } else {
            0
        },
        expired: patch.expired,
    }
}

/// The nearest-rank percentile of sorted values: the smallest value with at
/// least `pct`% of the values at or below it.
fn nearest_rank(sorted: &[i64], pct: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// "41d 3h", "5h 12m", "7m 5s", "15s".
pub fn duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn installed_list(installed: &BTreeMap<String, String>, sep: &str) -> String {
    installed
        .iter()
        .map(|(c, v)| format!("{c}={v}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// Two tables for people: the nodes (one line per missing patch), then time to
/// remediate per severity.
pub fn to_table(r: &Report) -> String {
    let mut nodes = Table::new();
    nodes.load_preset(UTF8_BORDERS_ONLY);
    nodes.set_header(vec![
        "NODE",
        "GROUP",
        "INSTALLED",
        "MISSING",
        "OUTSTANDING/SLA",
    ]);
    for n in &r.nodes {
        let (missing, outstanding) = if n.missing.is_empty() {
            ("-".to_string(), "compliant".to_string())
        } else {
            let missing: Vec<String> = n
                .missing
                .iter()
                .map(|m| {
                    format!(
                        "{} ({} {} {}){}",
                        m.patch_id,
                        m.severity.as_str(),
                        m.component,
                        m.version,
                        if m.expired { ", missed: expired" } else { "" }
                    )
                })
                .collect();
            let outstanding: Vec<String> = n
                .missing
                .iter()
                .map(|m| {
                    let flag = if m.overdue { " OVERDUE" } else { "" };
                    format!("{} / {}d{flag}", duration(m.outstanding_secs), m.sla_days)
                })
                .collect();
            (missing.join("\n"), outstanding.join("\n"))
        };
        let installed = if n.installed.is_empty() {
            "-".to_string()
        } else {
            installed_list(&n.installed, "\n")
        };
        nodes.add_row(vec![
            n.id.clone(),
            n.group.clone(),
            installed,
            missing,
            outstanding,
        ]);
    }

    let mut stats = Table::new();
    stats.load_preset(UTF8_BORDERS_ONLY);
    stats.set_header(vec![
        "SEVERITY",
        "REMEDIATED",
        "MEDIAN",
        "P95",
        "OUTSTANDING",
        "OVERDUE",
    ]);
    let or_dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), duration);
    for s in &r.remediation {
        stats.add_row(vec![
            s.severity.as_str().to_string(),
            s.remediated.to_string(),
            or_dash(s.median_secs),
            or_dash(s.p95_secs),
            s.outstanding.to_string(),
            s.overdue.to_string(),
        ]);
    }

    let overdue = r.nodes.iter().filter(|n| n.overdue).count();
    let lacking = r.nodes.iter().filter(|n| !n.missing.is_empty()).count();
    format!(
        "Compliance at {}: {} nodes, {lacking} with missing patches, {overdue} overdue\n{}{nodes}\n\nTime to remediate\n{stats}\n",
        generated_at(r.generated_at_ms),
        r.nodes.len(),
        old_trust_line(r),
    )
}

/// The nodes on an older trust policy than the fleet's, if any.
fn old_trust_line(r: &Report) -> String {
    const SHOWN: usize = 20;
    if r.old_trust.is_empty() {
        return String::new();
    }
    let mut ids = r.old_trust[..r.old_trust.len().min(SHOWN)].join(", ");
    if r.old_trust.len() > SHOWN {
        ids.push_str(&format!(" and {} more", r.old_trust.len() - SHOWN));
    }
    format!(
        "{} node(s) hold an older trust policy than v{} (they refuse patches signed only by newer keys): {ids}\n",
        r.old_trust.len(),
        r.trust_version
    )
}

fn generated_at(ms: i64) -> String {
    jiff::Timestamp::from_second(ms.div_euclid(1000))
        .map_or_else(|_| ms.to_string(), |t| t.to_string())
}

/// Pretty JSON of the whole report.
pub fn to_json(r: &Report) -> String {
    // Plain structs with string-keyed maps: serialising cannot fail.
    serde_json::to_string_pretty(r).expect("report serialises to JSON")
}

/// One row per (node, missing patch); a node missing nothing gets one
/// "compliant" row with the patch columns empty.
pub fn to_csv(r: &Report) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into memory cannot fail, so neither can any record below.
    let mut row = |fields: &[&str]| w.write_record(fields).expect("CSV into memory");
    row(&[
        "node",
        "group",
        "status",
        "patch",
        "component",
        "version",
        "severity",
        "outstanding_secs",
        "sla_days",
        "overdue",
        "installed",
        "trust_version",
    ]);
    for n in &r.nodes {
        let installed = installed_list(&n.installed, ";");
        if n.missing.is_empty() {
            row(&[
                &n.id,
                &n.group,
                "compliant",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                &installed,
                &n.trust_version.to_string(),
            ]);
        }
        for m in &n.missing {
            let status = match (m.expired, m.overdue) {
                (true, _) => "missed",
                (false, true) => "overdue",
                (false, false) => "missing",
            };
            row(&[
                &n.id,
                &n.group,
                status,
                &m.patch_id,
                &m.component,
                &m.version,
                m.severity.as_str(),
                &m.outstanding_secs.to_string(),
                &m.sla_days.to_string(),
                if m.overdue { "true" } else { "false" },
                &installed,
                &n.trust_version.to_string(),
            ]);
        }
    }
    let bytes = w.into_inner().expect("CSV into memory");
    // Every field was a &str, so the output is UTF-8.
    String::from_utf8(bytes).expect("CSV of UTF-8 fields is UTF-8")
}

pub mod evidence;
#[cfg(test)]
mod tests;
