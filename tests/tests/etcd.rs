//! The server on the etcd store (cargo feature `etcd`): a whole fleet works
//! with its records in a real etcd, nothing in the data dir's database, the
//! records outlive a restart, and a second server on the same prefix is
//! refused. The server is registered as the fleet's replica and leads.

use std::process::Command;
use std::time::Duration;

use flotilla_e2e::etcd::Etcd;
use flotilla_e2e::{Agent, Server, bin, patch, wait_until};

#[test]
fn a_fleet_runs_on_etcd_and_one_server_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.url,
        "--etcd-prefix",
        "/e2e/",
    ];
    let mut server = Server::init_with(dir.path(), &store);
    server.start();
    assert!(
        !server.data_dir.join("db").exists(),
        "records went to the data dir"
    );
    let k = patch::key(dir.path(), "release");
    server.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);
    let token = server.token("store", 2, &[]);
    let mut agent = Agent::new(dir.path(), "a0").with_root();
    let out = agent.join_output(
        &server.url(),
        &token,
        &["--trusted-key", k.public.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let joined: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = joined["node_id"].as_str().unwrap().to_string();
    agent.start(&[server.url()]);
    // The server is the fleet's one replica: it leads, and holds the session.
    wait_until(
        "the replica to lead with one session",
        Duration::from_secs(30),
        || {
            let replicas = server.cli_json(&["replicas", "list"]);
            let r = replicas.as_array()?;
            (r.len() == 1 && r[0]["leader"] == true && r[0]["sessions"] == 1).then_some(())
        },
    );
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("bin/tool", b"v2\n", 0o755)]);
    let spec = patch::files_spec(dir.path(), "demo-2.0.0", "2.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("demo-2.0.0"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let outcome = patch::wait_outcomes(&server, "demo-2.0.0", 1);
    assert_eq!(outcome[0].1, "committed", "{outcome:?}");

    // A second server on the same prefix is refused while this one lives.
    let out = Command::new(bin("flotilla-server"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .args(store)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs on etcd prefix /e2e/"), "{err}");

    // Restarted, the server has everything from etcd, and leads again (its
    // old registration and leader key went with its lease at the stop).
    server.stop();
    server.start();
    wait_until(
        "the restarted replica to lead",
        Duration::from_secs(30),
        || {
            let replicas = server.cli_json(&["replicas", "list"]);
            let r = replicas.as_array()?;
            (r.len() == 1 && r[0]["leader"] == true).then_some(())
        },
    );
    wait_until("the node back online", Duration::from_secs(30), || {
        (server.node(&id)["online"] == true).then_some(())
    });
    assert_eq!(server.node(&id)["installed"]["demo"], "2.0.0");
    let status = patch::status(&server, "demo-2.0.0");
    assert_eq!(status["counts"]["committed"], 1, "{status}");
}
