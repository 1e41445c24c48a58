//! Backup, restore and migration with real processes: a backup of a running
//! sled server taken while operators write restores into a server its agents
//! accept; a sled fleet moved into a real etcd goes on under a server there.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use flotilla_e2e::etcd::Etcd;
use flotilla_e2e::{Agent, Server, bin, output_text as text, patch, server_cmd, wait_until};

/// A fleet of `n` agents with a trusted key and one committed patch.
struct Fleet {
    server: Server,
    agents: Vec<Agent>,
    key: patch::Key,
}

fn fleet(dir: &Path, n: usize) -> Fleet {
    let mut server = Server::init(dir);
    server.start();
    let key = patch::key(dir, "release");
    server.cli(&["trust", "set", "--key", key.public.to_str().unwrap()]);
    let token = server.token("store", n as u32, &[]);
    let mut agents = Vec::new();
    for i in 0..n {
        let mut a = Agent::new(dir, &format!("a{i}")).with_root();
        let out = a.join_output(
            &server.url(),
            &token,
            &["--trusted-key", key.public.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out));
        a.start(&[server.url()]);
        agents.push(a);
    }
    patch::roll_out(&server, dir, &key, "demo-1.0.0", "1.0.0", n);
    Fleet {
        server,
        agents,
        key,
    }
}

#[test]
fn a_backup_of_a_running_server_under_writes_restores_to_a_server_its_agents_accept() {
    let dir = tempfile::tempdir().unwrap();
    let Fleet {
        mut server,
        agents,
        key,
    } = fleet(dir.path(), 2);
    // Operators keep writing while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU32::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        let cred = server.credential();
        let url = server.url();
        std::thread::spawn(move || {
            for i in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let out = Command::new(bin("flotilla"))
                    .args([
                        "group",
                        "set",
                        &format!("g{i}"),
                        "--create",
                        "--desired",
                        "1",
                    ])
                    .env("FLOTILLA_SERVER", &url)
                    .env("FLOTILLA_CREDENTIAL", &cred)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", text(&out));
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until("some writes", Duration::from_secs(30), || {
        (written.load(Ordering::Relaxed) >= 3).then_some(())
    });
    let backup = dir.path().join("fleet.backup");
    let out = server_cmd(
        &["backup"],
        &[("--data-dir", &server.data_dir), ("--out", &backup)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("records"), "{}", text(&out));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // The server ran on throughout and still answers.
    server.cli(&["nodes", "list"]);

    // Restoring refuses a data dir that is in use or not empty.
    let out = server_cmd(
        &["restore"],
        &[("--from", &backup), ("--data-dir", &server.data_dir)],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("not empty"), "{}", text(&out));

    let restored_dir = dir.path().join("restored");
    let out = server_cmd(
        &["restore"],
        &[("--from", &backup), ("--data-dir", &restored_dir)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("checked"), "{}", text(&out));

    // The restored server takes the old one's place: same address, same CA.
    let addr = server.addr;
    server.stop();
    let mut restored =
        Server::existing(&dir.path().join("restored.log"), restored_dir.clone(), &[]);
    restored.extra_args = server.extra_args.clone();
    std::fs::copy(server.credential(), restored_dir.join("admin.credential")).unwrap();
    restored.addr = addr;
    restored.start();
    let nodes = restored.nodes();
    assert_eq!(nodes.len(), agents.len());
    wait_until(
        "the agents back on the restored server",
        Duration::from_secs(60),
        || {
            restored
                .nodes()
                .iter()
                .all(|n| n["online"] == true)
                .then_some(())
        },
    );
    // The groups written before the backup began are there.
    assert_eq!(restored.group("g0")["desired"], 1);
    // And the fleet goes on: a new patch reaches every agent.
    patch::roll_out(
        &restored,
        dir.path(),
        &key,
        "demo-2.0.0",
        "2.0.0",
        agents.len(),
    );
    drop(agents);
}

#[test]
fn a_sled_fleet_migrated_into_etcd_goes_on_there() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let Fleet {
        mut server,
        agents,
        key,
    } = fleet(dir.path(), 2);
    let data_dir = server.data_dir.clone();
    let migrate = |prefix: &str| {
        Command::new(bin("flotilla-server"))
            .args(["migrate", "--from-data-dir"])
            .arg(&data_dir)
            .args(["--to-etcd", &etcd.url, "--etcd-prefix", prefix])
            .output()
            .unwrap()
    };
    // Not while its server runs.
    let out = migrate("/moved/");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("stop its server first"),
        "{}",
        text(&out)
    );

    server.stop();
    let out = migrate("/moved/");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("checked in etcd"), "{}", text(&out));
    // Not twice into the same prefix.
    let again = migrate("/moved/");
    assert!(!again.status.success());
    assert!(text(&again).contains("already holds"), "{}", text(&again));

    // The server on etcd, same data dir (CA, artifacts), same address.
    std::fs::rename(data_dir.join("db"), dir.path().join("old-sled-db")).unwrap();
    server.extra_args.extend(
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.url,
            "--etcd-prefix",
            "/moved/",
        ]
        .map(String::from),
    );
    server.start();
    assert!(
        !data_dir.join("db").exists(),
        "records went to the data dir"
    );
    wait_until(
        "the agents back on the server on etcd",
        Duration::from_secs(60),
        || {
            let nodes = server.nodes();
            (nodes.len() == agents.len() && nodes.iter().all(|n| n["online"] == true)).then_some(())
        },
    );
    let status = patch::status(&server, "demo-1.0.0");
    assert_eq!(status["counts"]["committed"], 2, "{status}");
    patch::roll_out(
        &server,
        dir.path(),
        &key,
        "demo-2.0.0",
        "2.0.0",
        agents.len(),
    );
}
