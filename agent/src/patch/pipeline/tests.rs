//! The pipeline's verdicts that need no server: expiry is judged against the time
//! the update started (or now, for one taken up again), a host with no pinned keys applies nothing, and a committed
//! patch the server asks to undo is undone (artifacts placed where a download
//! would have left them).

use super::*;
use crate::install::tests_util::{Ent, snapshot, tar_bytes, write_mode};
use crate::state::{Desired, Identity, Role};

fn iso(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A store holding an identity that pins `pk` (or nothing).
fn pipeline(dir: &Path, pk: Option<String>) -> Pipeline {
    pipeline_with(dir, pk, LocalPolicy::default())
}

/// `pipeline`, with this host policy. The host's root is `dir/root`, downloads and
/// backups go under `dir`, and there is no server to download from.
fn pipeline_with(dir: &Path, pk: Option<String>, policy: LocalPolicy) -> Pipeline {
    pipeline_on_disk(dir, pk, policy, DiskLimits::default())
}

/// `pipeline_with`, with these disk limits.
fn pipeline_on_disk(
    dir: &Path,
    pk: Option<String>,
    policy: LocalPolicy,
    disk: DiskLimits,
) -> Pipeline {
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
        trust_version: 0,
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
            policy,
            work_dir: dir.to_path_buf(),
            fetch: FetchLimits::default(),
            servers: Vec::new(),
            executor: Executor::Host,
            shared: None,
            source_address: None,
            site_cache: None,
            textfile: None,
            disk,
        },
    )
}

/// The minisign signature of `bytes` by `kp`.
fn sign(kp: &minisign::KeyPair, bytes: &[u8]) -> String {
    minisign::sign(Some(&kp.pk), &kp.sk, bytes, None, None)
        .unwrap()
        .into_string()
}

/// `kp`'s public key as a host pins it.
fn public_key(kp: &minisign::KeyPair) -> String {
    kp.pk.to_box().unwrap().into_string()
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
    let sig = sign(&kp, manifest.as_bytes());
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
        transfer: None,
        deltas: String::new(),
    };
    (entry, public_key(&kp))
}

#[test]
fn expiry_is_judged_at_the_start_of_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let two_hours_ago = unix_now() - 7200;
    let (entry, pk) = expired_entry(two_hours_ago);
    let p = pipeline(dir.path(), Some(pk));
    // Started before the manifest expired: still valid now, whatever the clock says.
    assert!(p.verify(&entry, None, entry.started_at).is_ok());
    // The same manifest starting now is refused.
    let fresh = Entry {
        started_at: unix_now(),
        ..entry
    };
    let stop = p.verify(&fresh, None, fresh.started_at).unwrap_err();
    assert_eq!(stop.phase, Phase::Rejected);
    assert!(stop.error.contains("expired"), "{}", stop.error);
}

#[tokio::test]
async fn a_patch_taken_up_again_is_judged_now_not_when_first_received() {
    let (_tmp, dir) = host();
    let root = dir.join("root");
    let before = snapshot(&root);
    // Received and downloaded ahead two hours ago, before the manifest
    // expired an hour ago; now offered for install.
    let (mut entry, pk) = expired_entry(unix_now() - 7200);
    let p = pipeline_with(&dir, Some(pk), host_policy(false));
    p.journal.record(&entry).unwrap();
    for ph in [Phase::Verified, Phase::Downloaded] {
        entry.phase = ph;
        p.journal.record(&entry).unwrap();
    }
    let signed = pb::SignedManifest {
        id: entry.manifest_id.clone(),
        manifest: entry.manifest.clone().into(),
        signatures: entry.signatures.clone(),
        ..Default::default()
    };
    p.take(offer(&[&signed], &[])).await;
    let got = p.journal.get("p1").unwrap().unwrap();
    assert_eq!(got.phase, Phase::Rejected);
    assert!(
        got.error.as_deref().unwrap_or("").contains("expired"),
        "{:?}",
        got.error
    );
    assert_eq!(snapshot(&root), before);
}

