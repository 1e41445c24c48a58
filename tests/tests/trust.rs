//! Trust policy rotation end to end: real server, real agents, real CLI. A
//! rotation signed by the version before and by itself reaches every agent
//! (one that was away walks every version it missed); a badly signed one is
//! refused by the server, and one a tampered server offers is refused by the
//! agents.

use std::path::Path;
use std::time::Duration;

use flotilla_e2e::patch::{self, FleetOptions, Key, cli, key};
use flotilla_e2e::{Agent, Server, wait_until};

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `trust propose` of `keys` (threshold `threshold`) into `file`.
fn propose(server: &Server, file: &Path, keys: &[&Key], threshold: u32) {
    let t = threshold.to_string();
    let mut args = vec!["trust", "propose", "--out", arg(file), "--threshold", &t];
    for k in keys {
        args.extend(["--key", arg(&k.public)]);
    }
    let (ok, out, err) = cli(server, &args);
    assert!(ok, "propose: {out}{err}");
}

fn sign(server: &Server, file: &Path, by: &[&Key]) {
    for k in by {
        let (ok, out, err) = cli(
            server,
            &["trust", "sign", arg(file), "--key", arg(&k.secret)],
        );
        assert!(ok, "sign: {out}{err}");
    }
}

fn publish(server: &Server, file: &Path) -> (bool, String) {
    let (ok, out, err) = cli(server, &["trust", "publish", arg(file)]);
    (ok, format!("{out}{err}"))
}

/// Waits until each agent's status says it holds `version`.
fn wait_version(agents: &[&Agent], version: u64) {
    for a in agents {
        wait_until(
            &format!("{} on trust policy v{version}", a.name),
            Duration::from_secs(30),
            || {
                a.status()
                    .filter(|s| s["trust_version"] == version)
                    .map(|_| ())
            },
        );
    }
}

/// Publishes patch `id` signed by `by`; returns whether the server took it.
fn publish_patch(server: &Server, dir: &Path, id: &str, by: &[&Key]) -> (bool, String) {
    patch::publish_signed(server, dir, id, &format!("1.0.{}", id.len()), "", by)
}

#[test]
fn rotations_reach_every_agent_and_retire_the_old_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, c, k4) = (key(d, "a"), key(d, "b"), key(d, "c"), key(d, "d"));
    let (mut server, mut agents) = patch::fleet(
        d,
        FleetOptions {
            agents: 3,
            server_keys: &[&a, &b, &c],
            server_threshold: 2,
            pinned: &[&a, &b, &c],
            pin_threshold: 2,
            ..FleetOptions::default()
        },
    );
    // Keys pinned from files learn their version from the chain.
    wait_version(&agents.iter().collect::<Vec<_>>(), 1);
    let (ok, out) = publish_patch(&server, d, "p1", &[&a, &b]);
    assert!(ok, "{out}");
    let first = patch::wait_outcomes(&server, "p1", 3);
    assert!(first.iter().all(|o| o.1 == "committed"), "{first:?}");

    // The third host is away for both rotations.
    let away = agents[2].status().unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    agents[2].kill9();

    // v2 signed by one of v1's keys only (B; D is new): refused by the server.
    let bad = d.join("v2-bad.json");
    propose(&server, &bad, &[&b, &c, &k4], 2);
    sign(&server, &bad, &[&b, &k4]);
    let (ok, out) = publish(&server, &bad);
    assert!(!ok && out.contains("not signed by the keys of v1"), "{out}");

    // A patch signed by A and B is published under v1 and held by a closed
    // maintenance window until after the rotation that retires A.
    let window = format!("{} 03:00-04:00", flotilla_e2e::another_day());
    server.cli(&["group", "config", "store", "--window", &window]);
    let (ok, out) = patch::publish_signed(&server, d, "held", "1.0.3", "", &[&a, &b]);
    assert!(ok, "{out}");

    // v1 {A,B,C} 2-of-3 -> v2 {B,C,D} 2-of-3, signed by B, C (v1) and B, C, D (v2).
    let v2 = d.join("v2.json");
    propose(&server, &v2, &[&b, &c, &k4], 2);
    sign(&server, &v2, &[&b, &c, &k4]);
    let (ok, out) = publish(&server, &v2);
    assert!(ok && out.contains("v2"), "{out}");
    wait_version(&[&agents[0], &agents[1]], 2);

    // Released now, the held patch is refused by each agent: under v2 only
    // B's signature counts.
    server.cli(&["group", "config", "store", "--clear-windows"]);
    wait_until(
        "both agents to refuse the held patch",
        Duration::from_secs(60),
        || {
            let p = patch::phases(&server, "held");
            let refused = p
                .iter()
                .filter(|(_, ph, err)| ph == "rejected" && err.contains("trusted key"))
                .count();
            (refused == 2).then_some(())
        },
    );

    // A manifest signed by A+B was fine before; now the server refuses it.
    let (ok, out) = publish_patch(&server, d, "p22", &[&a, &b]);
    assert!(!ok && out.contains("manifest refused"), "{out}");

    // v3 {C,D} 2-of-2, signed by C and D (two of v2's, both of its own).
    let v3 = d.join("v3.json");
    propose(&server, &v3, &[&c, &k4], 2);
    sign(&server, &v3, &[&c, &k4]);
    let (ok, out) = publish(&server, &v3);
    assert!(ok, "{out}");
    wait_version(&[&agents[0], &agents[1]], 3);

    // The compliance report names the host still on v1.
    // (Agents tell the server what they hold at most every few seconds.)
    wait_until(
        "the report to name the host away",
        Duration::from_secs(30),
        || {
            let report = server.cli_json(&["report", "compliance"]);
            (report["trust_version"] == 3 && report["old_trust"] == serde_json::json!([away]))
                .then_some(())
        },
    );

    // Back, it walks v1 -> v2 -> v3 and takes a patch signed by the new keys.
    agents[2].start(&[server.url()]);
    wait_version(&[&agents[2]], 3);
    let (ok, out) = publish_patch(&server, d, "p333", &[&c, &k4]);
    assert!(ok, "{out}");
    let outcomes = patch::wait_outcomes(&server, "p333", 3);
    assert!(outcomes.iter().all(|o| o.1 == "committed"), "{outcomes:?}");
    wait_until("nodes show the version", Duration::from_secs(30), || {
        (server.node(&away)["facts"]["trust_version"] == 3).then_some(())
    });
    let shown = server.cli(&["trust", "show"]);
    assert!(shown.contains("trust policy v3"), "{shown}");

    // A tampered server offers a v4 signed by a key the fleet never trusted,
    // and a v1 that would bring back A: every agent stays on v3.
    let evil = key(d, "evil");
    server.stop();
    forge_policy(&server, 4, &[&evil], &[&evil]);
    server.start();
    for a in agents.iter_mut() {
        wait_until(
            &format!("{} refused the forged policy", a.name),
            Duration::from_secs(30),
            || {
                a.log_text()
                    .contains("a trust policy version was refused")
                    .then_some(())
            },
        );
        assert_eq!(a.status().unwrap()["trust_version"], 3);
    }
}

