//! Three server replicas on a three-member etcd, with agents spread over
//! them, through the failures replicas are for: `kill -9` of the leading
//! replica mid-rollout, `kill -9` of an etcd member mid-rollout, and a leader
//! frozen (SIGSTOP) past its lease. Each rollout completes, every node
//! installs each patch exactly once (its install script counts its runs),
//! and the capacity guard holds throughout (never more nodes applying than
//! the group may lose). Also: joins racing on three replicas for one token,
//! and etcd unreachable for a while.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_e2e::etcd::{Etcd, EtcdCluster};
use flotilla_e2e::patch::{self, Key};
use flotilla_e2e::{Agent, Server, Watch, bin, replica_of, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const AGENTS: usize = 12;
/// The group may lose this many nodes to patching at once.
const MAX_UNAVAILABLE: u64 = 2;

/// `n` started replicas of one fleet on `store`: the first made by `init`,
/// the others from its CA bundle.
fn replicas_on(dir: &Path, store: &[&str], n: usize) -> Vec<Server> {
    let mut first = Server::init_with(dir, store);
    first.start();
    let mut replicas = vec![first];
    for i in 1..n {
        let mut r = replica_of(&replicas[0], dir, store, &format!("replica{i}"));
        r.start();
        replicas.push(r);
    }
    replicas
}

struct Fleet {
    replicas: Vec<Server>,
    agents: Vec<Agent>,
    key: Key,
}

impl Fleet {
    /// Three replicas on `store`, the first made by `init`, and AGENTS agents,
    /// agent i joined through replica i % 3 and preferring it.
    fn start(dir: &Path, store: &[&str]) -> Self {
        let replicas = replicas_on(dir, store, 3);
        wait_until("three replicas, one leading", T, || {
            let l = replicas[0].cli_json(&["replicas", "list"]);
            let l = l.as_array()?;
            (l.len() == 3 && l.iter().filter(|r| r["leader"] == true).count() == 1).then_some(())
        });
        let key = patch::key(dir, "release");
        let s = &replicas[0];
        s.cli(&["trust", "set", "--key", key.public.to_str().unwrap()]);
        let token = s.token("store", AGENTS as u32, &[]);
        let desired = AGENTS.to_string();
        let most = MAX_UNAVAILABLE.to_string();
        s.cli(&[
            "group",
            "set",
            "store",
            "--desired",
            &desired,
            "--max-unavailable",
            &most,
        ]);
        let urls: Vec<String> = replicas.iter().map(Server::url).collect();
        let mut agents = Vec::new();
        for i in 0..AGENTS {
            let mut a = Agent::new(dir, &format!("host{i:02}")).with_root();
            a.run_args.push("--allow-scripts".into());
            let mine: Vec<String> = (0..3).map(|k| urls[(i + k) % 3].clone()).collect();
            let out = a.join_output(
                &mine[0],
                &token,
                &["--trusted-key", key.public.to_str().unwrap()],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            a.start(&mine);
            agents.push(a);
        }
        for r in &replicas {
            wait_until("every agent online on each replica", T, || {
                (r.group("store")["online"] == AGENTS as u64).then_some(())
            });
        }
        Self {
            replicas,
            agents,
            key,
        }
    }

    /// The index of the replica that leads now, as `asked` sees it.
    fn leader(&self, asked: usize) -> usize {
        wait_until("a leader", T, || {
            let l = self.replicas[asked].cli_json(&["replicas", "list"]);
            let url = l.as_array()?.iter().find(|r| r["leader"] == true)?["url"]
                .as_str()?
                .to_string();
            self.replicas.iter().position(|r| r.url() == url)
        })
    }

    /// Builds, signs and publishes (through replica `via`) a patch whose
    /// install script appends its version to the host's `install.count`
    /// and whose health check takes a second; returns a watch of its rollout
    /// from replica `watch`.
    fn publish(&self, dir: &Path, via: usize, watch: usize, version: &str) -> (String, Watch) {
        let id = format!("demo-{version}");
        let script = dir.join(format!("install-{version}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nmkdir -p \"$FLOTILLA_ROOT/opt/demo\"\necho {version} >> \"$FLOTILLA_ROOT/opt/demo/install.count\"\n"
            ),
        )
        .unwrap();
        let spec = dir.join(format!("{id}.toml"));
        std::fs::write(
            &spec,
            format!(
                "id = \"{id}\"\ncomponent = \"demo\"\nversion = \"{version}\"\nseverity = \"critical\"\nexpires_in = \"30d\"\n\
                 [[artifacts]]\nname = \"install.sh\"\npath = \"{}\"\n\
                 [install]\ntype = \"script\"\nartifact = \"install.sh\"\ntimeout_secs = 60\n\
                 [health_check]\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1\"]\nretries = 1\ninterval_secs = 1\n",
                script.display()
            ),
        )
        .unwrap();
        let server = &self.replicas[via];
        let manifest = patch::build(server, &spec, &dir.join(&id));
        patch::sign(server, &manifest, &self.key);
        let (ok, out, err) = patch::cli(
            server,
            &[
                "patch",
                "publish",
                manifest.to_str().unwrap(),
                "--waves",
                "1,100%",
            ],
        );
        assert!(ok, "publish failed: {out}{err}");
        let w = Watch::rollout(&self.replicas[watch], dir, &id);
        (id, w)
    }

    /// Waits until `n` nodes committed patch `id`, as replica `asked` sees it.
    fn wait_committed(&self, asked: usize, id: &str, n: usize) {
        wait_until(&format!("{n} nodes to commit {id}"), T, || {
            let committed = patch::phases(&self.replicas[asked], id)
                .iter()
                .filter(|p| p.1 == "committed")
                .count();
            (committed >= n).then_some(())
        });
    }

    /// The rollout of `id` completed with every node committed, each host ran
    /// its install exactly once, and the watch never saw more nodes applying
    /// than the group may lose.
    fn check_done(&self, asked: usize, id: &str, version: &str, w: &Watch) {
        wait_until(&format!("rollout {id} to complete"), T, || {
            let r = self.replicas[asked].cli_json(&["rollout", "show", id]);
            (r["state"] == "completed").then_some(())
        });
        let outcomes = patch::wait_outcomes(&self.replicas[asked], id, AGENTS);
        assert!(outcomes.iter().all(|o| o.1 == "committed"), "{outcomes:?}");
        for a in &self.agents {
            let runs = std::fs::read_to_string(a.root().join("opt/demo/install.count"))
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == version)
                .count();
            assert_eq!(runs, 1, "{} installed {version} {runs} times", a.name);
        }
        let events = w.events();
        assert!(!events.is_empty(), "the watch saw the rollout");
        let most = events
            .iter()
            .flat_map(|e| e["groups"].as_array().cloned().unwrap_or_default())
            .map(|g| g["applying"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0);
        assert!(most <= MAX_UNAVAILABLE, "{most} nodes applying at once");
    }
}

fn elapsed_since(t: Instant) -> String {
    format!("{:.1} s", t.elapsed().as_secs_f64())
}

#[test]
fn rollouts_complete_through_a_dead_leader_a_dead_etcd_member_and_a_frozen_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(dir.path(), 3);
    let store = etcd.store_args("/fleet/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let mut fleet = Fleet::start(dir.path(), &store);

    // 1. The leading replica is killed mid-rollout.
    let leader = fleet.leader(0);
    let other = (leader + 1) % 3;
    let (id, w) = fleet.publish(dir.path(), leader, other, "2.0.0");
    fleet.wait_committed(other, &id, 3);
    let killed = Instant::now();
    fleet.replicas[leader].kill9();
    let new_leader = wait_until("another replica to lead", T, || {
        let l = fleet.leader(other);
        (l != leader).then_some(l)
    });
    eprintln!("a new leader after {}", elapsed_since(killed));
    let alive: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in &alive {
        wait_until("every agent back online", T, || {
            (fleet.replicas[*i].group("store")["online"] == AGENTS as u64).then_some(())
        });
    }
    eprintln!("every agent back after {}", elapsed_since(killed));
    fleet.check_done(other, &id, "2.0.0", &w);
    eprintln!(
        "rollout 1 completed {} after the kill",
        elapsed_since(killed)
    );

    // 2. An etcd member is killed mid-rollout.
    let (id, w) = fleet.publish(dir.path(), new_leader, other, "3.0.0");
    fleet.wait_committed(other, &id, 3);
    etcd.kill9(0);
    fleet.check_done(other, &id, "3.0.0", &w);

    // 3. The leader is frozen past its lease: another takes over; thawed, the
    //    old one's writes are refused (fenced), so nothing is released twice.
    let leader = fleet.leader(alive[0]);
    let other = *alive.iter().find(|i| **i != leader).unwrap();
    let (id, w) = fleet.publish(dir.path(), leader, other, "4.0.0");
    fleet.wait_committed(other, &id, 3);
    let frozen = Instant::now();
    fleet.replicas[leader].freeze();
    wait_until("the other replica to lead", T, || {
        (fleet.leader(other) == other).then_some(())
    });
    eprintln!("the frozen leader replaced after {}", elapsed_since(frozen));
    fleet.replicas[leader].thaw();
    fleet.check_done(other, &id, "4.0.0", &w);
}

/// One `flotilla-agent join` process, started.
fn spawn_join(dir: &Path, name: &str, url: &str, token: &str) -> std::process::Child {
    std::process::Command::new(bin("flotilla-agent"))
        .args(["join", "--json", "--server", url, "--token", token])
        .args(["--machine-id", &format!("machine-{name}")])
        .arg("--state-dir")
        .arg(dir.join(name))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start flotilla-agent join")
}

#[test]
fn joins_racing_on_three_replicas_use_a_token_exactly_as_often_as_it_allows() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = etcd.store_args("/fleet/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let replicas = replicas_on(dir.path(), &store, 3);
    let token = replicas[0].token("store", 5, &[]);
    let joins: Vec<std::process::Child> = (0..10)
        .map(|i| spawn_join(dir.path(), &format!("j{i}"), &replicas[i % 3].url(), &token))
        .collect();
    let ok = joins
        .into_iter()
        .map(|mut c| c.wait().expect("join ends"))
        .filter(|s| s.success())
        .count();
    assert_eq!(ok, 5, "exactly the token's 5 uses succeed");
    let tokens: Value = replicas[1].cli_json(&["token", "list"]);
    assert_eq!(tokens[0]["uses"], 5, "{tokens}");
    assert_eq!(replicas[2].nodes().len(), 5);
}

#[test]
fn etcd_unreachable_for_a_while_fails_writes_clearly_and_everything_converges_after() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let store = etcd.store_args("/fleet/");
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let replicas = replicas_on(dir.path(), &store, 2);
    let (first, second) = (&replicas[0], &replicas[1]);
    let token = first.token("store", 2, &[]);
    first.cli(&["group", "set", "store", "--desired", "2"]);
    let urls = [first.url(), second.url()];
    let mut agents = Vec::new();
    for i in 0..2 {
        let mut a = Agent::new(dir.path(), &format!("host{i}"));
        let mine = [urls[i].clone(), urls[1 - i].clone()];
        a.join(&mine[0], &token);
        a.start(&mine);
        agents.push(a);
    }
    for s in [first, second] {
        wait_until("both online", T, || {
            (s.group("store")["online"] == 2).then_some(())
        });
    }
    let desired = |a: &Agent| a.status().and_then(|s| s["desired_count"].as_u64());
    wait_until("agents hold the desired count", T, || {
        agents.iter().all(|a| desired(a) == Some(2)).then_some(())
    });

    etcd.freeze();
    // An operator's change fails, naming the store; nothing of it is applied.
    let out = first.cli_as(
        &first.credential(),
        &["group", "set", "store", "--desired", "1"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store"), "{err}");
    // The agents keep their sessions and their last desired state.
    for a in &agents {
        let s = a.status().unwrap();
        assert_eq!(s["connected"], true, "{s}");
        assert_eq!(s["desired_count"], 2, "{s}");
    }
    etcd.thaw();
    // Once etcd answers, the change goes through and reaches every agent.
    wait_until("the store to answer again", T, || {
        first
            .cli_as(
                &first.credential(),
                &["group", "set", "store", "--desired", "1"],
            )
            .status
            .success()
            .then_some(())
    });
    wait_until("every agent to hear the new count", T, || {
        agents.iter().all(|a| desired(a) == Some(1)).then_some(())
    });
    for s in [first, second] {
        wait_until("both online on each replica", T, || {
            (s.group("store")["online"] == 2).then_some(())
        });
    }
    assert_eq!(second.group("store")["desired"], 1);
}
