//! Moving nodes without a re-join: `nodes set-labels` and `nodes move` change a
//! node's labels and group, its agent hears of it at once, and patches for its
//! new place reach it.

use std::time::Duration;

use flotilla_e2e::patch::{self, key};
use flotilla_e2e::wait_until;

#[test]
fn moved_and_relabelled_nodes_get_the_patches_of_their_new_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = key(d, "k");
    let (server, agents) = patch::signed_fleet(d, &k, 2);
    let id = |i: usize| {
        agents[i].status().unwrap()["node_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (moved, stayed) = (id(0), id(1));
    server.cli(&["group", "create", "warehouse"]);

    // A node of a group that does not exist stays where it is.
    let (ok, _, err) = patch::cli(&server, &["nodes", "move", &moved, "--group", "wharehouse"]);
    assert!(!ok && err.contains("unknown group wharehouse"), "{err}");

    let out = server.cli(&["nodes", "move", &moved, "--group", "warehouse"]);
    assert!(out.contains("moved"), "{out}");
    wait_until(
        "the agent to hear of its move",
        Duration::from_secs(30),
        || (agents[0].status()?["group"] == "warehouse").then_some(()),
    );
    assert_eq!(server.node(&moved)["group"], "warehouse");
    assert_eq!(server.node(&stayed)["group"], "store");

    // A patch for the new group reaches the moved node only.
    let groups = "[targets]\ngroups = [\"warehouse\"]\n";
    let (ok, out) = patch::publish_signed(&server, d, "wh-1", "1.0.0", groups, &[&k]);
    assert!(ok, "{out}");
    let outcomes = patch::wait_outcomes(&server, "wh-1", 1);
    assert_eq!(outcomes[0].0, moved, "{outcomes:?}");
    assert_eq!(outcomes[0].1, "committed", "{outcomes:?}");

    // Labels: the other node takes site=paris, and a patch for Paris reaches it.
    let out = server.cli(&["nodes", "set-labels", &stayed, "site=paris", "tier=front"]);
    assert!(out.contains("site=paris"), "{out}");
    let node = server.node(&stayed);
    assert_eq!(node["labels"]["site"], "paris", "{node}");
    assert_eq!(node["labels"]["tier"], "front", "{node}");
    let out = server.cli(&["nodes", "set-labels", &stayed, "--remove", "tier"]);
    assert!(!out.contains("tier="), "{out}");
    let paris = "[targets]\nlabels = { site = \"paris\" }\n";
    let (ok, out) = patch::publish_signed(&server, d, "paris-1", "1.0.1", paris, &[&k]);
    assert!(ok, "{out}");
    let outcomes = patch::wait_outcomes(&server, "paris-1", 1);
    assert_eq!(
        (outcomes[0].0.as_str(), outcomes[0].1.as_str()),
        (stayed.as_str(), "committed")
    );

    // Both changes are in the audit log.
    let audit = server.cli(&["audit"]);
    assert!(
        audit.contains("node.move") && audit.contains("node.labels"),
        "{audit}"
    );
}
