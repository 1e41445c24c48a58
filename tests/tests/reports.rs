//! What a node may report: only as an accepted node, only about patches it was
//! offered, with bounded text, at a bounded rate; and what a flood of forged
//! reports costs the server (nothing it keeps).

use flotilla_e2e::{enroll, measure, patch};
use flotilla_proto::pb;
use flotilla_proto::token::JoinToken;

const FORGED: usize = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    flotilla_proto::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

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
    let forger = runtime().block_on(async {
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
