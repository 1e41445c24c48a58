//! Records files and backup archives: round trips, and every malformed or
//! hostile input refused with its reason, nothing written outside the new
//! data dir.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::archive;
use super::records;
use crate::store::{Entries, Op, SledStore, Store};

fn sled(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SledStore::open(dir).unwrap())
}

#[tokio::test]
async fn records_round_trip_without_leased_keys_and_load_only_into_an_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    let a = sled(&tmp.path().join("a"));
    for i in 0..150 {
        a.put(
            &format!("nodes/{i:03}"),
            format!("{{\"n\":{i}}}").into_bytes(),
        )
        .await
        .unwrap();
    }
    a.put("bin", vec![0, 255, 10, 13]).await.unwrap();
    let lease = a.grant_lease(Duration::from_secs(60)).await.unwrap();
    a.txn(
        vec![],
        vec![Op::Put {
            key: "replicas/me".into(),
            value: b"x".to_vec(),
            lease: Some(lease),
        }],
    )
    .await
    .unwrap();
    let mut file = Vec::new();
    let (_, summary) = records::dump(a.as_ref(), &mut file).await.unwrap();
    assert_eq!(summary.count, 151);
    let (entries, read) = records::read(&file[..]).unwrap();
    assert_eq!(read, summary);
    assert!(entries.iter().all(|(k, _)| k != "replicas/me"));
    let b = sled(&tmp.path().join("b"));
    let loaded = records::load(b.as_ref(), entries.clone()).await.unwrap();
    assert_eq!(loaded, summary);
    assert_eq!(b.get("bin").await.unwrap().unwrap(), vec![0, 255, 10, 13]);
    let err = records::load(b.as_ref(), entries).await.unwrap_err();
    assert!(
        err.to_string().contains("already holds 151 records"),
        "{err}"
    );
}

#[test]
fn a_damaged_records_file_is_refused_with_its_line() {
    let bad = |text: &str| records::read(text.as_bytes()).unwrap_err().to_string();
    assert!(bad("{\"k\":\"a\"}\n").contains("line 1 is malformed"));
    assert!(bad("{\"k\":\"a\",\"v\":\"zz\"}\n").contains("not hex"));
    let unordered = "{\"k\":\"b\",\"v\":\"00\"}\n{\"k\":\"a\",\"v\":\"00\"}\n";
    assert!(bad(unordered).contains("line 2: key \"a\" is out of order"));
    let long = format!("{{\"k\":\"a\",\"v\":\"{}\"}}\n", "0".repeat(17 << 20));
    assert!(bad(&long).contains("longer than"));
}

/// A data dir with TLS files, two artifacts (and a partial upload), and a
/// records file.
fn data_dir(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, records::Summary) {
    use sha2::Digest;
    let dir = root.join("data");
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        std::fs::write(dir.join("tls").join(f), format!("{f} bytes")).unwrap();
    }
    std::fs::create_dir_all(dir.join("artifacts/partial")).unwrap();
    for body in [&b"one"[..], b"two"] {
        let name = hex::encode(sha2::Sha256::digest(body));
        std::fs::write(dir.join("artifacts").join(name), body).unwrap();
    }
    std::fs::write(dir.join("artifacts/partial/abc"), b"half").unwrap();
    let recs = root.join("records.jsonl");
    let text = "{\"k\":\"a\",\"v\":\"3031\"}\n{\"k\":\"b\",\"v\":\"\"}\n";
    std::fs::write(&recs, text).unwrap();
    let (_, summary) = records::read(text.as_bytes()).unwrap();
    (dir, recs, summary)
}

#[test]
fn a_backup_unpacks_into_a_new_data_dir_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, recs, summary) = data_dir(tmp.path());
    let out = tmp.path().join("b.backup");
    let info = archive::write(&out, &dir, &recs, 7, summary.clone()).unwrap();
    assert_eq!(info.artifacts, 2);
    assert!(!out.with_extension("partial").exists());
    let to = tmp.path().join("restored");
    let u = archive::unpack(&out, &to).unwrap();
    assert_eq!(u.info.records, summary);
    assert_eq!(u.info.revision, 7);
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert_eq!(
            std::fs::read(to.join("tls").join(f)).unwrap(),
            std::fs::read(dir.join("tls").join(f)).unwrap()
        );
    }
    assert_eq!(std::fs::read_dir(to.join("artifacts")).unwrap().count(), 2);
    // Not into a data dir that holds anything.
    let err = archive::unpack(&out, &to).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
}

/// A backup archive with `entries` (name, bytes) as regular files, and
/// optionally a symlink, written by hand the way a tampered file would be.
fn hand_made(path: &Path, entries: &[(&str, &[u8])], symlink: Option<&str>) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        // Names a builder would refuse (`..`) go in the raw header.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, *bytes).unwrap();
    }
    if let Some(name) = symlink {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, name, "/etc").unwrap();
    }
    tar.finish().unwrap();
}

#[test]
fn a_tampered_or_foreign_backup_is_refused_and_writes_nothing_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, recs, summary) = data_dir(tmp.path());
    let good = tmp.path().join("good.backup");
    archive::write(&good, &dir, &recs, 1, summary).unwrap();
    // The good archive's entries, to rebuild with one change each.
    let mut entries: Entries = Vec::new();
    let mut a = tar::Archive::new(std::fs::File::open(&good).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        entries.push((name, bytes));
    }
    let refused = |n: usize, change: &dyn Fn(&mut Entries), symlink: Option<&str>| {
        let mut e = entries.clone();
        change(&mut e);
        let path = tmp.path().join(format!("bad{n}.backup"));
        let borrowed: Vec<(&str, &[u8])> = e.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
        hand_made(&path, &borrowed, symlink);
        let to = tmp.path().join(format!("to{n}"));
        archive::unpack(&path, &to)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // An artifact whose bytes are not its name's digest.
    let err = refused(
        1,
        &|e| {
            let a = e
                .iter_mut()
                .find(|(n, _)| n.starts_with("artifacts/"))
                .unwrap();
            a.1 = b"evil".to_vec();
        },
        None,
    );
    assert!(err.contains("holds bytes whose sha256 is"), "{err}");
    // A path out of the data dir, or a name a backup does not have.
    for (n, name) in [(2, "../escaped"), (3, "tls/../../escaped"), (4, "db/conf")] {
        let err = refused(n, &|e| e.push((name.to_string(), b"x".to_vec())), None);
        assert!(
            err.contains("is not part of a flotilla backup"),
            "{name}: {err}"
        );
    }
    assert!(!tmp.path().join("escaped").exists());
    // A symlink entry.
    let err = refused(5, &|_| {}, Some("tls/ca.pem"));
    assert!(err.contains("is not a regular file"), "{err}");
    // A TLS file missing, and the manifest missing.
    let err = refused(6, &|e| e.retain(|(n, _)| n != "tls/ca.key"), None);
    assert!(err.contains("lacks some of the CA"), "{err}");
    let err = refused(7, &|e| e.retain(|(n, _)| n != "backup.json"), None);
    assert!(err.contains("not a flotilla backup"), "{err}");
    // An artifact left out that the manifest counts.
    let err = refused(
        8,
        &|e| {
            let i = e
                .iter()
                .position(|(n, _)| n.starts_with("artifacts/"))
                .unwrap();
            e.remove(i);
        },
        None,
    );
    assert!(err.contains("holds 1 artifacts where"), "{err}");
}
