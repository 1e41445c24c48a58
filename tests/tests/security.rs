//! Who may do what: revoked nodes, operator roles, mutual TLS, and certificates
//! the server builds itself whatever the CSR asks for.

use std::process::Command;
use std::time::Duration;

use flotilla_e2e::{Agent, Server, enroll, wait_until};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::replica_service_client::ReplicaServiceClient;
use flotilla_proto::token::JoinToken;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// A started server and an agent ("till", group pos) joined to it, not
/// running yet; its node id.
fn joined(dir: &std::path::Path) -> (Server, Agent, String) {
    let mut server = Server::init(dir);
    server.start();
    let token = server.token("pos", 1, &[]);
    let a = Agent::new(dir, "till");
    let id = a.join(&server.url(), &token);
    (server, a, id)
}

#[test]
fn revoked_node_is_cut_off_and_cannot_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut a, id) = joined(dir.path());
    a.start(&[server.url()]);
    wait_until("the node to be online", T, || {
        (server.node(&id)["online"] == true).then_some(())
    });
    server.cli(&["nodes", "revoke", &id]);
    let status = wait_until("the revoked agent to stop", T, || a.try_exit());
    assert!(!status.success());
    assert!(a.log_text().contains("revoked"), "{}", a.log_text());
    let node = server.node(&id);
    assert_eq!(node["status"], "revoked");
    assert_eq!(node["online"], false);
    // Started again, it is refused again.
    a.kill9();
    a.start(&[server.url()]);
    let status = wait_until("the agent to be refused again", T, || a.try_exit());
    assert!(!status.success());
    assert_eq!(server.node(&id)["online"], false);
}

#[test]
fn one_server_refusing_does_not_stop_an_agent_that_has_others() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut a, id) = joined(dir.path());
    // The same server under two names: two servers to the agent.
    let port = server.url().rsplit(':').next().unwrap().to_string();
    let other = format!("https://localhost:{port}");
    a.start(&[server.url(), other]);
    wait_until("the node to be online", T, || {
        (server.node(&id)["online"] == true).then_some(())
    });
    server.cli(&["nodes", "revoke", &id]);
    let status = wait_until("the revoked agent to stop", T, || a.try_exit());
    assert!(!status.success());
    let log = a.log_text();
    // The first refusal sent it to the other server; the second stopped it.
    assert!(
        log.contains("this server refused the node; trying the others before stopping"),
        "{log}"
    );
    assert!(log.contains("revoked"), "{log}");
}

/// A listener that answers every connection's first bytes with a plaintext
/// fatal TLS alert (bad_certificate) before any ServerHello, as anyone on
/// the path can; counts the connections.
fn alert_sender() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = conn.read(&mut [0u8; 1024]);
            let _ = conn.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x2a]);
        }
    });
    (url, seen)
}

#[test]
fn an_unauthenticated_tls_alert_never_stops_the_agent() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (server, mut a, id) = joined(dir.path());
    let (alerting, seen) = alert_sender();
    // First in the list: the agent moves on to the real server.
    a.start(&[alerting.clone(), server.url()]);
    wait_until("the node to be online", T, || {
        (server.node(&id)["online"] == true).then_some(())
    });
    assert!(seen.load(Ordering::SeqCst) >= 1);
    a.kill9();
    // Nothing but alerts: it keeps trying, naming what it got, and does not exit.
    a.start(std::slice::from_ref(&alerting));
    wait_until("three alerts taken", T, || {
        (seen.load(Ordering::SeqCst) >= 4).then_some(())
    });
    assert!(a.try_exit().is_none(), "{}", a.log_text());
    assert!(a.log_text().contains("BadCertificate"), "{}", a.log_text());
    a.kill9();
}