#[test]
fn no_pinned_keys_means_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, _) = expired_entry(unix_now() - 7200);
    let p = pipeline(dir.path(), None);
    let stop = p.verify(&entry, None, entry.started_at).unwrap_err();
    assert_eq!(stop.phase, Phase::Rejected);
    assert!(
        stop.error.contains("no patch-signing keys are pinned"),
        "{}",
        stop.error
    );
}

// ---- Undoing committed patches at the server's request ----

/// Component of every patch below.
const COMPONENT: &str = "c";

/// Signs manifests with one key and places their artifacts where a download
/// would have left them.
struct Publisher {
    kp: minisign::KeyPair,
}

impl Publisher {
    fn new() -> Self {
        Self {
            kp: minisign::KeyPair::generate_unencrypted_keypair().unwrap(),
        }
    }

    fn public_key(&self) -> String {
        public_key(&self.kp)
    }

    /// A valid manifest of `COMPONENT` at `version` with `artifacts` (name,
    /// content), the `install` and optional `rollback` JSON objects, signed.
    fn manifest(
        &self,
        id: &str,
        version: &str,
        artifacts: &[(&str, &[u8])],
        install: &str,
        rollback: Option<&str>,
    ) -> pb::SignedManifest {
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let artifacts: Vec<String> = artifacts
            .iter()
            .map(|(name, data)| {
                format!(
                    r#"{{"name":"{name}","sha256":"{}","size":{}}}"#,
                    flotilla_proto::sha256_hex(data),
                    data.len()
                )
            })
            .collect();
        let rollback = rollback.map_or(String::new(), |r| format!(r#","rollback":{r}"#));
        let manifest = format!(
            r#"{{"schema":1,"id":"{id}","component":"{COMPONENT}","version":"{version}","severity":"low",
"issued_at":"{}","expires_at":"{}","artifacts":[{}],"install":{install}{rollback}}}"#,
            iso(now - time::Duration::hours(1)),
            iso(now + time::Duration::hours(1)),
            artifacts.join(",")
        );
        pb::SignedManifest {
            id: id.into(),
            signatures: vec![sign(&self.kp, manifest.as_bytes())],
            manifest: manifest.into_bytes().into(),
            ..Default::default()
        }
    }
}

/// Puts `data` where the pipeline keeps downloaded artifacts.
fn place_artifact(p: &Pipeline, data: &[u8]) {
    std::fs::create_dir_all(p.artifact_dir()).unwrap();
    std::fs::write(
        p.artifact_dir().join(flotilla_proto::sha256_hex(data)),
        data,
    )
    .unwrap();
}

