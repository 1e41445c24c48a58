//! Desired counts, active and standby roles, deficit, failover, and what a server
//! restart or a mass loss must not do.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_e2e::{
    Agent, OFFLINE_GRACE, Server, Watch, role_hook, wait_until, wait_until_or_none,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn start_agent(server: &Server, dir: &Path, name: &str, token: &str) -> (Agent, String) {
    let mut a = Agent::new(dir, name);
    let hook_log = dir.join(format!("{name}-roles.log"));
    a.role_hook = Some(role_hook(dir, name, &hook_log));
    let id = a.join(&server.url(), token);
    a.start(&[server.url()]);
    (a, id)
}

fn wait_group(server: &Server, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, T, || {
        let g = server.group(name);
        f(&g).then_some(g)
    })
}

fn roles(server: &Server) -> BTreeMap<String, String> {
    server
        .nodes()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                n["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn desired_count_deficit_and_failover() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token = server.token("store-eu", 10, &[]);
    let watch = Watch::start(&server, dir.path(), "store-eu");

    let mut agents: Vec<(Agent, String)> = (0..3)
        .map(|i| start_agent(&server, dir.path(), &format!("n{i}"), &token))
        .collect();
    wait_group(&server, "store-eu", "3 nodes online", |g| g["online"] == 3);

    server.cli(&["group", "set", "store-eu", "--desired", "5"]);
    let g = wait_group(&server, "store-eu", "deficit 2", |g| g["deficit"] == 2);
    assert_eq!(g["healthy_active"], 3);
    for (a, _) in &agents {
        wait_until("the agent to see desired = 5", T, || {
            (a.status()?["desired_count"] == 5).then_some(())
        });
    }

    for i in 3..5 {
        agents.push(start_agent(&server, dir.path(), &format!("n{i}"), &token));
    }
    wait_group(&server, "store-eu", "deficit 0", |g| {
        g["deficit"] == 0 && g["healthy_active"] == 5
    });

    // A sixth node is beyond the desired count: standby.
    let (sixth, sixth_id) = start_agent(&server, dir.path(), "n5", &token);
    wait_until("the sixth node to stand by", T, || {
        (sixth.status()?["role"] == "standby").then_some(())
    });
    assert_eq!(server.node(&sixth_id)["role"], "standby");
    wait_group(&server, "store-eu", "1 standby", |g| g["standby"] == 1);

    // Lose an active node: after the grace period the standby takes over.
    let killed_at = Instant::now();
    agents[0].0.kill9();
    let lost_id = agents[0].1.clone();
    wait_group(&server, "store-eu", "the loss to show as deficit 1", |g| {
        g["deficit"] == 1
    });
    wait_until("the standby to be promoted", T, || {
        (sixth.status()?["role"] == "active").then_some(())
    });
    let promoted_after = killed_at.elapsed();
    assert!(
        promoted_after >= OFFLINE_GRACE,
        "promoted after {promoted_after:?}, before the grace period"
    );
    let hook_log = dir.path().join("n5-roles.log");
    wait_until("the role hook to run", T, || {
        std::fs::read_to_string(&hook_log)
            .ok()?
            .lines()
            .any(|l| l.starts_with("active standby"))
            .then_some(())
    });
    assert_eq!(server.node(&sixth_id)["role"], "active");
    assert_eq!(server.node(&lost_id)["role"], "standby");
    wait_group(&server, "store-eu", "deficit 0 again", |g| {
        g["deficit"] == 0
    });

    // `group watch` printed each change along the way.
    let events = watch.events();
    let deficits: Vec<u64> = events
        .iter()
        .map(|e| e["deficit"].as_u64().unwrap())
        .collect();
    for want in [2, 0, 1] {
        assert!(deficits.contains(&want), "watch saw deficits {deficits:?}");
    }
    assert!(events.iter().any(|e| e["standby"] == 1));
    assert!(events.iter().all(|e| e["name"] == "store-eu"));
}

#[test]
fn restart_keeps_state_and_does_not_promote_early() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token = server.token("depot", 5, &[]);
    server.cli(&["group", "set", "depot", "--desired", "2"]);
    let mut agents: Vec<(Agent, String)> = (0..3)
        .map(|i| start_agent(&server, dir.path(), &format!("d{i}"), &token))
        .collect();
    wait_group(&server, "depot", "2 active, 1 standby", |g| {
        g["healthy_active"] == 2 && g["standby"] == 1 && g["online"] == 3
    });
    let before_roles = roles(&server);
    let before_tokens = server.cli_json(&["token", "list"]);
    let before_audit = server.cli_json(&["audit"]);

    // Down for longer than the offline grace, then back.
    server.kill9();
    let down = Instant::now();
    for (a, _) in &agents {
        wait_until("the agent to notice", T, || {
            (a.status()?["connected"] == false).then_some(())
        });
    }
    wait_until("the outage to outlast the grace period", T, || {
        (down.elapsed() > OFFLINE_GRACE + Duration::from_secs(1)).then_some(())
    });
    server.start();
    let back = Instant::now();
    wait_group(&server, "depot", "all agents back by themselves", |g| {
        g["online"] == 3
    });
    eprintln!(
        "all 3 agents reconnected {:?} after the restart",
        back.elapsed()
    );

    assert_eq!(server.cli_json(&["token", "list"]), before_tokens);
    let after_audit = server.cli_json(&["audit"]);
    assert_eq!(
        after_audit.as_array().unwrap()[..before_audit.as_array().unwrap().len()],
        before_audit.as_array().unwrap()[..]
    );
    assert_eq!(server.group("depot")["desired"], 2);
    // Nobody was declared lost while agents were reconnecting.
    wait_until("startup grace and offline grace to pass", T, || {
        (back.elapsed() > Duration::from_secs(6) + OFFLINE_GRACE).then_some(())
    });
    assert_eq!(roles(&server), before_roles);

    // Most of the group vanishes at once (a partition): no mass promotion.
    let standby = agents
        .iter()
        .position(|(_, id)| before_roles[id] == "standby")
        .unwrap();
    for (i, (a, _)) in agents.iter_mut().enumerate() {
        if i != standby {
            a.kill9();
        }
    }
    wait_group(&server, "depot", "two nodes offline", |g| g["online"] == 1);
    let cut = Instant::now();
    wait_until("well past the grace period", T, || {
        (cut.elapsed() > OFFLINE_GRACE * 2).then_some(())
    });
    assert_eq!(
        server.node(&agents[standby].1)["role"],
        "standby",
        "a mass loss must not promote the remaining node"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("not replacing lost active nodes yet"),
        "server explains the hold"
    );
}

