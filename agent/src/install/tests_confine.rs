//! Confinement of `files` installs: no patch, and no sequence of patches, can
//! create, change or remove anything outside the allowed paths, whatever
//! symlinks earlier patches, other software or a racing process left there.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use flotilla_proto::manifest::Compression;
use proptest::prelude::*;

use super::files::install_files_with;
use super::tests_util::{Ent, Scratch, Snap, policy, snapshot, write_artifact, write_mode};
use super::{InstallError, LocalPolicy, install_files, rollback_files};

fn install(
    s: &Scratch,
    entries: &[Ent],
    pol: &LocalPolicy,
    dest: &Path,
) -> Result<(), InstallError> {
    let artifact = write_artifact(&s.art, entries, Compression::None);
    install_files(&artifact, Compression::None, dest, pol, &s.work).map(|_| ())
}

/// Everything under `root` but the allowed tree and the agent's own directories.
fn outside(s: &Scratch, allowed: &Path) -> Vec<(PathBuf, Snap)> {
    snapshot(&s.root)
        .into_iter()
        .filter(|(p, _)| {
            let abs = s.root.join(p);
            !abs.starts_with(allowed) && !abs.starts_with(&s.work) && !abs.starts_with(&s.art)
        })
        .collect()
}

#[test]
fn a_symlink_at_an_allowed_path_is_refused_so_a_second_patch_cannot_follow_it() {
    let s = Scratch::new();
    write_mode(&s.root.join("etc/cron.d/keep"), b"", 0o644);
    fs::create_dir(s.root.join("opt")).unwrap();
    let newapp = s.root.join("opt/newapp");
    let before = outside(&s, &newapp);

    // Only /opt/newapp allowed (not there yet): patch 1, destination "/".
    let pol = policy(&[&newapp]);
    let err = install(&s, &[Ent::Symlink("opt/newapp", "../etc")], &pol, &s.root).unwrap_err();
    assert!(
        matches!(err, InstallError::NotADirectoryAtAllowedPath { .. }),
        "{err}"
    );
    // /opt and /opt/newapp allowed: the same link leaves the tree of /opt.
    let both = policy(&[&s.root.join("opt"), &newapp]);
    let err = install(&s, &[Ent::Symlink("opt/newapp", "../etc")], &both, &s.root).unwrap_err();
    assert!(
        matches!(err, InstallError::SymlinkLeavesAllowed { .. }),
        "{err}"
    );
    assert_eq!(outside(&s, &newapp), before);

    // The link made by something else: patch 2 writes nothing through it.
    symlink("../etc", &newapp).unwrap();
    for pol in [&pol, &both] {
        let err = install(
            &s,
            &[Ent::File("cron.d/evil", b"* * * * * root sh", 0o644)],
            pol,
            &newapp,
        )
        .unwrap_err();
        assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
    }
    assert!(!s.root.join("etc/cron.d/evil").exists());
}

#[test]
fn a_directory_swapped_for_a_symlink_during_the_install_is_not_written_through() {
    let s = Scratch::new();
    write_mode(&s.dest.join("sub/old"), b"old", 0o644);
    write_mode(&s.root.join("outside/passwd"), b"root:x:0:0", 0o644);
    let pol = policy(&[&s.dest]);
    let before = outside(&s, &s.dest);
    let artifact = write_artifact(
        &s.art,
        &[
            Ent::File("sub/new", b"new", 0o644),
            Ent::File("sub/passwd", b"evil", 0o644),
        ],
        Compression::None,
    );
    // Checked and planned against a real directory; swapped before the writes.
    let swap = || {
        fs::rename(s.dest.join("sub"), s.dest.join("sub.moved")).unwrap();
        symlink(s.root.join("outside"), s.dest.join("sub")).unwrap();
    };
    let err = install_files_with(
        &artifact,
        Compression::None,
        &s.dest,
        &pol,
        &s.work,
        None,
        &swap,
    )
    .unwrap_err();
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
    assert_eq!(outside(&s, &s.dest), before);
    // Rollback obeys the same rule: it changes nothing through the link either.
    let err = rollback_files(&s.work).unwrap_err();
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
    assert_eq!(outside(&s, &s.dest), before);
    // With the directory back, rollback finishes.
    fs::remove_file(s.dest.join("sub")).unwrap();
    fs::rename(s.dest.join("sub.moved"), s.dest.join("sub")).unwrap();
    rollback_files(&s.work).unwrap();
    assert_eq!(fs::read(s.dest.join("sub/old")).unwrap(), b"old");
    assert!(!s.dest.join("sub/new").exists());
}