/// A files patch of `COMPONENT` unpacking `entries` into /opt/c, its artifact placed.
fn files_patch(
    publisher: &Publisher,
    p: &Pipeline,
    id: &str,
    version: &str,
    entries: &[Ent],
) -> pb::SignedManifest {
    let tar = tar_bytes(entries);
    place_artifact(p, &tar);
    publisher.manifest(
        id,
        version,
        &[("a.tar", &tar)],
        r#"{"type":"files","artifact":"a.tar","destination":"/opt/c"}"#,
        Some(r#"{"type":"restore"}"#),
    )
}

/// A host policy allowing files under /opt/c and scripts if asked.
fn host_policy(allow_scripts: bool) -> LocalPolicy {
    LocalPolicy {
        allow_health_checks: true,
        allowed_paths: vec![PathBuf::from("/opt/c")],
        allow_scripts,
        max_artifact_bytes: 16 << 20,
    }
}

fn offer(manifests: &[&pb::SignedManifest], rollback: &[&str]) -> Offer {
    Offer {
        manifests: manifests.iter().map(|m| (*m).clone()).collect(),
        prefetch: Vec::new(),
        rollback: rollback.iter().map(|id| id.to_string()).collect(),
        target: NodeTarget::default(),
        site_peers: Vec::new(),
    }
}

fn phase(p: &Pipeline, id: &str) -> Option<Phase> {
    p.journal.get(id).unwrap().map(|e| e.phase)
}

/// The queued reports about `id`: (phase, error).
fn reports(p: &Pipeline, id: &str) -> Vec<(Phase, String)> {
    p.outbox
        .pending()
        .unwrap()
        .into_iter()
        .filter(|(_, r)| r.manifest_id == id)
        .map(|(_, r)| (r.phase, r.error))
        .collect()
}

/// Acknowledges every queued report, as a reachable server would.
fn ack_all(p: &Pipeline) {
    for (seq, _) in p.outbox.pending().unwrap() {
        p.outbox.ack(seq).unwrap();
    }
}

/// A fresh scratch directory (canonical, so a symlinked temp dir does not look
/// like a symlink to the install) with the host's /opt/c holding version 0.
fn host() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    write_mode(&dir.join("root/opt/c/bin/app"), b"app 0", 0o755);
    write_mode(&dir.join("root/opt/c/etc/app.conf"), b"conf 0", 0o600);
    (tmp, dir)
}

const V1: &[Ent] = &[
    Ent::File("bin/app", b"app 1", 0o755),
    Ent::File("lib/new.so", b"lib 1", 0o644),
];
const V2: &[Ent] = &[
    Ent::File("bin/app", b"app 2", 0o750),
    Ent::File("etc/app.conf", b"conf 2", 0o644),
];

/// Runs a pipeline as the agent starts one: resume, then the offer, then stop.
async fn start(p: Pipeline, offer: Offer) {
    let (tx, rx) = watch::channel(offer);
    drop(tx);
    p.run(rx).await;
}

#[tokio::test]
async fn a_reverted_files_patch_restores_the_exact_previous_files() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let root = dir.join("root");
    let before = snapshot(&root);

    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    let at_v1 = snapshot(&root);
    assert_ne!(at_v1, before);
    let p2 = files_patch(&publisher, &p, "p2", "1.1.0", V2);
    p.take(offer(&[&p1, &p2], &[])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    assert_eq!(std::fs::read(root.join("opt/c/bin/app")).unwrap(), b"app 2");
    assert_eq!(p.journal.installed_versions().unwrap()[COMPONENT], "1.1.0");
    ack_all(&p);

    // Asked to undo p1 while p2 is installed over it: refused, nothing touched
    // (p1's backup would leave p2's files half old).
    p.take(offer(&[&p1, &p2], &["p1"])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    assert_eq!(std::fs::read(root.join("opt/c/bin/app")).unwrap(), b"app 2");
    let refused = reports(&p, "p1");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, Phase::Committed);
    assert!(
        refused[0].1.contains("a newer patch of c (p2)"),
        "{refused:?}"
    );
    ack_all(&p);

    // The rollout of p2 is aborted: the host goes back to p1's files, exactly.
    p.take(offer(&[&p1], &["p2"])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), at_v1);
    assert_eq!(p.journal.installed_versions().unwrap()[COMPONENT], "1.0.0");
    // Reported before acting, then the outcome.
    assert_eq!(
        reports(&p, "p2"),
        [
            (Phase::Reverting, String::new()),
            (Phase::RolledBack, REVERTED.to_string())
        ]
    );
    let entry = p.journal.get("p2").unwrap().unwrap();
    assert_eq!(entry.error.as_deref(), Some(REVERTED));

    // Then p1's too (now the newest): back to what the host had before any patch.
    p.take(offer(&[], &["p1"])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), before);
    assert!(
        !p.journal
            .installed_versions()
            .unwrap()
            .contains_key(COMPONENT)
    );

    // Undone for good: offered again (and asked to undo again), nothing happens.
    ack_all(&p);
    p.take(offer(&[&p1, &p2], &["p1", "p2"])).await;
    p.take(offer(&[&p1, &p2], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::RolledBack));
    assert_eq!(phase(&p, "p2"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), before);
    assert!(p.outbox.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_while_reverting_finishes_the_undo_at_the_next_start() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let root = dir.join("root");
    let before = snapshot(&root);
    for restored_already in [false, true] {
        let id = if restored_already {
            "p-late"
        } else {
            "p-early"
        };
        let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
        let m = files_patch(&publisher, &p, id, "1.0.0", V1);
        p.take(offer(&[&m], &[])).await;
        assert_eq!(phase(&p, id), Some(Phase::Committed));
        assert_ne!(snapshot(&root), before);
        // The agent records Reverting, then dies before (or, the second time,
        // right after) restoring the files.
        let mut entry = p.journal.get(id).unwrap().unwrap();
        assert!(p.advance(&mut entry, Phase::Reverting, "", ""));
        if restored_already {
            install::rollback_files(&p.patch_dir(id)).unwrap();
            assert_eq!(snapshot(&root), before);
        }
        drop(p);

        // The next start finishes the undo, with no offer asking for it.
        let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
        start(p, Offer::default()).await;
        let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
        assert_eq!(phase(&p, id), Some(Phase::RolledBack), "{id}");
        assert_eq!(snapshot(&root), before, "{id}");
        let phases: Vec<Phase> = reports(&p, id).into_iter().map(|(ph, _)| ph).collect();
        assert_eq!(phases.last(), Some(&Phase::RolledBack), "{id}");
        assert!(
            !p.journal
                .installed_versions()
                .unwrap()
                .contains_key(COMPONENT)
        );
    }
}

