//! Patch-signing keys (minisign format, so stock `minisign` reads and verifies
//! them) and the fleet's trust policy.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_proto::pb;
use flotilla_proto::trust::PolicyDoc;
use serde_json::json;

use super::connect::{Target, status_error};
use super::output::Output;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Generate a minisign key pair: PREFIX.key (secret, password-protected) and PREFIX.pub.
    Generate {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
        /// Leave the secret key without a password (for automation that keeps it elsewhere safe).
        #[arg(long)]
        unencrypted: bool,
        /// Read the password from this file instead of FLOTILLA_KEY_PASSWORD or a prompt.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TrustCmd {
    /// Set the fleet's first trust policy: the keys that sign patches and how many must (admin).
    /// Once set, it changes only by a signed rotation (trust propose, sign, publish).
    Set {
        /// A minisign public key file (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many of the keys must each sign a patch.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
    },
    /// Show the trust policy in force.
    Show,
    /// Write the next version of the trust policy, for its signers to sign.
    Propose {
        /// A minisign public key file of the new policy (repeatable: every key it keeps or adds).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many of the new keys must each sign a patch.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// The policy document to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
        /// The version it follows (default: the fleet's version now, asked from the server).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Sign a proposed trust policy (writes FILE.<key-id>.minisig; stock `minisign -Sm FILE` does too).
    /// The next version needs a threshold of the old keys and of the new keys.
    Sign {
        /// The policy document from `trust propose`.
        policy: PathBuf,
        /// Secret key from `flotilla key generate`.
        #[arg(long)]
        key: PathBuf,
        /// Read the key's password from this file instead of FLOTILLA_KEY_PASSWORD or a prompt.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Send a signed policy to the server, which checks it against the version in force and
    /// pushes it to every agent (admin).
    Publish {
        /// The policy document from `trust propose`.
        policy: PathBuf,
        /// Signature files; default: FILE.minisig and FILE.*.minisig.
        #[arg(long = "signature")]
        sigs: Vec<PathBuf>,
    },
}

/// The password for a secret key: a file, FLOTILLA_KEY_PASSWORD, or (None) a
/// prompt on the terminal.
pub fn password(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read password file {}", f.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if let Ok(p) = std::env::var("FLOTILLA_KEY_PASSWORD") {
        return Ok(Some(p));
    }
    if std::io::stdin().is_terminal() {
        return Ok(None);
    }
    bail!(
        "the secret key needs a password: set FLOTILLA_KEY_PASSWORD, pass --password-file, or run on a terminal"
    )
}

/// True when `text` is a minisign public key (what `trust set` takes and
/// `patch sign` does not).
pub fn is_public_key(text: &str) -> bool {
    minisign::PublicKeyBox::from_string(text)
        .and_then(|b| b.into_public_key())
        .is_ok()
}

/// Reads a public key for the trust policy, refusing a secret key before it
/// could be sent anywhere.
fn read_public_key(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    if is_public_key(&text) {
        return Ok(text);
    }
    if text.contains("secret key") || text.lines().any(|l| l.trim().len() > 100) {
        bail!(
            "{} is a secret key: the trust policy takes the public key (PREFIX.pub); the secret key never leaves the signer",
            path.display()
        );
    }
    bail!("{} is not a minisign public key", path.display())
}

fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key",
            path.display()
        );
    }
    crate::ca::write_atomic(path, text.as_bytes(), secret)?;
    Ok(())
}

pub fn key(out: Output, cmd: KeyCmd) -> anyhow::Result<()> {
    let KeyCmd::Generate {
        out: prefix,
        unencrypted,
        password_file,
    } = cmd;
    let kp = if unencrypted {
        minisign::KeyPair::generate_unencrypted_keypair()
    } else {
        minisign::KeyPair::generate_encrypted_keypair(password(password_file.as_deref())?)
    }
    .map_err(|e| anyhow::anyhow!("cannot generate the key pair: {e}"))?;
    // Appended, not replaced: `--out alice.2026` gives alice.2026.key.
    let sk_path = PathBuf::from(format!("{}.key", prefix.display()));
    let pk_path = PathBuf::from(format!("{}.pub", prefix.display()));
    let pk_text = kp.pk.to_box()?.into_string();
    write_file(&sk_path, &kp.sk.to_box(None)?.into_string(), true)?;
    write_file(&pk_path, &pk_text, false)?;
    out.object(
        &format!(
            "secret key: {}{}\npublic key: {}\n\n{}",
            sk_path.display(),
            if unencrypted { " (UNENCRYPTED)" } else { "" },
            pk_path.display(),
            pk_text.trim_end()
        ),
        json!({ "secret_key": sk_path, "public_key": pk_path, "encrypted": !unencrypted }),
    );
    Ok(())
}

