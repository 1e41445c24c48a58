//! Site caches: an agent serving its site fetches each artifact once over the
//! uplink and hands it to the site's other agents, which check every byte and
//! fall back to the servers (saying why) when it fails them.

use std::path::Path;
use std::time::Duration;

use flotilla_e2e::patch::{self, FleetOptions, Key};
use flotilla_e2e::{Agent, Server, enroll, wait_until};
use flotilla_proto::pb;
use serde_json::Value;

const T: Duration = Duration::from_secs(180);

/// A fleet of `agents` at `sites`, the first agent of each site serving it.
fn site_fleet(
    d: &Path,
    key: &Key,
    agents: usize,
    sites: &[&str],
    env: &[(&str, String)],
) -> (Server, Vec<Agent>) {
    patch::fleet(
        d,
        FleetOptions {
            agents,
            server_keys: &[key],
            pinned: &[key],
            sites,
            serving: sites.len(),
            server_env: env,
            ..FleetOptions::default()
        },
    )
}

/// Builds, signs and publishes `id`: one file of `size` random bytes.
fn publish(server: &Server, d: &Path, key: &Key, id: &str, size: usize) -> u64 {
    let tar = d.join(format!("{id}.tar"));
    patch::tar(&tar, &[("blob.bin", &patch::noise(size, 7), 0o644)]);
    let spec = patch::files_spec(d, id, "1.0.0", &tar, "");
    let manifest = patch::build(server, &spec, &d.join(id));
    patch::sign(server, &manifest, key);
    assert!(patch::publish(server, &manifest).0);
    std::fs::metadata(&tar).unwrap().len()
}

fn committed(server: &Server, id: &str, n: u64) -> Value {
    wait_until(&format!("{n} nodes committed {id}"), T, || {
        let st = patch::status(server, id);
        (st["counts"]["committed"] == n).then_some(st)
    })
}

fn node_id(a: &Agent) -> String {
    wait_until("the agent's status", T, || a.status())["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The node's transfer record in a patch status.
fn transfer<'a>(st: &'a Value, node: &str) -> &'a Value {
    &st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node)
        .unwrap_or_else(|| panic!("{node} in {st}"))["transfer"]
}

#[test]
fn each_site_takes_the_artifact_over_its_uplink_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, agents) = site_fleet(d, &key, 8, &["berlin", "paris"], &[]);
    let servers: Vec<String> = agents[..2].iter().map(node_id).collect();
    let sites = wait_until("both sites served", T, || {
        let s = server.cli_json(&["sites"]);
        s.as_array()
            .unwrap()
            .iter()
            .all(|s| s["serving_node"].as_str().is_some_and(|n| !n.is_empty()))
            .then_some(s)
    });
    for s in sites.as_array().unwrap() {
        assert!(
            servers.contains(&s["serving_node"].as_str().unwrap().to_string()),
            "{sites}"
        );
        assert_eq!(s["serving_marked"], true, "{sites}");
    }
    let size = publish(&server, d, &key, "app-1.0.0", 5 << 20);
    let st = committed(&server, "app-1.0.0", 8);
    let served = st["served_bytes"].as_u64().unwrap();
    eprintln!(
        "2 sites x 4 agents, {size} bytes: the server sent {served} ({:.2} x sites x size)",
        served as f64 / (2 * size) as f64
    );
    assert!(
        served * 10 <= 11 * 2 * size,
        "{served} bytes for {size}: {st}"
    );
    for a in &agents[2..] {
        let t = transfer(&st, &node_id(a));
        assert_eq!(t["peer_bytes"], size, "{t}");
        assert_eq!(t["server_bytes"], 0, "{t}");
    }
    // The serving agents report what their caches hold.
    wait_until("cache state shown", T, || {
        let s = server.cli_json(&["sites"]);
        s.as_array()
            .unwrap()
            .iter()
            .all(|s| s["cache_files"] == 1 && s["cache_bytes"] == size)
            .then_some(())
    });
    let shown = server.cli(&["rollout", "show", "app-1.0.0"]);
    assert!(
        shown.contains("from site peers") && shown.contains("this server sent"),
        "{shown}"
    );
    let table = server.cli(&["sites"]);
    assert!(
        table.contains("SERVED BY") && table.contains(&servers[0]),
        "{table}"
    );
}

