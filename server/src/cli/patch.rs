//! `flotilla patch`: build a manifest from a spec (and deltas from an older
//! bundle: `delta.rs`), sign it, publish it with its artifacts and deltas
//! (resumable uploads with a progress bar), and follow it.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_proto::manifest::{
    Artifact, HealthCheck, Install, Manifest, Rollback, SCHEMA_VERSION, Severity, Targets,
};
use flotilla_proto::pb;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use super::connect::{Target, status_error};
use super::output::{Output, time};

#[derive(Subcommand)]
pub enum PatchCmd {
    /// Build manifest.json from a spec (TOML): hashes the artifacts and copies
    /// them next to the manifest in the output directory.
    Build {
        /// The patch spec (TOML).
        spec: PathBuf,
        /// Output directory (default: beside the spec, named after the patch id).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Rebuild over a signed manifest: its signatures (which would be for
        /// other bytes) are removed.
        #[arg(long)]
        force: bool,
        /// An older bundle (its directory or its manifest.json): also write a
        /// zstd delta from it of each artifact that changed, and deltas.json.
        #[arg(long, value_name = "OLD")]
        delta_from: Option<PathBuf>,
    },
    /// Add a signature to a manifest (writes MANIFEST.<key-id>.minisig).
    Sign {
        /// The manifest to sign (manifest.json from `patch build`).
        manifest: PathBuf,
        /// Secret key from `flotilla key generate` (or a password-protected `minisign -G` key).
        #[arg(long)]
        key: PathBuf,
        /// Read the key's password from this file instead of FLOTILLA_KEY_PASSWORD or a prompt.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Upload a manifest's artifacts and deltas (resuming) and publish it with its signatures.
    Publish {
        /// The signed manifest (manifest.json from `patch build`).
        manifest: PathBuf,
        /// Signature files; default: MANIFEST.minisig and MANIFEST.*.minisig.
        #[arg(long = "sig")]
        sigs: Vec<PathBuf>,
        #[command(flatten)]
        policy: super::rollout::PolicyArgs,
        /// Send to every target at once, maintenance windows ignored (the
        /// capacity guard still holds).
        #[arg(long)]
        emergency: bool,
        /// With --emergency: ignore the capacity guard too.
        #[arg(long, requires = "emergency")]
        force: bool,
    },
    /// List published patches.
    List,
    /// Show one patch.
    Show {
        /// The patch id.
        id: String,
    },
    /// Where each targeted node stands with a patch; failing nodes with reasons.
    Status {
        /// The patch id.
        id: String,
        /// Wait (up to this long) until every targeted node reached an outcome, then print.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// List every node: its phase, where its bytes came from, its download
        /// attempts and the last error.
        #[arg(long)]
        nodes: bool,
    },
}

/// The spec `patch build` reads: the manifest's fields, with artifact paths
/// instead of digests and a lifetime instead of times.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    id: String,
    component: String,
    version: String,
    severity: Severity,
    #[serde(with = "humantime_serde")]
    expires_in: Duration,
    /// When the fix was released (RFC 3339); default now. Compliance SLAs
    /// count from it, so a vendor fix repackaged late is not "new".
    #[serde(default, with = "time::serde::rfc3339::option")]
    issued_at: Option<time::OffsetDateTime>,
    #[serde(default)]
    allow_downgrade: bool,
    #[serde(default)]
    targets: Targets,
    artifacts: Vec<SpecArtifact>,
    install: Install,
    #[serde(default)]
    health_check: Option<HealthCheck>,
    #[serde(default)]
    rollback: Option<Rollback>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecArtifact {
    name: String,
    /// Relative to the spec file.
    path: PathBuf,
}

/// A progress bar of `len` bytes on stderr, when stderr is a terminal
/// (scripts and logs get none).
fn progress(len: u64, msg: String) -> indicatif::ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template"),
    );
    bar.set_message(msg);
    bar
}

/// SHA-256 and size of the file of artifact `name`, with a progress bar
/// (large artifacts take a while to hash).
fn hash_file(path: &Path, name: &str) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().map_or(0, |m| m.len());
    let bar = progress(len, format!("hashing {name}"));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok((hex::encode(h.finalize()), size))
}

