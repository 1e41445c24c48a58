//! Rollouts end to end: waves and bake time, a failing canary that pauses,
//! the capacity guard, emergencies against maintenance windows, convergence of
//! late and returning nodes, abort with rollback, and the compliance report —
//! real server, real agents, real TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_e2e::patch::{self, FleetOptions, Key};
use flotilla_e2e::{Agent, Server, Watch, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn fleet(dir: &Path, k: &Key, n: usize, sites: &[&str]) -> (Server, Vec<Agent>) {
    patch::fleet(
        dir,
        FleetOptions {
            agents: n,
            server_keys: &[k],
            pinned: &[k],
            run_args: &["--allow-scripts"],
            sites,
            ..FleetOptions::default()
        },
    )
}

/// Builds and signs a critical files patch of `component` at `version`, with
/// `extra` (tables: health check, rollback) appended to its spec.
fn make_patch(
    server: &Server,
    dir: &Path,
    k: &Key,
    id: &str,
    component: &str,
    version: &str,
    extra: &str,
) -> PathBuf {
    make_patch_with(
        server,
        dir,
        k,
        id,
        (component, version, "critical"),
        "",
        extra,
    )
}

/// As [`make_patch`], with a severity and `top` (plain keys such as
/// `issued_at`) placed before the spec's tables.
fn make_patch_with(
    server: &Server,
    dir: &Path,
    k: &Key,
    id: &str,
    (component, version, severity): (&str, &str, &str),
    top: &str,
    extra: &str,
) -> PathBuf {
    let artifact = dir.join(format!("{id}.tar"));
    let body = format!("#!/bin/sh\necho {component} {version}\n");
    patch::tar(&artifact, &[("bin/tool", body.as_bytes(), 0o755)]);
    let spec = patch::files_spec(dir, id, version, &artifact, extra);
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            "component = \"demo\"",
            &format!("component = \"{component}\"\n{top}"),
        )
        .replace(
            "severity = \"critical\"",
            &format!("severity = \"{severity}\""),
        )
        .replace("/opt/demo", &format!("/opt/{component}"));
    std::fs::write(&spec, text).unwrap();
    let manifest = patch::build(server, &spec, &dir.join(id));
    patch::sign(server, &manifest, k);
    manifest
}

fn check(cmd: &str) -> String {
    format!(
        "[health_check]\ncommand = [\"/bin/sh\", \"-c\", {}]\nretries = 1\ninterval_secs = 1\n",
        serde_json::to_string(cmd).unwrap()
    )
}

fn publish(server: &Server, manifest: &Path, args: &[&str]) -> String {
    let mut all = vec!["patch", "publish", manifest.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, out, err) = patch::cli(server, &all);
    assert!(ok, "publish failed: {err}");
    out
}

fn rollout(server: &Server, id: &str) -> Value {
    server.cli_json(&["rollout", "show", id])
}

fn wait_state(server: &Server, id: &str, state: &str) -> Value {
    wait_until(&format!("rollout {id} {state}"), T, || {
        let r = rollout(server, id);
        (r["state"] == state).then_some(r)
    })
}

