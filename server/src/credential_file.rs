//! The file an operator keeps: a credential, the CA to trust, and optionally the
//! server's URL. `flotilla-server init` writes the first one; the CLI reads it.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// `<id>.<secret>`.
    pub credential: String,
    /// PEM of the server's CA: the CLI trusts nothing else.
    pub ca_certificate: String,
    /// Default server URL (a flag or FLOTILLA_SERVER wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

impl CredentialFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read credential file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid credential file {}", path.display()))
    }

    /// Writes the file with owner-only permissions.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self).context("cannot encode credential file")?;
        crate::ca::write_atomic(path, text.as_bytes(), true)?;
        Ok(())
    }
}