/// A script patch: the install script writes a marker under the root, the
/// rollback script (if any) removes it.
fn script_patch(
    publisher: &Publisher,
    p: &Pipeline,
    id: &str,
    with_rollback: bool,
) -> (pb::SignedManifest, &'static [u8]) {
    const INSTALL: &[u8] = b"#!/bin/sh\nset -e\nmkdir -p \"$FLOTILLA_ROOT/opt/c\"\necho \"$FLOTILLA_VERSION\" > \"$FLOTILLA_ROOT/opt/c/marker\"\n";
    const ROLLBACK: &[u8] =
        b"#!/bin/sh\nset -e\necho undoing\nrm -f \"$FLOTILLA_ROOT/opt/c/marker\"\n";
    place_artifact(p, INSTALL);
    let mut artifacts: Vec<(&str, &[u8])> = vec![("install.sh", INSTALL)];
    if with_rollback {
        artifacts.push(("rollback.sh", ROLLBACK));
    }
    let m = publisher.manifest(
        id,
        "2.0.0",
        &artifacts,
        r#"{"type":"script","artifact":"install.sh","timeout_secs":30}"#,
        with_rollback.then_some(r#"{"type":"script","artifact":"rollback.sh","timeout_secs":30}"#),
    );
    if with_rollback {
        place_artifact(p, ROLLBACK);
    }
    (m, ROLLBACK)
}

#[tokio::test]
async fn a_script_install_without_a_rollback_plan_stays_committed() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(true));
    let (m, _) = script_patch(&publisher, &p, "s1", false);
    p.take(offer(&[&m], &[])).await;
    assert_eq!(phase(&p, "s1"), Some(Phase::Committed));
    let marker = dir.join("root/opt/c/marker");
    assert_eq!(std::fs::read(&marker).unwrap(), b"2.0.0\n");
    ack_all(&p);

    // Asked twice: refused once, with the reason, and the host is left alone.
    p.take(offer(&[], &["s1"])).await;
    p.take(offer(&[], &["s1"])).await;
    assert_eq!(phase(&p, "s1"), Some(Phase::Committed));
    assert!(marker.exists());
    assert_eq!(
        reports(&p, "s1"),
        [(
            Phase::Committed,
            format!("cannot be rolled back: {NO_ROLLBACK_PLAN}")
        )]
    );
    assert_eq!(p.journal.installed_versions().unwrap()[COMPONENT], "2.0.0");
}

