//! The backup file: a tar archive of the fleet's records (a records file as
//! of one revision), the server's TLS files (CA and server certificate with
//! their keys: agents accept a restored server because it is the same CA),
//! and every complete artifact. Restoring reads back only the names it
//! writes, each checked (artifacts against their digests), into a new data dir.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::records::Summary;
use crate::ca::TlsPaths;
use crate::store::Revision;

/// The file that says what the archive holds.
const MANIFEST: &str = "backup.json";
const RECORDS: &str = "records.jsonl";
const FORMAT: u32 = 1;
/// The TLS files, by their names in the archive and in `<data-dir>/tls/`.
const TLS_FILES: [&str; 4] = ["ca.pem", "ca.key", "server.pem", "server.key"];

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    pub format: u32,
    pub created_at: String,
    /// The store revision the records are as of.
    pub revision: Revision,
    pub records: Summary,
    pub artifacts: u64,
}

fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn append_file(tar: &mut tar::Builder<impl Write>, name: &str, path: &Path) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    tar.append_file(name, &mut f)
        .with_context(|| format!("cannot add {} to the backup", path.display()))
}

/// Writes the backup of `data_dir` with `records_file` (as of `revision`) to
/// `out`, through a partial file renamed into place once durable: an
/// interrupted backup leaves no file that looks whole.
pub fn write(
    out: &Path,
    data_dir: &Path,
    records_file: &Path,
    revision: Revision,
    records: Summary,
) -> anyhow::Result<BackupInfo> {
    let partial = out.with_extension("partial");
    let file =
        File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    // Artifacts: the complete ones, under their digests. They are immutable,
    // and a patch's artifacts are stored before its record, so every patch
    // in the records has its artifacts here.
    let art_dir = data_dir.join("artifacts");
    let mut artifacts = Vec::new();
    if art_dir.exists() {
        for entry in std::fs::read_dir(&art_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_file() && is_digest(&name) {
                artifacts.push(name);
            }
        }
    }
    artifacts.sort();
    let info = BackupInfo {
        format: FORMAT,
        created_at: flotilla_proto::when::unix_secs(crate::model::now_secs()),
        revision,
        records,
        artifacts: artifacts.len() as u64,
    };
    let manifest = serde_json::to_vec_pretty(&info)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o600);
    tar.append_data(&mut header, MANIFEST, &manifest[..])?;
    append_file(&mut tar, RECORDS, records_file)?;
    let tls = data_dir.join("tls");
    for name in TLS_FILES {
        append_file(&mut tar, &format!("tls/{name}"), &tls.join(name))?;
    }
    for a in &artifacts {
        append_file(&mut tar, &format!("artifacts/{a}"), &art_dir.join(a))?;
    }
    let file = tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, out)
        .with_context(|| format!("cannot move the backup into place at {}", out.display()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(info)
}

/// What [`unpack`] restored.
#[derive(Debug)]
pub struct Unpacked {
    pub info: BackupInfo,
    /// The records file, in the new data dir (the caller loads and removes it).
    pub records_file: PathBuf,
}

/// Restores the TLS files and artifacts of the backup `from` into `data_dir`,
/// which must be absent or empty, and leaves its records file there for the
/// caller to load. Anything in the archive but the names a backup has, a
/// TLS file or artifact missing, or an artifact whose bytes do not match its
/// digest, is refused.
pub fn unpack(from: &Path, data_dir: &Path) -> anyhow::Result<Unpacked> {
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir)
            .with_context(|| format!("cannot read {}", data_dir.display()))?;
        anyhow::ensure!(
            entries.next().is_none(),
            "{} is not empty: restore into a new data dir",
            data_dir.display()
        );
    }
    crate::data_dir::create(data_dir)?;
    let tls = TlsPaths::in_dir(data_dir);
    let tls_dir = tls.ca_cert.parent().expect("tls dir").to_path_buf();
    crate::data_dir::create(&tls_dir)?;
    let art_dir = data_dir.join("artifacts");
    crate::data_dir::create(&art_dir)?;
    let records_file = data_dir.join("restore-records.jsonl");
    let file = File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut info: Option<BackupInfo> = None;
    let (mut have_records, mut tls_seen, mut artifacts) = (false, 0, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        anyhow::ensure!(
            entry.header().entry_type().is_file(),
            "backup entry {name:?} is not a regular file"
        );
        if name == MANIFEST {
            let mut text = Vec::new();
            (&mut entry).take(1 << 20).read_to_end(&mut text)?;
            info = Some(
                serde_json::from_slice(&text).context("the backup's backup.json is malformed")?,
            );
        } else if name == RECORDS {
            copy_to(&mut entry, &records_file, u64::MAX)?;
            have_records = true;
        } else if let Some(t) = name.strip_prefix("tls/").filter(|t| TLS_FILES.contains(t)) {
            copy_to(&mut entry, &tls_dir.join(t), 1 << 20)?;
            tls_seen += 1;
        } else if let Some(a) = name.strip_prefix("artifacts/").filter(|a| is_digest(a)) {
            let path = art_dir.join(a);
            let digest = copy_to(&mut entry, &path, crate::artifacts::MAX_ARTIFACT_BYTES)?;
            if digest != a {
                let _ = std::fs::remove_file(&path);
                anyhow::bail!("backup artifact {a} holds bytes whose sha256 is {digest}");
            }
            artifacts += 1;
        } else {
            anyhow::bail!("backup entry {name:?} is not part of a flotilla backup");
        }
    }
    let info = info.context("the file has no backup.json: it is not a flotilla backup")?;
    anyhow::ensure!(
        info.format == FORMAT,
        "backup format {} is not one this server reads ({FORMAT})",
        info.format
    );
    anyhow::ensure!(have_records, "the backup has no records file");
    anyhow::ensure!(
        tls_seen == TLS_FILES.len(),
        "the backup lacks some of the CA and server TLS files"
    );
    anyhow::ensure!(
        artifacts == info.artifacts,
        "the backup holds {artifacts} artifacts where its backup.json says {}",
        info.artifacts
    );
    Ok(Unpacked { info, records_file })
}

/// Copies at most `limit` bytes of `r` to a new owner-only file at `path`,
/// fsynced; returns the SHA-256 of what was copied.
fn copy_to(r: &mut impl Read, path: &Path, limit: u64) -> anyhow::Result<String> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        anyhow::ensure!(
            total <= limit,
            "{} is larger than a backup allows ({limit} bytes)",
            path.display()
        );
        hash.update(&buf[..n]);
        f.write_all(&buf[..n])?;
    }
    f.sync_all()?;
    Ok(hex::encode(hash.finalize()))
}
