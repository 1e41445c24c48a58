//! The `flotilla-agent` binary against the in-process fake server: join, status
//! (flags and config file), run, and a graceful stop on SIGTERM.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{eventually, start, status};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla-agent");

async fn agent(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("FLOTILLA_AGENT_CONFIG")
        .env_remove("FLOTILLA_AGENT_STATE_DIR")
        .env_remove("FLOTILLA_AGENT_SERVERS")
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_status_run_and_stop_on_sigterm() {
    let (fake, url) = start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let token = fake.token.to_string();

    let out = agent(&[
        "join",
        "--server",
        &url,
        "--token",
        &token,
        "--label",
        "zone=eu-1",
        "--machine-id",
        "machine-1",
        "--state-dir",
        state_arg,
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let joined: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(joined["node_id"], "node-1");
    assert_eq!(joined["group"], "depots");
    assert_eq!(joined["role"], "active");
    assert_eq!(joined["rejoined"], false);

    let out = agent(&[
        "join",
        "--server",
        &url,
        "--token",
        &token,
        "--machine-id",
        "machine-1",
        "--state-dir",
        state_arg,
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already joined as node node-1"),
        "{}",
        text(&out.stderr)
    );

    // Status through a config file naming the state dir.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("state_dir = {:?}\n", state_arg)).unwrap();
    let out = agent(&["--config", config.to_str().unwrap(), "status", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "node_id",
        "group",
        "role",
        "desired_count",
        "unmanaged",
        "revision",
        "servers",
        "connected",
        "cert_serial",
        "cert_not_after",
        "renewals",
        "updated_at",
    ] {
        assert!(st.get(field).is_some(), "status.json lacks {field}: {st}");
    }
    assert_eq!(st["connected"], false);
    let out = agent(&["status", "--state-dir", state_arg]).await;
    assert!(
        text(&out.stdout).contains("node-1"),
        "{}",
        text(&out.stdout)
    );

    // A config file with an unknown key is refused.
    std::fs::write(&config, "stat_dir = \"/x\"\n").unwrap();
    let out = agent(&["--config", config.to_str().unwrap(), "status"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("stat_dir"),
        "{}",
        text(&out.stderr)
    );

    let mut run = tokio::process::Command::new(BIN)
        .args(["run", "--state-dir", state_arg, "--max-backoff", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(15, "connected", || {
        status(&state).is_some_and(|s| s.connected)
    })
    .await;
    let pid = run.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("agent exits on SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit {exit:?}");
    assert!(!status(&state).unwrap().connected);
}

#[tokio::test]
async fn errors_are_clear_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let state_arg = dir.path().to_str().unwrap();
    let out = agent(&["run", "--state-dir", state_arg]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not joined: run `flotilla-agent join` first"),
        "{}",
        text(&out.stderr)
    );
    let out = agent(&[
        "join",
        "--server",
        "https://127.0.0.1:1",
        "--token",
        "nope",
        "--state-dir",
        state_arg,
    ])
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("invalid join token"), "{err}");
    // Each cause once.
    assert_eq!(err.matches("must look like").count(), 1, "{err}");
}