pub(super) fn build(
    spec_path: &Path,
    out_dir: Option<PathBuf>,
    force: bool,
    delta_from: Option<&Path>,
    out: Output,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec_path)
        .with_context(|| format!("cannot read {}", spec_path.display()))?;
    let spec: Spec =
        toml::from_str(&text).with_context(|| format!("invalid spec {}", spec_path.display()))?;
    let base = spec_path.parent().unwrap_or(Path::new("."));
    let out_dir = out_dir.unwrap_or_else(|| base.join(&spec.id));
    std::fs::create_dir_all(&out_dir)?;
    // Signatures beside the manifest would be for the old bytes.
    let path = out_dir.join("manifest.json");
    let stale = default_sigs(&path)?;
    if !stale.is_empty() && !force {
        bail!(
            "{} is already signed ({}); rebuilding would leave those signatures for other bytes: \
             pass --force to rebuild and remove them, or build into another --out-dir",
            path.display(),
            names(&stale)
        );
    }
    // Read before anything here changes: it may not be this directory.
    let old = delta_from
        .map(|p| super::delta::old_bundle(p, &out_dir))
        .transpose()?;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let mut artifacts = Vec::new();
    for a in &spec.artifacts {
        let src = base.join(&a.path);
        let (sha256, size) = hash_file(&src, &a.name)?;
        let dest = out_dir.join(&a.name);
        if std::fs::canonicalize(&src).ok() != std::fs::canonicalize(&dest).ok() {
            std::fs::copy(&src, &dest)
                .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
        }
        artifacts.push(Artifact {
            name: a.name.clone(),
            sha256,
            size,
        });
    }
    let manifest = Manifest {
        schema: SCHEMA_VERSION,
        id: spec.id,
        component: spec.component,
        version: spec.version,
        severity: spec.severity,
        issued_at: spec.issued_at.unwrap_or(now),
        expires_at: now + spec.expires_in,
        allow_downgrade: spec.allow_downgrade,
        targets: spec.targets,
        artifacts,
        install: spec.install,
        health_check: spec.health_check,
        rollback: spec.rollback,
    };
    manifest.validate()?;
    let mut bytes = serde_json::to_vec_pretty(&manifest)?;
    bytes.push(b'\n');
    // Parse what we wrote, exactly as an agent will.
    Manifest::parse(&bytes)?;
    for s in &stale {
        std::fs::remove_file(s).with_context(|| format!("cannot remove {}", s.display()))?;
    }
    if !stale.is_empty() {
        eprintln!(
            "removed {} signature(s) of the old manifest: {}",
            stale.len(),
            names(&stale)
        );
    }
    // Only now, with a valid manifest to write: a failed build keeps the old bundle whole.
    super::delta::remove_stale(&out_dir, &manifest, old.is_some())?;
    crate::ca::write_atomic(&path, &bytes, false)?;
    let deltas = match &old {
        Some(old) => super::delta::build(&out_dir, &manifest, &bytes, old)?,
        None => 0,
    };
    out.object(
        &format!(
            "wrote {} ({} artifact(s){}); sign it with `flotilla patch sign {} --key KEY`",
            path.display(),
            manifest.artifacts.len(),
            if old.is_some() {
                format!(", {deltas} delta(s)")
            } else {
                String::new()
            },
            path.display()
        ),
        json!({ "manifest": path, "id": manifest.id, "artifacts": manifest.artifacts.len(), "deltas": deltas }),
    );
    Ok(())
}

pub(super) fn sign(
    manifest: &Path,
    key: &Path,
    password_file: Option<&Path>,
    out: Output,
) -> anyhow::Result<()> {
    sign_file(manifest, key, password_file, out, |bytes| {
        Manifest::parse(bytes)
            .map(|_| ())
            .context("refusing to sign an invalid manifest")
    })
}

