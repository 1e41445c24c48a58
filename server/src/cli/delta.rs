//! Delta patches in the CLI: `patch build --delta-from OLD` writes, for each
//! artifact that changed since the old bundle, a zstd delta with the old
//! artifact as reference prefix (what `zstd --patch-from` makes, so stock
//! `zstd -d --patch-from=OLD` decodes it) and the delta index `deltas.json`
//! beside the manifest; `patch publish` finds the index and its files.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flotilla_proto::delta::{self, Delta, DeltaIndex, INDEX_FILE, MAX_DELTA_BYTES};
use flotilla_proto::manifest::{Artifact, Manifest};
use serde_json::{Value, json};
use sha2::Digest;

/// zstd's level for deltas: its default, which is also `zstd --patch-from`'s.
/// Higher levels were no smaller on real archives, and far slower.
const LEVEL: i32 = 3;
/// A delta is kept only when smaller than this share (percent) of its
/// artifact: otherwise a host might as well fetch the artifact.
const KEEP_BELOW_PERCENT: u64 = 90;

/// An older bundle to make deltas from: its directory and its manifest.
pub(super) struct OldBundle {
    dir: PathBuf,
    manifest: Manifest,
}

/// Reads the bundle `--delta-from` names (a directory, or its manifest.json),
/// refusing the directory the new bundle is built into: building would
/// replace the bases before they are read.
pub(super) fn old_bundle(path: &Path, out_dir: &Path) -> anyhow::Result<OldBundle> {
    let manifest_path = if path.is_dir() {
        path.join("manifest.json")
    } else {
        path.to_path_buf()
    };
    let dir = manifest_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let bytes = std::fs::read(&manifest_path).with_context(|| {
        format!(
            "--delta-from: cannot read {} (give an older bundle's directory or its manifest.json)",
            manifest_path.display()
        )
    })?;
    let manifest = Manifest::parse(&bytes).with_context(|| {
        format!(
            "--delta-from: {} is not a valid manifest",
            manifest_path.display()
        )
    })?;
    if std::fs::canonicalize(&dir).ok() == std::fs::canonicalize(out_dir).ok() {
        bail!(
            "--delta-from {} is the bundle being built; build the new one into another --out-dir",
            path.display()
        );
    }
    Ok(OldBundle { dir, manifest })
}

/// Removes an earlier build's `deltas.json` from `out_dir`, with the delta
/// files it lists (never a file that is an artifact of `manifest`, the one
/// being built): they were made for other manifest bytes. Says so on stderr
/// when this build makes no deltas of its own.
pub(super) fn remove_stale(
    out_dir: &Path,
    manifest: &Manifest,
    replacing: bool,
) -> anyhow::Result<()> {
    let path = out_dir.join(INDEX_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // Names only from an index that parses: they are checked file names.
    let files = DeltaIndex::parse(&bytes).map_or(Vec::new(), |i| i.deltas);
    let mut removed = 0;
    for d in files
        .iter()
        .filter(|d| manifest.artifact(&d.name).is_none())
    {
        match std::fs::remove_file(out_dir.join(&d.name)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", d.name)),
        }
    }
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    if !replacing {
        eprintln!(
            "removed {INDEX_FILE} of the previous build and {removed} delta file(s): they were for \
             other manifest bytes (build with --delta-from OLD to make deltas again)"
        );
    }
    Ok(())
}

/// Writes the deltas from `old` of the new manifest's changed artifacts
/// (already in `out_dir`) and, when any is kept, `deltas.json` for these
/// exact manifest bytes. Returns how many deltas it wrote.
pub(super) fn build(
    out_dir: &Path,
    manifest: &Manifest,
    manifest_bytes: &[u8],
    old: &OldBundle,
) -> anyhow::Result<usize> {
    let mut deltas = Vec::new();
    for target in &manifest.artifacts {
        let Some(base) = old.manifest.artifact(&target.name) else {
            eprintln!(
                "no delta for {}: the old bundle has no artifact of that name",
                target.name
            );
            continue;
        };
        if base.sha256 == target.sha256 {
            continue;
        }
        let Some(window_log) = delta::window_log(base.size, target.size) else {
            eprintln!(
                "no delta for {}: it is {} bytes and its base {}; deltas are made only for \
                 artifacts of at most {MAX_DELTA_BYTES} bytes (128 MiB)",
                target.name, target.size, base.size
            );
            continue;
        };
        let name = Delta::file_name(&target.name, &base.sha256);
        if manifest.artifact(&name).is_some() {
            bail!(
                "the delta of {} would be called {name}, the name of one of the patch's artifacts: \
                 rename that artifact",
                target.name
            );
        }
        let base_bytes = read_base(&old.dir.join(&base.name), base)?;
        let path = out_dir.join(&name);
        let Some((sha256, size)) = encode(
            &base_bytes,
            &out_dir.join(&target.name),
            target,
            window_log,
            &path,
        )?
        else {
            continue;
        };
        deltas.push(Delta {
            artifact: target.name.clone(),
            base_sha256: base.sha256.clone(),
            base_size: base.size,
            name,
            sha256,
            size,
            target_sha256: target.sha256.clone(),
            target_size: target.size,
        });
    }
    if deltas.is_empty() {
        eprintln!(
            "no deltas from {}: {INDEX_FILE} not written",
            old.dir.display()
        );
        return Ok(0);
    }
    let index = DeltaIndex::new(manifest_bytes, deltas);
    // Checked as the server and the agents will.
    index.validate()?;
    index.validate_against(manifest, manifest_bytes)?;
    crate::ca::write_atomic(&out_dir.join(INDEX_FILE), &index.to_bytes(), false)?;
    Ok(index.deltas.len())
}

/// The old artifact, whole, once it is the one its manifest names.
fn read_base(path: &Path, base: &Artifact) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_DELTA_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| {
            format!(
                "--delta-from: cannot read {} (the old bundle's artifacts sit beside its manifest)",
                path.display()
            )
        })?;
    let sha = flotilla_proto::sha256_hex(&bytes);
    if sha != base.sha256 || bytes.len() as u64 != base.size {
        bail!(
            "--delta-from: {} has sha256 {sha} ({} bytes), but the old manifest says {} ({} bytes)",
            path.display(),
            bytes.len(),
            base.sha256,
            base.size
        );
    }
    Ok(bytes)
}