/// The artifact digest of patch `id`.
fn artifact_sha(server: &Server, id: &str) -> String {
    patch::status(server, id)["patch"]["artifacts"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The failures a node's transfer noted, in one string.
fn failures(t: &Value) -> String {
    t["failures"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|f| f.as_str().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

#[test]
fn a_serving_agent_that_sends_a_wrong_byte_is_dropped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, mut agents) = site_fleet(d, &key, 3, &["berlin"], &[]);
    let serving = node_id(&agents[0]);
    let peers: Vec<String> = agents[1..].iter().map(node_id).collect();
    // The peers are away while the serving agent takes the patch.
    for a in &mut agents[1..] {
        a.kill9();
    }
    let size = publish(&server, d, &key, "app-1.0.0", 1 << 20);
    committed(&server, "app-1.0.0", 1);
    // One byte of its cached copy flipped (its own host installed already).
    let cached = agents[0]
        .state_dir
        .join("site-cache")
        .join(artifact_sha(&server, "app-1.0.0"));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[size as usize / 2] ^= 0x20;
    std::fs::write(&cached, &bytes).unwrap();
    for a in &mut agents[1..] {
        a.start(&[server.url()]);
    }
    let st = committed(&server, "app-1.0.0", 3);
    for p in &peers {
        let t = transfer(&st, p);
        let why = failures(t);
        assert!(
            why.contains(&format!("site peer {serving}")) && why.contains("sha256 is"),
            "the failure names the peer and the mismatch: {t}"
        );
        assert_eq!(
            t["server_bytes"], size,
            "all of it again from the server: {t}"
        );
    }
}

#[test]
fn peers_of_a_serving_agent_killed_mid_transfer_go_on_from_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    // The site's uplink is slow: the serving agent takes seconds to fill.
    let env = [("FLOTILLA_FAULT_ARTIFACT_RATE", "1000000".to_string())];
    let (server, mut agents) = site_fleet(d, &key, 3, &["berlin"], &env);
    let peers: Vec<String> = agents[1..].iter().map(node_id).collect();
    let size = publish(&server, d, &key, "app-1.0.0", 4 << 20);
    let part = agents[0]
        .state_dir
        .join("site-cache")
        .join(format!("{}.part", artifact_sha(&server, "app-1.0.0")));
    wait_until("the cache half filled", T, || {
        std::fs::metadata(&part)
            .ok()
            .filter(|m| m.len() >= size / 3)
            .map(|_| ())
    });
    agents[0].kill9();
    let st = committed(&server, "app-1.0.0", 2);
    let mut from_peer = 0;
    for p in &peers {
        let t = transfer(&st, p);
        assert!(
            failures(t).contains("site peer"),
            "the peer's failure is reported: {t}"
        );
        from_peer += t["peer_bytes"].as_u64().unwrap();
        assert_eq!(
            t["peer_bytes"].as_u64().unwrap() + t["server_bytes"].as_u64().unwrap(),
            size,
            "resumed, not restarted: {t}"
        );
    }
    assert!(
        from_peer > 0,
        "the peers had part of it from the serving agent: {st}"
    );
    // Back, the serving agent finishes its own download and commits too.
    agents[0].start(&[server.url()]);
    committed(&server, "app-1.0.0", 3);
}

#[test]
fn a_serving_agent_serves_only_nodes_of_its_site_the_server_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, agents) = site_fleet(d, &key, 2, &["berlin"], &[]);
    let serving = node_id(&agents[0]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = server.ca_pem();
    let fetch = |url: &str, cert: Option<(&str, &str)>, sha: &str| {
        let endpoint = flotilla_proto::tls::endpoint_named(
            url,
            &flotilla_proto::site::server_name(&serving),
            &ca,
            cert,
        )
        .unwrap();
        let sha = sha.to_string();
        rt.block_on(async move {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let mut stream = pb::site_service_client::SiteServiceClient::new(channel)
                .fetch_artifact(pb::FetchArtifactRequest {
                    sha256: sha,
                    offset: 0,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let mut got = 0;
            while let Some(chunk) = stream.message().await.map_err(|s| s.to_string())? {
                got += chunk.data.len();
            }
            Ok::<usize, String>(got)
        })
    };
    let node = |site: &str, machine: &str| {
        let token: flotilla_proto::token::JoinToken = server
            .token("store", 1, &["--label", &format!("site={site}")])
            .parse()
            .unwrap();
        rt.block_on(enroll::enroll_identity(
            &server,
            "127.0.0.1",
            &token,
            None,
            machine,
        ))
        .unwrap()
    };

    // Nodes of this fleet that join by hand, here and at another site, and
    // are online: the patch is offered to them.
    let berlin = node("berlin", "visitor-1");
    let paris = node("paris", "visitor-2");
    publish(&server, d, &key, "app-1.0.0", 256 << 10);
    committed(&server, "app-1.0.0", 2);
    let (beat, state) = rt.block_on(async {
        let mut client = berlin.client(&server).await.unwrap();
        let (beat, mut states) = enroll::open_session(&mut client, "visitor-1").await;
        let (state, _) = enroll::offered(&mut states, "app-1.0.0").await;
        (beat, state)
    });
    assert_eq!(
        state
            .site_peers
            .iter()
            .map(|p| p.node_id.as_str())
            .collect::<Vec<_>>(),
        [serving.as_str()],
        "told of its site's serving agent"
    );
    let sha = artifact_sha(&server, "app-1.0.0");
    let url = server.cli_json(&["sites"])[0]["serving_url"]
        .as_str()
        .unwrap()
        .to_string();
    // A node of this fleet and site, targeted by the patch: served.
    let cert = Some((berlin.cert_pem.as_str(), berlin.key_pem.as_str()));
    assert!(fetch(&url, cert, &sha).unwrap() > 0);
    // Not an artifact of a patch offered to it.
    let other = "ab".repeat(32);
    let e = fetch(&url, cert, &other).unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("no patch offered"),
        "{e}"
    );
    beat.abort();
    // Revoked: refused at once.
    server.cli(&["nodes", "revoke", &berlin.node_id]);
    let e = fetch(&url, cert, &sha).unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("not an accepted node"),
        "{e}"
    );
    // A node of another site.
    let e = fetch(&url, Some((&paris.cert_pem, &paris.key_pem)), &sha).unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("not at the site"),
        "{e}"
    );
    // No certificate, or one of another CA: no TLS session at all.
    assert!(fetch(&url, None, &sha).is_err());
    let outsider = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, berlin.node_id.clone());
    let forged = params.self_signed(&outsider).unwrap();
    let e = fetch(&url, Some((&forged.pem(), &outsider.serialize_pem())), &sha).unwrap_err();
    assert!(!e.is_empty());
}

