//! An idle agent does no work but its heartbeat: the binary, connected to the fake
//! server with nothing changing, must not wake up beyond its heartbeat timer.

mod common;

use std::time::Duration;

use common::{desired, eventually, start, status};
use flotilla_proto::pb;

/// Context switches (voluntary and not) per thread name of process `pid`.
fn switches(pid: u32) -> Vec<(String, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(text) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let count = text
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        threads.push((name, count));
    }
    threads
}

/// Switches of every thread of the agent. Its store (redb) runs no threads
/// of its own: nothing but the agent wakes.
fn agent_switches(pid: u32) -> u64 {
    switches(pid).iter().map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_wakes_only_for_its_heartbeat() {
    let (fake, url) = start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_flotilla-agent");
    let token = fake.token.to_string();
    let out = tokio::process::Command::new(bin)
        .args([
            "join",
            "--server",
            &url,
            "--token",
            &token,
            "--machine-id",
            "machine-1",
        ])
        .args(["--state-dir", s])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = tokio::process::Command::new(bin)
        .args(["run", "--state-dir", s])
        .env("FLOTILLA_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(15, "connected", || {
        status(&state).is_some_and(|s| s.connected)
    })
    .await;
    // Heartbeat once a second from now on.
    let mut msg = desired(1, pb::Role::Active);
    if let Ok(pb::ServerMessage {
        kind: Some(pb::server_message::Kind::Desired(d)),
    }) = &mut msg
    {
        d.heartbeat_interval_ms = 1000;
    }
    fake.push.send(msg).unwrap();
    eventually(5, "new state held", || {
        status(&state).is_some_and(|s| s.revision == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pid = run.id().unwrap();
    let before = agent_switches(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let woke = agent_switches(pid) - before;
    eprintln!("agent threads: {woke} context switches in 5 s");
    assert!(
        !switches(pid)
            .iter()
            .any(|(name, _)| name.starts_with("sled")),
        "a store thread runs: {:?}",
        switches(pid)
    );
    // About 5 heartbeats at two or three switches each (measured: 10 to 13); a busy
    // loop or a fast polling timer would show far more.
    assert!(
        woke <= 30,
        "agent threads switched {woke} times in 5 s idle: {:?}",
        switches(pid)
    );
    run.kill().await.unwrap();
}