/// node id -> (phase, first report ms, last report ms)
fn nodes(server: &Server, id: &str) -> Vec<(String, String, i64, i64)> {
    patch::status(server, id)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_string(),
                n["phase"].as_str().unwrap().to_string(),
                n["first_at_ms"].as_i64().unwrap_or(0),
                n["updated_at_ms"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

fn count(server: &Server, id: &str, phase: &str) -> usize {
    nodes(server, id).iter().filter(|n| n.1 == phase).count()
}

fn node_id(a: &Agent) -> String {
    a.status().unwrap()["node_id"].as_str().unwrap().to_string()
}

#[test]
fn waves_start_with_the_canary_and_wait_for_health_and_bake() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, _agents) = fleet(dir.path(), &k, 20, &[]);
    let m = make_patch(
        &server,
        dir.path(),
        &k,
        "w-2.0.0",
        "demo",
        "2.0.0",
        &check("true"),
    );
    publish(&server, &m, &["--waves", "1,25%,100%", "--bake", "2s"]);
    let r = wait_state(&server, "w-2.0.0", "completed");
    let g = &r["groups"][0];
    let waves: Vec<(i64, i64, i64)> = g["waves_progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["size"].as_i64().unwrap(),
                w["started_at_ms"].as_i64().unwrap(),
                w["done_at_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut ns = nodes(&server, "w-2.0.0");
    ns.sort_by_key(|n| n.2);
    let t0 = waves[0].1;
    eprintln!("timeline (ms after the canary started):");
    for (i, (size, start, done)) in waves.iter().enumerate() {
        eprintln!(
            "  wave {}: {size} node(s) in all, started +{}, finished +{}",
            i + 1,
            start - t0,
            done - t0
        );
    }
    for (id, phase, first, last) in &ns {
        eprintln!("  {id}: received +{}, {phase} +{}", first - t0, last - t0);
    }
    assert_eq!(
        waves.iter().map(|w| w.0).collect::<Vec<_>>(),
        vec![1, 5, 20]
    );
    assert!(ns.iter().all(|n| n.1 == "committed"), "{ns:?}");
    // Each wave starts only once the one before finished and baked 2 s.
    for i in 1..waves.len() {
        assert!(
            waves[i].1 >= waves[i - 1].2 + 2000,
            "wave {} started before wave {} baked: {waves:?}",
            i + 1,
            i
        );
    }
    // Who received what when: the canary alone, then 4 more, then the rest,
    // each node committed before its wave was declared finished.
    let received_before = |t: i64| ns.iter().filter(|n| n.2 < t).count();
    assert_eq!(
        received_before(waves[1].1),
        1,
        "only the canary before wave 2"
    );
    assert_eq!(received_before(waves[2].1), 5, "5 nodes before wave 3");
    for (i, (size, _, done)) in waves.iter().enumerate() {
        let committed_by = ns.iter().filter(|n| n.3 <= *done).count() as i64;
        assert!(
            committed_by >= *size,
            "wave {} finished with only {committed_by} committed",
            i + 1
        );
    }
}

#[test]
fn failing_canary_pauses_the_rollout_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, _agents) = fleet(dir.path(), &k, 5, &[]);
    let flag = dir.path().join("broken");
    std::fs::write(&flag, "").unwrap();
    let m = make_patch(
        &server,
        dir.path(),
        &k,
        "c-2.0.0",
        "demo",
        "2.0.0",
        &check(&format!("test ! -e {}", flag.display())),
    );
    publish(&server, &m, &["--waves", "1,100%"]);
    let r = wait_state(&server, "c-2.0.0", "paused");
    let reason = r["reason"].as_str().unwrap();
    eprintln!("paused: {reason}");
    assert!(reason.contains("threshold of 1"), "{reason}");
    assert!(reason.contains("health check"), "{reason}");
    let ns = nodes(&server, "c-2.0.0");
    assert_eq!(count(&server, "c-2.0.0", "rolled_back"), 1, "{ns:?}");
    assert_eq!(
        count(&server, "c-2.0.0", "waiting (paused)"),
        4,
        "no other node received it: {ns:?}"
    );
    // Fixed on the host side; resuming releases the rest.
    std::fs::remove_file(&flag).unwrap();
    patch::cli(&server, &["rollout", "resume", "c-2.0.0"]);
    wait_state(&server, "c-2.0.0", "completed");
    assert_eq!(count(&server, "c-2.0.0", "committed"), 4);
    assert_eq!(count(&server, "c-2.0.0", "rolled_back"), 1);
    let audit = server.cli(&["audit"]);
    assert!(audit.contains("rollout.resume"), "{audit}");
}

