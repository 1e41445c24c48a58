//! Tests of `files` installs that go through: contents, modes, symlinks, backups,
//! the plan, exact rollback, and rollback after a crash at every point.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Compression;

use super::files::install_files_until;
use super::plan::{self, DONE_PLAN_FILE, Kind, PLAN_FILE};
use super::rollback::rollback_until;
use super::tests_util::{Ent, Scratch, mode_of, policy, snapshot, write_artifact, write_mode};
use super::{InstallError, install_files, rollback_files};

/// The host before the install: two files the artifact replaces, one it leaves.
fn prepare_host(s: &Scratch) {
    write_mode(&s.dest.join("bin/tool"), b"old tool", 0o700);
    write_mode(&s.dest.join("README"), b"old readme", 0o640);
    write_mode(&s.dest.join("keep.txt"), b"untouched", 0o600);
    // A listed directory that exists with another mode: changed, then restored.
    fs::set_permissions(s.dest.join("bin"), fs::Permissions::from_mode(0o750)).expect("chmod");
}

fn good_entries() -> Vec<Ent> {
    vec![
        Ent::Dir("./", 0o700),
        Ent::Dir("bin/", 0o755),
        Ent::File("bin/tool", b"new tool", 0o755),
        Ent::File("./bin/suid", b"suid", 0o4755),
        Ent::File("lib/deep/x.so", b"library", 0o644),
        Ent::File("README", b"new readme", 0o644),
        Ent::Symlink("current", "bin/tool"),
        Ent::Symlink("lib/deep/readme", "../../README"),
    ]
}

fn check_good_install(compression: Compression) {
    let s = Scratch::new();
    prepare_host(&s);
    let before = snapshot(&s.dest);
    let artifact = write_artifact(&s.art, &good_entries(), compression);
    let pol = policy(&[&s.dest]);

    let report = install_files(&artifact, compression, &s.dest, &pol, &s.work).expect("install");
    let d = &s.dest;
    assert_eq!(
        report.written,
        [
            "bin/tool",
            "bin/suid",
            "lib/deep/x.so",
            "README",
            "current",
            "lib/deep/readme"
        ]
        .iter()
        .map(|p| d.join(p))
        .collect::<Vec<PathBuf>>()
    );
    assert_eq!(fs::read(d.join("bin/tool")).expect("read"), b"new tool");
    assert_eq!(mode_of(&d.join("bin/tool")), 0o755);
    assert_eq!(
        mode_of(&d.join("bin")),
        0o755,
        "listed directories get their mode"
    );
    assert_eq!(mode_of(&d.join("bin/suid")), 0o755, "setuid is dropped");
    assert_eq!(fs::read(d.join("lib/deep/x.so")).expect("read"), b"library");
    assert_eq!(mode_of(&d.join("lib/deep/x.so")), 0o644);
    assert_eq!(
        mode_of(&d.join("lib/deep")),
        0o755,
        "implicit directories get 0755"
    );
    assert_eq!(fs::read(d.join("README")).expect("read"), b"new readme");
    assert_eq!(
        fs::read_link(d.join("current")).expect("link"),
        Path::new("bin/tool")
    );
    assert_eq!(
        fs::read(d.join("lib/deep/readme")).expect("via link"),
        b"new readme"
    );
    assert_eq!(fs::read(d.join("keep.txt")).expect("read"), b"untouched");
    assert_ne!(
        mode_of(d),
        0o700,
        "the ./ entry does not change the destination"
    );
    assert!(!d.join(".bin.flotilla-tmp").exists());

    // The plan records the previous state, and the backups hold the old bytes.
    let plan = plan::read_plan(&s.work).expect("plan").expect("present");
    let tool = plan
        .entries
        .iter()
        .find(|e| e.path == d.join("bin/tool"))
        .expect("tool in plan");
    assert!(tool.existed);
    assert_eq!(tool.prev_kind, Some(Kind::File));
    assert_eq!(tool.prev_mode, Some(0o700));
    let backup = s.work.join(tool.backup.as_deref().expect("backup"));
    assert_eq!(fs::read(backup).expect("backup"), b"old tool");
    let lib = plan
        .entries
        .iter()
        .find(|e| e.path == d.join("lib"))
        .expect("lib in plan");
    assert!(!lib.existed && lib.kind == Kind::Dir);
    assert_eq!(
        fs::read_dir(s.work.join("backup"))
            .expect("backups")
            .count(),
        2
    );

    rollback_files(&s.work).expect("rollback");
    assert_eq!(
        snapshot(&s.dest),
        before,
        "rollback restores the exact previous tree"
    );
    assert!(!s.work.join(PLAN_FILE).exists());
    assert!(s.work.join(DONE_PLAN_FILE).exists());
    rollback_files(&s.work).expect("second rollback");
    assert_eq!(snapshot(&s.dest), before);
}

#[test]
fn good_tar_installs_and_rolls_back() {
    check_good_install(Compression::None);
}

#[test]
fn good_zstd_tar_installs_and_rolls_back() {
    check_good_install(Compression::Zstd);
}

#[test]
fn reinstall_over_installed_symlinks_rolls_back_to_the_first_install() {
    let s = Scratch::new();
    prepare_host(&s);
    let pol = policy(&[&s.dest]);
    let first = write_artifact(&s.art, &good_entries(), Compression::None);
    install_files(&first, Compression::None, &s.dest, &pol, &s.work).expect("first");
    let after_first = snapshot(&s.dest);

    let second_art = s.root.join("art2");
    fs::create_dir(&second_art).expect("mkdir");
    let entries = [
        Ent::Symlink("current", "README"),
        Ent::File("bin/tool", b"v3", 0o750),
        Ent::File("lib/deep/x.so", b"lib v3", 0o600),
    ];
    let second = write_artifact(&second_art, &entries, Compression::None);
    let work2 = s.root.join("work2");
    fs::create_dir(&work2).expect("mkdir");
    install_files(&second, Compression::None, &s.dest, &pol, &work2).expect("second");
    assert_eq!(
        fs::read_link(s.dest.join("current")).expect("link"),
        Path::new("README")
    );
    assert_eq!(mode_of(&s.dest.join("bin/tool")), 0o750);
    rollback_files(&work2).expect("rollback");
    assert_eq!(snapshot(&s.dest), after_first);
}