/// A file being written, hashed and counted as it goes.
struct Hashing {
    file: File,
    hasher: sha2::Sha256,
    len: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Encodes the delta of `target_path` (the artifact `target`) from `base`
/// into `out`, as `zstd --patch-from` does: `base` as the reference prefix,
/// long-distance matching, a window reaching back over the base, the
/// target's size and a checksum in the frame. Returns the delta's digest
/// and size, or None (and writes nothing) when it is not small enough to
/// be worth it.
fn encode(
    base: &[u8],
    target_path: &Path,
    target: &Artifact,
    window_log: u32,
    out: &Path,
) -> anyhow::Result<Option<(String, u64)>> {
    let name = out
        .file_name()
        .context("delta path has no file name")?
        .to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    let written = (|| -> anyhow::Result<Hashing> {
        let file = File::create(&tmp)?;
        let sink = Hashing {
            file,
            hasher: sha2::Sha256::new(),
            len: 0,
        };
        let mut enc = zstd::stream::write::Encoder::with_ref_prefix(sink, LEVEL, base)?;
        enc.long_distance_matching(true)?;
        enc.window_log(window_log)?;
        enc.include_checksum(true)?;
        enc.set_pledged_src_size(Some(target.size))?;
        let mut input = File::open(target_path)
            .with_context(|| format!("cannot read {}", target_path.display()))?;
        std::io::copy(&mut input, &mut enc)
            .with_context(|| format!("cannot encode the delta of {}", target.name))?;
        let sink = enc
            .finish()
            .with_context(|| format!("cannot encode the delta of {}", target.name))?;
        sink.file.sync_all()?;
        Ok(sink)
    })();
    let sink = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("cannot write {}", out.display())));
        }
    };
    if sink.len * 100 >= target.size * KEEP_BELOW_PERCENT {
        std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        eprintln!(
            "no delta for {}: it would be {} bytes, {}% of the artifact's {}; a delta is kept only \
             below {KEEP_BELOW_PERCENT}%",
            target.name,
            sink.len,
            sink.len * 100 / target.size.max(1),
            target.size
        );
        return Ok(None);
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    let dir = out.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(Some((hex::encode(sink.hasher.finalize()), sink.len)))
}

/// The delta index beside `manifest_path`, checked against the manifest's
/// exact bytes, with its exact bytes (None: the bundle has no deltas).
pub(super) fn for_publish(
    manifest_path: &Path,
    manifest: &Manifest,
    manifest_bytes: &[u8],
) -> anyhow::Result<Option<(Vec<u8>, DeltaIndex)>> {
    let path = manifest_path.with_file_name(INDEX_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let index = DeltaIndex::parse(&bytes).with_context(|| format!("{} refused", path.display()))?;
    match index.validate_against(manifest, manifest_bytes) {
        Ok(()) => Ok(Some((bytes, index))),
        Err(e @ delta::DeltaIndexError::OtherManifest { .. }) => Err(anyhow::Error::new(e)
            .context(format!(
                "{} was made for other manifest bytes: build again with --delta-from, or remove it \
                 to publish without deltas",
                path.display()
            ))),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{} refused", path.display()))),
    }
}

/// A delta file as `publish` uploads it: an artifact by digest and size.
pub(super) fn as_artifact(d: &Delta) -> Artifact {
    Artifact {
        name: d.name.clone(),
        sha256: d.sha256.clone(),
        size: d.size,
    }
}

/// The deltas of a published patch's index (its bytes as the server holds
/// them), for `--json`; none when it has none (or it does not parse).
pub(super) fn json(index: &[u8]) -> Value {
    let deltas = if index.is_empty() {
        Vec::new()
    } else {
        DeltaIndex::parse(index).map_or(Vec::new(), |i| i.deltas)
    };
    Value::Array(
        deltas
            .iter()
            .map(|d| {
                json!({
                    "artifact": d.artifact, "name": d.name, "sha256": d.sha256, "size": d.size,
                    "base_sha256": d.base_sha256, "base_size": d.base_size,
                })
            })
            .collect(),
    )
}

/// One line per delta of a published patch, for people.
pub(super) fn summary(index: &[u8]) -> Vec<String> {
    if index.is_empty() {
        return Vec::new();
    }
    DeltaIndex::parse(index).map_or(Vec::new(), |i| {
        i.deltas
            .iter()
            .map(|d| {
                format!(
                    "delta {}: {} from base {} ({} bytes, {}% of {} bytes)",
                    d.name,
                    d.artifact,
                    &d.base_sha256[..12],
                    d.size,
                    d.size * 100 / d.target_size.max(1),
                    d.target_size
                )
            })
            .collect()
    })
}

#[cfg(test)]
mod tests;