/// Signs `manifest` (a patch manifest or a trust policy document, which
/// `check` accepts first) with a minisign secret key: writes
/// FILE.<key-id>.minisig beside it.
pub(super) fn sign_file(
    manifest: &Path,
    key: &Path,
    password_file: Option<&Path>,
    out: Output,
    check: impl FnOnce(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    check(&bytes)?;
    let text =
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    if super::keys::is_public_key(&text) {
        bail!(
            "{} is a public key: sign with the secret key (PREFIX.key from `flotilla key generate`)",
            key.display()
        );
    }
    let sk_box = minisign::SecretKeyBox::from_string(&text)
        .with_context(|| format!("{} is not a minisign secret key", key.display()))?;
    let sk = match sk_box.clone().into_unencrypted_secret_key() {
        Ok(sk) => sk,
        Err(e) if e.to_string().contains("might be encrypted") => sk_box
            .into_secret_key(super::keys::password(password_file)?)
            .map_err(|e| anyhow::anyhow!("cannot unlock {}: {e}", key.display()))?,
        Err(e) => bail!(
            "cannot use {}: {e} (an unencrypted key from `minisign -G -W` cannot be read here: \
             sign with stock `minisign -Sm` instead, or use a key from `flotilla key generate`)",
            key.display()
        ),
    };
    let pk = minisign::PublicKey::from_secret_key(&sk)?;
    let sig = minisign::sign(Some(&pk), &sk, bytes.as_slice(), None, None)?;
    // The key id as minisign prints it (little-endian, upper case).
    let key_id: String = pk
        .keynum()
        .iter()
        .rev()
        .map(|b| format!("{b:02X}"))
        .collect();
    let name = format!(
        "{}.{key_id}.minisig",
        manifest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("manifest.json")
    );
    let path = manifest.with_file_name(name);
    crate::ca::write_atomic(&path, sig.into_string().as_bytes(), false)?;
    out.object(
        &format!("signed with key {key_id}: {}", path.display()),
        json!({ "signature": path, "key_id": key_id }),
    );
    Ok(())
}

/// File names, for messages.
fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.file_name().unwrap_or(p.as_os_str()).to_string_lossy())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names the file behind "signature N" in a refusal (the server counts the
/// signatures it was sent from 0, in the order sent).
fn name_signature(message: &str, sigs: &[PathBuf]) -> Option<String> {
    let rest = message.split("signature ").nth(1)?;
    let n: usize = rest.split(' ').next()?.parse().ok()?;
    Some(sigs.get(n)?.display().to_string())
}

/// FILE.minisig and FILE.*.minisig beside a signed file.
pub(super) fn default_sigs(manifest: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let name = manifest
        .file_name()
        .and_then(|n| n.to_str())
        .context("manifest path has no file name")?
        .to_string();
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if n.starts_with(&format!("{name}.")) && n.ends_with(".minisig") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

const UPLOAD_CHUNK: usize = 512 * 1024;

/// Uploads the file at `path` as `a` (an artifact, or a delta file; `source`
/// says which document gives its digest), unless the server holds it.
async fn upload(
    c: &mut super::connect::Admin,
    path: &Path,
    a: &Artifact,
    source: &str,
) -> anyhow::Result<()> {
    let held = c
        .artifact_status(pb::ArtifactStatusRequest {
            sha256: a.sha256.clone(),
            size: a.size,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if held.complete {
        return Ok(());
    }
    let (sha, size) = hash_file(path, &a.name)?;
    if sha != a.sha256 || size != a.size {
        bail!(
            "{} does not match the digest and size {source} gives",
            path.display()
        );
    }
    let bar = progress(a.size, a.name.clone());
    bar.set_position(held.received);
    let mut file = std::fs::File::open(path)?;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(held.received))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ArtifactUpload>(4);
    let (sha256, offset, pbar) = (a.sha256.clone(), held.received, bar.clone());
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut first = true;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 && !first {
                return Ok(());
            }
            let msg = pb::ArtifactUpload {
                sha256: if first { sha256.clone() } else { String::new() },
                size: if first { size } else { 0 },
                offset: if first { offset } else { 0 },
                data: buf[..n].to_vec(),
            };
            first = false;
            if tx.blocking_send(msg).is_err() {
                return Ok(());
            }
            pbar.inc(n as u64);
            if n == 0 {
                return Ok(());
            }
        }
    });
    let result = c
        .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    reader.await??;
    bar.finish_and_clear();
    if !result.complete {
        bail!(
            "upload of {} stopped at {} of {} bytes; run publish again to resume",
            a.name,
            result.received,
            a.size
        );
    }
    Ok(())
}

/// How `publish` rolls the patch out.
#[derive(Debug, Default)]
pub(super) struct Publish {
    pub rollout: Option<pb::RolloutPolicy>,
    pub emergency: bool,
    pub force: bool,
}

pub(super) async fn publish(
    target: &Target,
    manifest_path: &Path,
    sigs: Vec<PathBuf>,
    how: Publish,
    out: Output,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&bytes)?;
    let sigs = if sigs.is_empty() {
        default_sigs(manifest_path)?
    } else {
        sigs
    };
    if sigs.is_empty() {
        bail!(
            "no signatures found beside {} (sign it with `flotilla patch sign` or `minisign -Sm`)",
            manifest_path.display()
        );
    }
    let mut signatures = Vec::new();
    for s in &sigs {
        signatures.push(
            std::fs::read_to_string(s).with_context(|| format!("cannot read {}", s.display()))?,
        );
    }
    let deltas = super::delta::for_publish(manifest_path, &manifest, &bytes)?;
    let (mut c, _) = target.admin().await?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    for a in &manifest.artifacts {
        upload(&mut c, &dir.join(&a.name), a, "the manifest").await?;
    }
    for d in deltas.iter().flat_map(|(_, index)| &index.deltas) {
        let a = super::delta::as_artifact(d);
        upload(
            &mut c,
            &dir.join(&d.name),
            &a,
            flotilla_proto::delta::INDEX_FILE,
        )
        .await?;
    }
    let info = c
        .publish_patch(pb::PublishPatchRequest {
            manifest: bytes,
            signatures,
            rollout: how.rollout,
            emergency: how.emergency,
            force: how.force,
            deltas: deltas.map(|(bytes, _)| bytes).unwrap_or_default(),
        })
        .await
        .map_err(|s| match name_signature(s.message(), &sigs) {
            Some(file) => status_error(s).context(format!("signature from {file}")),
            None => status_error(s),
        })?
        .into_inner();
    let rollout = match c
        .get_rollout(pb::GetRolloutRequest {
            patch_id: info.id.clone(),
        })
        .await
    {
        Ok(r) => rollout_summary(&r.into_inner()),
        Err(_) => info.rollout_state.clone(),
    };
    out.object(
        &format!(
            "published {} ({} {}, {}){} to {} node(s); rollout {}",
            info.id,
            info.component,
            info.version,
            info.severity,
            if info.emergency {
                " as an EMERGENCY"
            } else {
                ""
            },
            info.targeted,
            rollout
        ),
        info_json(&info),
    );
    Ok(())
}

