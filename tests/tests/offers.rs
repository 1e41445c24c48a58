//! A node with more patches in flight than one desired state carries gets every
//! one of them in turn, none silently dropped, and patch status says which wait.

use std::time::Duration;

use flotilla_e2e::patch;
use flotilla_e2e::wait_until;

/// More than the 64 one desired state carries.
const PATCHES: usize = 70;

#[test]
fn more_patches_than_one_state_carries_all_arrive_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, mut agents) = patch::signed_fleet(dir.path(), &k, 1);
    // Offline while they are published, so they are all in flight at once
    // when it comes back.
    agents[0].kill9();
    wait_until("the node offline", Duration::from_secs(30), || {
        (server.group("store")["online"] == 0).then_some(())
    });
    let artifact = dir.path().join("p.tar");
    patch::tar(&artifact, &[("VERSION", b"1\n", 0o644)]);
    let ids: Vec<String> = (0..PATCHES).map(|i| format!("c{i:02}")).collect();
    for id in &ids {
        // One component each, so none supersedes another.
        let spec = patch::component_spec(dir.path(), id, id, "1.0.0", &artifact, "");
        let manifest = patch::build(&server, &spec, &dir.path().join(id));
        patch::sign(&server, &manifest, &k);
        let (ok, _, err) = patch::publish(&server, &manifest);
        assert!(ok, "publish {id}: {err}");
    }
    agents[0].start(&[server.url()]);
    let root = agents[0].root();
    for id in &ids {
        let outcome = patch::wait_outcomes(&server, id, 1);
        assert_eq!(outcome[0].1, "committed", "{id}: {outcome:?}");
        assert!(root.join("opt").join(id).join("VERSION").exists(), "{id}");
    }
    let node = &server.nodes()[0];
    assert_eq!(
        node["installed"].as_object().map(|m| m.len()),
        Some(PATCHES),
        "{node}"
    );
}
