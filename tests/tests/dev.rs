//! `flotilla dev`, the README's first command: a server and agents come up, answer
//! the CLI and on the dashboard it prints, and all stop on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_e2e::web::Dashboard;
use flotilla_e2e::{bin, wait_until};

#[test]
fn dev_fleet_starts_answers_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let fleet_dir = dir.path().join("fleet");
    let mut dev = Command::new(bin("flotilla"))
        .args(["dev", "--agents", "2", "--dir"])
        .arg(&fleet_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = dev.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let url = wait_until("the dev fleet to come up", Duration::from_secs(60), || {
        while let Ok(line) = rx.try_recv() {
            printed.push(line);
        }
        assert!(
            dev.try_wait().unwrap().is_none(),
            "flotilla dev exited: {printed:?}"
        );
        printed
            .iter()
            .any(|l| l.contains("Ctrl-C stops everything"))
            .then(|| {
                printed
                    .iter()
                    .find_map(|l| l.trim().strip_prefix("export FLOTILLA_SERVER="))
                    .unwrap()
                    .to_string()
            })
    });
    // The signed demo patch reached every agent.
    assert!(
        printed
            .iter()
            .any(|l| l.contains("every agent committed the demo patch")),
        "{printed:?}"
    );
    for i in 1..=2 {
        let version = fleet_dir.join(format!("agent-{i}-root/opt/flotilla-demo/VERSION"));
        assert_eq!(std::fs::read_to_string(version).unwrap(), "1.0.0\n");
    }
    let credential = fleet_dir.join("server/admin.credential");
    // The dashboard it printed answers, and the printed credential signs in.
    let web = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("dashboard:      https://"))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no dashboard URL in {printed:?}"));
    let ca = std::fs::read_to_string(fleet_dir.join("server/tls/ca.pem")).unwrap();
    let web = Dashboard::at(web.parse().unwrap(), &ca);
    let (session, _) = web.sign_in(&credential);
    let home = web.get("/", Some(&session));
    assert!(
        home.body.contains("Fleet overview") && home.body.contains(">dev<"),
        "{}",
        home.body
    );
    let out = Command::new(bin("flotilla"))
        .args(["nodes", "list", "--json"])
        .env("FLOTILLA_SERVER", &url)
        .env("FLOTILLA_CREDENTIAL", &credential)
        .output()
        .unwrap();
    assert!(out.status.success());
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes
            .iter()
            .all(|n| n["online"] == true && n["group"] == "dev")
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_until("flotilla dev to stop", Duration::from_secs(30), || {
        dev.try_wait().unwrap()
    });
    assert!(status.success());
    // Everything it started is gone: the server no longer answers, and each
    // agent recorded that it disconnected.
    let out = Command::new(bin("flotilla"))
        .args(["group", "list"])
        .env("FLOTILLA_SERVER", &url)
        .env("FLOTILLA_CREDENTIAL", &credential)
        .output()
        .unwrap();
    assert!(!out.status.success());
    for i in 1..=2 {
        let status =
            std::fs::read_to_string(fleet_dir.join(format!("agent-{i}/status.json"))).unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["connected"], false);
    }
}
