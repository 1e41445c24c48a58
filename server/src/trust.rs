//! The fleet's patch-signing trust policy as the server keeps it: public keys and
//! a threshold. The server checks every publish against it so a badly signed
//! manifest is never stored; agents check again against the copy they pinned.

use flotilla_proto::manifest::TrustPolicy;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Db;

const KEY: &str = "meta/trust";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustRecord {
    /// minisign public keys, normalised to their base64 line.
    pub public_keys: Vec<String>,
    pub threshold: u32,
}

impl TrustRecord {
    /// Validates and normalises keys (a `.pub` file's text or its base64 line).
    pub fn new(keys: &[String], threshold: u32) -> Result<Self> {
        let mut normalised = Vec::new();
        for k in keys {
            let line = base64_line(k);
            if !normalised.contains(&line) {
                normalised.push(line);
            }
        }
        TrustPolicy::new(&normalised, threshold as usize)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Self {
            public_keys: normalised,
            threshold,
        })
    }

    pub fn policy(&self) -> Result<TrustPolicy> {
        TrustPolicy::new(&self.public_keys, self.threshold as usize)
            .map_err(|e| Error::Internal(format!("stored trust policy is invalid: {e}")))
    }

    /// A hash over the normalised policy: keys sorted, then the threshold. An
    /// operator can compare it with what an agent pinned.
    pub fn sha256(&self) -> String {
        let mut keys = self.public_keys.clone();
        keys.sort();
        flotilla_proto::sha256_hex(format!("{}\n{}", keys.join("\n"), self.threshold).as_bytes())
    }
}

/// The base64 line of a minisign public key: the last non-empty line of a .pub file.
fn base64_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

pub async fn get(db: &Db) -> Result<Option<TrustRecord>> {
    Ok(db.get(KEY).await?)
}

pub async fn set(db: &Db, record: &TrustRecord) -> Result<()> {
    Ok(db.put(KEY, record).await?)
}
