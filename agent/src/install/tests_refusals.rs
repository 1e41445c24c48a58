//! Tests of `files` installs that must be refused, each leaving the host (the whole
//! destination tree, and a directory outside it) exactly as it was, with no plan.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use flotilla_proto::manifest::Compression;
use tar::EntryType;

use super::tests_util::{Ent, Scratch, policy, snapshot, tar_bytes, write_artifact, write_mode};
use super::{InstallError, LocalPolicy, MAX_TAR_ENTRIES, install_files};
use crate::install::plan::PLAN_FILE;

/// Host with some content under `dest` and a directory `outside` next to it that
/// an escape would reach.
fn host(s: &Scratch) {
    write_mode(&s.dest.join("bin/tool"), b"old", 0o755);
    write_mode(&s.dest.join("etc/conf"), b"conf", 0o644);
    write_mode(&s.root.join("outside/passwd"), b"root:x:0:0", 0o644);
}

/// Installs `entries` under `pol` (default: dest allowed) and returns the error,
/// after checking that nothing on the host or in the work dir's plan changed.
fn refused_with(s: &Scratch, entries: &[Ent], pol: &LocalPolicy, dest: &Path) -> InstallError {
    let before = snapshot(&s.root.join("dest"));
    let outside = snapshot(&s.root.join("outside"));
    let artifact = write_artifact(&s.art, entries, Compression::None);
    let err = install_files(&artifact, Compression::None, dest, pol, &s.work)
        .expect_err("the install must be refused");
    assert_eq!(
        snapshot(&s.root.join("dest")),
        before,
        "host changed by: {err}"
    );
    assert_eq!(
        snapshot(&s.root.join("outside")),
        outside,
        "outside changed by: {err}"
    );
    assert!(
        !s.work.join(PLAN_FILE).exists(),
        "a plan was written for: {err}"
    );
    err
}

fn refused(entries: &[Ent]) -> InstallError {
    let s = Scratch::new();
    host(&s);
    let pol = policy(&[&s.dest]);
    refused_with(&s, entries, &pol, &s.dest)
}

fn ok_file() -> Ent {
    Ent::File("bin/tool", b"new", 0o755)
}

