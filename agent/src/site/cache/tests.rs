//! The site cache's bounds and reads, on a real directory.

use std::time::{Duration, SystemTime};

use super::*;
use crate::state::Store;

fn cache(dir: &Path, max_bytes: u64) -> Arc<SiteCache> {
    let store = Store::open(&dir.join("state")).unwrap();
    let uplink = Uplink {
        store,
        servers: Vec::new(),
        shared: None,
        source_address: None,
    };
    SiteCache::open(
        dir.join("cache"),
        dir.join("artifacts"),
        max_bytes,
        uplink,
        FetchLimits::default(),
        1 << 20,
    )
    .unwrap()
}

fn digest(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// Puts `bytes` bytes under digest `n`, last used `age` ago.
fn put(dir: &Path, n: u8, bytes: usize, age: Duration) -> PathBuf {
    let path = dir.join(digest(n));
    std::fs::write(&path, vec![n; bytes]).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
    path
}

#[test]
fn the_least_recently_used_go_first_never_one_the_host_holds() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 250);
    let cached = dir.path().join("cache");
    std::fs::create_dir_all(dir.path().join("artifacts")).unwrap();
    // Oldest, but the host's own downloads hold it too.
    let held = put(&cached, 1, 100, Duration::from_secs(400));
    std::fs::hard_link(&held, dir.path().join("artifacts").join(digest(1))).unwrap();
    put(&cached, 2, 100, Duration::from_secs(300));
    put(&cached, 3, 100, Duration::from_secs(200));
    put(&cached, 4, 100, Duration::from_secs(100));
    // A fill in progress, and what a fill cut short left (the oldest).
    let part = |n: u8| cached.join(format!("{}.part", digest(n)));
    std::fs::write(part(5), [0u8; 50]).unwrap();
    c.table().insert(digest(5), watch::channel(Fill::Running).1);
    std::fs::write(part(6), [0u8; 300]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(part(6))
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(500))
        .unwrap();
    c.evict();
    let left: Vec<bool> = (1..=4).map(|n| cached.join(digest(n)).exists()).collect();
    assert_eq!(left, [true, false, false, true], "750 bytes down to 250");
    assert!(!part(6).exists(), "a partial file counts, and goes");
    assert!(
        part(5).exists(),
        "a fill in progress is not the cache's to evict"
    );
    assert_eq!(
        *c.stats().borrow(),
        CacheStats {
            files: 2,
            bytes: 250
        }
    );
}

#[tokio::test]
async fn a_peer_reads_complete_intact_files_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 20);
    let cached = dir.path().join("cache");
    std::fs::create_dir_all(&cached).unwrap();
    let bytes = b"seven bytes and more";
    let sha = flotilla_proto::sha256_hex(bytes);
    std::fs::write(cached.join(&sha), bytes).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(cached.join(&sha))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let mut r = c.reader(&sha).await.unwrap().expect("complete");
    assert!(r.fill.is_none());
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut r.file, &mut got)
        .await
        .unwrap();
    assert_eq!(got, bytes);
    let used = std::fs::metadata(cached.join(&sha))
        .unwrap()
        .modified()
        .unwrap();
    assert!(
        used > SystemTime::now() - Duration::from_secs(60),
        "serving it makes it recently used"
    );
    // A file damaged on disk (its name is not its digest) is removed, not
    // served.
    put(&cached, 7, 10, Duration::from_secs(60));
    assert!(c.reader(&digest(7)).await.unwrap().is_none());
    assert!(!cached.join(digest(7)).exists());
    // A partial file no fill is working on is not served.
    std::fs::write(cached.join(format!("{}.part", digest(8))), [8u8; 4]).unwrap();
    assert!(c.reader(&digest(8)).await.unwrap().is_none());
    assert!(c.reader(&digest(9)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_fill_without_servers_fails_and_leaves_no_entry_behind() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 20);
    let a = Artifact {
        name: "app.tar".into(),
        sha256: digest(3),
        size: 10,
    };
    let mut transfer = Transfer::default();
    // No identity, no servers: the fill cannot start, and says why.
    let e = c.fill(&a, &mut transfer).await.unwrap_err();
    assert!(e.to_string().contains("no identity"), "{e}");
    assert!(c.table().is_empty(), "a later fill starts afresh");
}
