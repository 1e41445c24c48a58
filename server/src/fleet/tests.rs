//! Two replicas' fleets over one store: each sees the other's writes through
//! the store's feed, and writes that race converge on what the store holds.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::manifest::Manifest;
use tokio_util::sync::CancellationToken;

use super::{Fleet, FleetConfig, RolloutRequest, State};
use crate::model::{GroupRecord, NodeRecord, NodeStatus, Role, keys};
use crate::replica::{Leadership, Replica};
use crate::rollout::record::{self as rollout_record, RolloutRecord, RolloutState};
use crate::store::{Db, SledStore, Store};

struct Replicas {
    _dir: tempfile::TempDir,
    db: Db,
    a: Arc<Fleet>,
    b: Arc<Fleet>,
    /// Stop replica `a` or `b` alone.
    stop_a: CancellationToken,
    stop_b: CancellationToken,
    shutdown: CancellationToken,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

const CFG: FleetConfig = FleetConfig {
    heartbeat_interval: Duration::from_secs(5),
    offline_grace: Duration::from_secs(60),
    startup_grace: Duration::ZERO,
};

async fn fleet(
    db: &Db,
    cfg: FleetConfig,
    shutdown: &CancellationToken,
    name: &str,
) -> (Arc<Fleet>, Leadership) {
    let fleet = Fleet::load(db.clone(), cfg).await.unwrap();
    let (leadership, _) = Replica::start(
        db.clone(),
        Replica::new_id(),
        format!("https://{name}.test:7443"),
        fleet.held(),
        shutdown.clone(),
    );
    fleet.lead_with(leadership.clone());
    tokio::spawn(fleet.clone().run_follower(shutdown.clone()));
    tokio::spawn(fleet.clone().run_reconciler(shutdown.clone()));
    tokio::spawn(fleet.clone().run_rollouts(shutdown.clone()));
    (fleet, leadership)
}

/// Replica `a` leads; `b` follows.
async fn replicas() -> Replicas {
    replicas_with(CFG).await
}

async fn replicas_with(cfg: FleetConfig) -> Replicas {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let db = Db::new(store);
    let shutdown = CancellationToken::new();
    let stop_a = shutdown.child_token();
    let (a, mut lead) = fleet(&db, cfg, &stop_a, "a").await;
    tokio::time::timeout(Duration::from_secs(10), lead.acquired())
        .await
        .expect("the first replica leads");
    let stop_b = shutdown.child_token();
    let (b, _) = fleet(&db, cfg, &stop_b, "b").await;
    Replicas {
        _dir: dir,
        db,
        a,
        b,
        stop_a,
        stop_b,
        shutdown,
    }
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node(id: &str, group: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        group: group.into(),
        status: NodeStatus::Accepted,
        role: Role::Standby,
        facts: crate::model::Facts {
            machine_id: format!("machine-{id}"),
            ..Default::default()
        },
        labels: Default::default(),
        joined_at: 0,
        token_id: String::new(),
        cert_serial: format!("serial-{id}"),
        cert_not_after: 0,
        public_key: String::new(),
        enrolled_at: 0,
        prev_cert_serial: String::new(),
        revision: 1,
        last_seen: 0,
        installed: Default::default(),
    }
}

fn manifest(id: &str) -> (String, Manifest) {
    let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let text = format!(
        r#"{{"schema": 1, "id": "{id}", "component": "app", "version": "1.0.0",
  "severity": "high", "issued_at": "2026-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z",
  "targets": {{ "groups": ["g"] }},
  "artifacts": [{{ "name": "app.tar", "sha256": "{sha}", "size": 10 }}],
  "install": {{ "type": "files", "artifact": "app.tar", "destination": "/opt/app" }} }}"#
    );
    let parsed = Manifest::parse(text.as_bytes()).unwrap();
    (text, parsed)
}

async fn role_on(fleet: &Fleet, id: &str) -> Option<Role> {
    fleet.node(id).await.map(|(n, _, _)| n.role)
}