#[test]
fn viewer_cannot_change_anything_and_changes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let viewer = dir.path().join("viewer.credential");
    server.cli(&[
        "credential",
        "create",
        "--name",
        "alice",
        "--role",
        "viewer",
        "--out",
        viewer.to_str().unwrap(),
    ]);
    let out = server.cli_as(&viewer, &["token", "create", "--group", "g"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("needs role operator"),
        "{err}"
    );
    let out = server.cli_as(&viewer, &["group", "set", "g", "--desired", "1"]);
    assert!(!out.status.success());
    // Reading is allowed.
    let out = server.cli_as(&viewer, &["group", "list"]);
    assert!(out.status.success());
    // A made-up credential is refused outright.
    let forged = dir.path().join("forged.credential");
    let mut text = std::fs::read_to_string(&viewer).unwrap();
    let start = text.find("credential = \"").unwrap() + 14 + 11;
    text.replace_range(start..start + 4, "zzzz");
    std::fs::write(&forged, text).unwrap();
    let out = server.cli_as(&forged, &["group", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));

    let token = server.token("g", 1, &[]);
    server.cli(&["group", "set", "g", "--desired", "1"]);
    let id = Agent::new(dir.path(), "x").join(&server.url(), &token);
    server.cli(&["nodes", "revoke", &id]);
    let audit = server.cli_json(&["audit"]);
    let entries: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                e["target"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (actor, action, target) in [
        ("admin", "credential.create", "alice"),
        ("admin", "group.set", "g"),
        ("admin", "node.revoke", id.as_str()),
    ] {
        assert!(
            entries.contains(&(actor.into(), action.into(), target.into())),
            "{action} missing from {entries:?}"
        );
    }
    assert!(entries.iter().any(|(_, a, t)| a == "node.join" && t == &id));
    assert!(
        entries
            .iter()
            .any(|(a, act, _)| a == "admin" && act == "token.create")
    );
    // Refused attempts changed nothing, so they are not in the log.
    assert!(!entries.iter().any(|(a, _, _)| a == "alice"));
    // A revoked credential is refused from then on; the last admin cannot be revoked.
    server.cli(&["credential", "revoke", "alice"]);
    let out = server.cli_as(&viewer, &["group", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has been revoked"), "{err}");
    let out = server.cli_as(&server.credential(), &["credential", "revoke", "admin"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("last admin credential"));
    let audit = server.cli_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "credential.revoke" && e["target"] == "alice")
    );
    // Sequence numbers only grow.
    let seqs: Vec<u64> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

fn csr_asking_for_everything(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "flotilla-server");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serialize_request(key).unwrap().der().to_vec()
}

fn facts(machine: &str) -> pb::NodeFacts {
    flotilla_e2e::enroll::facts(machine)
}

#[test]
fn server_builds_node_certificates_itself_and_requires_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token: JoinToken = server.token("g", 2, &[]).parse().unwrap();
    let out = server.cli_as(
        &server.credential(),
        &["group", "set", "../etc", "--desired", "1"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    let url = server.url();
    let ca = server.ca_pem();
    let data_dir = server.data_dir.clone();
    enroll::runtime().block_on(async {
        let channel = flotilla_proto::tls::endpoint(&url, &ca, None)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut anon = AgentServiceClient::new(channel);
        // Malformed joins are refused with what was wrong, and cost the token nothing.
        for (csr, facts_sent, want) in [
            (
                b"garbage".to_vec(),
                Some(facts("m-0")),
                "invalid certificate signing request",
            ),
            (Vec::new(), Some(facts("m-0")), "CSR must be"),
            (b"x".to_vec(), None, "facts are missing"),
            (b"x".to_vec(), Some(facts("")), "machine id is empty"),
        ] {
            let err = anon
                .enroll(pb::EnrollRequest {
                    token_id: token.id.clone(),
                    token_secret: token.secret.clone(),
                    csr_der: csr,
                    facts: facts_sent,
                    labels: Default::default(),
                    proof: None,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.message().contains(want), "{err}");
        }
        let key = KeyPair::generate().unwrap();
        let resp = anon
            .enroll(pb::EnrollRequest {
                token_id: token.id.clone(),
                token_secret: token.secret.clone(),
                csr_der: csr_asking_for_everything(&key),
                facts: Some(facts("m-1")),
                labels: Default::default(),
                proof: None,
            })
            .await
            .unwrap()
            .into_inner();

        let der = flotilla_proto::tls::first_pem_der(&resp.certificate_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, resp.node_id);
        assert!(resp.node_id.starts_with("node-"));
        let bc = cert
            .basic_constraints()
            .unwrap()
            .expect("basic constraints present")
            .value;
        assert!(!bc.ca, "must not be a CA");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        // Client, and server of its site's peers under a name no real
        // server has; nothing the CSR asked for.
        assert!(eku.client_auth && eku.server_auth && !eku.any && eku.other.is_empty());
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .expect("the site-peer name")
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [format!(
                "DNSName({})",
                flotilla_proto::site::server_name(&resp.node_id)
            )],
            "no SANs from the CSR"
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        // 30 days, plus five minutes of slack before "now" for clocks behind.
        assert_eq!(lifetime, 30 * 24 * 3600 + 300);
        assert!(cert.raw_serial().len() >= 16, "random 127-bit serial");
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );

        // Without a client certificate, every node call is refused.
        let err = anon
            .renew_certificate(pb::RenewCertificateRequest {
                csr_der: csr_asking_for_everything(&key),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let hello = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                last_revision: 0,
                facts: Some(facts("m-1")),
            })),
        };
        let err = anon
            .session(tokio_stream::iter(vec![hello.clone()]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");

        // With the issued certificate, it works (so the refusals above mean something).
        let key_pem = key.serialize_pem();
        let channel =
            flotilla_proto::tls::endpoint(&url, &ca, Some((&resp.certificate_pem, &key_pem)))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut node = AgentServiceClient::new(channel);
        let renewed = node
            .renew_certificate(pb::RenewCertificateRequest {
                csr_der: csr_asking_for_everything(&key),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(renewed.certificate_pem, resp.certificate_pem);
        // The certificate just replaced still works once (an agent that died before
        // saving its new one can renew again); after the next renewal it does not.
        let second = node
            .renew_certificate(pb::RenewCertificateRequest {
                csr_der: csr_asking_for_everything(&key),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(second.certificate_pem, renewed.certificate_pem);
        let err = node
            .renew_certificate(pb::RenewCertificateRequest {
                csr_der: csr_asking_for_everything(&key),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(err.message().contains("has been replaced"), "{err}");

        // Replica calls take neither no certificate, nor a node's, nor one the
        // fleet's CA made for a replica that is not registered.
        let fetch = pb::FetchArtifactRequest {
            sha256: "0".repeat(64),
            offset: 0,
        };
        let mut anon_replica = ReplicaServiceClient::new(
            flotilla_proto::tls::endpoint(&url, &ca, None)
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let err = anon_replica
            .fetch_artifact(fetch.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let mut as_node = ReplicaServiceClient::new(
            flotilla_proto::tls::endpoint(&url, &ca, Some((&second.certificate_pem, &key_pem)))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let err = as_node.fetch_artifact(fetch.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.message().contains("does not name a replica"), "{err}");
        let fleet_ca = rcgen::Issuer::from_ca_cert_pem(
            &ca,
            KeyPair::from_pem(&std::fs::read_to_string(data_dir.join("tls/ca.key")).unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut stale = CertificateParams::default();
        stale
            .distinguished_name
            .push(DnType::CommonName, "replica-gone-1-00000000");
        stale.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let stale_key = KeyPair::generate().unwrap();
        let stale_cert = stale.signed_by(&stale_key, &fleet_ca).unwrap();
        let mut as_stale = ReplicaServiceClient::new(
            flotilla_proto::tls::endpoint(
                &url,
                &ca,
                Some((&stale_cert.pem(), &stale_key.serialize_pem())),
            )
            .unwrap()
            .connect()
            .await
            .unwrap(),
        );
        let err = as_stale.fetch_artifact(fetch.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.message().contains("not registered"), "{err}");

        // A certificate for the same node id from another CA does not get through TLS.
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::default();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_ca = other.self_signed(&other_key).unwrap();
        let issuer = rcgen::Issuer::new(other, other_key);
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name
            .push(DnType::CommonName, resp.node_id.clone());
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let _ = other_ca;
        let foreign_key = leaf_key.serialize_pem();
        let refused = async {
            let channel =
                flotilla_proto::tls::endpoint(&url, &ca, Some((&leaf_cert.pem(), &foreign_key)))
                    .unwrap()
                    .connect()
                    .await?;
            let mut c = AgentServiceClient::new(channel);
            c.renew_certificate(pb::RenewCertificateRequest {
                csr_der: csr_asking_for_everything(&leaf_key),
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))
        }
        .await;
        assert!(
            refused.is_err(),
            "a foreign CA's certificate must be refused"
        );
    });
    // Only the one good join counted against the token.
    assert_eq!(server.cli_json(&["token", "list"])[0]["uses"], 1);
}

#[test]
fn certificates_renew_without_a_new_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server
        .extra_args
        .extend(["--node-cert-lifetime".into(), "6s".into()]);
    server.start();
    let token = server.token("g", 1, &[]);
    let mut a = Agent::new(dir.path(), "r1");
    let id = a.join(&server.url(), &token);
    let first_serial = a.status().unwrap()["cert_serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        server.node(&id)["certificate_serial"],
        Value::String(first_serial.clone())
    );
    a.start(&[server.url()]);
    let renewed = wait_until("a renewal", T, || {
        let s = a.status()?;
        (s["renewals"].as_u64()? >= 1 && s["connected"] == true).then_some(s)
    });
    let new_serial = renewed["cert_serial"].as_str().unwrap();
    assert_ne!(new_serial, first_serial);
    wait_until("the server to record the new certificate", T, || {
        let n = server.node(&id);
        (n["certificate_serial"] == new_serial && n["online"] == true).then_some(())
    });
    // Still the same single node: no new join happened.
    assert_eq!(server.nodes().len(), 1);
    // Keeps renewing past the first certificate's expiry and stays online.
    wait_until("a second renewal", T, || {
        (a.status()?["renewals"].as_u64()? >= 2).then_some(())
    });
    wait_until("the node online on its newest certificate", T, || {
        (server.node(&id)["online"] == true).then_some(())
    });
}

/// Every directory and file under `dir` with group or other permission bits.
fn open_to_others(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode();
        if mode & 0o077 != 0 {
            found.push(format!("{} {:o}", d.display(), mode & 0o777));
        }
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                found.push(format!(
                    "{} {:o}",
                    e.path().display(),
                    meta.permissions().mode() & 0o777
                ));
            }
        }
    }
    found
}

#[test]
fn the_data_dir_is_owner_only_whatever_the_umask() {
    use nix::sys::stat::{Mode, umask};
    // The most common umask, which left the store readable by everyone.
    umask(Mode::from_bits_truncate(0o022));
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    let data = server.data_dir.clone();
    assert_eq!(open_to_others(&data), Vec::<String>::new(), "after init");
    // Files the store creates while it runs are owner-only too.
    server.start();
    for i in 0..20 {
        server.token(&format!("g{i}"), 1, &[]);
    }
    let (ok, _, err) = flotilla_e2e::patch::cli(
        &server,
        &[
            "credential",
            "create",
            "--name",
            "ci",
            "--role",
            "viewer",
            "--out",
            dir.path().join("ci.credential").to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    server.stop();
    assert_eq!(open_to_others(&data), Vec::<String>::new(), "after a run");
    // A data dir opened up by hand (or restored from a backup) is closed again at start.
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    server.start();
    assert_eq!(
        open_to_others(&data),
        Vec::<String>::new(),
        "after a restart"
    );
}

#[test]
fn credentials_expire_rotate_and_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = Server::init(d);
    server.start();
    let file = |n: &str| d.join(format!("{n}.credential"));
    let path = |n: &str| file(n).to_str().unwrap().to_string();
    let whoami = |f: &std::path::Path| server.cli_as(f, &["whoami"]);

    // A credential with a two-second lifetime works, then is refused, saying why.
    let out = server.cli(&[
        "credential",
        "create",
        "--name",
        "brief",
        "--role",
        "viewer",
        "--ttl",
        "2s",
        "--out",
        &path("brief"),
    ]);
    assert!(out.contains("expires"), "{out}");
    assert!(whoami(&file("brief")).status.success());
    let refused = wait_until("the credential to expire", Duration::from_secs(30), || {
        let out = whoami(&file("brief"));
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    assert!(refused.contains("expired at"), "{refused}");

    // Rotation: the old secret is refused at once, the new one works.
    server.cli(&[
        "credential",
        "create",
        "--name",
        "ops",
        "--role",
        "operator",
        "--out",
        &path("ops"),
    ]);
    assert!(whoami(&file("ops")).status.success());
    let out = server.cli(&["credential", "rotate", "ops", "--out", &path("ops-new")]);
    assert!(out.contains("rotated"), "{out}");
    let old = whoami(&file("ops"));
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stderr).contains("not valid"));
    let new = whoami(&file("ops-new"));
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    // The rotated file is not overwritten without --force.
    let again = server.cli_as(
        &server.credential(),
        &["credential", "rotate", "ops", "--out", &path("ops-new")],
    );
    assert!(!again.status.success());

    // Refusals are audited with their reason, at a bounded rate: many
    // guesses from one address make one entry. They are not slowed, so the
    // right secret still gets in at once.
    let forged = d.join("forged.credential");
    let text = std::fs::read_to_string(file("ops-new")).unwrap();
    let forged_text: String = text
        .lines()
        .map(|l| match l.strip_prefix("credential = \"") {
            // Its id, another secret: a guess.
            Some(rest) => format!("credential = \"{}.{}\"", &rest[..10], "x".repeat(32)),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(forged_text.trim(), text.trim());
    std::fs::write(&forged, forged_text).unwrap();
    for _ in 0..15 {
        let out = whoami(&forged);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));
    }
    assert!(whoami(&file("ops-new")).status.success());
    let audit = server.cli_json(&["audit", "--limit", "200"]);
    let refusals: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .collect();
    assert!(!refusals.is_empty(), "{audit}");
    assert!(
        refusals.len() <= 3,
        "one entry per source and minute: {refusals:?}"
    );
    assert!(
        refusals.iter().any(|e| e["detail"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("expired at")),
        "{refusals:?}"
    );
    let _ = server.stop();
}

#[test]
fn the_server_certificate_renews_without_a_restart_and_agents_stay() {
    use flotilla_e2e::patch;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = patch::key(d, "k");
    let (server, _agents) = patch::signed_fleet(d, &k, 3);
    let port = server.url().rsplit(':').next().unwrap().to_string();
    let by_name = format!("https://localhost:{port}");
    let whoami_by_name = || {
        Command::new(flotilla_e2e::bin("flotilla"))
            .args(["--server", &by_name, "whoami"])
            .env("FLOTILLA_CREDENTIAL", server.credential())
            .output()
            .unwrap()
    };
    assert!(whoami_by_name().status.success());
    let renew = |args: &[&str]| {
        let out = flotilla_e2e::server_cmd(
            &[&["cert", "renew"], args].concat(),
            &[("--data-dir", &server.data_dir)],
        );
        assert!(out.status.success(), "{}", flotilla_e2e::output_text(&out));
        flotilla_e2e::output_text(&out)
    };

    // Without the name "localhost": the running server takes the new
    // certificate, and a client reaching it by that name is refused.
    let said = renew(&["--remove-name", "localhost"]);
    assert!(said.contains("names 127.0.0.1"), "{said}");
    wait_until(
        "the server to take the new certificate",
        Duration::from_secs(30),
        || (!whoami_by_name().status.success()).then_some(()),
    );
    // With it again: reached by that name.
    renew(&["--name", "localhost"]);
    wait_until(
        "the server to take the renewed certificate",
        Duration::from_secs(30),
        || whoami_by_name().status.success().then_some(()),
    );

    // The agents kept working across both: all online, and a patch reaches all.
    assert_eq!(server.group("store")["online"], 3);
    patch::roll_out(&server, d, &k, "after-renewal", "1.0.0", 3);
    let audit = server.cli_json(&["audit", "--limit", "200"]);
    let renewals = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "server.cert.renew")
        .count();
    assert_eq!(renewals, 2, "{audit}");
}
