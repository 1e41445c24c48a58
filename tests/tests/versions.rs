//! Back-to-back publishes of one component: a node busy with one patch is
//! waited for (not taken for offline), the next is released when it finishes,
//! an older version overtaken by a newer one is superseded (not refused as a
//! downgrade), and every node ends on the newest version without reconnecting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_e2e::patch::{self, Key};
use flotilla_e2e::{Server, wait_until};

const T: Duration = Duration::from_secs(120);

/// A signed `files` patch of component `demo` at `version`, installing a file
/// that names the version.
fn make(server: &Server, dir: &Path, k: &Key, version: &str) -> (String, PathBuf) {
    let id = format!("demo-{version}");
    let artifact = dir.join(format!("{id}.tar"));
    let body = format!("demo {version}\n");
    patch::tar(&artifact, &[("VERSION", body.as_bytes(), 0o644)]);
    let spec = patch::files_spec(dir, &id, version, &artifact, "");
    let manifest = patch::build(server, &spec, &dir.join(&id));
    patch::sign(server, &manifest, k);
    (id, manifest)
}

fn publish(server: &Server, manifest: &Path, args: &[&str]) {
    let mut all = vec!["patch", "publish", manifest.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, _, err) = patch::cli(server, &all);
    assert!(ok, "publish failed: {err}");
}

/// Publishes `versions` one right after the other (with each one's publish
/// flags), then checks that every node ends on the last one: installed on the
/// host and recorded by the server, every rollout completed, no downgrade
/// refusal or failure anywhere, and no agent reconnected.
fn back_to_back(agents: usize, versions: &[(&str, &[&str])]) {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, fleet) = patch::signed_fleet(dir.path(), &k, agents);
    let made: Vec<(String, PathBuf)> = versions
        .iter()
        .map(|(v, _)| make(&server, dir.path(), &k, v))
        .collect();
    for ((_, manifest), (_, args)) in made.iter().zip(versions) {
        publish(&server, manifest, args);
    }
    let newest = versions.last().unwrap().0;
    wait_until("every node on the newest version", T, || {
        server
            .nodes()
            .iter()
            .all(|n| n["installed"]["demo"] == newest)
            .then_some(())
    });
    for (id, _) in &made {
        wait_until(&format!("rollout {id} completed"), T, || {
            let r = server.cli_json(&["rollout", "show", id]);
            (r["state"] == "completed").then_some(())
        });
        let phases = patch::phases(&server, id);
        assert_eq!(phases.len(), agents, "{id}: {phases:?}");
        for (node, phase, error) in &phases {
            assert!(
                phase == "committed" || phase == "superseded",
                "{id} on {node}: {phase} {error}"
            );
            assert!(!error.contains("downgrade"), "{id} on {node}: {error}");
        }
    }
    for a in &fleet {
        let installed = std::fs::read_to_string(a.root().join("opt/demo/VERSION")).unwrap();
        assert_eq!(installed, format!("demo {newest}\n"));
        let log = a.log_text();
        assert_eq!(
            log.matches("session open").count(),
            1,
            "an agent had to reconnect:\n{log}"
        );
        assert!(!log.contains("downgrade"), "{log}");
    }
}

#[test]
fn two_back_to_back_publishes_both_reach_every_node_in_order() {
    back_to_back(3, &[("2.0.3", &[]), ("2.0.4", &[])]);
}

#[test]
fn two_back_to_back_publishes_with_waves() {
    back_to_back(
        4,
        &[
            ("2.0.3", &["--waves", "1,100%"]),
            ("2.0.4", &["--waves", "1,100%"]),
        ],
    );
}

#[test]
fn five_back_to_back_publishes_with_waves_and_an_emergency_among_them() {
    back_to_back(
        4,
        &[
            ("3.0.1", &["--waves", "1,50%,100%"]),
            ("3.0.2", &[]),
            ("3.0.3", &["--waves", "2,100%"]),
            ("3.0.4", &["--emergency"]),
            ("3.0.5", &["--waves", "1,100%"]),
        ],
    );
}
