//! A node is its enrolled key, not its machine-id claim: a host that keeps its
//! state joins again as itself (keeping its journal and downgrade memory),
//! hosts cloned from one image get nodes of their own (or are refused while
//! the original is online), and a re-imaged host gets its node back once the
//! node is settled.

use std::time::Duration;

use flotilla_e2e::patch::{self, key};
use flotilla_e2e::{Agent, Server, wait_until};
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn joined_id(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("join --json output");
    v["node_id"].as_str().expect("node_id").to_string()
}

/// An agent with `name`'s machine id but a state directory of its own.
fn twin(dir: &std::path::Path, name: &str, state: &str) -> Agent {
    let mut a = Agent::new(dir, name);
    a.state_dir = dir.join(state);
    a.log = dir.join(format!("{state}.log"));
    a
}

#[test]
fn machine_ids_do_not_hand_a_node_to_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = Server::init(d);
    server
        .env
        .push(("FLOTILLA_CLONE_WINDOW".into(), "3s".into()));
    server.start();
    let url = server.url();
    let token = server.token("depot", 20, &[]);

    // The original host joins and is online.
    let mut host = Agent::new(d, "host");
    let id = host.join(&url, &token);
    host.start(std::slice::from_ref(&url));
    wait_until("the host online", Duration::from_secs(20), || {
        (host.status()?["connected"] == true).then_some(())
    });

    // A copy of its image (same machine id, another key) is refused while the
    // original is online, and the audit log says so.
    let clone = twin(d, "host", "clone");
    let out = clone.join_output(&url, &token, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is online with another key"),
        "{}",
        stderr(&out)
    );
    assert!(clone.status().is_none());
    assert_eq!(server.nodes().len(), 1);
    // With a token made for it, the copy gets a node of its own.
    let lenient = server.token("depot", 2, &["--new-node-for-clones"]);
    let copy = twin(d, "host", "copy");
    let copy_id = joined_id(&copy.join_output(&url, &lenient, &[]));
    assert_ne!(copy_id, id);
    assert!(host.is_running(), "the original keeps its node and session");

    // Two hosts of one image booting together: two nodes, never one.
    let a = twin(d, "twin", "twin-a");
    let b = twin(d, "twin", "twin-b");
    let ida = joined_id(&a.join_output(&url, &token, &[]));
    let idb = joined_id(&b.join_output(&url, &token, &[]));
    assert_ne!(ida, idb);

    let audit = server.cli_json(&["audit", "--limit", "200"]);
    let clones: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.clone")
        .collect();
    assert!(
        clones.iter().any(|e| e["detail"]["outcome"] == "refused")
            && clones.iter().any(|e| e["detail"]["outcome"] == "new node"),
        "{clones:?}"
    );

    // A host re-imaged (a fresh state directory, same machine id) gets its
    // node back once the node is offline and settled.
    let old = twin(d, "reimaged", "before");
    let old_id = joined_id(&old.join_output(&url, &token, &[]));
    // The clock is what is tested here: the node must be older than the window.
    std::thread::sleep(Duration::from_secs(4));
    let again = twin(d, "reimaged", "after");
    assert_eq!(joined_id(&again.join_output(&url, &token, &[])), old_id);
}

#[test]
fn a_host_joining_again_with_its_state_keeps_its_node_journal_and_downgrade_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = key(d, "k");
    let (server, mut agents) = patch::signed_fleet(d, &k, 1);
    let id = agents[0].status().unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    patch::roll_out(&server, d, &k, "v2", "2.0.0", 1);

    // Without --again, a joined state directory is not joined over.
    agents[0].kill9();
    let token = server.token("store", 2, &["--label", "site=berlin"]);
    let out = agents[0].join_output(&server.url(), &token, &[]);
    assert!(stderr(&out).contains("join --again"), "{}", stderr(&out));

    // With --again it proves its key and keeps its node.
    let out = agents[0].join_output(&server.url(), &token, &["--again"]);
    assert_eq!(joined_id(&out), id);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rejoined"], true);
    assert_eq!(server.nodes().len(), 1);
    agents[0].start(&[server.url()]);

    // Its journal is kept: an older version of the component is not applied.
    let (ok, out) = patch::publish_signed(&server, d, "v1", "1.0.0", "", &[&k]);
    assert!(ok, "{out}");
    let p = patch::wait_outcomes(&server, "v1", 1);
    assert_eq!(p[0].1, "superseded", "{p:?}");
    assert!(p[0].2.contains("2.0.0"), "{p:?}");

    // --again needs a state directory that holds a node.
    let stranger = twin(d, "stranger", "stranger");
    let out = stranger.join_output(&server.url(), &token, &["--again"]);
    assert!(stderr(&out).contains("holds no node"), "{}", stderr(&out));
}

