//! What one node can make the server do in a loop stays bounded: its
//! certificate renewals (a CA signature, a store write and an audit entry
//! each), its session opens (each may store its facts) and its artifact
//! downloads open at once; a pending node downloads nothing and renews only
//! the certificate it needs. Real server, real TLS, nodes enrolled by hand as
//! a misbehaving agent would.

use std::time::Duration;

use flotilla_e2e::enroll::{self, Enrolled};
use flotilla_e2e::{Server, patch};
use flotilla_proto::pb;
use flotilla_proto::token::JoinToken;

/// A fresh key and CSR for a renewal.
fn csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (key, csr)
}

/// One renewal as `node`, on a fresh key: the node with its new certificate.
async fn renew(server: &Server, node: &Enrolled) -> Result<Enrolled, tonic::Status> {
    let (key, csr) = csr();
    let renewed = node
        .client(server)
        .await?
        .renew_certificate(pb::RenewCertificateRequest { csr_der: csr })
        .await?;
    Ok(Enrolled {
        node_id: node.node_id.clone(),
        cert_pem: renewed.into_inner().certificate_pem,
        key_pem: key.serialize_pem(),
    })
}

/// A client of `server` without a certificate, from local address `source`.
async fn anon(
    server: &Server,
    source: &str,
) -> pb::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let channel = flotilla_proto::tls::endpoint(&server.url(), &server.ca_pem(), None)
        .unwrap()
        .local_address(Some(source.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    pb::agent_service_client::AgentServiceClient::new(channel)
}

#[test]
fn renewals_and_session_opens_in_a_loop_are_slowed_and_their_audit_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token: JoinToken = server.token("store", 1, &[]).parse().unwrap();
    let rt = enroll::runtime();
    let (node_id, renewed, refused) = rt.block_on(async {
        let mut node = enroll::enroll_identity(&server, "127.0.0.1", &token, None, "m-1")
            .await
            .unwrap();
        let (mut renewed, mut refused) = (0, Vec::new());
        // Each time with the newest certificate, as a node that means it.
        for _ in 0..50 {
            match renew(&server, &node).await {
                Ok(n) => {
                    renewed += 1;
                    node = n;
                }
                Err(s) => refused.push(s),
            }
        }
        (node.node_id, renewed, refused)
    });
    assert_eq!(renewed, 5, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|s| s.code() == tonic::Code::ResourceExhausted
                && s.message()
                    .contains("certificate renewals faster than one every")),
        "{refused:?}"
    );
    let audit = server.cli_json(&["audit", "--limit", "500"]);
    let renew_entries = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.renew" && e["target"] == node_id.as_str())
        .count();
    assert_eq!(renew_entries, 5, "{audit}");

    // Sessions opened and dropped in a loop, each Hello with other facts: a
    // burst, then refused (the agent's backoff retries later).
    let token: JoinToken = server.token("store", 1, &[]).parse().unwrap();
    let codes = rt.block_on(async {
        let node = enroll::enroll_identity(&server, "127.0.0.1", &token, None, "m-2")
            .await
            .unwrap();
        let mut client = node.client(&server).await.unwrap();
        let mut codes = Vec::new();
        for i in 0..40 {
            let mut facts = enroll::facts("m-2");
            facts.hostname = format!("host-{i}");
            let hello = pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                    last_revision: 0,
                    facts: Some(facts),
                })),
            };
            let opened = client
                .session(tokio_stream::iter(vec![hello]))
                .await
                .map(|_| ());
            codes.push(opened.err().map(|s| s.code()));
        }
        codes
    });
    let opened = codes.iter().filter(|c| c.is_none()).count();
    assert!((30..=32).contains(&opened), "{codes:?}");
    assert!(
        codes
            .iter()
            .flatten()
            .all(|c| *c == tonic::Code::ResourceExhausted),
        "{codes:?}"
    );
}

