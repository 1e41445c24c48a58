//! The pipeline's verdicts that need no server: expiry is judged against the time
//! the update started, and a host with no pinned keys applies nothing.

use super::*;
use crate::state::{Desired, Identity, Role};

fn iso(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A store holding an identity that pins `pk` (or nothing).
fn pipeline(dir: &Path, pk: Option<String>) -> Pipeline {
    let store = Store::open(&dir.join("state")).unwrap();
    let identity = Identity {
        node_id: "node-1".into(),
        group: "g".into(),
        key_pem: String::new(),
        cert_pem: String::new(),
        ca_pem: String::new(),
        servers: vec!["https://127.0.0.1:1".into()],
        token_id: "abcdefghij".into(),
        machine_id: "m".into(),
        renewals: 0,
        trusted_keys: pk.into_iter().collect(),
        trust_threshold: 1,
    };
    store
        .save_joined(&identity, &Desired::initial(Role::Active))
        .unwrap();
    let journal = Journal::open(store.tree("journal").unwrap());
    let outbox = Outbox::open(store.tree("outbox").unwrap()).unwrap();
    Pipeline::new(
        store,
        journal,
        outbox,
        PipelineConfig {
            root: dir.join("root"),
            policy: LocalPolicy::default(),
            work_dir: dir.to_path_buf(),
            fetch: FetchLimits::default(),
            servers: Vec::new(),
        },
    )
}

/// A signed entry whose manifest expired an hour ago, started at `started_at`.
fn expired_entry(started_at: i64) -> (Entry, String) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let manifest = format!(
        r#"{{"schema":1,"id":"p1","component":"c","version":"1.0.0","severity":"low",
"issued_at":"{}","expires_at":"{}",
"artifacts":[{{"name":"a.tar","sha256":"{}","size":1}}],
"install":{{"type":"files","artifact":"a.tar","destination":"/opt/c"}}}}"#,
        iso(now - time::Duration::hours(3)),
        iso(now - time::Duration::hours(1)),
        "a".repeat(64)
    );
    let sig = minisign::sign(Some(&kp.pk), &kp.sk, manifest.as_bytes(), None, None)
        .unwrap()
        .into_string();
    let entry = Entry {
        manifest_id: "p1".into(),
        manifest: manifest.into_bytes(),
        signatures: vec![sig],
        component: String::new(),
        version: String::new(),
        phase: Phase::Received,
        started_at,
        updated_at: started_at,
        error: None,
        log_tail: String::new(),
    };
    (entry, kp.pk.to_box().unwrap().into_string())
}

#[test]
fn expiry_is_judged_at_the_start_of_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let two_hours_ago = unix_now() - 7200;
    let (entry, pk) = expired_entry(two_hours_ago);
    let p = pipeline(dir.path(), Some(pk));
    // Started before the manifest expired: still valid now, whatever the clock says.
    assert!(p.verify(&entry, None).is_ok());
    // The same manifest starting now is refused.
    let fresh = Entry {
        started_at: unix_now(),
        ..entry
    };
    let err = p.verify(&fresh, None).unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn no_pinned_keys_means_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, _) = expired_entry(unix_now() - 7200);
    let p = pipeline(dir.path(), None);
    let err = p.verify(&entry, None).unwrap_err();
    assert!(err.contains("no patch-signing keys are pinned"), "{err}");
}
