//! What a node may report: only as an accepted node, only about patches it was
//! offered, with bounded text, at a bounded rate; and what a flood of forged
//! reports costs the server (nothing it keeps).

use std::time::{Duration, Instant};

use flotilla_e2e::{enroll, measure, patch};
use flotilla_proto::pb;
use flotilla_proto::token::JoinToken;

const FORGED: usize = 10_000;

fn report(manifest_id: &str, seq: usize, error: &str) -> pb::ReportRequest {
    pb::ReportRequest {
        report_id: format!("r-{seq}"),
        manifest_id: manifest_id.into(),
        phase: pb::PatchPhase::Committed as i32,
        at_unix_ms: 1_000 + seq as i64,
        error: error.into(),
        log_tail: String::new(),
        transfer: None,
    }
}

#[test]
fn nodes_report_only_on_patches_they_were_offered() {
    let dir = tempfile::tempdir().unwrap();
    let key = patch::key(dir.path(), "k");
    let (server, _agents) = patch::signed_fleet(dir.path(), &key, 1);
    // A patch for group "store" only, committed by its real agent.
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"1\n", 0o644)]);
    let spec = patch::files_spec(
        dir.path(),
        "store-only",
        "1.0.0",
        &tar,
        "[targets]\ngroups = [\"store\"]",
    );
    let manifest = patch::build(&server, &spec, &dir.path().join("store-only"));
    patch::sign(&server, &manifest, &key);
    assert!(patch::publish(&server, &manifest).0);
    let outcomes = patch::wait_outcomes(&server, "store-only", 1);
    assert_eq!(outcomes[0].1, "committed", "{outcomes:?}");

    let other = server.token("other", 1, &[]);
    let pending = server.token("other", 1, &["--approval"]);
    let db = server.data_dir.join("db");
    let pid = server.pid().unwrap();
    let forger = enroll::runtime().block_on(async {
        let other: JoinToken = other.parse().unwrap();
        let pending: JoinToken = pending.parse().unwrap();
        let (forger, mut node) = enroll::enroll(&server, "127.0.0.1", &other, None, "forger")
            .await
            .unwrap();
        let (_, mut waiting) = enroll::enroll(&server, "127.0.0.1", &pending, None, "pending")
            .await
            .unwrap();

        // Each refusal names what was wrong.
        let refused = |e: tonic::Status, code: tonic::Code, want: &str| {
            assert_eq!(e.code(), code, "{e}");
            assert!(e.message().contains(want), "{e}");
        };
        let e = node.report(report("store-only", 0, "")).await.unwrap_err();
        refused(
            e,
            tonic::Code::FailedPrecondition,
            &format!("patch store-only was never offered to node {forger}"),
        );
        let e = node.report(report("no-such", 1, "")).await.unwrap_err();
        refused(e, tonic::Code::NotFound, "no patch with id no-such");
        let e = waiting
            .report(report("store-only", 2, ""))
            .await
            .unwrap_err();
        refused(
            e,
            tonic::Code::PermissionDenied,
            "is pending: only accepted nodes report",
        );
        let long = "x".repeat(flotilla_proto::limits::MAX_REPORT_TEXT + 1);
        let e = node
            .report(report("store-only", 3, &long))
            .await
            .unwrap_err();
        refused(e, tonic::Code::InvalidArgument, "limited to");

        // A flood of forged reports with the longest text allowed: refused as
        // forged, then as too fast; nothing of it is kept.
        let (db_before, rss_before) = (measure::dir_bytes(&db), measure::status_kib(pid, "VmRSS:"));
        let text = "y".repeat(flotilla_proto::limits::MAX_REPORT_TEXT);
        let (mut forged, mut too_fast) = (0, 0);
        for i in 0..FORGED {
            let id = if i % 2 == 0 {
                "store-only".to_string()
            } else {
                format!("forged-{i}")
            };
            match node.report(report(&id, 10 + i, &text)).await {
                Ok(r) => panic!("forged report {i} was taken: {r:?}"),
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(e.message().contains("faster than"), "{e}");
                    too_fast += 1;
                }
                Err(e) => {
                    assert!(
                        matches!(
                            e.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::NotFound
                        ),
                        "{e}"
                    );
                    forged += 1;
                }
            }
        }
        assert!(too_fast > 0, "the per-node rate limit never applied");
        assert_eq!(forged + too_fast, FORGED);
        let (db_after, rss_after) = (measure::dir_bytes(&db), measure::status_kib(pid, "VmRSS:"));
        eprintln!(
            "{FORGED} forged reports: {forged} refused as forged, {too_fast} as too fast; \
             db {db_before} -> {db_after} bytes, RSS {rss_before} -> {rss_after} KiB"
        );
        assert!(
            db_after <= db_before + 256 * 1024,
            "db grew from {db_before} to {db_after} bytes"
        );
        assert!(
            rss_after <= rss_before + 32 * 1024,
            "RSS grew from {rss_before} to {rss_after} KiB"
        );
        forger
    });

    // Status, installed versions and compliance know only the real agent.
    let nodes = patch::phases(&server, "store-only");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].1, "committed");
    let shown = server.node(&forger);
    assert_eq!(shown["status"], "accepted", "{shown}");
    assert!(
        shown["installed"].as_object().is_none_or(|m| m.is_empty()),
        "{shown}"
    );
}

