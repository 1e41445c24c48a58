//! `patch build --delta-from`: the deltas it writes (decoded by the stock
//! `zstd`, which `scripts/test` installs when missing), the ones it drops, and
//! the stale index a rebuild removes.

use std::process::Command;

use super::*;
use crate::cli::output::Output;

const OUT: Output = Output {
    json: false,
    wide: false,
};

/// Deterministic bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed * 2 + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` as the artifact of a spec for version `version`; returns the spec.
fn spec(dir: &Path, version: &str, data: &[u8]) -> PathBuf {
    let artifact = dir.join(format!("app-{version}.tar"));
    std::fs::write(&artifact, data).unwrap();
    let spec = dir.join(format!("app-{version}.toml"));
    std::fs::write(
        &spec,
        format!(
            r#"id = "app-{version}"
component = "app"
version = "{version}"
severity = "low"
expires_in = "1d"
[[artifacts]]
name = "app.tar"
path = "{}"
[install]
type = "files"
artifact = "app.tar"
destination = "/opt/app"
"#,
            artifact.display()
        ),
    )
    .unwrap();
    spec
}

/// Builds `version` with `data` into `dir/<version>`, from `old` if given.
fn build(dir: &Path, version: &str, data: &[u8], old: Option<&Path>) -> anyhow::Result<PathBuf> {
    let out = dir.join(version);
    crate::cli::patch::build(
        &spec(dir, version, data),
        Some(out.clone()),
        false,
        old,
        OUT,
    )?;
    Ok(out)
}

fn index_of(bundle: &Path) -> DeltaIndex {
    DeltaIndex::parse(&std::fs::read(bundle.join(INDEX_FILE)).unwrap()).unwrap()
}

#[test]
fn a_changed_artifact_gets_a_small_delta_that_stock_zstd_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = noise(1 << 20, 1);
    let mut v2 = v1.clone();
    v2[4096..4112].copy_from_slice(b"version 1.0.1 ok");
    v2.extend_from_slice(&noise(2000, 2));
    let old = build(dir.path(), "1.0.0", &v1, None).unwrap();
    assert!(
        !old.join(INDEX_FILE).exists(),
        "no deltas without --delta-from"
    );
    let new = build(dir.path(), "1.0.1", &v2, Some(&old)).unwrap();
    let manifest_bytes = std::fs::read(new.join("manifest.json")).unwrap();
    let manifest = Manifest::parse(&manifest_bytes).unwrap();
    let index = index_of(&new);
    index.validate_against(&manifest, &manifest_bytes).unwrap();
    let d = &index.deltas[0];
    assert_eq!(index.deltas.len(), 1);
    assert_eq!(d.artifact, "app.tar");
    assert_eq!(d.base_sha256, flotilla_proto::sha256_hex(&v1));
    assert_eq!(d.base_size, v1.len() as u64);
    assert_eq!(
        d.name,
        format!("app.tar.delta-{}.zst", &d.base_sha256[..12])
    );
    let file = std::fs::read(new.join(&d.name)).unwrap();
    assert_eq!(flotilla_proto::sha256_hex(&file), d.sha256);
    assert_eq!(file.len() as u64, d.size);
    assert!(d.size < 8 * 1024, "{} bytes for a small change", d.size);
    // The publish side finds the same index, byte for byte.
    let (bytes, found) = for_publish(&new.join("manifest.json"), &manifest, &manifest_bytes)
        .unwrap()
        .unwrap();
    assert_eq!(bytes, std::fs::read(new.join(INDEX_FILE)).unwrap());
    assert_eq!(found, index);

    // `zstd -d --patch-from=OLD` rebuilds the new artifact from it.
    let rebuilt = dir.path().join("rebuilt");
    let out = match Command::new("zstd")
        .arg("-q")
        .arg("-d")
        .arg(format!("--patch-from={}", old.join("app.tar").display()))
        .arg(new.join(&d.name))
        .arg("-o")
        .arg(&rebuilt)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the stock `zstd` tool is not installed; scripts/test installs it (apt-get install zstd)"
        ),
        Err(e) => panic!("cannot run zstd: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(rebuilt).unwrap(), v2);
}

#[test]
fn a_rebuild_without_delta_from_removes_the_stale_index_and_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = noise(64 * 1024, 3);
    let mut v2 = v1.clone();
    v2[10] ^= 1;
    let old = build(dir.path(), "1.0.0", &v1, None).unwrap();
    let new = build(dir.path(), "1.0.1", &v2, Some(&old)).unwrap();
    let name = index_of(&new).deltas[0].name.clone();
    assert!(new.join(&name).exists());
    build(dir.path(), "1.0.1", &v2, None).unwrap();
    assert!(!new.join(INDEX_FILE).exists());
    assert!(!new.join(&name).exists(), "the delta file goes with it");
    assert!(new.join("app.tar").exists() && new.join("manifest.json").exists());
    // And a rebuild with --delta-from replaces it.
    build(dir.path(), "1.0.1", &v2, Some(&old)).unwrap();
    assert_eq!(index_of(&new).deltas[0].name, name);
}

#[test]
fn a_delta_not_much_smaller_than_its_artifact_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let old = build(dir.path(), "1.0.0", &noise(64 * 1024, 4), None).unwrap();
    // Nothing in common with the base: the delta would be the whole artifact.
    let new = build(dir.path(), "1.0.1", &noise(64 * 1024, 5), Some(&old)).unwrap();
    assert!(!new.join(INDEX_FILE).exists());
    let names: Vec<String> = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains(".delta-") && !n.ends_with(".tmp")),
        "{names:?}"
    );
}

#[test]
fn the_bundle_being_built_cannot_be_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = build(dir.path(), "1.0.0", &noise(4096, 6), None).unwrap();
    let err = crate::cli::patch::build(
        &spec(dir.path(), "1.0.1", &noise(4096, 7)),
        Some(old.clone()),
        false,
        Some(&old.join("manifest.json")),
        OUT,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("is the bundle being built"),
        "{err:#}"
    );
    let err = build(dir.path(), "1.0.1", b"x", Some(&dir.path().join("nope"))).unwrap_err();
    assert!(
        format!("{err:#}").contains("--delta-from: cannot read"),
        "{err:#}"
    );
}

#[test]
fn an_old_artifact_that_is_not_its_manifests_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = noise(4096, 8);
    let old = build(dir.path(), "1.0.0", &v1, None).unwrap();
    std::fs::write(old.join("app.tar"), b"something else").unwrap();
    let err = build(dir.path(), "1.0.1", &noise(4096, 9), Some(&old)).unwrap_err();
    assert!(
        format!("{err:#}").contains("but the old manifest says"),
        "{err:#}"
    );
}

#[test]
fn publish_refuses_an_index_made_for_other_manifest_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = noise(64 * 1024, 10);
    let mut v2 = v1.clone();
    v2[0] ^= 1;
    let old = build(dir.path(), "1.0.0", &v1, None).unwrap();
    let new = build(dir.path(), "1.0.1", &v2, Some(&old)).unwrap();
    let path = new.join("manifest.json");
    // The manifest rebuilt by hand (another time in it), the index left.
    let bytes = std::fs::read(&path).unwrap();
    let mut edited = bytes.clone();
    edited.push(b'\n');
    let manifest = Manifest::parse(&edited).unwrap();
    let err = for_publish(&path, &manifest, &edited).unwrap_err();
    assert!(
        format!("{err:#}").contains("was made for other manifest bytes"),
        "{err:#}"
    );
    assert!(for_publish(&path, &manifest, &bytes).unwrap().is_some());
}