#[test]
fn missing_destination_is_created_and_removed_again() {
    let s = Scratch::new();
    let dest = s.dest.join("new/app");
    let pol = policy(&[&s.dest]);
    let artifact = write_artifact(&s.art, &good_entries(), Compression::None);
    let before = snapshot(&s.dest);
    install_files(&artifact, Compression::None, &dest, &pol, &s.work).expect("install");
    assert_eq!(fs::read(dest.join("bin/tool")).expect("read"), b"new tool");
    rollback_files(&s.work).expect("rollback");
    assert_eq!(snapshot(&s.dest), before);
}

#[test]
fn installing_twice_into_one_work_dir_is_refused_until_rolled_back() {
    let s = Scratch::new();
    prepare_host(&s);
    let pol = policy(&[&s.dest]);
    let artifact = write_artifact(&s.art, &good_entries(), Compression::None);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect("install");
    let err = install_files(&artifact, Compression::None, &s.dest, &pol, &s.work)
        .expect_err("a second plan would overwrite the backups");
    assert!(matches!(err, InstallError::PlanExists { .. }), "{err}");
    assert!(err.to_string().contains("plan.json"), "{err}");
}

#[test]
fn rollback_without_a_plan_changes_nothing() {
    let s = Scratch::new();
    prepare_host(&s);
    let before = snapshot(&s.dest);
    // A crash during the backup step: backups, but no plan yet.
    fs::create_dir(s.work.join("backup")).expect("mkdir");
    fs::write(s.work.join("backup/0"), b"half a back").expect("write");
    rollback_files(&s.work).expect("rollback");
    assert_eq!(snapshot(&s.dest), before);
}

/// Stops the install after `n` files (as a crash would), leaves a half-written
/// temp file next to the next target, then stops a rollback after `k` steps, then
/// rolls back fully: the host must be exactly as before, every time.
#[test]
fn rollback_after_a_crash_at_any_point_restores_the_previous_state() {
    let entries = good_entries();
    let leaves = 6;
    for n in 0..=leaves {
        for k in [0, 1, 3, 100] {
            let s = Scratch::new();
            prepare_host(&s);
            let before = snapshot(&s.dest);
            let artifact = write_artifact(&s.art, &entries, Compression::Zstd);
            let pol = policy(&[&s.dest]);
            let report = install_files_until(
                &artifact,
                Compression::Zstd,
                &s.dest,
                &pol,
                &s.work,
                Some(n),
            )
            .expect("partial install");
            assert_eq!(report.written.len(), n);
            // The torn temp file a crash mid-write leaves behind.
            if s.dest.join("bin").is_dir() {
                fs::write(s.dest.join("bin/.tool.flotilla-tmp"), b"torn").expect("temp");
            }
            assert!(s.work.join(PLAN_FILE).exists(), "n={n}");

            let finished = rollback_until(&s.work, Some(k)).expect("partial rollback");
            assert_eq!(finished, k >= 100, "n={n} k={k}");
            rollback_files(&s.work).expect("rollback");
            assert_eq!(
                snapshot(&s.dest),
                before,
                "after crash at n={n}, rollback cut at k={k}"
            );
            rollback_files(&s.work).expect("rollback again");
            assert_eq!(snapshot(&s.dest), before);
        }
    }
}

/// A rollback run again on its own finished work (its plan put back) must change
/// nothing: each step is idempotent, not just the retired plan.
#[test]
fn rollback_steps_are_idempotent() {
    let s = Scratch::new();
    prepare_host(&s);
    let before = snapshot(&s.dest);
    let artifact = write_artifact(&s.art, &good_entries(), Compression::None);
    let pol = policy(&[&s.dest]);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect("install");
    rollback_files(&s.work).expect("rollback");
    fs::copy(s.work.join(DONE_PLAN_FILE), s.work.join(PLAN_FILE)).expect("restore plan");
    rollback_files(&s.work).expect("rollback again");
    assert_eq!(snapshot(&s.dest), before);
}

#[test]
fn a_corrupt_backup_is_refused_not_restored() {
    let s = Scratch::new();
    prepare_host(&s);
    let artifact = write_artifact(&s.art, &good_entries(), Compression::None);
    let pol = policy(&[&s.dest]);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect("install");
    for b in fs::read_dir(s.work.join("backup")).expect("backups") {
        fs::write(b.expect("entry").path(), b"garbage").expect("corrupt");
    }
    let err = rollback_files(&s.work).expect_err("corrupt backup");
    assert!(matches!(err, InstallError::BackupCorrupt { .. }), "{err}");
    assert!(
        s.work.join(PLAN_FILE).exists(),
        "the plan stays for a later attempt"
    );
}

#[test]
fn allowed_subdirectories_of_the_destination_are_enough() {
    let s = Scratch::new();
    fs::create_dir(s.dest.join("bin")).expect("mkdir");
    let bin = s.dest.join("bin");
    let pol = policy(&[&bin]);
    let entries = [Ent::File("bin/tool", b"x", 0o755)];
    let artifact = write_artifact(&s.art, &entries, Compression::None);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect("install");
    assert_eq!(fs::read(bin.join("tool")).expect("read"), b"x");
}