#[tokio::test]
async fn a_rollback_script_is_fetched_again_if_gone_and_run() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(true));
    let (m, rollback) = script_patch(&publisher, &p, "s2", true);
    p.take(offer(&[&m], &[])).await;
    assert_eq!(phase(&p, "s2"), Some(Phase::Committed));
    let marker = dir.join("root/opt/c/marker");
    assert!(marker.exists());
    ack_all(&p);

    // The commit kept the artifacts (the installed version's); a copy that
    // was changed since is not trusted, and with no server to fetch from the
    // patch stays committed.
    let at = p.artifact_dir().join(flotilla_proto::sha256_hex(rollback));
    assert!(at.exists(), "kept with the installed version");
    std::fs::write(&at, b"#!/bin/sh\necho not the signed script\n").unwrap();
    p.take(offer(&[], &["s2"])).await;
    assert_eq!(phase(&p, "s2"), Some(Phase::Committed));
    assert!(marker.exists());
    let sent = reports(&p, "s2");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Phase::Committed);
    assert!(
        sent[0]
            .1
            .starts_with("cannot be rolled back: download failed"),
        "{}",
        sent[0].1
    );
    ack_all(&p);

    // Once the script can be had, it runs.
    place_artifact(&p, rollback);
    p.take(offer(&[], &["s2"])).await;
    assert_eq!(phase(&p, "s2"), Some(Phase::RolledBack));
    assert!(!marker.exists());
    let entry = p.journal.get("s2").unwrap().unwrap();
    assert!(entry.log_tail.contains("undoing"), "{}", entry.log_tail);
    let phases: Vec<Phase> = reports(&p, "s2").into_iter().map(|(ph, _)| ph).collect();
    assert_eq!(phases, [Phase::Reverting, Phase::RolledBack]);
    assert!(!at.exists(), "cleaned up again");
}

#[tokio::test]
async fn a_tampered_journal_entry_is_not_undone() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(true));
    let (m, _) = script_patch(&publisher, &p, "s3", true);
    p.take(offer(&[&m], &[])).await;
    assert_eq!(phase(&p, "s3"), Some(Phase::Committed));
    ack_all(&p);

    // Someone with write access to the database points the rollback elsewhere.
    let mut entry = p.journal.get("s3").unwrap().unwrap();
    let text = String::from_utf8(entry.manifest.clone()).unwrap();
    entry.manifest = text
        .replace(r#""timeout_secs":30}}"#, r#""timeout_secs":31}}"#)
        .into_bytes();
    assert_ne!(entry.manifest, m.manifest);
    p.store
        .tree("journal")
        .unwrap()
        .insert("s3", serde_json::to_vec(&entry).unwrap())
        .unwrap();

    // Even with the rollback script at hand, nothing runs.
    script_patch(&publisher, &p, "s3", true);
    p.take(offer(&[], &["s3"])).await;
    assert_eq!(phase(&p, "s3"), Some(Phase::Committed));
    assert!(dir.join("root/opt/c/marker").exists());
    let sent = reports(&p, "s3");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Phase::Committed);
    assert!(
        sent[0].1.starts_with(
            "cannot be rolled back: signature 0 is from a trusted key but over other bytes"
        ),
        "{}",
        sent[0].1
    );
}

#[tokio::test]
async fn undoing_a_components_commits_at_once_goes_newest_first() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let root = dir.join("root");
    let before = snapshot(&root);
    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    let p2 = files_patch(&publisher, &p, "p2", "1.1.0", V2);
    p.take(offer(&[&p1], &[])).await;
    p.take(offer(&[&p1, &p2], &[])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    ack_all(&p);
    // Named oldest first (and one twice): undone newest first, both.
    p.take(offer(&[], &["p1", "p2", "p1"])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::RolledBack));
    assert_eq!(phase(&p, "p2"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), before);
    assert!(reports(&p, "p1").iter().all(|(_, e)| !e.contains("newer")));
}