/// Writes a trust policy version straight into a stopped server's store, as
/// someone holding its database could.
fn forge_policy(server: &Server, version: u64, keys: &[&Key], by: &[&Key]) {
    let lines: Vec<String> = keys
        .iter()
        .map(|k| {
            let text = std::fs::read_to_string(&k.public).unwrap();
            text.lines().last().unwrap().trim().to_string()
        })
        .collect();
    let doc = flotilla_proto::trust::PolicyDoc {
        version,
        keys: lines,
        threshold: 1,
    };
    let file = server.data_dir.join(format!("forged-v{version}.json"));
    std::fs::write(&file, doc.to_bytes()).unwrap();
    let mut signatures = Vec::new();
    for k in by {
        let (ok, out, err) = cli(
            server,
            &["trust", "sign", arg(&file), "--key", arg(&k.secret)],
        );
        assert!(ok, "{out}{err}");
        let sig = std::fs::read_dir(&server.data_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.to_string_lossy()
                    .starts_with(&format!("{}.", file.display()))
                    && p.extension().is_some_and(|x| x == "minisig")
            })
            .unwrap();
        signatures.push(std::fs::read_to_string(&sig).unwrap());
        std::fs::remove_file(sig).unwrap();
    }
    let record = serde_json::json!({
        "version": version,
        "document": String::from_utf8(doc.to_bytes()).unwrap(),
        "signatures": signatures,
        "published_at": 0,
        "published_by": "forger",
    });
    let db = sled::open(server.data_dir.join("db")).expect("open the server's store");
    db.insert(
        format!("trust/policy/{version:020}"),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    db.flush().unwrap();
}

#[test]
fn a_host_joins_with_the_policy_its_token_pins() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = key(d, "k");
    let mut server = Server::init(d);
    server.start();
    server.cli(&["trust", "set", "--key", arg(&k.public)]);
    // Pinned by default once there is a policy.
    let token = server.token("store", 2, &["--label", "site=berlin"]);
    assert_eq!(token.split('.').count(), 5, "{token}");

    // No key file: the keys come from the server, checked against the token.
    let mut host = Agent::new(d, "host00").with_root();
    host.join(&server.url(), &token);
    host.start(&[server.url()]);
    wait_version(&[&host], 1);
    patch::roll_out(&server, d, &k, "p1", "1.0.0", 1);

    // A server whose policy is not the one the token pins: the join is refused
    // and nothing is kept on the host.
    let evil = key(d, "evil");
    server.stop();
    replace_root(&server, &evil);
    server.start();
    let other = Agent::new(d, "host01");
    let out = other.join_output(&server.url(), &token, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not the one the join token pins"), "{err}");
    assert!(other.status().is_none(), "no identity may be kept");
}

/// Replaces the stored first version's keys with `key`'s in a stopped server.
fn replace_root(server: &Server, key: &Key) {
    let line = std::fs::read_to_string(&key.public)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let db = sled::open(server.data_dir.join("db")).expect("open the server's store");
    let k = format!("trust/policy/{:020}", 1);
    let mut rec: serde_json::Value = serde_json::from_slice(&db.get(&k).unwrap().unwrap()).unwrap();
    let doc = flotilla_proto::trust::PolicyDoc {
        version: 1,
        keys: vec![line],
        threshold: 1,
    };
    rec["document"] = serde_json::Value::String(String::from_utf8(doc.to_bytes()).unwrap());
    db.insert(&k, serde_json::to_vec(&rec).unwrap()).unwrap();
    db.flush().unwrap();
}
