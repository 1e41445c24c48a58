//! Disks that do not fill on the server: an artifact no unexpired patch names
//! is removed once the retention period has passed, on demand (`flotilla
//! artifacts gc`, with a dry run) as on the server's own timer; one a live
//! patch names never is.

use std::path::Path;
use std::time::Duration;

use flotilla_e2e::{patch, wait_until};

fn sha_of(manifest: &Path) -> String {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    m["artifacts"][0]["sha256"].as_str().unwrap().to_string()
}

fn collected(v: &serde_json::Value) -> Vec<String> {
    v["collected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sha256"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_expired_patchs_artifact_is_collected_after_the_retention_and_a_live_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, _agents) = patch::fleet(
        dir.path(),
        patch::FleetOptions {
            agents: 1,
            server_keys: &[&k],
            pinned: &[&k],
            server_env: &[("FLOTILLA_ARTIFACT_RETENTION", "2s".into())],
            ..Default::default()
        },
    );

    // One patch that expires soon, one that does not; both installed.
    let mut shas = Vec::new();
    for (id, version, expires, seed) in [("short", "1.0.0", "15s", 1), ("live", "2.0.0", "30d", 2)]
    {
        let tar = dir.path().join(format!("{id}.tar"));
        patch::tar(&tar, &[("data.bin", &patch::noise(64 << 10, seed), 0o644)]);
        let spec = patch::files_spec(dir.path(), id, version, &tar, "");
        let text = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(
            &spec,
            text.replace(
                "expires_in = \"30d\"",
                &format!("expires_in = \"{expires}\""),
            ),
        )
        .unwrap();
        let manifest = patch::build(&server, &spec, &dir.path().join(id));
        patch::sign(&server, &manifest, &k);
        assert!(patch::publish(&server, &manifest).0);
        let out = patch::wait_outcomes(&server, id, 1);
        assert_eq!(out[0].1, "committed", "{out:?}");
        shas.push(sha_of(&manifest));
    }
    let (short, live) = (&shas[0], &shas[1]);
    let held = |sha: &str| server.data_dir.join("artifacts").join(sha).exists();
    assert!(held(short) && held(live));

    // Nothing to collect while both patches are unexpired.
    let dry = server.cli_json(&["artifacts", "gc", "--dry-run"]);
    assert_eq!(collected(&dry), Vec::<String>::new(), "{dry}");

    // A viewer may look, not remove.
    let viewer = dir.path().join("viewer.cred");
    server.cli(&[
        "credential",
        "create",
        "--name",
        "watcher",
        "--role",
        "viewer",
        "--out",
        viewer.to_str().unwrap(),
    ]);
    assert!(
        server
            .cli_as(&viewer, &["artifacts", "gc", "--dry-run"])
            .status
            .success()
    );
    let refused = server.cli_as(&viewer, &["artifacts", "gc"]);
    assert!(!refused.status.success());

    // Expired, then past the retention: listed by a dry run (which removes
    // nothing), then removed; the live patch's artifact stays.
    let dry = wait_until(
        "the expired patch's artifact to be collectable",
        Duration::from_secs(60),
        || {
            let dry = server.cli_json(&["artifacts", "gc", "--dry-run"]);
            (!collected(&dry).is_empty()).then_some(dry)
        },
    );
    assert_eq!(collected(&dry), vec![short.clone()], "{dry}");
    assert!(
        dry["collected"][0]["why"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{dry}"
    );
    assert!(held(short), "a dry run removed it");
    let done = server.cli_json(&["artifacts", "gc"]);
    assert_eq!(collected(&done), vec![short.clone()], "{done}");
    assert!(!held(short));
    assert!(held(live), "the live patch's artifact was removed");
    let again = server.cli_json(&["artifacts", "gc"]);
    assert_eq!(collected(&again), Vec::<String>::new(), "{again}");

    // Audited, with what went.
    let audit = server.cli_json(&["audit"]).to_string();
    assert!(
        audit.contains("artifact.gc") && audit.contains(short.as_str()),
        "{audit}"
    );
    // The patch's record and status stay: only the bytes went.
    assert_eq!(
        patch::status(&server, "short")["nodes"][0]["phase"],
        "committed"
    );
}