/// Waits until the wall clock is past `unix` (what a certificate's expiry is).
fn wait_past(what: &str, unix: i64) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    wait_until(what, Duration::from_secs(60), || {
        (now() > unix).then_some(())
    });
}

fn cert_not_after(a: &Agent) -> i64 {
    a.status().unwrap()["cert_not_after"].as_i64().unwrap()
}

#[test]
fn a_host_back_after_its_certificate_expired_renews_with_its_key_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = key(d, "k");
    let (server, mut agents) = patch::fleet(
        d,
        patch::FleetOptions {
            agents: 2,
            server_keys: &[&k],
            pinned: &[&k],
            server_env: &[
                ("FLOTILLA_NODE_CERT_LIFETIME", "4s".into()),
                ("FLOTILLA_REENROLL_WITHIN", "8s".into()),
            ],
            ..patch::FleetOptions::default()
        },
    );
    let node = |a: &Agent| a.status().unwrap()["node_id"].as_str().unwrap().to_string();
    let (away_id, other_id) = (node(&agents[0]), node(&agents[1]));

    // Host 0 is away past its certificate's end; a patch is published meanwhile.
    agents[0].kill9();
    wait_past("host 0's certificate to expire", cert_not_after(&agents[0]));
    let (ok, out) = patch::publish_signed(&server, d, "p1", "1.0.0", "", &[&k]);
    assert!(ok, "{out}");

    // Back: it renews with its key alone (no token) and takes the patch.
    agents[0].start(&[server.url()]);
    let p = patch::wait_outcomes(&server, "p1", 2);
    assert!(p.iter().all(|o| o.1 == "committed"), "{p:?}");
    assert!(
        agents[0]
            .log_text()
            .contains("renewing it with the node's key")
    );
    assert_eq!(node(&agents[0]), away_id, "the same node");
    let audit = server.cli_json(&["audit", "--limit", "200"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "node.reenroll" && e["target"] == away_id.as_str()),
        "{audit}"
    );

    // Host 1 is away for longer than a node may renew by its key: refused,
    // told what to do, its journal kept.
    agents[1].kill9();
    let expired = cert_not_after(&agents[1]);
    // A patch that expires while it is away is "missed", not silently absent.
    let tar = d.join("brief.tar");
    patch::tar(&tar, &[("bin/tool", b"brief", 0o755)]);
    let spec = d.join("brief.toml");
    std::fs::write(
        &spec,
        format!(
            "id = \"brief\"\ncomponent = \"demo\"\nversion = \"1.1.0\"\nseverity = \"high\"\nexpires_in = \"6s\"\n[[artifacts]]\nname = \"payload.tar\"\npath = \"{}\"\n[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
            tar.display()
        ),
    )
    .unwrap();
    let manifest = patch::build(&server, &spec, &d.join("brief"));
    patch::sign(&server, &manifest, &k);
    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(ok, "{out}{err}");
    wait_past("past the reenroll window", expired + 9);
    let status = patch::status(&server, "brief");
    let missed = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == other_id.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(missed["phase"], "missed", "{status}");
    let report = server.cli_json(&["report", "compliance"]);
    let row = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == other_id.as_str())
        .cloned()
        .unwrap();
    assert!(
        row["missing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["patch_id"] == "brief" && m["expired"] == true),
        "{row}"
    );

    agents[1].start(&[server.url()]);
    let exit = wait_until("host 1 to give up", Duration::from_secs(30), || {
        agents[1].try_exit()
    });
    assert!(!exit.success());
    let log = agents[1].log_text();
    assert!(
        log.contains("longer than a node may renew with its key alone")
            && log.contains("join --again"),
        "{log}"
    );
}