/// Every event of a rollout watch, checked against the guard's floor; returns
/// the most nodes seen applying at once.
fn check_guard(w: &Watch) -> u64 {
    let events = w.events();
    assert!(!events.is_empty());
    let mut most = 0;
    for e in &events {
        for g in e["groups"].as_array().unwrap() {
            let (ins, min) = (
                g["in_service"].as_u64().unwrap(),
                g["min_in_service"].as_u64().unwrap(),
            );
            assert!(ins >= min, "guard broken: {g}");
            assert!(g["lowest_in_service"].as_u64().unwrap() >= min, "{g}");
            most = most.max(g["applying"].as_u64().unwrap());
        }
    }
    eprintln!(
        "{} state changes watched, at most {most} applying at once",
        events.len()
    );
    most
}

/// Publishes patch `id` with the groups' defaults, follows it with `rollout
/// watch`, and returns the watch once the rollout completed and the watch saw
/// it end.
fn publish_watched(server: &Server, dir: &Path, manifest: &Path, id: &str) -> Watch {
    publish(server, manifest, &[]);
    let w = Watch::rollout(server, dir, id);
    wait_state(server, id, "completed");
    wait_until("the watch to end", T, || {
        w.events()
            .last()
            .is_some_and(|e| e["state"] == "completed")
            .then_some(())
    });
    w
}

#[test]
fn capacity_guard_holds_and_waits_for_offline_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, mut agents) = fleet(dir.path(), &k, 10, &[]);
    server.cli(&[
        "group",
        "set",
        "store",
        "--desired",
        "8",
        "--max-unavailable",
        "1",
    ]);
    // Each apply takes a moment, so releases overlap.
    let m = make_patch(
        &server,
        dir.path(),
        &k,
        "g-2.0.0",
        "demo",
        "2.0.0",
        &check("sleep 1"),
    );
    let w = publish_watched(&server, dir.path(), &m, "g-2.0.0");
    let r = rollout(&server, "g-2.0.0");
    assert_eq!(r["groups"][0]["min_in_service"], 7);
    assert!(
        r["groups"][0]["lowest_in_service"].as_u64().unwrap() >= 7,
        "{r}"
    );
    let most = check_guard(&w);
    assert!(
        (1..=3).contains(&most),
        "10 online, floor 7: at most 3 at once, and the watch saw some: {most}"
    );
    assert_eq!(count(&server, "g-2.0.0", "committed"), 10);

    // Two nodes offline: 8 in service, so one at a time; the offline ones wait.
    for a in &mut agents[8..] {
        a.kill9();
    }
    wait_until("8 online", T, || {
        (server.group("store")["online"] == 8).then_some(())
    });
    let m = make_patch(
        &server,
        dir.path(),
        &k,
        "g-3.0.0",
        "demo",
        "3.0.0",
        &check("sleep 1"),
    );
    let w = publish_watched(&server, dir.path(), &m, "g-3.0.0");
    assert_eq!(check_guard(&w), 1, "8 online, floor 7: one at a time");
    assert_eq!(count(&server, "g-3.0.0", "committed"), 8);
    assert_eq!(count(&server, "g-3.0.0", "waiting (offline)"), 2);
    // They come back and catch up by themselves.
    for a in &mut agents[8..] {
        a.start(&[server.url()]);
    }
    wait_until("returning nodes converge", T, || {
        (count(&server, "g-3.0.0", "committed") == 10).then_some(())
    });
}

