//! Registration, election and fencing, against sled and a real etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::store::{Op, SledStore};

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Running {
    leadership: Leadership,
    held: Arc<Held>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(db: &Db, name: &str) -> Running {
    let held = Arc::new(Held::default());
    let stop = CancellationToken::new();
    let (leadership, task) = Replica::start(
        db.clone(),
        Replica::new_id(),
        format!("https://{name}:7443"),
        held.clone(),
        stop.clone(),
    );
    Running {
        leadership,
        held,
        stop,
        task,
    }
}

/// Two replicas: one leads, both are listed with their sessions; the
/// leader's fenced write applies, the other's is refused; when the leader
/// stops, the other leads, and the old leader's fence is refused from then on.
async fn one_leads_and_writes_are_fenced(db: Db) {
    let a = start(&db, "a");
    let b = start(&db, "b");
    until("a leader", async || {
        a.leadership.is_leading() != b.leadership.is_leading()
    })
    .await;
    let (leader, other) = if a.leadership.is_leading() {
        (a, b)
    } else {
        (b, a)
    };
    for n in 0..7 {
        leader.held.insert(&format!("node-{n}"));
    }
    until("both listed, the leader with its sessions", async || {
        let l = list(&db).await.unwrap();
        l.len() == 2 && l.iter().any(|(r, leads)| *leads && r.sessions == 7)
    })
    .await;
    // The nodes it holds are in the store under its lease.
    let held: Vec<HeldRecord> = db.list(HELD).await.unwrap();
    assert_eq!(held.iter().map(|h| h.nodes.len()).sum::<usize>(), 7);
    let write = |fence: Option<Condition>, v: &'static [u8]| {
        let store = db.raw().clone();
        async move {
            store
                .txn(
                    fence.into_iter().collect(),
                    vec![Op::put("rollouts/x", v.to_vec())],
                )
                .await
                .unwrap()
                .is_some()
        }
    };
    assert!(write(leader.leadership.fence(), b"by the leader").await);
    assert!(!write(other.leadership.fence(), b"by the other").await);
    // The leader goes; the other takes over.
    let old_fence = leader.leadership.fence();
    leader.stop.cancel();
    leader.task.await.unwrap();
    until("the other to lead", async || other.leadership.is_leading()).await;
    // Its held nodes went with its lease.
    assert!(db.list::<HeldRecord>(HELD).await.unwrap().is_empty());
    assert!(write(other.leadership.fence(), b"by the new leader").await);
    assert!(
        !write(old_fence, b"by the old leader").await,
        "a replica that no longer leads wrote through its fence"
    );
    assert_eq!(
        db.raw().get("rollouts/x").await.unwrap().unwrap(),
        b"by the new leader"
    );
    // A leader key taken from under the leader (its lease ran out while it
    // was paused) ends its leadership at its next renewal.
    db.raw().delete(LEADER).await.unwrap();
    db.raw()
        .put(LEADER, b"someone-else".to_vec())
        .await
        .unwrap();
    until("the leader to notice", async || {
        !other.leadership.is_leading()
    })
    .await;
    assert!(!write(other.leadership.fence(), b"late").await);
    other.stop.cancel();
    other.task.await.unwrap();
    db.raw().delete(LEADER).await.unwrap();
    assert!(
        list(&db).await.unwrap().is_empty(),
        "registrations outlived their replicas"
    );
}

#[tokio::test]
async fn on_sled_one_leads_and_writes_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(Arc::new(SledStore::open(dir.path()).unwrap()));
    one_leads_and_writes_are_fenced(db).await;
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn on_etcd_one_leads_and_writes_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let member = flotilla_e2e::etcd::Etcd::start(dir.path());
    let store = crate::store::etcd_store::connect_when_up(&member.url, "/r/").await;
    one_leads_and_writes_are_fenced(Db::new(Arc::new(store))).await;
}

/// A leader whose store stops answering steps down (by design two thirds of
/// a lease after its last renewal, before another could be elected; fencing
/// refuses its writes either way), and leads again once the store is back.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn a_leader_cut_off_from_etcd_steps_down_in_time_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let member = flotilla_e2e::etcd::Etcd::start(dir.path());
    let store = crate::store::etcd_store::connect_when_up(&member.url, "/cut/").await;
    let db = Db::new(Arc::new(store));
    let r = start(&db, "a");
    until("it leads", async || r.leadership.is_leading()).await;
    member.freeze();
    let frozen = Instant::now();
    until("it steps down", async || !r.leadership.is_leading()).await;
    eprintln!(
        "stepped down {:?} after the store went quiet",
        frozen.elapsed()
    );
    member.thaw();
    until("it leads again", async || r.leadership.is_leading()).await;
    r.stop.cancel();
    r.task.await.unwrap();
}
