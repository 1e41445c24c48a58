//! The report against hand-built fleets.
use super::*;

const DAY: i64 = MS_PER_DAY;
const HOUR: i64 = 3_600_000;
/// An arbitrary "now".
const NOW: i64 = 1_750_000_000_000;

fn node(id: &str, group: &str, joined_at_ms: i64, installed: &[(&str, &str)]) -> NodeInput {
    NodeInput {
        id: id.into(),
        group: group.into(),
        joined_at_ms,
        trust_version: 0,
        installed: installed
            .iter()
            .map(|(c, v)| (c.to_string(), v.to_string()))
            .collect(),
    }
}

fn patch(
    id: &str,
    component: &str,
    version: &str,
    severity: Severity,
    issued_at_ms: i64,
    targeted: &[&str],
    committed: &[(&str, i64)],
) -> PatchInput {
    PatchInput {
        id: id.into(),
        component: component.into(),
        version: version.into(),
        severity,
        issued_at_ms,
        expired: false,
        targeted: targeted.iter().map(|s| s.to_string()).collect(),
        committed_at_ms: committed.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
    }
}

fn default_sla(_: &str) -> Sla {
    Sla::default()
}

/// a: overdue on a critical patch; b: missing a high one within SLA;
/// c: compliant (committed); d: compliant (already has a newer version).
fn fleet() -> (Vec<NodeInput>, Vec<PatchInput>) {
    let nodes = vec![
        node("d", "pos", 0, &[("openssl", "3.0.9")]),
        node("c", "pos", 0, &[("openssl", "3.0.2")]),
        node("b", "pos", 0, &[("openssl", "3.0.1")]),
        node("a", "pos", 0, &[("openssl", "3.0.1"), ("pos-app", "1.2.0")]),
    ];
    let patches = vec![
        patch(
            "ssl-302",
            "openssl",
            "3.0.2",
            Severity::Critical,
            NOW - 41 * DAY - 3 * HOUR,
            &["a", "c", "d"],
            &[("c", NOW - 40 * DAY)],
        ),
        patch(
            "app-130",
            "pos-app",
            "1.3.0",
            Severity::High,
            NOW - 10 * DAY,
            &["a", "b"],
            &[],
        ),
    ];
    (nodes, patches)
}

#[test]
fn overdue_nodes_come_first_with_exact_durations() {
    let (nodes, patches) = fleet();
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let order: Vec<&str> = r.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "d"]);

    let a = &r.nodes[0];
    assert!(a.overdue);
    assert_eq!(a.missing.len(), 2);
    let ssl = &a.missing[0];
    assert_eq!(ssl.patch_id, "ssl-302");
    assert_eq!(ssl.outstanding_since_ms, NOW - 41 * DAY - 3 * HOUR);
    assert_eq!(ssl.outstanding_secs, (41 * 86_400) + 3 * 3600);
    assert_eq!(ssl.sla_days, 30);
    assert!(ssl.overdue);
    assert_eq!(ssl.overdue_by_secs, 11 * 86_400 + 3 * 3600);
    let app = &a.missing[1];
    assert_eq!((app.patch_id.as_str(), app.overdue), ("app-130", false));
    assert_eq!((app.outstanding_secs, app.sla_days), (10 * 86_400, 90));
    assert_eq!(app.overdue_by_secs, 0);

    assert!(!r.nodes[1].overdue);
    assert_eq!(r.nodes[1].missing.len(), 1);
    assert!(r.nodes[2].missing.is_empty() && r.nodes[3].missing.is_empty());

    let table = to_table(&r);
    assert!(table.contains("41d 3h / 30d OVERDUE"), "{table}");
    assert!(table.contains("10d 0h / 90d"), "{table}");
}

#[test]
fn most_overdue_node_first_and_group_slas_apply() {
    let nodes = vec![
        node("x", "strict", 0, &[]),
        node("y", "lax", 0, &[]),
        node("z", "lax", 0, &[]),
    ];
    let patches = vec![patch(
        "p",
        "openssl",
        "3.0.2",
        Severity::Critical,
        NOW - 20 * DAY,
        &["x", "y", "z"],
        &[],
    )];
    let sla = |group: &str| match group {
        "strict" => Sla::parse("critical=7").expect("valid"),
        _ => Sla::parse("critical=14").expect("valid"),
    };
    let r = compute(&nodes, &patches, &sla, NOW, 0);
    let order: Vec<(&str, i64)> = r
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.missing[0].overdue_by_secs))
        .collect();
    assert_eq!(
        order,
        [("x", 13 * 86_400), ("y", 6 * 86_400), ("z", 6 * 86_400)]
    );
}