/// Reads public key files into the base64 lines a policy document holds.
fn key_lines(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let texts = paths
        .iter()
        .map(|p| read_public_key(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(crate::trust::normalise_keys(&texts))
}

pub async fn trust(target: &Target, out: Output, cmd: TrustCmd) -> anyhow::Result<()> {
    let t = match cmd {
        TrustCmd::Set { keys, threshold } => {
            let public_keys = keys
                .iter()
                .map(|k| read_public_key(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (mut c, _) = target.admin().await?;
            c.set_trust(pb::TrustPolicy {
                public_keys,
                threshold,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner()
        }
        TrustCmd::Show => {
            let (mut c, _) = target.admin().await?;
            c.get_trust(pb::GetTrustRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
        }
        TrustCmd::Propose {
            keys,
            threshold,
            out: path,
            after,
        } => return propose(target, out, &keys, threshold, &path, after).await,
        TrustCmd::Sign {
            policy,
            key,
            password_file,
        } => {
            return super::patch::sign_file(&policy, &key, password_file.as_deref(), out, |b| {
                PolicyDoc::parse(b)
                    .map(|_| ())
                    .context("refusing to sign an invalid trust policy")
            });
        }
        TrustCmd::Publish { policy, sigs } => {
            let document = std::fs::read(&policy)
                .with_context(|| format!("cannot read {}", policy.display()))?;
            PolicyDoc::parse(&document)?;
            let sigs = if sigs.is_empty() {
                super::patch::default_sigs(&policy)?
            } else {
                sigs
            };
            if sigs.is_empty() {
                bail!(
                    "no signatures found beside {} (sign it with `flotilla trust sign` or `minisign -Sm`)",
                    policy.display()
                );
            }
            let signatures = sigs
                .iter()
                .map(|s| {
                    std::fs::read_to_string(s)
                        .with_context(|| format!("cannot read {}", s.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (mut c, _) = target.admin().await?;
            c.publish_trust(pb::SignedTrustPolicy {
                document: document.into(),
                signatures,
            })
            .await
            .map_err(status_error)?
            .into_inner()
        }
    };
    out.object(
        &format!(
            "trust policy v{}: {} of {} key(s) must sign each patch\npolicy sha256: {}\n{}",
            t.version,
            t.threshold,
            t.public_keys.len(),
            t.sha256,
            t.public_keys.join("\n")
        ),
        json!({ "version": t.version, "public_keys": t.public_keys, "threshold": t.threshold, "sha256": t.sha256 }),
    );
    Ok(())
}

/// Writes the next version's document (the fleet's version now plus one).
async fn propose(
    target: &Target,
    out: Output,
    keys: &[PathBuf],
    threshold: u32,
    path: &Path,
    after: Option<u64>,
) -> anyhow::Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            path.display()
        );
    }
    let after = match after {
        Some(v) => v,
        None => {
            let (mut c, _) = target.admin().await?;
            c.get_trust(pb::GetTrustRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .version
        }
    };
    let doc = PolicyDoc {
        version: after + 1,
        keys: key_lines(keys)?,
        threshold,
    };
    let bytes = doc.to_bytes();
    PolicyDoc::parse(&bytes)?;
    crate::ca::write_atomic(path, &bytes, false)?;
    out.object(
        &format!(
            "trust policy v{} written to {}: {} of {} key(s); policy sha256 {}\n\
             to take effect it must be signed by as many of v{after}'s keys as v{after} \
             requires, and by {threshold} of its own: `flotilla trust sign {}`",
            doc.version,
            path.display(),
            threshold,
            doc.keys.len(),
            doc.sha256(),
            path.display()
        ),
        json!({ "version": doc.version, "path": path, "sha256": doc.sha256() }),
    );
    Ok(())
}
