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