#[tokio::test]
async fn each_replica_sees_the_others_writes() {
    let r = replicas().await;
    // Made on the follower; roles assigned by the leader; seen by both.
    r.b.set_group("g", 1, None, true).await.unwrap();
    for id in ["n1", "n2"] {
        r.b.save_node(node(id, "g"), true).await.unwrap();
    }
    eventually("the leader sees the group and nodes", || async {
        r.a.group_statuses(Some("g"))
            .await
            .is_ok_and(|s| s[0].desired == Some(1) && s[0].total == 2)
    })
    .await;
    // Online on the leader, which picks one to be active.
    let grant = r.a.open_session("n1").await.unwrap();
    let _other = r.a.open_session("n2").await.unwrap();
    eventually("the follower sees the leader's role change", || async {
        let roles = [role_on(&r.b, "n1").await, role_on(&r.b, "n2").await];
        roles.iter().filter(|x| **x == Some(Role::Active)).count() == 1
    })
    .await;
    // A node revoked on one replica ends its session on the other.
    r.b.set_node_status("n1", NodeStatus::Revoked)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), grant.cancel.cancelled())
        .await
        .expect("the session on the other replica ends");
    let err = r.a.open_session("n1").await.err().expect("revoked");
    assert!(err.to_string().contains("revoked"), "{err}");
}

#[tokio::test]
async fn a_patch_published_on_a_follower_is_stepped_by_the_leader() {
    let r = replicas().await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    r.a.save_node(node("n1", "g"), true).await.unwrap();
    let _session = r.a.open_session("n1").await.unwrap();
    let (text, parsed) = manifest("app-1");
    r.b.add_patch(
        text,
        vec!["sig".into()],
        String::new(),
        "tester",
        parsed,
        RolloutRequest::default(),
    )
    .await
    .unwrap();
    eventually("the leader releases the patch to the node", || async {
        r.a.rollout_info("app-1")
            .await
            .is_some_and(|i| i.groups.iter().any(|g| g.released > 0))
    })
    .await;
    // An operator's pause on the follower reaches the leader's view.
    r.b.pause_rollout("app-1", "ops").await.unwrap();
    eventually("the leader sees the pause", || async {
        r.a.rollout_info("app-1")
            .await
            .is_some_and(|i| i.state == RolloutState::Paused)
    })
    .await;
}

#[tokio::test]
async fn racing_writes_converge_on_what_the_store_holds() {
    let r = replicas().await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    eventually("b sees the group", || async {
        r.b.group_statuses(Some("g")).await.is_ok()
    })
    .await;
    // Both replicas set the count over and over at once: every call either
    // commits or is decided again on fresher records; none is lost.
    let (fa, fb) = (r.a.clone(), r.b.clone());
    let ta = tokio::spawn(async move {
        for d in 0..20 {
            fa.set_group("g", d, None, false).await.unwrap();
        }
    });
    let tb = tokio::spawn(async move {
        for d in 100..120 {
            fb.set_group("g", d, None, false).await.unwrap();
        }
    });
    ta.await.unwrap();
    tb.await.unwrap();
    let stored: GroupRecord = r.db.get(&keys::group("g")).await.unwrap().unwrap();
    // 1 at creation, +1 per call: every write was made on the one before it.
    assert_eq!(stored.revision, 2 + 40);
    for f in [&r.a, &r.b] {
        eventually("each view holds the stored count", || async {
            f.group_statuses(Some("g")).await.unwrap()[0].desired == stored.desired
        })
        .await;
    }
}

#[tokio::test]
async fn a_delta_index_reaches_the_other_replica_and_the_nodes() {
    let r = replicas().await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    r.a.save_node(node("n1", "g"), true).await.unwrap();
    let session = r.a.open_session("n1").await.unwrap();
    let (text, parsed) = manifest("app-1");
    let target = &parsed.artifacts[0];
    let base = "fedcba9876543210".repeat(4);
    let delta = flotilla_proto::delta::Delta {
        artifact: target.name.clone(),
        name: flotilla_proto::delta::Delta::file_name(&target.name, &base),
        base_sha256: base,
        base_size: 9,
        sha256: "ab".repeat(32),
        size: 4,
        target_sha256: target.sha256.clone(),
        target_size: target.size,
    };
    let index = flotilla_proto::delta::DeltaIndex::new(text.as_bytes(), vec![delta]).to_bytes();
    let index = String::from_utf8(index).unwrap();
    r.b.add_patch(
        text,
        vec!["sig".into()],
        index.clone(),
        "tester",
        parsed,
        RolloutRequest::default(),
    )
    .await
    .unwrap();
    // The delta file is an artifact the leader may fetch and serve.
    eventually("the leader knows the delta's size", || async {
        r.a.artifact_size(&"ab".repeat(32)).await == Some(4)
    })
    .await;
    assert_eq!(r.b.artifact_size(&"ab".repeat(32)).await, Some(4));
    assert_eq!(r.a.artifact_size(&"cd".repeat(32)).await, None);
    // The node is sent the index beside the manifest, byte for byte.
    let mut desired = session.desired.clone();
    eventually("the node is offered the patch", || {
        let offered = desired.borrow_and_update().manifests.clone();
        async move { !offered.is_empty() }
    })
    .await;
    let offered = desired.borrow().manifests[0].clone();
    assert_eq!(offered.deltas, index.as_bytes());
    assert_eq!(
        r.a.patch_info("app-1").await.unwrap().record.deltas,
        index,
        "stored with the patch"
    );
}

