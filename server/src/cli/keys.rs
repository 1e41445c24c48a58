//! Patch-signing keys (minisign format, so stock `minisign` reads and verifies
//! them) and the fleet's trust policy.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_proto::pb;
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
    /// Set the keys the fleet trusts and how many must sign each patch (admin).
    Set {
        /// A minisign public key file (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many of the keys must each sign a patch.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
    },
    /// Show the trust policy.
    Show,
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

pub async fn trust(target: &Target, out: Output, cmd: TrustCmd) -> anyhow::Result<()> {
    let (mut c, _) = target.admin().await?;
    let t = match cmd {
        TrustCmd::Set { keys, threshold } => {
            let public_keys = keys
                .iter()
                .map(|k| read_public_key(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            c.set_trust(pb::TrustPolicy {
                public_keys,
                threshold,
                sha256: String::new(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
        }
        TrustCmd::Show => c
            .get_trust(pb::GetTrustRequest {})
            .await
            .map_err(status_error)?
            .into_inner(),
    };
    out.object(
        &format!(
            "{} of {} key(s) must sign each patch\npolicy sha256: {}\n{}",
            t.threshold,
            t.public_keys.len(),
            t.sha256,
            t.public_keys.join("\n")
        ),
        json!({ "public_keys": t.public_keys, "threshold": t.threshold, "sha256": t.sha256 }),
    );
    Ok(())
}