#[test]
fn agent_notices_a_server_that_stops_answering() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let token = server.token("depot", 1, &[]);
    let (mut agent, _) = start_agent(&server, dir.path(), "quiet", &token);
    wait_until("the agent to learn the heartbeat interval", T, || {
        (agent.status()?["revision"].as_u64()? > 0).then_some(())
    });
    // Restarted, it sizes its pings from the server's (short) heartbeat interval.
    agent.kill9();
    // The killed process could not record that it disconnected.
    std::fs::remove_file(agent.state_dir.join("status.json")).unwrap();
    agent.start(&[server.url()]);
    wait_until("the restarted agent to connect", T, || {
        (agent.status()?["connected"] == true).then_some(())
    });
    // Frozen, the server's kernel still holds the connection open: only the
    // agent's HTTP/2 pings can tell it nobody answers.
    let pid = Pid::from_raw(server.pid().expect("server running") as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let noticed = wait_until_or_none(T, || (agent.status()?["connected"] == false).then_some(()));
    kill(pid, Signal::SIGCONT).unwrap();
    assert!(
        noticed.is_some(),
        "the agent never noticed the silent server"
    );
    eprintln!("a silent server was noticed after {:?}", frozen.elapsed());
    wait_until(
        "the agent to reconnect once the server answers again",
        T,
        || (agent.status()?["connected"] == true).then_some(()),
    );
}

/// Established TCP connections from `local` (an IPv4 address) to `port` on
/// 127.0.0.1, from the kernel's table (addresses in network order, hex).
fn connections_from(local: [u8; 4], port: u16) -> usize {
    let hex = |a: [u8; 4]| format!("{:08X}", u32::from_le_bytes(a));
    let from = format!("{}:", hex(local));
    let to = format!("{}:{port:04X}", hex([127, 0, 0, 1]));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].starts_with(&from) && f[2] == to && f[3] == "01"
        })
        .count()
}

#[test]
fn agent_connects_from_the_source_address_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let token = server.token("depot", 1, &[]);
    let mut agent = Agent::new(dir.path(), "multi-homed");
    agent.join(&server.url(), &token);
    agent
        .run_args
        .extend(["--source-address".to_string(), "127.0.0.2".to_string()]);
    agent.start(&[server.url()]);
    wait_group(&server, "depot", "the node online", |g| g["online"] == 1);
    wait_until("the session's connection from 127.0.0.2", T, || {
        (connections_from([127, 0, 0, 2], port) >= 1).then_some(())
    });
    assert_eq!(
        connections_from([127, 0, 0, 1], port),
        0,
        "no connection to the server left from the default address"
    );
}