#[test]
fn an_allowed_path_under_a_symlink_the_host_made_is_installed_where_it_leads() {
    let s = Scratch::new();
    // The operator's layout: /opt is a symlink to /data/opt.
    fs::create_dir_all(s.root.join("data/opt")).unwrap();
    symlink("data/opt", s.root.join("opt")).unwrap();
    let app = s.root.join("opt/app");
    let pol = policy(&[&app]);
    install(&s, &[Ent::File("bin/tool", b"v1", 0o755)], &pol, &app).unwrap();
    assert_eq!(
        fs::read(s.root.join("data/opt/app/bin/tool")).unwrap(),
        b"v1"
    );
    fs::remove_file(s.work.join(super::plan::PLAN_FILE)).unwrap();
    // A symlink inside the tree still stops an install there.
    symlink(s.root.join("elsewhere"), s.root.join("data/opt/app/lib")).unwrap();
    let err = install(&s, &[Ent::File("lib/x.so", b"x", 0o644)], &pol, &app).unwrap_err();
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
    assert!(!s.root.join("elsewhere").exists());
}

#[test]
fn an_allowed_path_that_resolves_through_another_allowed_tree_is_refused() {
    let s = Scratch::new();
    let a = s.root.join("a");
    fs::create_dir_all(a.join("real")).unwrap();
    // /p/b's parent leads through a link inside /a, which a patch to /a could replace.
    symlink("real", a.join("link")).unwrap();
    symlink("a/link", s.root.join("p")).unwrap();
    let b = s.root.join("p/b");
    let pol = policy(&[&a, &b]);
    let err = install(&s, &[Ent::File("f", b"x", 0o644)], &pol, &b).unwrap_err();
    assert!(
        matches!(err, InstallError::AnchorThroughAllowedTree { .. }),
        "{err}"
    );
    assert!(!a.join("real/b").exists());
}

/// Names and link targets the random archives are made of: nested paths, the
/// allowed path itself, its parent, and targets that climb out.
const NAMES: &[&str] = &[
    "x", "d", "d/y", "d/e", "d/e/z", "newapp", "newapp/x", "opt", "s", "d/s", "d/e/L",
];
const TARGETS: &[&str] = &[
    "x",
    "d",
    "..",
    "../..",
    "../../etc",
    "../etc",
    "d/../..",
    "e",
    "s/../../..",
    "../s/x",
    "s/x",
    "../..",
];

fn entry() -> impl Strategy<Value = Ent> {
    (0..3usize, 0..NAMES.len(), 0..TARGETS.len()).prop_map(|(kind, n, t)| match kind {
        0 => Ent::File(NAMES[n], b"data", 0o644),
        1 => Ent::Dir(NAMES[n], 0o755),
        _ => Ent::Symlink(NAMES[n], TARGETS[t]),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random sequences of archives into random destinations, each install
    /// rolled back when it failed (and some when they succeeded): nothing
    /// outside the allowed tree ever changes.
    #[test]
    fn no_sequence_of_archives_changes_anything_outside_the_allowed_tree(
        steps in prop::collection::vec(
            (prop::collection::vec(entry(), 1..5), 0..4usize, any::<bool>()),
            1..6,
        )
    ) {
        let s = Scratch::new();
        write_mode(&s.root.join("etc/cron.d/keep"), b"", 0o644);
        fs::create_dir(s.root.join("opt")).unwrap();
        let allowed = s.root.join("opt/newapp");
        let pol = policy(&[&allowed]);
        let dests = [s.root.clone(), s.root.join("opt"), allowed.clone(), allowed.join("d")];
        let before = outside(&s, &allowed);
        for (entries, dest, undo) in steps {
            let result = install(&s, &entries, &pol, &dests[dest]);
            if result.is_err() || undo {
                rollback_files(&s.work).unwrap();
            } else {
                // Keep it: the next patch meets what this one left.
                let _ = fs::remove_file(s.work.join(super::plan::PLAN_FILE));
            }
            prop_assert_eq!(&outside(&s, &allowed), &before);
            // And every link the tree holds leads inside it, wherever it goes.
            for link in links(&allowed) {
                if let Ok(to) = fs::canonicalize(&link) {
                    let inside = fs::canonicalize(&allowed).unwrap();
                    prop_assert!(to.starts_with(&inside), "{} -> {}", link.display(), to.display());
                }
            }
        }
    }
}

/// Every symlink under `dir` (not followed).
fn links(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(read) = fs::read_dir(dir) else {
        return out;
    };
    for e in read.flatten() {
        let p = e.path();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => out.push(p),
            Ok(m) if m.is_dir() => out.extend(links(&p)),
            _ => {}
        }
    }
    out
}