#[test]
fn parent_dir_entries_are_refused() {
    for name in ["../outside/passwd", "bin/../../outside/passwd", ".."] {
        let err = refused(&[ok_file(), Ent::File(name, b"pwned", 0o644)]);
        assert!(
            matches!(err, InstallError::ParentDirEntry { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn absolute_entries_are_refused() {
    let err = refused(&[ok_file(), Ent::File("/etc/flotilla-pwned", b"x", 0o644)]);
    assert!(matches!(err, InstallError::AbsoluteEntry { .. }), "{err}");
    assert!(err.to_string().contains("/etc/flotilla-pwned"), "{err}");
}

#[test]
fn escaping_symlinks_are_refused() {
    let err = refused(&[ok_file(), Ent::Symlink("bin/pw", "../../outside/passwd")]);
    assert!(matches!(err, InstallError::SymlinkEscapes { .. }), "{err}");
    assert!(err.to_string().contains("../../outside/passwd"), "{err}");

    let err = refused(&[Ent::Symlink("pw", "/etc/passwd")]);
    assert!(matches!(err, InstallError::SymlinkAbsolute { .. }), "{err}");
    assert!(err.to_string().contains("/etc/passwd"), "{err}");

    // Each link alone stays inside, but `..` after the first one would climb
    // out: `..` after a name is refused whatever that name is.
    let err = refused(&[
        Ent::Symlink("a/up", ".."),
        Ent::Symlink("b", "a/up/../../outside"),
    ]);
    assert!(
        matches!(err, InstallError::SymlinkParentAfterName { .. }),
        "{err}"
    );
}

#[test]
fn in_root_symlinks_with_dotdot_are_fine() {
    let s = Scratch::new();
    host(&s);
    let pol = policy(&[&s.dest]);
    let entries = [Ent::Symlink("bin/conf", "../etc/conf")];
    let artifact = write_artifact(&s.art, &entries, Compression::None);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect("install");
    // The link is there, as written, and resolves inside the destination.
    let link = s.dest.join("bin/conf");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("../etc/conf"));
    let resolved = link.parent().unwrap().join(fs::read_link(&link).unwrap());
    assert_eq!(
        fs::canonicalize(resolved.parent().unwrap()).unwrap(),
        fs::canonicalize(s.dest.join("etc")).unwrap()
    );
}

#[test]
fn hardlinks_are_refused() {
    let err = refused(&[ok_file(), Ent::Raw("bin/pw", EntryType::Link, "bin/tool")]);
    assert!(matches!(err, InstallError::HardlinkEntry { .. }), "{err}");
    assert!(err.to_string().contains("bin/pw"), "{err}");
}

#[test]
fn device_and_fifo_entries_are_refused() {
    for (etype, what) in [
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "fifo"),
    ] {
        let err = refused(&[ok_file(), Ent::Raw("dev/null", etype, "")]);
        assert!(matches!(err, InstallError::SpecialEntry { .. }), "{err}");
        assert!(
            err.to_string().contains(what) && err.to_string().contains("dev/null"),
            "{err}"
        );
    }
}

#[test]
fn entries_outside_the_allowed_paths_are_refused() {
    let s = Scratch::new();
    host(&s);
    // The destination contains an allowed path, so it is accepted; etc/ is not.
    let bin = s.dest.join("bin");
    let pol = policy(&[&bin]);
    let err = refused_with(
        &s,
        &[ok_file(), Ent::File("etc/conf", b"evil", 0o644)],
        &pol,
        &s.dest,
    );
    assert!(matches!(err, InstallError::EntryNotAllowed { .. }), "{err}");
    assert!(err.to_string().contains("etc/conf"), "{err}");
}

#[test]
fn a_destination_outside_the_allowed_paths_is_refused() {
    let s = Scratch::new();
    host(&s);
    let elsewhere = s.root.join("elsewhere");
    let pol = policy(&[&elsewhere]);
    let err = refused_with(&s, &[ok_file()], &pol, &s.dest);
    assert!(
        matches!(err, InstallError::DestinationNotAllowed { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&s.dest.display().to_string()),
        "{err}"
    );

    // Allowed by name, but a symlink inside the allowed tree: never written through.
    fs::create_dir(&elsewhere).expect("mkdir");
    symlink(s.root.join("outside"), elsewhere.join("app")).expect("symlink");
    let err = refused_with(&s, &[ok_file()], &pol, &elsewhere.join("app"));
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");

    let err = refused_with(&s, &[ok_file()], &pol, Path::new("relative/dest"));
    assert!(
        matches!(err, InstallError::DestinationNotAbsolute { .. }),
        "{err}"
    );
}

#[test]
fn duplicate_paths_are_refused() {
    let err = refused(&[ok_file(), Ent::File("./bin//tool", b"again", 0o644)]);
    assert!(matches!(err, InstallError::DuplicateEntry { .. }), "{err}");
    assert!(err.to_string().contains("./bin//tool"), "{err}");
}

#[test]
fn too_many_entries_are_refused() {
    let s = Scratch::new();
    host(&s);
    let names: Vec<&'static str> = (0..=MAX_TAR_ENTRIES)
        .map(|i| &*Box::leak(format!("f{i}").into_boxed_str()))
        .collect();
    let entries: Vec<Ent> = names.iter().map(|n| Ent::File(n, b"", 0o644)).collect();
    let pol = policy(&[&s.dest]);
    let err = refused_with(&s, &entries, &pol, &s.dest);
    assert!(matches!(err, InstallError::TooManyEntries { .. }), "{err}");
    assert!(err.to_string().contains("10000"), "{err}");
}

#[test]
fn too_large_artifacts_are_refused() {
    let s = Scratch::new();
    host(&s);
    let mut pol = policy(&[&s.dest]);
    pol.max_artifact_bytes = 10;
    let entries = [
        Ent::File("a", b"123456", 0o644),
        Ent::File("b", b"12345", 0o644),
    ];
    let err = refused_with(&s, &entries, &pol, &s.dest);
    assert!(matches!(err, InstallError::TooLarge { limit: 10 }), "{err}");
    assert!(err.to_string().contains("10 bytes"), "{err}");
}

#[test]
fn host_kind_conflicts_are_refused() {
    // A directory on the host where the artifact has a file.
    let err = refused(&[Ent::File("etc", b"x", 0o644)]);
    assert!(
        matches!(err, InstallError::HostDirectoryWhereFile { .. }),
        "{err}"
    );
    // A file on the host where the artifact needs a directory.
    let err = refused(&[Ent::File("bin/tool/inner", b"x", 0o644)]);
    assert!(
        matches!(err, InstallError::HostFileWhereDirectory { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("bin/tool"), "{err}");
}

#[test]
fn host_symlinks_on_the_way_are_refused() {
    let s = Scratch::new();
    host(&s);
    symlink(s.root.join("outside"), s.dest.join("link")).expect("symlink");
    let pol = policy(&[&s.dest]);
    let err = refused_with(
        &s,
        &[ok_file(), Ent::File("link/passwd", b"pwned", 0o644)],
        &pol,
        &s.dest,
    );
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
    assert!(err.to_string().contains("link"), "{err}");
    // The same when the artifact lists the directory itself.
    let err = refused_with(&s, &[Ent::Dir("link/", 0o755)], &pol, &s.dest);
    assert!(matches!(err, InstallError::HostSymlink { .. }), "{err}");
}

#[test]
fn entries_under_an_entry_that_is_not_a_directory_are_refused() {
    let err = refused(&[Ent::Symlink("x", "bin"), Ent::File("x/tool", b"x", 0o644)]);
    assert!(
        matches!(err, InstallError::EntryUnderNonDirectory { .. }),
        "{err}"
    );
}

#[test]
fn reserved_temp_names_are_refused() {
    let err = refused(&[Ent::File("bin/.tool.flotilla-tmp", b"x", 0o644)]);
    assert!(matches!(err, InstallError::ReservedName { .. }), "{err}");
}

#[test]
fn a_truncated_artifact_is_refused() {
    let s = Scratch::new();
    host(&s);
    let before = snapshot(&s.dest);
    let mut bytes = tar_bytes(&[ok_file(), Ent::File("big", &[7u8; 4000], 0o644)]);
    bytes.truncate(2048);
    let artifact = s.art.join("cut.tar");
    fs::write(&artifact, bytes).expect("write");
    let pol = policy(&[&s.dest]);
    let err =
        install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).expect_err("truncated");
    assert!(matches!(err, InstallError::Archive { .. }), "{err}");
    assert_eq!(snapshot(&s.dest), before);
}

/// A header of `etype` that declares `size` bytes, followed by `data` and a
/// small file: what a 16 KB archive claiming a 512 MiB long name looks like.
fn extension_bomb(etype: EntryType, size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(etype);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend(tar_bytes(&[ok_file()]));
    out
}

fn refused_bytes(bytes: &[u8]) -> InstallError {
    let s = Scratch::new();
    host(&s);
    let before = snapshot(&s.dest);
    let artifact = s.art.join("bomb.tar");
    fs::write(&artifact, bytes).unwrap();
    let pol = policy(&[&s.dest]);
    let err = install_files(&artifact, Compression::None, &s.dest, &pol, &s.work)
        .expect_err("the install must be refused");
    assert_eq!(snapshot(&s.dest), before, "host changed by: {err}");
    assert!(!s.work.join(PLAN_FILE).exists());
    err
}

#[test]
fn oversized_extension_headers_are_refused_before_they_are_read() {
    for (etype, limit) in [
        (EntryType::GNULongName, 4097),
        (EntryType::GNULongLink, 4097),
        (EntryType::XHeader, 64 * 1024),
        (EntryType::XGlobalHeader, 64 * 1024),
    ] {
        // Declared far larger than the archive: refused on the declaration alone.
        let err = refused_bytes(&extension_bomb(etype, 512 << 20, b"x"));
        assert!(
            matches!(err, InstallError::ExtensionHeaderTooLarge { size, .. } if size == 512 << 20),
            "{etype:?}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("at most {limit}")),
            "{err}"
        );
        // One byte over the bound is enough.
        let data = vec![b'a'; limit as usize + 1];
        let err = refused_bytes(&extension_bomb(etype, limit + 1, &data));
        assert!(
            matches!(err, InstallError::ExtensionHeaderTooLarge { .. }),
            "{etype:?}: {err}"
        );
    }
}

#[test]
fn a_pax_size_that_disagrees_with_its_header_is_refused() {
    // The tar crate would take the pax size; a header-driven reader would not.
    let record = b"16 size=1048576\n";
    let err = refused_bytes(&extension_bomb(
        EntryType::XHeader,
        record.len() as u64,
        record,
    ));
    assert!(
        matches!(
            err,
            InstallError::PaxSizeMismatch {
                pax: 1_048_576,
                header: 3
            }
        ),
        "{err}"
    );
}

#[test]
fn a_long_name_within_the_bound_still_installs() {
    let s = Scratch::new();
    let name = format!("{}/f", "d".repeat(200));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_entry_type(EntryType::Regular);
    b.append_data(&mut h, &name, &b"ok"[..]).unwrap();
    let artifact = s.art.join("long.tar");
    fs::write(&artifact, b.into_inner().unwrap()).unwrap();
    let pol = policy(&[&s.dest]);
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).unwrap();
    assert_eq!(fs::read(s.dest.join(&name)).unwrap(), b"ok");
}

/// A GNU sparse header followed by `blocks` extension blocks, each saying
/// another follows: 512 bytes each to the tar crate's list, were it read.
fn sparse_bomb(blocks: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_path("sparse").unwrap();
    h.as_gnu_mut().unwrap().isextended[0] = 1;
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for i in 0..blocks {
        let mut ext = [0u8; 512];
        ext[504] = u8::from(i + 1 < blocks);
        out.extend_from_slice(&ext);
    }
    out.extend(tar_bytes(&[ok_file()]));
    out
}

fn refused_zstd(bytes: &[u8]) -> InstallError {
    let s = Scratch::new();
    host(&s);
    let before = snapshot(&s.dest);
    let artifact = s.art.join("bomb.tar.zst");
    fs::write(&artifact, bytes).unwrap();
    let pol = policy(&[&s.dest]);
    let err = install_files(&artifact, Compression::Zstd, &s.dest, &pol, &s.work)
        .expect_err("the install must be refused");
    assert_eq!(snapshot(&s.dest), before, "host changed by: {err}");
    assert!(!s.work.join(PLAN_FILE).exists());
    err
}

#[test]
fn gnu_sparse_and_unknown_entry_types_are_refused_before_the_tar_reader_parses_them() {
    // 20,000 extension blocks (10 MB) compress to a few KB.
    let bomb = zstd::encode_all(&sparse_bomb(20_000)[..], 3).unwrap();
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let err = refused_zstd(&bomb);
    assert!(
        matches!(&err, InstallError::UnsupportedEntry { entry, kind } if entry == "sparse" && kind == "GNU sparse file"),
        "{err}"
    );
    // Any type the installer does not know (GNU volume header 'V', multivolume
    // 'M', an unassigned letter) is refused by name in the same pass.
    for t in [b'V', b'M', b'N', b'Q'] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::new(t));
        h.set_size(0);
        h.set_mode(0o644);
        h.set_path("odd").unwrap();
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(tar_bytes(&[ok_file()]));
        let err = refused_bytes(&bytes);
        assert!(
            matches!(&err, InstallError::UnsupportedEntry { kind, .. } if kind.contains(char::from(t))),
            "{}: {err}",
            char::from(t)
        );
    }
}

#[test]
fn a_zstd_frame_asking_for_a_large_window_is_refused() {
    let tar = tar_bytes(&[ok_file()]);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(27).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    let err = refused_zstd(&enc.finish().unwrap());
    assert!(
        matches!(err, InstallError::ZstdWindowTooLarge { max_mib: 32, .. }),
        "{err}"
    );
    // The same archive at an ordinary level installs.
    let s = Scratch::new();
    let artifact = s.art.join("ok.tar.zst");
    fs::write(&artifact, zstd::encode_all(&tar[..], 19).unwrap()).unwrap();
    let pol = policy(&[&s.dest]);
    install_files(&artifact, Compression::Zstd, &s.dest, &pol, &s.work).unwrap();
}

#[test]
fn a_symlink_target_may_climb_only_before_its_first_name() {
    let s = Scratch::new();
    host(&s);
    let pol = policy(&[&s.dest]);
    // The chain of two patches: `s` does not exist yet when `L` is checked,
    // and a later patch could make `s` a link that climbs. Refused at once.
    for target in ["s/../../../../etc", "a/../b", "./x/./../y", "x/.."] {
        let err = refused_with(&s, &[Ent::Symlink("d1/d2/d3/L", target)], &pol, &s.dest);
        assert!(
            matches!(err, InstallError::SymlinkParentAfterName { .. }),
            "{target}: {err}"
        );
    }
    // Climbing first, then down, inside the destination: installed.
    let artifact = write_artifact(
        &s.art,
        &[
            Ent::Symlink("d1/d2/L", "../../bin/tool"),
            Ent::Symlink("d1/M", "./../etc/conf"),
        ],
        Compression::None,
    );
    install_files(&artifact, Compression::None, &s.dest, &pol, &s.work).unwrap();
    assert_eq!(
        fs::canonicalize(s.dest.join("d1/d2/L")).unwrap(),
        fs::canonicalize(s.dest.join("bin/tool")).unwrap()
    );
}