#[test]
fn a_node_waiting_for_approval_renews_only_the_certificate_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    // Short-lived certificates: one reaches the second half of its life while
    // the test waits.
    server
        .extra_args
        .extend(["--node-cert-lifetime".into(), "16s".into()]);
    server.start();
    let approval: JoinToken = server.token("store", 1, &["--approval"]).parse().unwrap();
    let rt = enroll::runtime();
    let renewed = rt.block_on(async {
        let node = enroll::enroll_identity(&server, "127.0.0.1", &approval, None, "m-1")
            .await
            .unwrap();
        // Straight after its join: refused, told why and from when.
        let e = renew(&server, &node)
            .await
            .err()
            .expect("refused while fresh");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains(&format!(
                "node {} is waiting for an operator's approval",
                node.node_id
            )) && e
                .message()
                .contains("second half of the certificate's life"),
            "{e:?}"
        );
        // Nor may it ask what its site's peers were offered.
        let e = node
            .client(&server)
            .await
            .unwrap()
            .authorize_site_peer(pb::AuthorizeSitePeerRequest {
                peer_node_id: "node-aaaaaaaaaaaa".into(),
                sha256: "ab".repeat(32),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("serves no site peers until accepted"),
            "{e:?}"
        );
        // Asked again as its agent would, the renewal is taken once the
        // certificate is half way through its life (well before it expires).
        let renewed = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match renew(&server, &node).await {
                    Ok(n) => return n,
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
        .await
        .expect("a pending node's certificate is renewed in the second half of its life");
        // Its new certificate is a fresh one: refused again.
        let e = renew(&server, &renewed).await.err().expect("refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        renewed
    });
    let renew_entries = |server: &Server| {
        let audit = server.cli_json(&["audit", "--limit", "500"]);
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "node.renew" && e["target"] == renewed.node_id.as_str())
            .count()
    };
    // However often it asked: one renewal, one audit entry.
    assert_eq!(renew_entries(&server), 1);
    // Accepted, it renews as any node does.
    server.cli(&["nodes", "accept", &renewed.node_id]);
    rt.block_on(renew(&server, &renewed)).unwrap();
    assert_eq!(renew_entries(&server), 2);
}

