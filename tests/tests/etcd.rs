//! The server on the etcd store (cargo feature `etcd`): a whole fleet works
//! with its records in a real etcd, nothing in the data dir's database, the
//! records outlive a restart, and a second server on the same prefix is
//! refused. The server is registered as the fleet's replica and leads.

use std::process::Command;
use std::time::Duration;

use flotilla_e2e::etcd::Etcd;
use flotilla_e2e::{Agent, Server, bin, output_text as text, patch, server_cmd, wait_until};

#[test]
fn a_fleet_runs_on_etcd_and_one_server_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = etcd.store_args("/e2e/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
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
    patch::roll_out(&server, dir.path(), &k, "demo-2.0.0", "2.0.0", 1);

    // A second server on the same prefix is refused while this one lives.
    let out = Command::new(bin("flotilla-server"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .args(&store)
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

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A second server made with `init --replica-of` from the first's CA bundle
/// serves the same fleet: refused while the first holds it, it takes over
/// when the first dies, and the agents (given both addresses) accept it.
#[test]
fn a_replica_made_from_the_ca_bundle_takes_over_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = etcd.store_args("/fleet/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let mut first = Server::init_with(dir.path(), &store);
    first.start();
    let bundle = dir.path().join("ca.bundle");
    let out = server_cmd(
        &["export-ca"],
        &[("--data-dir", &first.data_dir), ("--out", &bundle)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let second_dir = dir.path().join("second");
    let replica_init = |prefix: &str, to: &std::path::Path| {
        let mut args = vec!["init", "--name", "127.0.0.1", "--replica-of"];
        let b = bundle.to_str().unwrap();
        args.push(b);
        args.extend(["--store", "etcd", "--etcd-endpoints", &etcd.url]);
        args.extend(["--etcd-prefix", prefix]);
        server_cmd(&args, &[("--data-dir", to)])
    };
    // Not onto a prefix that holds no fleet, nor with sled.
    let out = replica_init("/empty/", &dir.path().join("nowhere"));
    assert!(!out.status.success());
    assert!(text(&out).contains("holds no fleet"), "{}", text(&out));
    let out = server_cmd(
        &[
            "init",
            "--name",
            "127.0.0.1",
            "--replica-of",
            bundle.to_str().unwrap(),
        ],
        &[("--data-dir", &dir.path().join("sled-replica"))],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("shares its fleet's store"),
        "{}",
        text(&out)
    );
    // A server of another fleet is refused on this fleet's prefix.
    let other = Server::init(&dir.path().join("other-fleet-dir"));
    let out = Command::new(bin("flotilla-server"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&other.data_dir)
        .args(&store)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("is not the fleet's"), "{}", text(&out));

    let out = replica_init("/fleet/", &second_dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!second_dir.join("admin.credential").exists());
    assert_ne!(
        std::fs::read(second_dir.join("tls/server.pem")).unwrap(),
        std::fs::read(first.data_dir.join("tls/server.pem")).unwrap(),
        "the replica has a server certificate of its own"
    );
    // The operator's own credential works on every replica (one store).
    std::fs::copy(first.credential(), second_dir.join("admin.credential")).unwrap();

    let k = patch::key(dir.path(), "release");
    first.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);
    let token = first.token("store", 1, &[]);
    let mut second = Server::existing(&dir.path().join("second.log"), second_dir, &store);
    second.extra_args = first.extra_args.clone();
    second.addr = Some(free_addr());
    let mut agent = Agent::new(dir.path(), "a0").with_root();
    let joined = agent.join_output(
        &first.url(),
        &token,
        &["--trusted-key", k.public.to_str().unwrap()],
    );
    assert!(joined.status.success(), "{}", text(&joined));
    agent.start(&[first.url(), second.url()]);
    wait_until("the node online", Duration::from_secs(30), || {
        (first.nodes().first()?["online"] == true).then_some(())
    });
    // The first dies; the replica takes over once its hold has lapsed.
    first.kill9();
    second.start();
    wait_until(
        "the node online on the replica",
        Duration::from_secs(60),
        || {
            let n = second.nodes();
            (n.first()?["online"] == true).then_some(())
        },
    );
    wait_until("the replica to lead", Duration::from_secs(30), || {
        let replicas = second.cli_json(&["replicas", "list"]);
        replicas
            .as_array()?
            .iter()
            .any(|r| r["leader"] == true && r["url"] == second.url() && r["sessions"] == 1)
            .then_some(())
    });
    patch::roll_out(&second, dir.path(), &k, "demo-2.0.0", "2.0.0", 1);
}