#[tokio::test]
async fn patches_published_at_once_on_two_replicas_get_their_own_numbers() {
    let r = replicas().await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    let (t1, p1) = manifest("app-1");
    let (t2, p2) = manifest("app-2");
    let (a, b) = (r.a.clone(), r.b.clone());
    let one = tokio::spawn(async move {
        a.add_patch(
            t1,
            vec![],
            String::new(),
            "x",
            p1,
            RolloutRequest::default(),
        )
        .await
    });
    let two = tokio::spawn(async move {
        b.add_patch(
            t2,
            vec![],
            String::new(),
            "y",
            p2,
            RolloutRequest::default(),
        )
        .await
    });
    let (one, two) = (one.await.unwrap().unwrap(), two.await.unwrap().unwrap());
    assert_ne!(one.seq, two.seq);
    let mut seqs = [one.seq, two.seq];
    seqs.sort();
    assert_eq!(seqs, [1, 2]);
    // Each patch has its rollout.
    for id in ["app-1", "app-2"] {
        let rec: Option<RolloutRecord> = r.db.get(&rollout_record::key(id)).await.unwrap();
        assert!(rec.is_some(), "{id} has a rollout");
    }
}

#[tokio::test]
async fn a_follower_cannot_make_the_leaders_writes() {
    let r = replicas().await;
    r.b.set_group("g", 1, None, true).await.unwrap();
    r.b.save_node(node("n1", "g"), true).await.unwrap();
    // The follower assigns no roles of its own: only the leader's assignment
    // (fenced) is stored.
    let writes = {
        let mut st = r.b.state.lock().await;
        r.b.assign_roles(&mut st, "g")
    };
    assert!(writes.is_empty());
    let err = r.b.commit(vec![], true).await;
    assert!(err.is_err(), "a fenced write from a follower is refused");
}