/// A weekday three days from now (UTC), so its window is surely closed now.
#[test]
fn emergency_ignores_the_window_that_holds_a_normal_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = fleet(dir.path(), &k, 4, &[]);
    let window = format!("{} 03:00-04:00", flotilla_e2e::another_day());
    server.cli(&[
        "group",
        "config",
        "store",
        "--timezone",
        "Europe/Berlin",
        "--window",
        &window,
    ]);
    let normal = make_patch(&server, dir.path(), &k, "app-2.0.0", "app", "2.0.0", "");
    // Not downloaded ahead: the nodes show what the install waits for.
    let out = publish(&server, &normal, &["--no-download-ahead"]);
    assert!(
        out.contains("rollout waiting for the maintenance window (store opens"),
        "{out}"
    );
    wait_until("nodes waiting for the window", T, || {
        (count(&server, "app-2.0.0", "waiting for window") == 4).then_some(())
    });
    let status = patch::status(&server, "app-2.0.0");
    let detail = status["nodes"][0]["error"].as_str().unwrap();
    assert!(
        detail.starts_with("the maintenance window opens at"),
        "{status}"
    );
    let shown = server.cli(&["rollout", "show", "app-2.0.0"]);
    assert!(
        shown.contains("waiting for the maintenance window (opens"),
        "{shown}"
    );
    let urgent = make_patch(&server, dir.path(), &k, "ssl-3.0.1", "openssl", "3.0.1", "");
    let out = publish(&server, &urgent, &["--emergency"]);
    assert!(out.contains("EMERGENCY"), "{out}");
    wait_until("the emergency patch everywhere", T, || {
        (count(&server, "ssl-3.0.1", "committed") == 4).then_some(())
    });
    let r = rollout(&server, "ssl-3.0.1");
    assert_eq!(r["emergency"], true);
    assert_eq!(r["groups"][0]["waves"], 1, "one step: {r}");
    assert_eq!(
        count(&server, "app-2.0.0", "waiting for window"),
        4,
        "the normal patch still waits"
    );
    let audit = server.cli(&["audit"]);
    assert!(audit.contains("patch.publish.emergency"), "{audit}");
    let listed = server.cli_json(&["patch", "list"]);
    let ssl = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "ssl-3.0.1")
        .unwrap();
    assert_eq!(ssl["emergency"], true);
    // The window opens: the normal patch goes out.
    server.cli(&["group", "config", "store", "--clear-windows"]);
    wait_until("the normal patch after the window opened", T, || {
        (count(&server, "app-2.0.0", "committed") == 4).then_some(())
    });
    for a in &agents {
        assert!(a.root().join("opt/openssl/bin/tool").exists());
        assert!(a.root().join("opt/app/bin/tool").exists());
    }
}

/// With the window closed, targeted nodes download and verify the patch at
/// once (reported `downloaded`, with what the install waits for) and install
/// nothing; when the window opens they install without another artifact byte
/// from the server.
#[test]
fn nodes_download_ahead_while_the_window_is_closed_and_install_when_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = fleet(dir.path(), &k, 3, &[]);
    let window = format!("{} 03:00-04:00", flotilla_e2e::another_day());
    server.cli(&["group", "config", "store", "--window", &window]);
    let shown = server.cli(&["group", "config", "store"]);
    assert!(shown.contains("download ahead on (windows)"), "{shown}");
    let manifest = make_patch(&server, dir.path(), &k, "app-2.0.0", "app", "2.0.0", "");
    let size = std::fs::metadata(dir.path().join("app-2.0.0.tar"))
        .unwrap()
        .len();
    publish(&server, &manifest, &[]);
    let status = wait_until("every node downloaded ahead", T, || {
        let st = patch::status(&server, "app-2.0.0");
        (st["counts"]["downloaded"] == 3).then_some(st)
    });
    for n in status["nodes"].as_array().unwrap() {
        let why = n["error"].as_str().unwrap();
        assert!(
            why.starts_with(
                "downloaded ahead; install waiting for window: the maintenance window opens at"
            ),
            "{n}"
        );
        assert_eq!(n["transfer"]["server_bytes"], size, "{n}");
    }
    assert_eq!(status["served_bytes"], 3 * size, "{status}");
    let r = rollout(&server, "app-2.0.0");
    assert_eq!(
        r["groups"][0]["applying"], 0,
        "downloads do not count as applying: {r}"
    );
    for a in &agents {
        assert!(
            !a.root().join("opt/app/bin/tool").exists(),
            "nothing installed"
        );
    }
    // The window opens: every node installs from what it downloaded.
    server.cli(&["group", "config", "store", "--clear-windows"]);
    let status = wait_until("every node committed", T, || {
        let st = patch::status(&server, "app-2.0.0");
        (st["counts"]["committed"] == 3).then_some(st)
    });
    assert_eq!(
        status["served_bytes"],
        3 * size,
        "no artifact byte after the window opened: {status}"
    );
    for a in &agents {
        assert!(a.root().join("opt/app/bin/tool").exists());
    }
}