#[test]
fn artifact_downloads_are_capped_per_node_and_pending_nodes_get_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, key) = patch::trusting_server(d);
    // Large enough that an unread download stays open (flow control).
    let tar = d.join("big.tar");
    patch::tar(&tar, &[("blob.bin", &patch::noise(16 << 20, 7), 0o644)]);
    let spec = patch::files_spec(d, "big-1.0.0", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &d.join("big"));
    patch::sign(&server, &manifest, &key);
    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(ok, "{out}{err}");

    let token: JoinToken = server.token("store", 1, &[]).parse().unwrap();
    let approval: JoinToken = server.token("store", 1, &["--approval"]).parse().unwrap();
    let rt = enroll::runtime();
    rt.block_on(async {
        let (_, mut node) = enroll::enroll(&server, "127.0.0.1", &token, None, "m-1")
            .await
            .unwrap();
        let (beat, mut states) = enroll::open_session(&mut node, "m-1").await;
        let (_, offered) = enroll::offered(&mut states, "big-1.0.0").await;
        let m = flotilla_proto::manifest::Manifest::parse(&offered.manifest).unwrap();
        let sha = m.artifacts[0].sha256.clone();
        let fetch = || pb::FetchArtifactRequest {
            sha256: sha.clone(),
            offset: 0,
        };
        // Opened, never read.
        let mut open = Vec::new();
        for _ in 0..8 {
            open.push(node.fetch_artifact(fetch()).await.unwrap().into_inner());
        }
        let e = node.fetch_artifact(fetch()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("8 artifact downloads open"), "{e:?}");
        // One given up: its place comes back.
        open.pop();
        let mut again = None;
        for _ in 0..100 {
            match node.fetch_artifact(fetch()).await {
                Ok(s) => {
                    again = Some(s.into_inner());
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert!(again.is_some(), "a download's place was not given back");
        beat.abort();

        // A node waiting for approval is offered nothing and fetches nothing.
        let (_, mut pending) = enroll::enroll(&server, "127.0.0.1", &approval, None, "m-2")
            .await
            .unwrap();
        let e = pending.fetch_artifact(fetch()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("waiting for an operator's approval"),
            "{e:?}"
        );
    });
}

#[test]
fn failed_key_proofs_and_refused_clone_joins_are_guesses_with_a_bounded_audit() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token: JoinToken = server.token("store", 100, &[]).parse().unwrap();
    let rt = enroll::runtime();
    let (proof_codes, reenroll_codes, clone_codes) = rt.block_on(async {
        let (node_id, mut node) = enroll::enroll(&server, "127.0.0.1", &token, None, "m-1")
            .await
            .unwrap();
        // Online, so a join with its machine id and another key is a clone.
        let (beat, _states) = enroll::open_session(&mut node, "m-1").await;
        let join = |proof: Option<pb::KeyProof>| pb::EnrollRequest {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            csr_der: csr().1,
            facts: Some(enroll::facts("m-1")),
            labels: Default::default(),
            proof,
        };
        let forged = || pb::KeyProof {
            node_id: node_id.clone(),
            at_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
            signature: vec![7u8; 64],
        };
        // The right token, a proof of the node's key that does not verify.
        let mut proof_codes = Vec::new();
        for _ in 0..14 {
            let e = anon(&server, "127.0.0.1")
                .await
                .enroll(join(Some(forged())))
                .await
                .unwrap_err();
            proof_codes.push(e.code());
        }
        // A renewal by proof of the key, from a third address: the
        // certificate is still valid, and the forged proof counts all the
        // same (it is checked first).
        let mut reenroll_codes = Vec::new();
        for _ in 0..14 {
            let e = anon(&server, "127.0.0.3")
                .await
                .reenroll(pb::ReenrollRequest {
                    csr_der: csr().1,
                    proof: Some(forged()),
                })
                .await
                .unwrap_err();
            reenroll_codes.push(e.code());
        }
        // Without a proof, from the second address: a refused clone each time.
        let mut clone_codes = Vec::new();
        for _ in 0..14 {
            let e = enroll::enroll_identity(&server, "127.0.0.2", &token, None, "m-1")
                .await
                .err()
                .expect("refused while the node is online");
            clone_codes.push(e.code());
        }
        beat.abort();
        (proof_codes, reenroll_codes, clone_codes)
    });
    // Counted as guesses: ten back to back, then slowed.
    assert_ne!(
        proof_codes[0],
        tonic::Code::ResourceExhausted,
        "{proof_codes:?}"
    );
    assert_eq!(
        proof_codes.last(),
        Some(&tonic::Code::ResourceExhausted),
        "{proof_codes:?}"
    );
    assert_eq!(
        reenroll_codes[0],
        tonic::Code::PermissionDenied,
        "{reenroll_codes:?}"
    );
    assert_eq!(
        reenroll_codes.last(),
        Some(&tonic::Code::ResourceExhausted),
        "{reenroll_codes:?}"
    );
    assert_eq!(
        clone_codes[0],
        tonic::Code::FailedPrecondition,
        "{clone_codes:?}"
    );
    assert_eq!(
        clone_codes.last(),
        Some(&tonic::Code::ResourceExhausted),
        "{clone_codes:?}"
    );
    // One audit entry per source a minute, not one per attempt.
    let audit = server.cli_json(&["audit", "--limit", "500"]);
    let count = |action: &str| {
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .count()
    };
    // Two sources of failed proofs: one entry each.
    assert_eq!(count("join.failed"), 2, "{audit}");
    assert_eq!(count("node.clone"), 1, "{audit}");
}

#[test]
fn one_credential_follows_the_event_log_on_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let rt = enroll::runtime();
    rt.block_on(async {
        let mut admin = enroll::admin(&server).await;
        let follow = || pb::WatchEventsRequest {
            follow: true,
            ..Default::default()
        };
        let mut open = Vec::new();
        for _ in 0..8 {
            open.push(admin.watch_events(follow()).await.unwrap().into_inner());
        }
        let e = admin.watch_events(follow()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("8 event streams open"), "{e:?}");
        // Closing one gives its place back (within the follower's next look).
        open.pop();
        let mut again = None;
        for _ in 0..100 {
            match admin.watch_events(follow()).await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert!(
            again.is_some(),
            "a closed stream's place was not given back"
        );
    });
}