#[tokio::test]
async fn a_session_on_one_replica_is_online_on_all_until_its_lease_goes() {
    let r = replicas().await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    r.a.save_node(node("n1", "g"), true).await.unwrap();
    let online =
        |f: Arc<Fleet>| async move { f.group_statuses(Some("g")).await.unwrap()[0].online };
    assert_eq!(online(r.a.clone()).await, 0);
    let _session = r.b.open_session("n1").await.unwrap();
    assert_eq!(online(r.b.clone()).await, 1);
    eventually(
        "the leader sees the node online on the other replica",
        || async { online(r.a.clone()).await == 1 },
    )
    .await;
    // Held online elsewhere, it is made active by the leader.
    eventually("the leader makes it active", || async {
        role_on(&r.a, "n1").await == Some(Role::Active)
    })
    .await;
    // The replica goes (its lease with it): the node is offline everywhere.
    r.stop_b.cancel();
    eventually(
        "the node is offline once the other replica is gone",
        || async { online(r.a.clone()).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn a_new_leader_declares_nobody_lost_before_its_startup_grace() {
    let grace = Duration::from_secs(2);
    let r = replicas_with(FleetConfig {
        offline_grace: Duration::from_millis(100),
        startup_grace: grace,
        ..CFG
    })
    .await;
    r.a.set_group("g", 1, None, true).await.unwrap();
    r.a.save_node(node("n1", "g"), true).await.unwrap();
    r.a.save_node(node("n2", "g"), true).await.unwrap();
    let _n1 = r.a.open_session("n1").await.unwrap();
    eventually("n1 active", || async {
        role_on(&r.a, "n1").await == Some(Role::Active)
    })
    .await;
    let _n2 = r.b.open_session("n2").await.unwrap();
    // Long past `b`'s own start: only a grace counted from when it takes the
    // lead holds it back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.b.started.elapsed() < grace * 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader dies with n1's session; `b` takes over.
    r.stop_a.cancel();
    eventually("b leads", || async { r.b.leadership().is_leading() }).await;
    let took_over = tokio::time::Instant::now();
    while took_over.elapsed() < grace / 2 {
        assert_eq!(
            role_on(&r.b, "n2").await,
            Some(Role::Standby),
            "promoted during the new leader's startup grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("n2 replaces the lost n1 after the grace", || async {
        role_on(&r.b, "n2").await == Some(Role::Active)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_joins_into_one_group_all_succeed() {
    let r = replicas().await;
    // Every join reconciles the group it joins: done at once on both
    // replicas, none may fail for the others.
    let joins: Vec<_> = (0..256)
        .map(|i| {
            let f = if i % 2 == 0 { r.a.clone() } else { r.b.clone() };
            tokio::spawn(async move { f.save_node(node(&format!("n{i}"), "g"), true).await })
        })
        .collect();
    for j in joins {
        j.await.unwrap().expect("every join is stored");
    }
    eventually("both views have every node", || async {
        r.a.nodes(Some("g")).await.is_ok_and(|n| n.len() == 256)
            && r.b.nodes(Some("g")).await.is_ok_and(|n| n.len() == 256)
    })
    .await;
}

/// A node of group g at site `site`, listening for its peers when `url` is
/// not empty, marked to serve when `marked`, enrolled at `enrolled`.
fn site_node(id: &str, site: &str, url: &str, marked: bool, enrolled: i64) -> NodeRecord {
    let mut n = node(id, "g");
    n.labels.insert("site".into(), site.into());
    n.facts.site_url = url.into();
    n.facts.serve_site = marked;
    n.enrolled_at = enrolled;
    n
}

fn put(st: &mut State, n: NodeRecord) {
    let id = n.id.clone();
    let old = st.nodes.insert(id.clone(), n);
    st.index_site_server(old.as_ref().map(|o| o.group.as_str()), &id);
}

fn online(st: &mut State, ids: &[&str]) {
    for id in ids {
        st.remote_count.insert(id.to_string(), 1);
    }
}

#[test]
fn a_site_is_served_by_a_marked_agent_first_then_the_longest_enrolled_online() {
    let mut st = State::default();
    put(
        &mut st,
        site_node("a", "x", "https://10.0.0.1:7444", false, 10),
    );
    put(
        &mut st,
        site_node("b", "x", "https://10.0.0.2:7444", false, 5),
    );
    put(
        &mut st,
        site_node("c", "x", "https://10.0.0.3:7444", true, 20),
    );
    put(&mut st, site_node("d", "x", "", false, 1));
    put(
        &mut st,
        site_node("e", "y", "https://10.0.1.1:7444", false, 1),
    );
    online(&mut st, &["a", "c", "d", "e"]);
    let ids = |v: Vec<&NodeRecord>| v.into_iter().map(|n| n.id.clone()).collect::<Vec<_>>();
    // b listens but is offline; d does not listen.
    assert_eq!(ids(st.site_servers("g/x")), ["c", "a"]);
    let peers = |st: &State, id: &str| {
        st.site_peers_for(&st.nodes[id])
            .into_iter()
            .map(|p| p.node_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(peers(&st, "d"), ["c", "a"]);
    assert_eq!(
        peers(&st, "a"),
        ["c"],
        "a fallback is told of the serving agent"
    );
    assert!(
        peers(&st, "c").is_empty(),
        "the serving agent fetches for the site"
    );
    assert!(peers(&st, "e").is_empty(), "alone at its site");
    // The marked agent goes offline: the longest enrolled that listens serves.
    st.remote_count.remove("c");
    assert_eq!(ids(st.site_servers("g/x")), ["a"]);
    online(&mut st, &["b"]);
    assert_eq!(ids(st.site_servers("g/x")), ["b", "a"]);
    // Moved to another site, or revoked: no longer a candidate there.
    put(
        &mut st,
        site_node("b", "y", "https://10.0.0.2:7444", false, 5),
    );
    assert_eq!(ids(st.site_servers("g/x")), ["a"]);
    assert_eq!(ids(st.site_servers("g/y")), ["e", "b"]);
    let mut revoked = site_node("a", "x", "https://10.0.0.1:7444", false, 10);
    revoked.status = NodeStatus::Revoked;
    put(&mut st, revoked);
    assert!(st.site_servers("g/x").is_empty());
    assert!(peers(&st, "d").is_empty());
}
