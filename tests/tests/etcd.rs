//! The server on the etcd store (cargo feature `etcd`): a whole fleet works
//! with its records in a real etcd, nothing in the data dir's database, the
//! records outlive a restart. Every server is registered as a replica of the
//! fleet; several serve it at once, one leads, and the others take over
//! when it dies.

use std::process::Command;
use std::time::Duration;

use flotilla_e2e::etcd::Etcd;
use flotilla_e2e::{
    Agent, Server, bin, free_addr, output_text as text, patch, replica_of, server_cmd, wait_until,
};

#[test]
fn a_fleet_runs_on_etcd_and_outlives_its_server() {
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

/// A second server made with `init --replica-of` from the first's CA bundle
/// serves the same fleet beside the first: agents on either are online on
/// both, one replica leads; when the leader dies, the other leads, the dead
/// one's agents (given both addresses) reconnect to it, and it rolls out.
#[test]
fn a_replica_made_from_the_ca_bundle_serves_beside_the_first_and_takes_over() {
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
    let token = first.token("store", 2, &[]);
    let mut second = Server::existing(&dir.path().join("second.log"), second_dir, &store);
    second.extra_args = first.extra_args.clone();
    second.addr = Some(free_addr());
    second.start();
    let mut agents = Vec::new();
    for (name, urls) in [
        ("a0", [first.url(), second.url()]),
        ("a1", [second.url(), first.url()]),
    ] {
        let mut agent = Agent::new(dir.path(), name).with_root();
        // Each joins through the replica it prefers.
        let joined = agent.join_output(
            &urls[0],
            &token,
            &["--trusted-key", k.public.to_str().unwrap()],
        );
        assert!(joined.status.success(), "{}", text(&joined));
        agent.start(&urls);
        agents.push(agent);
    }
    // Each replica holds one session; both see both nodes online.
    for s in [&first, &second] {
        wait_until(
            "both nodes online on each replica",
            Duration::from_secs(30),
            || {
                let n = s.nodes();
                (n.len() == 2 && n.iter().all(|n| n["online"] == true)).then_some(())
            },
        );
    }
    wait_until(
        "one leader, one session each",
        Duration::from_secs(30),
        || {
            let replicas = second.cli_json(&["replicas", "list"]);
            let r = replicas.as_array()?;
            let leaders = r.iter().filter(|r| r["leader"] == true).count();
            (r.len() == 2 && leaders == 1 && r.iter().all(|r| r["sessions"] == 1)).then_some(())
        },
    );
    // The first dies; the other leads and holds both sessions.
    first.kill9();
    wait_until(
        "the replica to lead with both sessions",
        Duration::from_secs(60),
        || {
            let replicas = second.cli_json(&["replicas", "list"]);
            let r = replicas.as_array()?;
            (r.len() == 1
                && r[0]["leader"] == true
                && r[0]["url"] == second.url()
                && r[0]["sessions"] == 2)
                .then_some(())
        },
    );
    wait_until(
        "both nodes online on the replica",
        Duration::from_secs(60),
        || {
            let n = second.nodes();
            (n.len() == 2 && n.iter().all(|n| n["online"] == true)).then_some(())
        },
    );
    patch::roll_out(&second, dir.path(), &k, "demo-2.0.0", "2.0.0", 2);
}

/// Artifacts on every replica: a publish on one replica is acknowledged once
/// a second holds its artifact; an agent whose replica never saw the
/// artifact gets it (fetched from a peer, digest checked) and commits; an
/// artifact no patch names is never fetched for an agent.
#[test]
fn an_artifact_published_on_one_replica_reaches_agents_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = etcd.store_args("/fleet/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let mut a = Server::init_with(dir.path(), &store);
    a.start();
    let mut others: Vec<Server> = ["b", "c"]
        .iter()
        .map(|n| replica_of(&a, dir.path(), &store, n))
        .collect();
    for s in &mut others {
        s.start();
    }
    wait_until("three replicas registered", Duration::from_secs(30), || {
        (a.cli_json(&["replicas", "list"]).as_array()?.len() == 3).then_some(())
    });
    let k = patch::key(dir.path(), "release");
    a.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);

    // Published on `a`: with three replicas, two hold the artifact when the
    // publish is acknowledged (the default copies), the third none.
    let id = "demo-2.0.0";
    let tar_path = dir.path().join("demo.tar");
    patch::tar(&tar_path, &[("bin/tool", b"2.0.0", 0o755)]);
    let spec = patch::files_spec(dir.path(), id, "2.0.0", &tar_path, "");
    let manifest = patch::build(&a, &spec, &dir.path().join(id));
    patch::sign(&a, &manifest, &k);
    let (ok, out, err) = patch::publish(&a, &manifest);
    assert!(ok, "{out}{err}");
    let holds = |s: &Server| {
        std::fs::read_dir(s.data_dir.join("artifacts"))
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().len() == 64)
    };
    assert!(holds(&a), "the publishing replica holds the artifact");
    let lacking: Vec<&Server> = others.iter().filter(|s| !holds(s)).collect();
    assert_eq!(lacking.len(), 1, "exactly one other replica holds it");
    let c = lacking[0];

    // An agent of the replica that never saw it joins there, is released
    // the patch, downloads it through that replica, and commits.
    let token = c.token("store", 1, &[]);
    let mut agent = Agent::new(dir.path(), "a0").with_root();
    let joined = agent.join_output(
        &c.url(),
        &token,
        &["--trusted-key", k.public.to_str().unwrap()],
    );
    assert!(joined.status.success(), "{}", text(&joined));
    agent.start(&[c.url()]);
    let outcomes = patch::wait_outcomes(c, id, 1);
    assert!(outcomes.iter().all(|o| o.1 == "committed"), "{outcomes:?}");
    assert!(holds(c), "the replica keeps the artifact it fetched");
    assert!(
        std::fs::read_to_string(&c.log)
            .unwrap()
            .contains("artifact fetched from a replica"),
        "the artifact came from a peer replica"
    );
}