/// A report of `phase` (a fresh id, `seq` ms after the others).
fn report_of(manifest_id: &str, seq: usize, phase: pb::PatchPhase) -> pb::ReportRequest {
    pb::ReportRequest {
        phase: phase as i32,
        error: if phase == pb::PatchPhase::Failed {
            "download failed: connection reset".into()
        } else {
            String::new()
        },
        ..report(manifest_id, seq, "")
    }
}

/// A node offered a patch only to download ahead of its release reports no
/// phase past the download; a failure is one event however often it is
/// reported again; and a final phase is never left, but by a host back with
/// a fresh state directory (joined again).
#[test]
fn reports_go_only_as_far_as_the_offer_and_never_out_of_a_final_phase() {
    let dir = tempfile::tempdir().unwrap();
    let key = patch::key(dir.path(), "k");
    // A host joining again gets its node back once it is this old.
    let clone_window = Duration::from_secs(1);
    let (server, _agents) = patch::fleet(
        dir.path(),
        patch::FleetOptions {
            agents: 1,
            server_keys: &[&key],
            pinned: &[&key],
            server_env: &[("FLOTILLA_CLONE_WINDOW", "1s".into())],
            ..Default::default()
        },
    );
    // The window closed: the group's nodes download ahead, install nothing.
    let window = format!("{} 03:00-04:00", flotilla_e2e::another_day());
    server.cli(&["group", "config", "store", "--window", &window]);
    let token = server.token("store", 2, &[]);
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"2\n", 0o644)]);
    let spec = patch::files_spec(
        dir.path(),
        "ahead",
        "2.0.0",
        &tar,
        "[targets]\ngroups = [\"store\"]",
    );
    let manifest = patch::build(&server, &spec, &dir.path().join("ahead"));
    patch::sign(&server, &manifest, &key);
    assert!(patch::publish(&server, &manifest).0);

    let rt = enroll::runtime();
    let token: JoinToken = token.parse().unwrap();
    let enrolled = Instant::now();
    let forger = rt.block_on(async {
        let (forger, mut node) = enroll::enroll(&server, "127.0.0.1", &token, None, "forger")
            .await
            .unwrap();
        let refused = |r: Result<_, tonic::Status>, want: &str| {
            let e = r.expect_err(want);
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            assert!(e.message().contains(want), "{e}");
        };
        // Past the download: refused, the patch was not released to it.
        for (seq, phase) in [
            (1, pb::PatchPhase::Applying),
            (2, pb::PatchPhase::Committed),
            (3, pb::PatchPhase::RolledBack),
        ] {
            refused(
                node.report(report_of("ahead", seq, phase)).await,
                "only to download ahead of its release",
            );
        }
        // As far as the download: taken.
        node.report(report_of("ahead", 4, pb::PatchPhase::Downloaded))
            .await
            .unwrap();
        // A download that failed: taken, once; the same failure reported
        // again (fresh ids, later) changes nothing.
        for seq in 5..25 {
            node.report(report_of("ahead", seq, pb::PatchPhase::Failed))
                .await
                .unwrap();
        }
        // Failed is final: nothing moves it.
        for (seq, phase) in [
            (30, pb::PatchPhase::Downloaded),
            (31, pb::PatchPhase::Rejected),
        ] {
            refused(
                node.report(report_of("ahead", seq, phase)).await,
                "which is final",
            );
        }
        forger
    });

    let mine: Vec<_> = patch::phases(&server, "ahead")
        .into_iter()
        .filter(|n| n.0 == forger)
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].1, "failed", "{mine:?}");
    // One patch.failed event for the node, not one per report.
    let out = server.cli(&[
        "--json",
        "events",
        "--last",
        "1000",
        "--kinds",
        "patch.failed",
    ]);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["data"]["node"] == forger.as_str())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["phase"], "failed", "{events:?}");

    // The host comes back with a fresh state directory (same machine, no key)
    // past the clone window: its node, and its patches start over.
    let settled = enrolled + 2 * clone_window + Duration::from_millis(100);
    flotilla_e2e::wait_until("the clone window to pass", 10 * clone_window, || {
        (Instant::now() >= settled).then_some(())
    });
    rt.block_on(async {
        let (again, mut node) = enroll::enroll(&server, "127.0.0.1", &token, None, "forger")
            .await
            .unwrap();
        assert_eq!(again, forger, "the same node");
        node.report(report_of("ahead", 40, pb::PatchPhase::Verified))
            .await
            .unwrap();
    });
    let mine: Vec<_> = patch::phases(&server, "ahead")
        .into_iter()
        .filter(|n| n.0 == forger)
        .collect();
    assert_eq!(mine[0].1, "verified", "{mine:?}");
}