#[test]
fn superseded_or_targeted_elsewhere_is_not_missing() {
    let nodes = vec![node("n", "g", 0, &[("openssl", "3.1.0"), ("odd", "weird")])];
    let patches = vec![
        // Superseded by the installed 3.1.0.
        patch(
            "old",
            "openssl",
            "3.0.2",
            Severity::Critical,
            0,
            &["n"],
            &[],
        ),
        // Same version installed.
        patch(
            "same",
            "openssl",
            "3.1.0",
            Severity::Critical,
            0,
            &["n"],
            &[],
        ),
        // Not targeted at n.
        patch(
            "other",
            "openssl",
            "9.0.0",
            Severity::Critical,
            0,
            &["m"],
            &[],
        ),
        // Unparsable installed version: not newer, so missing.
        patch("odd-2", "odd", "2.0.0", Severity::Low, 0, &["n"], &[]),
        // Not installed at all: missing.
        patch(
            "new-comp",
            "agent",
            "1.0.0",
            Severity::Medium,
            0,
            &["n"],
            &[],
        ),
    ];
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let mut ids: Vec<&str> = r.nodes[0]
        .missing
        .iter()
        .map(|m| m.patch_id.as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["new-comp", "odd-2"]);
}

#[test]
fn outstanding_counts_from_the_release_even_for_a_later_node() {
    let nodes = vec![
        node("old", "g", NOW - 100 * DAY, &[]),
        node("new", "g", NOW - 5 * DAY, &[]),
    ];
    let patches = vec![patch(
        "p",
        "openssl",
        "3.0.2",
        Severity::Critical,
        NOW - 40 * DAY,
        &["old", "new"],
        &[],
    )];
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let new = r.nodes.iter().find(|n| n.id == "new").expect("node");
    assert_eq!(new.missing[0].outstanding_since_ms, NOW - 40 * DAY);
    assert_eq!(new.missing[0].outstanding_secs, 40 * 86_400);
    assert!(new.overdue);
    let old = r.nodes.iter().find(|n| n.id == "old").expect("node");
    assert_eq!(old.missing[0].outstanding_secs, 40 * 86_400);
    assert!(old.overdue);
    // Equally overdue: ties go by id.
    assert_eq!(r.nodes[0].id, "new");
}

#[test]
fn time_to_remediate_median_and_p95() {
    // Ten nodes committing a critical patch after 1..=10 hours; one of them
    // joined after publication, so its clock starts at its join.
    let ids: Vec<String> = (1..=10).map(|i| format!("n{i:02}")).collect();
    let mut nodes: Vec<NodeInput> = ids.iter().map(|id| node(id, "g", 0, &[])).collect();
    let published = NOW - 30 * DAY;
    nodes[9].joined_at_ms = published + 50 * HOUR;
    let committed: Vec<(&str, i64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let start = if i == 9 {
                published + 50 * HOUR
            } else {
                published
            };
            (id.as_str(), start + (i as i64 + 1) * HOUR)
        })
        .collect();
    let targeted: Vec<&str> = ids.iter().map(String::as_str).collect();
    let patches = vec![
        patch(
            "crit",
            "openssl",
            "3.0.2",
            Severity::Critical,
            published,
            &targeted,
            &committed,
        ),
        // A low patch nobody has committed, and one node is overdue on.
        patch(
            "low",
            "zlib",
            "1.3.1",
            Severity::Low,
            NOW - 400 * DAY,
            &["n01"],
            &[],
        ),
        // Committed before publication (clock skew): counts as zero.
        patch(
            "med",
            "curl",
            "8.0.0",
            Severity::Medium,
            published,
            &["n01"],
            &[("n01", published - HOUR)],
        ),
    ];
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let sev: Vec<Severity> = r.remediation.iter().map(|s| s.severity).collect();
    assert_eq!(sev, [Severity::Critical, Severity::Medium, Severity::Low]);

    let crit = &r.remediation[0];
    assert_eq!(crit.remediated, 10);
    // Nearest rank: 50% of 10 is the 5th value, 95% the 10th.
    assert_eq!(crit.median_secs, Some(5 * 3600));
    assert_eq!(crit.p95_secs, Some(10 * 3600));
    assert_eq!((crit.outstanding, crit.overdue), (0, 0));

    let med = &r.remediation[1];
    assert_eq!((med.remediated, med.median_secs), (1, Some(0)));

    let low = &r.remediation[2];
    assert_eq!(
        (low.remediated, low.median_secs, low.p95_secs),
        (0, None, None)
    );
    assert_eq!((low.outstanding, low.overdue), (1, 1));

    assert_eq!(nearest_rank(&[1, 2, 3], 50), Some(2));
    assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), Some(2));
    assert_eq!(nearest_rank(&(1..=20).collect::<Vec<_>>(), 95), Some(19));
    assert_eq!(nearest_rank(&[7], 95), Some(7));
    assert_eq!(nearest_rank(&[], 50), None);
}

