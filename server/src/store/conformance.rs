//! What every backend of the storage trait must do, as one test body each
//! backend's tests run against itself.

use std::sync::Arc;

use super::{Db, Store, Update};

/// Reads, writes, prefix scans, compare-and-swap in all its cases, and the
/// typed CAS-retry update on top.
pub async fn keeps_the_promises_of_the_storage_trait(s: Arc<dyn Store>) {
    assert!(s.get("a/1").await.unwrap().is_none());
    s.put("a/1", b"one".to_vec()).await.unwrap();
    s.put("a/2", b"two".to_vec()).await.unwrap();
    s.put_unsynced("b/1", b"other".to_vec()).await.unwrap();
    s.sync().await.unwrap();
    let all = s.scan_prefix("a/").await.unwrap();
    assert_eq!(
        all,
        vec![
            ("a/1".into(), b"one".to_vec()),
            ("a/2".into(), b"two".to_vec())
        ]
    );
    assert_eq!(s.last_in_prefix("a/").await.unwrap().unwrap().0, "a/2");
    assert!(s.last_in_prefix("c/").await.unwrap().is_none());
    // Compare-and-swap: absent, present, stale, delete.
    assert!(
        s.compare_and_swap("k", None, Some(b"v1".to_vec()))
            .await
            .unwrap()
    );
    assert!(
        !s.compare_and_swap("k", None, Some(b"x".to_vec()))
            .await
            .unwrap()
    );
    assert!(
        s.compare_and_swap("k", Some(b"v1"), Some(b"v2".to_vec()))
            .await
            .unwrap()
    );
    assert!(
        !s.compare_and_swap("k", Some(b"v1"), Some(b"v3".to_vec()))
            .await
            .unwrap()
    );
    assert!(
        s.compare_and_swap_unsynced("k", Some(b"v2"), Some(b"v4".to_vec()))
            .await
            .unwrap()
    );
    assert!(s.compare_and_swap("k", Some(b"v4"), None).await.unwrap());
    assert!(s.get("k").await.unwrap().is_none());
    s.delete("a/1").await.unwrap();
    assert_eq!(s.scan_prefix("a/").await.unwrap().len(), 1);
    let db = Db::new(s);
    db.put("n/1", &5u32).await.unwrap();
    let r = db
        .update("n/1", |cur: Option<u32>| {
            Ok::<_, ()>(Update::Put(cur.unwrap_or(0) + 1))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Some(6));
}

/// The next change from `w`, or a failure after a deadline.
async fn next_change(w: &mut super::ChangeStream) -> super::Change {
    use futures::StreamExt;
    match tokio::time::timeout(std::time::Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(c))) => c,
        other => panic!("no change within 10 s: {other:?}"),
    }
}

/// Multi-key transactions with conditions, a snapshot and its revision, and
/// watches: from a revision (replaying what came after it), confined to a
/// prefix, one change per committed write with a transaction's events
/// together.
pub async fn keeps_transactions_and_history(s: Arc<dyn Store>) {
    use super::{Condition, Event, Op};
    s.put("t/a", b"1".to_vec()).await.unwrap();
    let (r0, entries) = s.snapshot("t/").await.unwrap();
    assert_eq!(entries, vec![("t/a".to_string(), b"1".to_vec())]);
    // All conditions hold: every op applies, at one new revision.
    let r1 = s
        .txn(
            vec![
                Condition::Equals("t/a".into(), b"1".to_vec()),
                Condition::Absent("t/b".into()),
            ],
            vec![
                Op::put("t/a", b"2".to_vec()),
                Op::put("t/b", b"new".to_vec()),
                Op::put("u/x", b"elsewhere".to_vec()),
            ],
        )
        .await
        .unwrap()
        .expect("conditions held");
    assert!(r1 > r0);
    // One condition fails: nothing applies.
    let refused = s
        .txn(
            vec![
                Condition::Equals("t/a".into(), b"2".to_vec()),
                Condition::Absent("t/b".into()),
            ],
            vec![Op::put("t/a", b"3".to_vec()), Op::Delete("t/b".into())],
        )
        .await
        .unwrap();
    assert_eq!(refused, None);
    assert_eq!(s.get("t/a").await.unwrap().unwrap(), b"2");
    assert_eq!(s.get("t/b").await.unwrap().unwrap(), b"new");
    s.delete("t/b").await.unwrap();
    // A watch from the snapshot replays what came after it, in order, and
    // only under its prefix.
    let mut w = s.watch("t/", r0).await.unwrap();
    let c1 = next_change(&mut w).await;
    assert_eq!(c1.revision, r1);
    assert_eq!(
        c1.events,
        vec![
            Event::Put {
                key: "t/a".into(),
                value: b"2".to_vec()
            },
            Event::Put {
                key: "t/b".into(),
                value: b"new".to_vec()
            },
        ]
    );
    let c2 = next_change(&mut w).await;
    assert!(c2.revision > r1);
    assert_eq!(c2.events, vec![Event::Delete { key: "t/b".into() }]);
    // Then live changes as they commit.
    s.put("u/y", b"not watched".to_vec()).await.unwrap();
    s.put("t/c", b"live".to_vec()).await.unwrap();
    let c3 = next_change(&mut w).await;
    assert!(c3.revision > c2.revision);
    assert_eq!(c3.events.len(), 1);
    assert_eq!(c3.events[0].key(), "t/c");
    // A second watch from the middle resumes there.
    let mut again = s.watch("t/", c1.revision).await.unwrap();
    assert_eq!(next_change(&mut again).await, c2);
    assert_eq!(next_change(&mut again).await, c3);
}