#[tokio::test]
async fn a_delta_index_past_its_limit_is_never_kept_and_none_outlives_its_patch() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let mut big = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    big.deltas = vec![b' '; flotilla_proto::delta::MAX_INDEX_BYTES + 1].into();
    let mut small = files_patch(&publisher, &p, "p2", "1.1.0", V2);
    small.deltas = b"{}".to_vec().into();
    // Offered ahead only: the small index is kept for the install to come.
    let mut ahead = offer(&[], &[]);
    ahead.prefetch = vec![big.clone(), small.clone()];
    p.take(ahead).await;
    let deltas = |id: &str| p.journal.get(id).unwrap().unwrap().deltas;
    assert_eq!(deltas("p1"), "");
    assert_eq!(deltas("p2"), "{}");
    p.take(offer(&[&big, &small], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    assert_eq!(deltas("p2"), "", "a finished patch keeps no index");
}

#[tokio::test]
async fn a_delta_never_removes_a_file_it_did_not_bring() {
    let (_tmp, dir) = host();
    let p = pipeline_with(
        &dir,
        Some(Publisher::new().public_key()),
        host_policy(false),
    );
    // Another patch's download, the base, and a target not here yet.
    let other = b"another patch's artifact".to_vec();
    let base = b"the base".to_vec();
    let target = vec![7u8; 4096];
    place_artifact(&p, &other);
    place_artifact(&p, &base);
    let sha = flotilla_proto::sha256_hex;
    let a = flotilla_proto::manifest::Artifact {
        name: "app.tar".into(),
        sha256: sha(&target),
        size: target.len() as u64,
    };
    // An index (trusted for nothing) whose delta has the other file's digest.
    let d = flotilla_proto::delta::Delta {
        artifact: "app.tar".into(),
        name: flotilla_proto::delta::Delta::file_name("app.tar", &sha(&base)),
        base_sha256: sha(&base),
        base_size: base.len() as u64,
        sha256: sha(&other),
        size: other.len() as u64,
        target_sha256: a.sha256.clone(),
        target_size: a.size,
    };
    let index = flotilla_proto::delta::DeltaIndex::new(b"{}", vec![d]);
    let sources = p.sources().unwrap();
    let mut transfer = Default::default();
    assert!(
        !p.rebuilt_from_delta(&sources, &index, &a, &mut transfer)
            .await
    );
    assert_eq!(
        std::fs::read(p.artifact_dir().join(sha(&other))).unwrap(),
        other
    );
    assert!(p.artifact_dir().join(sha(&base)).is_file());
}

#[tokio::test]
async fn only_committed_patches_are_undone() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let root = dir.join("root");
    // One in progress (as a crash left it), one failed, and one offered in the
    // same state that asks for it to be undone: never started.
    let mid = files_patch(&publisher, &p, "mid", "1.0.0", V1);
    let mut entry = Entry {
        manifest_id: "mid".into(),
        manifest: mid.manifest.to_vec(),
        signatures: mid.signatures.clone(),
        component: COMPONENT.into(),
        version: "1.0.0".into(),
        phase: Phase::Received,
        started_at: unix_now(),
        updated_at: unix_now(),
        error: None,
        log_tail: String::new(),
        transfer: None,
        deltas: String::new(),
    };
    p.journal.record(&entry).unwrap();
    for ph in [Phase::Verified, Phase::Downloaded] {
        entry.phase = ph;
        p.journal.record(&entry).unwrap();
    }
    let failed = Entry {
        manifest_id: "failed".into(),
        phase: Phase::Failed,
        ..entry.clone()
    };
    p.journal.record(&failed).unwrap();
    let fresh = files_patch(&publisher, &p, "fresh", "1.2.0", V2);
    let before = snapshot(&root);

    p.take(offer(
        &[&fresh],
        &["mid", "failed", "fresh", "unknown", "../x"],
    ))
    .await;
    assert_eq!(phase(&p, "mid"), Some(Phase::Downloaded));
    assert_eq!(phase(&p, "failed"), Some(Phase::Failed));
    assert_eq!(phase(&p, "fresh"), None);
    assert_eq!(phase(&p, "unknown"), None);
    assert_eq!(snapshot(&root), before);
    assert!(p.outbox.pending().unwrap().is_empty());
}

