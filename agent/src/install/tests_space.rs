//! `files` installs on a filesystem that is, or becomes, full: refused up front
//! when it cannot fit, and when space runs out mid-install no temp file is left,
//! the rollback frees temp files first, and a rollback the full disk stops can
//! run again once there is room.

use std::fs;
use std::path::Path;

use flotilla_proto::manifest::Compression;

use super::files::install_files_with;
use super::tests_util::{Ent, Scratch, Tmpfs, fill, policy, snapshot, write_artifact, write_mode};
use super::{InstallError, install_files, rollback_files};

/// Every name under `dir` that is one of the agent's temp files.
fn temp_files(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_keys()
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with(super::plan::TMP_SUFFIX))
        .collect()
}

const BIG: &[u8] = &[7u8; 2 << 20];

#[test]
fn an_install_that_cannot_fit_is_refused_before_anything_is_written() {
    let s = Scratch::new();
    let _fs = Tmpfs::mount(&s.dest, "1m");
    write_mode(&s.dest.join("VERSION"), b"old", 0o644);
    let before = snapshot(&s.dest);
    let artifact = write_artifact(
        &s.art,
        &[
            Ent::File("VERSION", b"new", 0o644),
            Ent::File("big.bin", BIG, 0o644),
        ],
        Compression::None,
    );
    let pol = policy(&[&s.dest]);
    let err = install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).unwrap_err();
    assert!(matches!(err, InstallError::NotEnoughSpace { .. }), "{err}");
    assert!(err.to_string().contains("needs"), "{err}");
    assert_eq!(snapshot(&s.dest), before);
    assert!(!s.work.join(super::plan::PLAN_FILE).exists());
}

#[test]
fn space_running_out_mid_install_leaves_no_temp_file_and_the_rollback_can_finish_later() {
    let s = Scratch::new();
    let _fs = Tmpfs::mount(&s.dest, "4m");
    write_mode(&s.dest.join("VERSION"), b"old", 0o644);
    let before = snapshot(&s.dest);
    let artifact = write_artifact(
        &s.art,
        &[
            Ent::File("VERSION", b"new", 0o644),
            Ent::File("zz-big.bin", BIG, 0o644),
        ],
        Compression::None,
    );
    let pol = policy(&[&s.dest]);
    // It fits when checked; something else takes the space before the writes.
    let filler = s.dest.join("filler");
    let take_space = || fill(&filler, 3 << 20);
    let err = install_files_with(
        &artifact,
        Compression::None,
        &s.dest,
        &pol,
        &s.work,
        None,
        &take_space,
    )
    .unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(err.may_pass_later());
    assert_eq!(
        temp_files(&s.dest),
        Vec::<String>::new(),
        "a temp file was left"
    );

    // Now nothing is left at all: the rollback cannot write the old VERSION
    // back, says why, keeps its plan, and leaves no temp file either.
    fill(&s.dest.join("filler2"), 8 << 20);
    let err = rollback_files(&s.work).unwrap_err();
    assert!(err.may_pass_later(), "{err}");
    assert!(s.work.join(super::plan::PLAN_FILE).exists());
    assert_eq!(temp_files(&s.dest), Vec::<String>::new());

    // With room again, the same rollback finishes and the host is as before.
    fs::remove_file(&filler).unwrap();
    fs::remove_file(s.dest.join("filler2")).unwrap();
    rollback_files(&s.work).unwrap();
    assert_eq!(snapshot(&s.dest), before);
}