#[test]
fn a_node_joining_after_the_rollout_catches_up_even_as_standby() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, _agents) = fleet(dir.path(), &k, 2, &[]);
    server.cli(&["group", "set", "store", "--desired", "2"]);
    let m = make_patch(&server, dir.path(), &k, "late-2.0.0", "demo", "2.0.0", "");
    publish(&server, &m, &["--waves", "1,100%"]);
    wait_state(&server, "late-2.0.0", "completed");
    let token = server.token("store", 1, &["--label", "site=berlin"]);
    let mut late = Agent::new(dir.path(), "late").with_root();
    late.run_args.push("--allow-scripts".into());
    let pin = k.public.to_string_lossy().into_owned();
    let out = late.join_output(&server.url(), &token, &["--trusted-key", &pin]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    late.start(&[server.url()]);
    let id = wait_until("the late node's id", T, || {
        late.status()
            .and_then(|s| s["node_id"].as_str().map(String::from))
    });
    wait_until("the late node committed", T, || {
        nodes(&server, "late-2.0.0")
            .iter()
            .any(|n| n.0 == id && n.1 == "committed")
            .then_some(())
    });
    let node = server.node(&id);
    assert_eq!(node["role"], "standby", "{node}");
    assert_eq!(node["installed"]["demo"], "2.0.0", "{node}");
}