#[tokio::test]
async fn the_no_op_executor_walks_every_step_but_leaves_the_host_alone() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let mut p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    p.cfg.executor = Executor::NoOp;
    let root = dir.join("root");
    let before = snapshot(&root);

    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    assert_eq!(snapshot(&root), before);
    let phases: Vec<Phase> = reports(&p, "p1").into_iter().map(|(ph, _)| ph).collect();
    assert_eq!(
        phases,
        [
            Phase::Received,
            Phase::Verified,
            Phase::Downloaded,
            Phase::Applying,
            Phase::Applied,
            Phase::Healthy,
            Phase::Committed
        ]
    );
    // Signatures still count: a manifest signed by another key is rejected.
    let stranger = Publisher::new();
    let p2 = files_patch(&stranger, &p, "p2", "1.1.0", V2);
    p.take(offer(&[&p1, &p2], &[])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Rejected));
    assert_eq!(snapshot(&root), before);
}

#[tokio::test]
async fn a_rollback_the_host_stops_is_retried_until_it_completes_and_says_so_meanwhile() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let root = dir.join("root");
    let before = snapshot(&root);
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    // An install whose plan and backups are in place, then stopped in Applying
    // with a reason: what a failed install leaves for its rollback.
    let signed = files_patch(&publisher, &p, "p-1", "1.0.0", V1);
    p.take(offer(&[&signed], &[])).await;
    assert_eq!(phase(&p, "p-1"), Some(Phase::Committed));
    let from = p.patch_dir("p-1");
    let to = p.patch_dir("p-2");
    std::fs::create_dir_all(to.join("backup")).unwrap();
    for f in ["plan.json", "backup/0"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
    let mut m = Manifest::parse(&signed.manifest).unwrap();
    m.id = "p-2".into();
    let mut entry = p.journal.get("p-1").unwrap().unwrap();
    entry.manifest_id = "p-2".into();
    for phase in [
        Phase::Received,
        Phase::Verified,
        Phase::Downloaded,
        Phase::Applying,
    ] {
        entry.phase = phase;
        p.journal.record(&entry).unwrap();
    }
    // Something puts a symlink where the rollback must restore a file.
    let bin = root.join("opt/c/bin");
    std::fs::rename(&bin, root.join("opt/c/bin.moved")).unwrap();
    std::os::unix::fs::symlink(dir.join("elsewhere"), &bin).unwrap();

    let why = Stop::new(Phase::RolledBack, "install failed: No space left on device");
    let fixer = async {
        // The node's state says the rollback is not complete, and why.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let e = p.journal.get("p-2").unwrap().unwrap();
            if e.error
                .as_deref()
                // Any try: with jitter the first retry can come and go
                // between two looks.
                .is_some_and(|x| x.contains("rollback not complete (try "))
            {
                assert_eq!(e.phase, Phase::Applying);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no retry note: {:?}",
                e.error
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (ph, error) = reports(&p, "p-2").pop().unwrap();
        assert_eq!(ph, Phase::Applying);
        assert!(error.contains("is a symlink on this host"), "{error}");
        // Put right: the next try completes.
        std::fs::remove_file(&bin).unwrap();
        std::fs::rename(root.join("opt/c/bin.moved"), &bin).unwrap();
    };
    let mut e = p.journal.get("p-2").unwrap().unwrap();
    tokio::join!(p.roll_back(&mut e, &m, why), fixer);
    assert_eq!(phase(&p, "p-2"), Some(Phase::RolledBack));
    assert!(!dir.join("elsewhere").exists());
    assert_eq!(snapshot(&root), before);
}

#[tokio::test]
async fn a_patch_offered_ahead_is_downloaded_and_installed_only_once_released() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let root = dir.join("root");
    let before = snapshot(&root);
    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    let ahead = Offer {
        prefetch: vec![p1.clone()],
        ..offer(&[], &[])
    };

    // Offered ahead: verified and downloaded, reported so, the host untouched.
    p.take(ahead.clone()).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Downloaded));
    assert_eq!(snapshot(&root), before);
    assert_eq!(
        reports(&p, "p1").iter().map(|r| r.0).collect::<Vec<_>>(),
        [Phase::Received, Phase::Verified, Phase::Downloaded]
    );
    // Offered ahead again (a resent state): nothing more happens.
    p.take(ahead).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Downloaded));
    assert_eq!(snapshot(&root), before);

    // Released: installed from what is on disk (no server to download from).
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    assert_eq!(std::fs::read(root.join("opt/c/bin/app")).unwrap(), b"app 1");
}

