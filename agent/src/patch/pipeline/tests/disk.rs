//! The pipeline's disk use: backups kept for the newest versions of a
//! component only, and a patch the download directory's bound cannot take
//! refused before anything is downloaded or installed.

use super::*;

fn ents(n: u8) -> Vec<Ent> {
    // Leaked: `Ent` borrows its bytes, and each test makes a handful.
    let app: &'static [u8] = Box::leak(format!("app {n}").into_bytes().into_boxed_slice());
    vec![Ent::File("bin/app", app, 0o755)]
}

/// A pipeline for /opt/c trusting `publisher`, with these disk limits.
fn on_disk(dir: &Path, publisher: &Publisher, disk: DiskLimits) -> Pipeline {
    pipeline_on_disk(dir, Some(publisher.public_key()), host_policy(false), disk)
}

#[tokio::test]
async fn backups_are_kept_for_the_newest_versions_of_a_component_only() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = on_disk(
        &dir,
        &publisher,
        DiskLimits {
            keep_backups: 2,
            ..DiskLimits::default()
        },
    );
    let root = dir.join("root");
    let mut offered = Vec::new();
    let mut at = Vec::new();
    for n in 1..=4u8 {
        let m = files_patch(
            &publisher,
            &p,
            &format!("p{n}"),
            &format!("1.{n}.0"),
            &ents(n),
        );
        offered.push(m);
        let refs: Vec<&pb::SignedManifest> = offered.iter().collect();
        p.take(offer(&refs, &[])).await;
        assert_eq!(phase(&p, &format!("p{n}")), Some(Phase::Committed));
        at.push(snapshot(&root));
    }
    let has_backups = |id: &str| p.patch_dir(id).exists();
    assert!(
        !has_backups("p1") && !has_backups("p2"),
        "older backups stay"
    );
    assert!(has_backups("p3") && has_backups("p4"));

    // Enough for an abort with rollback of the newest: back to p3's files.
    let refs: Vec<&pb::SignedManifest> = offered.iter().take(3).collect();
    p.take(offer(&refs, &["p4"])).await;
    assert_eq!(phase(&p, "p4"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), at[2]);
    // Under a newer commit (p3), p2 is not undone; once p3 is, p2's backups
    // are gone: refused, naming why, and nothing changes.
    p.take(offer(&[], &["p2"])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    assert_eq!(snapshot(&root), at[2]);
    p.take(offer(&[], &["p3"])).await;
    assert_eq!(phase(&p, "p3"), Some(Phase::RolledBack));
    assert_eq!(snapshot(&root), at[1]);
    ack_all(&p);
    p.take(offer(&[], &["p2"])).await;
    assert_eq!(phase(&p, "p2"), Some(Phase::Committed));
    let refused = reports(&p, "p2");
    assert!(
        refused.iter().any(|(_, e)| e.contains("is gone")),
        "{refused:?}"
    );
    assert_eq!(snapshot(&root), at[1]);

    // The next commit drops the rolled-back patch's directory too.
    let p5 = files_patch(&publisher, &p, "p5", "1.5.0", &ents(5));
    p.take(offer(&[&p5], &[])).await;
    assert_eq!(phase(&p, "p5"), Some(Phase::Committed));
    assert!(
        !has_backups("p4") && !has_backups("p3"),
        "a rolled-back patch's directory stays"
    );
    assert!(has_backups("p5"));
}

#[tokio::test]
async fn a_patch_past_the_download_bound_is_refused_before_anything_happens() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let p = on_disk(
        &dir,
        &publisher,
        DiskLimits {
            max_download_bytes: 100,
            ..DiskLimits::default()
        },
    );
    let root = dir.join("root");
    let before = snapshot(&root);
    // Its artifact is already in the download directory (where a download
    // would leave it), and more than the bound.
    let p1 = files_patch(&publisher, &p, "p1", "1.0.0", V1);
    p.take(offer(&[&p1], &[])).await;
    assert_eq!(phase(&p, "p1"), Some(Phase::Failed));
    let entry = p.journal.get("p1").unwrap().unwrap();
    let error = entry.error.unwrap_or_default();
    assert!(
        error.contains("insufficient disk") && error.contains("max_download_bytes"),
        "{error}"
    );
    assert_eq!(snapshot(&root), before);
    assert!(!p.patch_dir("p1").join("backup").exists());
}