#[test]
fn where_no_agent_is_marked_the_server_chooses_one_that_listens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = patch::key(d, "release");
    let (server, agents) = patch::fleet(
        d,
        FleetOptions {
            agents: 3,
            server_keys: &[&key],
            pinned: &[&key],
            run_args: &["--site-listen", "127.0.0.1:0"],
            ..FleetOptions::default()
        },
    );
    let site = wait_until("the site served", T, || {
        let s = server.cli_json(&["sites"]);
        (s[0]["serving_node"].as_str().is_some_and(|n| !n.is_empty())).then_some(s)
    });
    let chosen = site[0]["serving_node"].as_str().unwrap().to_string();
    assert_eq!(site[0]["serving_marked"], false, "{site}");
    let size = publish(&server, d, &key, "app-1.0.0", 1 << 20);
    let st = committed(&server, "app-1.0.0", 3);
    assert_eq!(st["served_bytes"], size, "{st}");
    let ids: Vec<String> = agents.iter().map(node_id).collect();
    assert!(ids.contains(&chosen), "{site}");
    for id in ids.iter().filter(|id| **id != chosen) {
        assert_eq!(transfer(&st, id)["peer_bytes"], size, "{st}");
    }
    let table = server.cli(&["sites"]);
    assert!(table.contains(&format!("{chosen} (chosen)")), "{table}");
}