/// Patch p1 (1.0.0 of V1) taken ahead of its install by an agent that then
/// stopped: Downloaded, the host untouched.
async fn downloaded_ahead(dir: &Path, publisher: &Publisher) -> pb::SignedManifest {
    let p = pipeline_with(dir, Some(publisher.public_key()), host_policy(false));
    let p1 = files_patch(publisher, &p, "p1", "1.0.0", V1);
    p.take(Offer {
        prefetch: vec![p1.clone()],
        ..offer(&[], &[])
    })
    .await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Downloaded));
    p1
}

#[tokio::test]
async fn a_restarted_agent_waits_for_the_offer_before_going_on() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let root = dir.join("root");
    let before = snapshot(&root);
    let p1 = downloaded_ahead(&dir, &publisher).await;
    // A restart with an offer that no longer has it (its rollout aborted):
    // nothing is installed.
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    start(p, offer(&[], &[])).await;
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    assert_eq!(phase(&p, "p1"), Some(Phase::Downloaded));
    assert_eq!(snapshot(&root), before);
    // Offered for install: it goes on.
    start(p, offer(&[&p1], &[])).await;
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
}

#[tokio::test]
async fn the_installed_versions_artifacts_stay_as_delta_bases_and_only_those() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    let on_disk = |data: &[u8]| {
        p.artifact_dir()
            .join(flotilla_proto::sha256_hex(data))
            .exists()
    };
    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Committed));
    assert!(
        on_disk(&tar_bytes(V1)),
        "the installed version's artifact stays"
    );
    let p2 = files_patch(&publisher, &p, "p2", "1.1.0", V2);
    p.take(offer(&[&p1, &p2], &[])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    assert!(on_disk(&tar_bytes(V2)));
    assert!(
        !on_disk(&tar_bytes(V1)),
        "the replaced version's artifact goes"
    );
}

#[tokio::test]
async fn a_patch_downloaded_ahead_is_verified_again_before_it_installs() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let root = dir.join("root");
    let before = snapshot(&root);
    let p1 = downloaded_ahead(&dir, &publisher).await;
    // Meanwhile the trust policy rotated: the publisher's key is no longer
    // trusted here. Released now, the patch is refused, the host untouched.
    let rotated = Publisher::new();
    let p = pipeline_with(&dir, Some(rotated.public_key()), host_policy(false));
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Rejected));
    assert_eq!(snapshot(&root), before);
    let tar = tar_bytes(V1);
    assert!(
        !p.artifact_dir()
            .join(flotilla_proto::sha256_hex(&tar))
            .exists(),
        "its download is removed"
    );
}

mod disk;
mod untrusted;