/// Leases: keys written under one live while it is renewed, go when it is
/// revoked or lapses (and watchers see them go), and a write under a lease
/// that is gone is refused.
pub async fn keeps_leases(s: Arc<dyn Store>) {
    use super::{Event, Op};
    use std::time::{Duration, Instant};
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    let put = |key: &str, lease| Op::Put {
        key: key.into(),
        value: b"held".to_vec(),
        lease: Some(lease),
    };
    s.txn(vec![], vec![put("l/a", lease), put("l/b", lease)])
        .await
        .unwrap()
        .unwrap();
    let (rev, _) = s.snapshot("l/").await.unwrap();
    // Renewed past its first TTL, the keys stay.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(s.keep_alive(lease).await.unwrap());
    }
    assert!(s.get("l/a").await.unwrap().is_some());
    s.revoke(lease).await.unwrap();
    assert!(s.get("l/a").await.unwrap().is_none());
    assert!(s.get("l/b").await.unwrap().is_none());
    assert!(!s.keep_alive(lease).await.unwrap());
    let mut w = s.watch("l/", rev).await.unwrap();
    let mut gone = Vec::new();
    while gone.len() < 2 {
        for e in next_change(&mut w).await.events {
            assert!(matches!(e, Event::Delete { .. }), "{e:?}");
            gone.push(e.key().to_string());
        }
    }
    gone.sort();
    assert_eq!(gone, ["l/a", "l/b"]);
    assert!(s.txn(vec![], vec![put("l/c", lease)]).await.is_err());
    // Not renewed: it lapses on its own and takes its key with it.
    let short = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(vec![], vec![put("l/d", short)])
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.get("l/d").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "a lapsed lease's key stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!s.keep_alive(short).await.unwrap());
    // A plain put over a leased key takes it out of the lease.
    let third = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(vec![], vec![put("l/e", third)])
        .await
        .unwrap()
        .unwrap();
    s.put("l/e", b"kept".to_vec()).await.unwrap();
    s.revoke(third).await.unwrap();
    assert_eq!(s.get("l/e").await.unwrap().unwrap(), b"kept");
}

/// A [`super::Feed`] starts with everything under its prefix, then hands
/// over each change; when the history it needs is gone (`compact` makes it
/// so), it reads afresh and starts over with everything as it is now.
pub async fn feed_follows_and_resyncs<F, Fut>(s: Arc<dyn Store>, compact: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use super::{Feed, FeedItem};
    s.put("f/a", b"1".to_vec()).await.unwrap();
    let mut feed = Feed::new(s.clone(), "f/");
    let FeedItem::Reset { revision, entries } = feed.next().await else {
        panic!("a feed starts with a full read")
    };
    assert_eq!(entries, vec![("f/a".to_string(), b"1".to_vec())]);
    s.put("f/b", b"2".to_vec()).await.unwrap();
    let FeedItem::Change(c) = feed.next().await else {
        panic!("expected the change")
    };
    assert!(c.revision > revision);
    assert_eq!(c.events[0].key(), "f/b");
    assert_eq!(feed.revision(), Some(c.revision));
    // A feed that has read everything, then falls behind a history that is
    // lost before it watches.
    let mut late = Feed::new(s.clone(), "f/");
    assert!(matches!(late.next().await, FeedItem::Reset { .. }));
    s.put("f/c", b"3".to_vec()).await.unwrap();
    s.delete("f/a").await.unwrap();
    compact().await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(20), late.next())
        .await
        .expect("the feed went quiet");
    let FeedItem::Reset { entries, .. } = next else {
        panic!("expected a fresh read after the compaction, got {next:?}")
    };
    let keys: Vec<_> = entries.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["f/b", "f/c"]);
}
