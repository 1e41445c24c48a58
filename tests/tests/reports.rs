//! What a node may report: only as an accepted node, only about patches it was
//! offered, with bounded text, at a bounded rate; and what a flood of forged
//! reports costs the server (nothing it keeps).

use std::path::Path;

use flotilla_e2e::Server;
use flotilla_e2e::patch::{self, FleetOptions};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::token::JoinToken;
use rcgen::{CertificateParams, KeyPair};
use tonic::transport::Channel;

const FORGED: usize = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    flotilla_proto::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Joins `group` over gRPC with a key of our own, so the test holds the node's
/// certificate; returns (node id, a client calling as that node).
async fn join_as_node(
    server: &Server,
    token: &str,
    machine: &str,
) -> (String, AgentServiceClient<Channel>) {
    let token: JoinToken = token.parse().unwrap();
    let (url, ca) = (server.url(), server.ca_pem());
    let anon = flotilla_proto::tls::endpoint(&url, &ca, None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let joined = AgentServiceClient::new(anon)
        .enroll(pb::EnrollRequest {
            token_id: token.id,
            token_secret: token.secret,
            csr_der: csr,
            facts: Some(pb::NodeFacts {
                hostname: machine.into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                agent_version: "0".into(),
                machine_id: machine.into(),
            }),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let channel = flotilla_proto::tls::endpoint(
        &url,
        &ca,
        Some((&joined.certificate_pem, &key.serialize_pem())),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    (joined.node_id, AgentServiceClient::new(channel))
}

fn report(manifest_id: &str, seq: usize, error: &str) -> pb::ReportRequest {
    pb::ReportRequest {
        report_id: format!("r-{seq}"),
        manifest_id: manifest_id.into(),
        phase: pb::PatchPhase::Committed as i32,
        at_unix_ms: 1_000 + seq as i64,
        error: error.into(),
        log_tail: String::new(),
    }
}

/// Bytes of every file under `dir`.
fn size_of(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// The server process's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn nodes_report_only_on_patches_they_were_offered() {
    let dir = tempfile::tempdir().unwrap();
    let key = patch::key(dir.path(), "k");
    let (server, _agents) = patch::fleet(
        dir.path(),
        FleetOptions {
            agents: 1,
            server_keys: &[&key],
            pinned: &[&key],
            ..Default::default()
        },
    );
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
        let (forger, mut node) = join_as_node(&server, &other, "forger").await;
        let (_, mut waiting) = join_as_node(&server, &pending, "pending").await;

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
        let (db_before, rss_before) = (size_of(&db), rss_kib(pid));
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
        let (db_after, rss_after) = (size_of(&db), rss_kib(pid));
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