#[test]
fn csv_parses_back_with_one_row_per_missing_patch() {
    let (nodes, patches) = fleet();
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let text = to_csv(&r);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(
        header.join(","),
        "node,group,status,patch,component,version,severity,outstanding_secs,sla_days,overdue,installed,trust_version"
    );
    let rows: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().expect("rows");
    // a: 2 missing, b: 1, c and d: one compliant row each.
    assert_eq!(rows.len(), 5);
    assert_eq!(&rows[0][0], "a");
    assert_eq!(&rows[0][2], "overdue");
    assert_eq!(&rows[0][3], "ssl-302");
    assert_eq!(&rows[0][7], (41 * 86_400 + 3 * 3600).to_string());
    assert_eq!(&rows[0][9], "true");
    assert_eq!(&rows[0][10], "openssl=3.0.1;pos-app=1.2.0");
    assert_eq!(&rows[0][11], "0");
    assert_eq!(&rows[1][2], "missing");
    assert_eq!(&rows[3][2], "compliant");
    assert_eq!(&rows[3][3], "");
    assert_eq!(&rows[3][10], "openssl=3.0.2");
}

#[test]
fn json_round_trips() {
    let (nodes, patches) = fleet();
    let r = compute(&nodes, &patches, &default_sla, NOW, 0);
    let json = to_json(&r);
    assert!(json.contains("\"severity\": \"critical\""), "{json}");
    let back: Report = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, r);
}

#[test]
fn sla_parse() {
    assert_eq!(Sla::parse("").expect("empty"), Sla::default());
    let sla = Sla::parse("critical=15, High=60").expect("valid");
    assert_eq!(
        sla,
        Sla {
            critical_days: 15,
            high_days: 60,
            ..Sla::default()
        }
    );
    assert_eq!(sla.days(Severity::Medium), 180);
    assert!(Sla::parse("urgent=3").is_err());
    assert!(Sla::parse("critical").is_err());
    assert!(Sla::parse("critical=soon").is_err());
    assert!(Sla::parse("critical=0").is_err());
    assert!(Sla::parse("critical=-1").is_err());
    assert!(Sla::parse("low=1,low=2").is_err());
}

#[test]
fn durations_read_well() {
    assert_eq!(duration(41 * 86_400 + 3 * 3600 + 59), "41d 3h");
    assert_eq!(duration(5 * 3600 + 12 * 60), "5h 12m");
    assert_eq!(duration(7 * 60 + 5), "7m 5s");
    assert_eq!(duration(15), "15s");
    assert_eq!(duration(-5), "0s");
}

#[test]
fn hosts_on_an_older_trust_policy_are_flagged() {
    let mut nodes = vec![
        node("c", "g", 0, &[]),
        node("a", "g", 0, &[]),
        node("b", "g", 0, &[]),
    ];
    nodes[0].trust_version = 1;
    nodes[1].trust_version = 3;
    // b has not said which it holds (0): flagged too.
    let r = compute(&nodes, &[], &default_sla, NOW, 3);
    assert_eq!(r.trust_version, 3);
    assert_eq!(r.old_trust, vec!["b".to_string(), "c".to_string()]);
    let table = to_table(&r);
    assert!(
        table.contains("2 node(s) hold an older trust policy than v3") && table.contains("b, c"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&to_json(&r)).unwrap();
    assert_eq!(json["old_trust"], serde_json::json!(["b", "c"]));
    // No policy, or everyone on it: nothing flagged.
    assert!(
        compute(&nodes, &[], &default_sla, NOW, 0)
            .old_trust
            .is_empty()
    );
    assert!(to_table(&compute(&nodes, &[], &default_sla, NOW, 0)).contains("Compliance at"));
}

#[test]
fn a_patch_that_expired_before_a_node_took_it_shows_as_missed() {
    let nodes = vec![node("away", "g", 0, &[]), node("here", "g", 0, &[])];
    let mut p = patch(
        "old-1",
        "app",
        "1.0.0",
        Severity::High,
        NOW - 40 * DAY,
        &["away", "here"],
        &[("here", NOW - 39 * DAY)],
    );
    p.expired = true;
    let r = compute(&nodes, &[p], &default_sla, NOW, 0);
    let away = r.nodes.iter().find(|n| n.id == "away").unwrap();
    assert_eq!(away.missing.len(), 1);
    assert!(away.missing[0].expired);
    assert!(
        r.nodes
            .iter()
            .find(|n| n.id == "here")
            .unwrap()
            .missing
            .is_empty()
    );
    assert!(to_table(&r).contains("missed: expired"), "{}", to_table(&r));
    assert!(to_csv(&r).contains("away,g,missed,old-1"), "{}", to_csv(&r));
}
