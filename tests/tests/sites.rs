//! Sites: nodes of a group sharing a site label's value (and its uplink).
//! `flotilla sites` lists them; `--max-site-downloads` lets only so many of a
//! site's nodes download from the server at once, the others trying again.

use std::time::Duration;

use flotilla_e2e::patch::{self, FleetOptions};
use flotilla_e2e::wait_until;
use serde_json::Value;

const T: Duration = Duration::from_secs(120);

#[test]
fn a_site_downloads_at_most_its_cap_at_once_and_every_node_commits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, _agents) = patch::fleet(
        d,
        FleetOptions {
            agents: 4,
            server_keys: &[&key],
            pinned: &[&key],
            sites: &["berlin", "paris"],
            server_env: &[
                ("FLOTILLA_MAX_SITE_DOWNLOADS", "1".to_string()),
                // Slow enough that the nodes of a site overlap.
                ("FLOTILLA_FAULT_ARTIFACT_RATE", "400000".to_string()),
            ],
            ..FleetOptions::default()
        },
    );
    let sites = server.cli_json(&["sites"]);
    let listed: Vec<(String, u64, u64)> = sites
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!(
                    "{}/{}={}",
                    s["group"].as_str().unwrap(),
                    s["label"].as_str().unwrap(),
                    s["site"].as_str().unwrap()
                ),
                s["nodes"].as_u64().unwrap(),
                s["max_downloads"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("store/site=berlin".to_string(), 2, 1),
            ("store/site=paris".to_string(), 2, 1)
        ],
        "{sites}"
    );
    let tar = d.join("blob.tar");
    patch::tar(&tar, &[("blob.bin", &patch::noise(400_000, 3), 0o644)]);
    let spec = patch::files_spec(d, "app-1.0.0", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &d.join("app-1.0.0"));
    patch::sign(&server, &manifest, &key);
    assert!(patch::publish(&server, &manifest).0);
    // While they download, no site has more than one download at once.
    let mut most = 0;
    let outcomes = wait_until("every node committed", T, || {
        for s in server.cli_json(&["sites"]).as_array().unwrap() {
            let n = s["downloads"].as_u64().unwrap();
            assert!(n <= 1, "{s}");
            most = most.max(n);
        }
        let st = patch::status(&server, "app-1.0.0");
        (st["counts"]["committed"] == 4).then_some(st)
    });
    let waited: Vec<&Value> = outcomes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["transfer"]["failures"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f.as_str().unwrap().contains("downloads at once already"))
            })
        })
        .collect();
    eprintln!(
        "site cap: {} node(s) waited for their site; most at once seen {most}",
        waited.len()
    );
    assert!(!waited.is_empty(), "someone waited its turn: {outcomes}");
    let (ok, _, err) = patch::cli(&server, &["sites", "--group", "nosuch"]);
    assert!(!ok && err.contains("unknown group"), "{err}");
}