#[test]
fn abort_with_rollback_undoes_the_canaries_spread_over_sites() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = fleet(dir.path(), &k, 6, &["hamburg", "munich", "berlin"]);
    for a in &agents {
        let tool = a.root().join("opt/demo/bin/tool");
        std::fs::create_dir_all(tool.parent().unwrap()).unwrap();
        std::fs::write(&tool, "v1\n").unwrap();
    }
    let m = make_patch(
        &server,
        dir.path(),
        &k,
        "a-2.0.0",
        "demo",
        "2.0.0",
        "[rollback]\ntype = \"restore\"\n",
    );
    publish(
        &server,
        &m,
        &[
            "--waves",
            "3,100%",
            "--spread-label",
            "site",
            "--bake",
            "1h",
        ],
    );
    let r = wait_until("the canaries baking", T, || {
        let r = rollout(&server, "a-2.0.0");
        (r["groups"][0]["waiting_for"] == "bake").then_some(r)
    });
    assert_eq!(r["groups"][0]["committed"], 3, "{r}");
    let canaries: Vec<&Agent> = agents
        .iter()
        .filter(|a| std::fs::read_to_string(a.root().join("opt/demo/bin/tool")).unwrap() != "v1\n")
        .collect();
    let mut sites: Vec<String> = canaries
        .iter()
        .map(|a| {
            server.node(&node_id(a))["labels"]["site"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    sites.sort();
    assert_eq!(
        sites,
        ["berlin", "hamburg", "munich"],
        "one canary per site"
    );

    patch::cli(&server, &["rollout", "abort", "a-2.0.0", "--rollback"]);
    wait_until("the canaries rolled back", T, || {
        (count(&server, "a-2.0.0", "rolled_back") == 3).then_some(())
    });
    assert_eq!(count(&server, "a-2.0.0", "not started (aborted)"), 3);
    // Nodes an aborted rollout never started have had their final word.
    let (ok, _, err) = patch::cli(&server, &["patch", "status", "a-2.0.0", "--wait", "20s"]);
    assert!(ok, "patch status --wait: {err}");
    for a in &agents {
        let tool = a.root().join("opt/demo/bin/tool");
        assert_eq!(std::fs::read_to_string(&tool).unwrap(), "v1\n");
        let node = server.node(&node_id(a));
        assert!(node["installed"].get("demo").is_none(), "{node}");
    }
    let r = rollout(&server, "a-2.0.0");
    assert_eq!(r["state"], "aborted");
    assert_eq!(r["rollback"], true);
}

#[test]
fn compliance_report_lists_the_overdue_node_first() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, mut agents) = fleet(dir.path(), &k, 3, &[]);
    server.cli(&["group", "config", "store", "--sla", "critical=30,low=365"]);
    let ids: Vec<String> = agents.iter().map(node_id).collect();
    // host02 is off when a critical fix issued 40 days ago is published.
    agents[2].kill9();
    wait_until("2 online", T, || {
        (server.group("store")["online"] == 2).then_some(())
    });
    let issued = time::OffsetDateTime::now_utc() - time::Duration::days(40);
    let issued = issued
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let old = make_patch_with(
        &server,
        dir.path(),
        &k,
        "crit-1.1",
        ("openssl", "1.1.0", "critical"),
        &format!("issued_at = \"{issued}\""),
        "",
    );
    publish(&server, &old, &[]);
    wait_until("2 committed", T, || {
        (count(&server, "crit-1.1", "committed") == 2).then_some(())
    });
    // host01 goes off before a low-severity patch issued now.
    agents[1].kill9();
    wait_until("1 online", T, || {
        (server.group("store")["online"] == 1).then_some(())
    });
    let low = make_patch_with(
        &server,
        dir.path(),
        &k,
        "low-2.0",
        ("tzdata", "2.0.0", "low"),
        "",
        "",
    );
    publish(&server, &low, &[]);
    wait_until("1 committed", T, || {
        (count(&server, "low-2.0", "committed") == 1).then_some(())
    });

    let (ok, json, err) = patch::cli(&server, &["report", "compliance", "--format", "json"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&json).expect("the JSON parses");
    let rows = report["nodes"].as_array().unwrap();
    let order: Vec<&str> = rows.iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(order, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    let first = &rows[0];
    assert_eq!(first["overdue"], true);
    let crit = first["missing"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["patch_id"] == "crit-1.1")
        .unwrap();
    let secs = crit["outstanding_secs"].as_i64().unwrap();
    let forty_days = 40 * 86_400;
    assert!((forty_days..forty_days + 600).contains(&secs), "{crit}");
    assert_eq!(crit["sla_days"], 30);
    let overdue_by = crit["overdue_by_secs"].as_i64().unwrap();
    assert!(
        (10 * 86_400..10 * 86_400 + 600).contains(&overdue_by),
        "{crit}"
    );
    assert_eq!(rows[1]["overdue"], false);
    assert_eq!(rows[1]["missing"][0]["patch_id"], "low-2.0");
    assert_eq!(rows[1]["missing"][0]["sla_days"], 365);
    assert_eq!(rows[2]["missing"].as_array().unwrap().len(), 0);
    let crit_stats = report["remediation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["severity"] == "critical")
        .unwrap();
    assert_eq!(crit_stats["remediated"], 2);
    // Time to remediate counts from the node's join (it joined after the fix
    // was issued): the fleet took seconds, not the 40 days since release.
    assert!(
        crit_stats["median_secs"].as_i64().unwrap() < 600,
        "{crit_stats}"
    );

    let (ok, csv_text, err) = patch::cli(&server, &["report", "compliance", "--format", "csv"]);
    assert!(ok, "{err}");
    let mut csv = csv::Reader::from_reader(csv_text.as_bytes());
    let records: Vec<csv::StringRecord> = csv.records().map(|r| r.expect("a CSV row")).collect();
    // host02 lacks two patches, host01 one, host00 none (one "compliant" row).
    assert_eq!(records.len(), 4, "{csv_text}");
    assert_eq!(&records[0][0], ids[2].as_str());
    assert_eq!(&records[0][2], "overdue");
    let (ok, table, _) = patch::cli(&server, &["report", "compliance"]);
    assert!(ok);
    eprintln!("{table}");
    assert!(table.contains("OVERDUE"), "{table}");
}

#[test]
fn server_killed_mid_rollout_goes_on_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (mut server, _agents) = fleet(dir.path(), &k, 4, &[]);
    let m = make_patch(&server, dir.path(), &k, "k-2.0.0", "demo", "2.0.0", "");
    publish(&server, &m, &["--waves", "1,100%", "--bake", "3s"]);
    let before = wait_until("the canary baking", T, || {
        let r = rollout(&server, "k-2.0.0");
        (r["groups"][0]["waiting_for"] == "bake").then_some(r)
    });
    let canary: Vec<_> = nodes(&server, "k-2.0.0")
        .into_iter()
        .filter(|n| n.1 == "committed")
        .collect();
    assert_eq!(canary.len(), 1);
    server.kill9();
    server.start();
    let after = wait_state(&server, "k-2.0.0", "completed");
    // The wave's end was durable: the bake ran from it, not from the restart.
    assert_eq!(
        before["groups"][0]["waves_progress"][0]["done_at_ms"],
        after["groups"][0]["waves_progress"][0]["done_at_ms"]
    );
    let ns = nodes(&server, "k-2.0.0");
    assert!(ns.iter().all(|n| n.1 == "committed"), "{ns:?}");
    // The canary was not sent the patch again: its first report is unchanged.
    let again = ns.iter().find(|n| n.0 == canary[0].0).unwrap();
    assert_eq!(again.2, canary[0].2);
}

#[test]
fn bad_rollout_input_is_refused_with_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, _agents) = fleet(dir.path(), &k, 1, &[]);
    let m = make_patch(&server, dir.path(), &k, "b-2.0.0", "demo", "2.0.0", "");
    let refused = |args: &[&str], wanted: &str| {
        let (ok, _, err) = patch::cli(&server, args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(wanted), "{args:?}: {err}");
    };
    let manifest = m.to_str().unwrap();
    refused(
        &["patch", "publish", manifest, "--waves", "1,50%"],
        "last wave",
    );
    refused(
        &["patch", "publish", manifest, "--waves", "0,100%"],
        "at least 1",
    );
    refused(
        &["patch", "publish", manifest, "--waves", "x,100%"],
        "node count",
    );
    refused(
        &["patch", "publish", manifest, "--failure-threshold", "150%"],
        "between 1% and 100%",
    );
    refused(&["patch", "publish", manifest, "--force"], "--emergency");
    // Nothing was published by the refused calls.
    assert!(
        server
            .cli_json(&["patch", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    refused(
        &[
            "group",
            "config",
            "store",
            "--timezone",
            "Mars/Base",
            "--window",
            "daily 01:00-02:00",
        ],
        "Mars/Base",
    );
    refused(
        &[
            "group",
            "config",
            "store",
            "--window",
            "mon-fri 25:00-04:00",
        ],
        "25",
    );
    refused(
        &[
            "group",
            "config",
            "store",
            "--window",
            "someday 01:00-02:00",
        ],
        "someday",
    );
    refused(
        &["group", "config", "store", "--sla", "critical=0"],
        "at least 1",
    );
    refused(
        &["group", "config", "store", "--sla", "urgent=3"],
        "unknown severity",
    );
    let g = server.cli_json(&["group", "config", "store"]);
    assert_eq!(g["windows"].as_array().unwrap().len(), 0, "{g}");
    assert_eq!(g["timezone"], "UTC");
    publish(&server, &m, &[]);
    wait_state(&server, "b-2.0.0", "completed");
    refused(&["rollout", "resume", "b-2.0.0"], "not paused");
    refused(&["rollout", "show", "nope"], "no rollout for patch nope");
    refused(
        &["report", "compliance", "--group", "nope"],
        "unknown group nope (NotFound)",
    );
    let cred = dir.path().join("viewer.credential");
    server.cli(&[
        "credential",
        "create",
        "--name",
        "ro",
        "--role",
        "viewer",
        "--out",
        cred.to_str().unwrap(),
    ]);
    let out = server.cli_as(&cred, &["rollout", "pause", "b-2.0.0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs role operator"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
