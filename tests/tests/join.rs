//! Joining: token limits and every way a join is refused, each with its own error.

use std::time::Duration;

use flotilla_e2e::{Agent, Server, enroll, wait_until};
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn token_uses(server: &Server, id: &str) -> u64 {
    let tokens = server.cli_json(&["token", "list"]);
    tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .map(|t| t["uses"].as_u64().unwrap())
        .expect("token listed")
}

#[test]
fn token_limits_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let url = server.url();

    // Three joins with a three-use token, the fourth refused.
    let token = server.token("store-eu", 3, &[]);
    let ids: Vec<String> = (0..3)
        .map(|i| Agent::new(dir.path(), &format!("a{i}")).join(&url, &token))
        .collect();
    assert_eq!(ids.len(), 3);
    let fourth = Agent::new(dir.path(), "a3").join_output(&url, &token, &[]);
    assert!(!fourth.status.success());
    assert!(
        stderr(&fourth).contains("used up (3 of 3 joins)"),
        "{}",
        stderr(&fourth)
    );

    // Expired.
    let short = server.cli_json(&["token", "create", "--group", "store-eu", "--ttl", "1s"]);
    let expires_at = short["info"]["expires_at"].as_i64().unwrap();
    wait_until("the token to expire", Duration::from_secs(5), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now > expires_at).then_some(())
    });
    let out = Agent::new(dir.path(), "b1").join_output(&url, short["token"].as_str().unwrap(), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired at"), "{}", stderr(&out));

    // Revoked.
    let revoked = server.cli_json(&["token", "create", "--group", "store-eu"]);
    let revoked_id = revoked["info"]["id"].as_str().unwrap();
    server.cli(&["token", "revoke", revoked_id]);
    let out =
        Agent::new(dir.path(), "b2").join_output(&url, revoked["token"].as_str().unwrap(), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has been revoked"),
        "{}",
        stderr(&out)
    );

    // Forged: right shape, wrong secret.
    let good = server.token("store-eu", 5, &[]);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!("{}.{}.{}.{}", parts[0], parts[1], "z".repeat(32), parts[3]);
    let out = Agent::new(dir.path(), "b3").join_output(&url, &forged, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("secret does not match"),
        "{}",
        stderr(&out)
    );

    // Unknown id.
    let unknown = format!("{}.{}.{}.{}", parts[0], "zzzzzzzzzz", parts[2], parts[3]);
    let out = Agent::new(dir.path(), "b4").join_output(&url, &unknown, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown join token"),
        "{}",
        stderr(&out)
    );

    // A CA fingerprint that is not this server's: refused before the secret is sent,
    // so the token is not even touched.
    let wrong_fp = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "0".repeat(64));
    let out = Agent::new(dir.path(), "b5").join_output(&url, &wrong_fp, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the one the join token names"),
        "{}",
        stderr(&out)
    );
    assert_eq!(token_uses(&server, parts[1]), 0);
    let audit = server.cli_json(&["audit"]);
    let joins = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.join")
        .count();
    assert_eq!(joins, 3, "only the three good joins are in the audit log");

    // The good token still works afterwards.
    Agent::new(dir.path(), "b6").join(&url, &good);
    assert_eq!(token_uses(&server, parts[1]), 1);
}

#[test]
fn approval_keeps_node_pending_until_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token = server.token("vault", 2, &["--approval"]);
    let mut a = Agent::new(dir.path(), "p1");
    let id = a.join(&server.url(), &token);
    a.start(&[server.url()]);
    wait_until(
        "the pending node to connect",
        Duration::from_secs(20),
        || (a.status()?["connected"] == Value::Bool(true)).then_some(()),
    );
    assert_eq!(a.status().unwrap()["role"], "pending");
    let g = server.group("vault");
    assert_eq!(g["pending"], 1);
    assert_eq!(g["active"], 0);
    server.cli(&["nodes", "accept", &id]);
    wait_until(
        "the accepted node to become active",
        Duration::from_secs(20),
        || (a.status()?["role"] == "active").then_some(()),
    );
    let b = Agent::new(dir.path(), "p2");
    let id_b = b.join(&server.url(), &token);
    server.cli(&["nodes", "reject", &id_b]);
    assert_eq!(server.node(&id_b)["status"], "rejected");
    let audit = server.cli_json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"node.accept") && actions.contains(&"node.reject"));

    // SIGTERM stops the server promptly even with a session open.
    let took = server.stop();
    assert!(
        took < Duration::from_secs(15),
        "server took {took:?} to stop"
    );
    wait_until(
        "the agent to see the server go",
        Duration::from_secs(20),
        || (a.status()?["connected"] == Value::Bool(false)).then_some(()),
    );
}

#[test]
fn guessing_join_secrets_is_slowed_and_audited_and_a_right_secret_still_joins() {
    flotilla_proto::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let guessed: flotilla_proto::token::JoinToken = server.token("pos", 5, &[]).parse().unwrap();
    let other: flotilla_proto::token::JoinToken = server.token("pos", 5, &[]).parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A burst of wrong secrets from one address: refused as wrong, then
        // refused unheard.
        let wrong = "x".repeat(other.secret.len());
        let (mut unauthenticated, mut slowed) = (0, 0);
        for _ in 0..40 {
            let e = enroll::enroll(&server, "127.0.0.1", &guessed, Some(&wrong), "guess")
                .await
                .map(|_| ())
                .unwrap_err();
            match e.code() {
                tonic::Code::Unauthenticated => unauthenticated += 1,
                tonic::Code::ResourceExhausted => {
                    assert!(e.message().contains("too many failed joins"), "{e}");
                    slowed += 1;
                }
                _ => panic!("{e}"),
            }
        }
        assert!(
            slowed > 0 && unauthenticated <= 12,
            "{unauthenticated} wrong, {slowed} slowed"
        );
        // The right secret of another token from another address joins at once.
        enroll::enroll(&server, "127.0.0.2", &other, None, "m-2")
            .await
            .map(|_| ())
            .unwrap();
        // From another address, a wrong secret for the guessed token is
        // answered "too many" (the token's allowance is used up)...
        let e = enroll::enroll(&server, "127.0.0.4", &guessed, Some(&wrong), "guess")
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(
            e.message().contains(&format!(
                "too many failed joins with join token {}",
                guessed.id
            )),
            "{e}"
        );
        // ...and its right secret joins at once: guessing at a token cannot
        // lock it out.
        enroll::enroll(&server, "127.0.0.3", &guessed, None, "m-3")
            .await
            .map(|_| ())
            .unwrap();
    });
    // Recorded: audited per source and interval with the count, not per guess.
    let audit = server.cli_json(&["audit"]);
    let failed: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "join.failed")
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    let actors: Vec<&str> = failed
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert!(actors.contains(&"source:127.0.0.1"), "{actors:?}");
    assert!(actors.contains(&"source:127.0.0.4"), "{actors:?}");
    assert!(failed.iter().all(|e| e["target"] == guessed.id.as_str()));
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert_eq!(
        log.matches("failed join").count(),
        2,
        "logged once per source, not per guess"
    );
}