/// The rollout's state, and the maintenance windows that hold it: "running"
/// is not the word when a closed window holds every targeted node.
fn rollout_summary(r: &pb::RolloutInfo) -> String {
    let targeted: Vec<&pb::RolloutGroup> = r.groups.iter().filter(|g| g.targeted > 0).collect();
    let held: Vec<String> = targeted
        .iter()
        .filter(|g| g.window_opens_at_ms > 0)
        .map(|g| {
            format!(
                "{} opens {}",
                g.group,
                super::output::time(g.window_opens_at_ms / 1000)
            )
        })
        .collect();
    if r.state != "running" || held.is_empty() {
        r.state.clone()
    } else if held.len() == targeted.len() {
        format!("waiting for the maintenance window ({})", held.join(", "))
    } else {
        format!(
            "running; waiting for the maintenance window in {}",
            held.join(", ")
        )
    }
}

pub(super) fn info_json(p: &pb::PatchInfo) -> Value {
    json!({
        "id": p.id, "component": p.component, "version": p.version, "severity": p.severity,
        "issued_at": p.issued_at, "expires_at": p.expires_at, "published_at": p.published_at,
        "published_by": p.published_by, "targeted": p.targeted, "signatures": p.signatures,
        "emergency": p.emergency, "rollout_state": p.rollout_state,
        "artifacts": p.artifacts.iter().map(|a| json!({"name": a.name, "sha256": a.sha256, "size": a.size})).collect::<Vec<_>>(),
        "deltas": super::delta::json(&p.deltas),
    })
}

pub async fn patch(target: &Target, out: Output, cmd: PatchCmd) -> anyhow::Result<()> {
    match cmd {
        PatchCmd::Build {
            spec,
            out_dir,
            force,
            delta_from,
        } => build(&spec, out_dir, force, delta_from.as_deref(), out),
        PatchCmd::Sign {
            manifest,
            key,
            password_file,
        } => sign(&manifest, &key, password_file.as_deref(), out),
        PatchCmd::Publish {
            manifest,
            sigs,
            policy,
            emergency,
            force,
        } => {
            let how = Publish {
                rollout: policy.to_pb(),
                emergency,
                force,
            };
            publish(target, &manifest, sigs, how, out).await
        }
        PatchCmd::List => list(target, out).await,
        PatchCmd::Show { id } => {
            let (mut c, _) = target.admin().await?;
            let p = c
                .get_patch(pb::GetPatchRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            out.object(&String::from_utf8_lossy(&p.manifest), info_json(&p));
            // Beside the manifest's exact bytes, not among them.
            if !out.json {
                for line in super::delta::summary(&p.deltas) {
                    eprintln!("{line}");
                }
            }
            Ok(())
        }
        PatchCmd::Status { id, wait, nodes } => {
            super::patch_status::status(target, out, id, wait, nodes).await
        }
    }
}

async fn list(target: &Target, out: Output) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let r = c
        .list_patches(pb::ListPatchesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    out.table(
        &[
            "ID",
            "COMPONENT",
            "VERSION",
            "SEVERITY",
            "PUBLISHED",
            "EXPIRES",
            "TARGETED",
        ],
        r.patches
            .iter()
            .map(|p| {
                vec![
                    p.id.clone(),
                    p.component.clone(),
                    p.version.clone(),
                    p.severity.clone(),
                    time(p.published_at),
                    time(p.expires_at),
                    p.targeted.to_string(),
                ]
            })
            .collect(),
        Value::Array(r.patches.iter().map(info_json).collect()),
    );
    Ok(())
}
