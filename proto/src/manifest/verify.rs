//! The checks an agent makes on a signed manifest: signatures and threshold,
//! expiry, target, and version policy. Each refusal has its own error.

use std::collections::BTreeMap;

use minisign_verify::{PublicKey, Signature};
use time::OffsetDateTime;

use super::{MAX_SIGNATURE_BYTES, MAX_SIGNATURES, Manifest, ManifestError};

/// The keys a fleet trusts to sign patches, and how many must sign each one.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: Vec<PublicKey>,
    threshold: usize,
}

/// Parses a minisign public key: the two-line `.pub` file or its base64 line.
pub fn parse_public_key(text: &str) -> Result<PublicKey, ManifestError> {
    let text = text.trim();
    let parsed = if text.lines().count() >= 2 {
        // Checked as a file, kept as its key line: the untrusted comment is
        // part of the parsed key's equality, and one key must be one key
        // whichever form it was given in (a threshold counts distinct keys).
        PublicKey::decode(text).and_then(|_| {
            PublicKey::from_base64(
                text.lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty())
                    .unwrap_or(""),
            )
        })
    } else {
        PublicKey::from_base64(text)
    };
    parsed.map_err(|e| ManifestError::Policy(format!("not a minisign public key: {e}")))
}

impl TrustPolicy {
    /// A policy over distinct `keys` needing `threshold` of them (1..=keys).
    pub fn new(keys: &[String], threshold: usize) -> Result<Self, ManifestError> {
        let mut parsed: Vec<PublicKey> = Vec::new();
        for k in keys {
            let pk = parse_public_key(k)?;
            if !parsed.contains(&pk) {
                parsed.push(pk);
            }
        }
        if parsed.is_empty() {
            return Err(ManifestError::Policy("no trusted keys".into()));
        }
        if parsed.len() > super::MAX_TRUSTED_KEYS {
            return Err(ManifestError::Policy(format!(
                "{} keys; a trust policy holds at most {}",
                parsed.len(),
                super::MAX_TRUSTED_KEYS
            )));
        }
        if threshold == 0 || threshold > parsed.len() {
            return Err(ManifestError::Policy(format!(
                "threshold {threshold} must be between 1 and the number of distinct keys ({})",
                parsed.len()
            )));
        }
        Ok(Self {
            keys: parsed,
            threshold,
        })
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks that at least `threshold` distinct trusted keys each made a valid
    /// prehashed signature over exactly `bytes`, then parses the manifest.
    pub fn verify(&self, bytes: &[u8], signatures: &[String]) -> Result<Manifest, ManifestError> {
        if bytes.len() > super::MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() });
        }
        self.check_signatures(bytes, signatures)?;
        Manifest::parse(bytes)
    }

    /// Whether these keys are exactly `other`'s (in any order) with the same threshold.
    pub fn same_as(&self, other: &TrustPolicy) -> bool {
        self.threshold == other.threshold
            && self.keys.len() == other.keys.len()
            && self.keys.iter().all(|k| other.keys.contains(k))
    }

    /// Checks that at least `threshold` distinct trusted keys each made a valid
    /// prehashed signature over exactly `bytes`.
    pub fn check_signatures(
        &self,
        bytes: &[u8],
        signatures: &[String],
    ) -> Result<(), ManifestError> {
        if signatures.len() > MAX_SIGNATURES {
            return Err(ManifestError::TooManySignatures {
                count: signatures.len(),
            });
        }
        let mut sigs = Vec::with_capacity(signatures.len());
        for (index, text) in signatures.iter().enumerate() {
            if text.len() > MAX_SIGNATURE_BYTES {
                return Err(ManifestError::BadSignature {
                    index,
                    reason: "too large".into(),
                });
            }
            let sig = Signature::decode(text).map_err(|e| ManifestError::BadSignature {
                index,
                reason: e.to_string(),
            })?;
            sigs.push((index, sig));
        }
        let mut have = 0;
        let mut legacy = None;
        let mut other_bytes = None;
        for key in &self.keys {
            let mut signed = false;
            for (index, sig) in &sigs {
                match key.verify(bytes, sig, false) {
                    Ok(()) => signed = true,
                    // Same key id, but a legacy signature: say so rather than "untrusted".
                    Err(minisign_verify::Error::UnexpectedAlgorithm) => legacy = Some(*index),
                    // The key's id, but not these bytes: say so rather than "untrusted".
                    Err(minisign_verify::Error::InvalidSignature) => {
                        other_bytes = other_bytes.or(Some(*index))
                    }
                    Err(_) => {}
                }
            }
            if signed {
                have += 1;
            }
        }
        if have == 0 {
            return Err(match (legacy, other_bytes) {
                (Some(index), _) => ManifestError::LegacySignature { index },
                (None, Some(index)) => ManifestError::OtherBytes { index },
                (None, None) => ManifestError::Untrusted,
            });
        }
        if have < self.threshold {
            return Err(ManifestError::BelowThreshold {
                have,
                need: self.threshold,
            });
        }
        Ok(())
    }
}

use crate::when::rfc3339;

/// Allowed clock difference between the signer and the host for `issued_at`.
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Checks the manifest is valid at `now` (the time the update *started*, so that
/// a clock jump during the update does not change the verdict).
pub fn check_time(m: &Manifest, now: OffsetDateTime) -> Result<(), ManifestError> {
    if now >= m.expires_at {
        return Err(ManifestError::Expired {
            expires_at: rfc3339(m.expires_at),
            now: rfc3339(now),
        });
    }
    if now + time::Duration::seconds(CLOCK_SKEW_SECS) < m.issued_at {
        return Err(ManifestError::NotYetValid {
            issued_at: rfc3339(m.issued_at),
            now: rfc3339(now),
        });
    }
    Ok(())
}

/// What a node is, for target matching.
#[derive(Debug, Clone, Default)]
pub struct NodeTarget {
    pub group: String,
    pub labels: BTreeMap<String, String>,
    pub os: String,
    pub arch: String,
}

/// Checks the manifest's targets include this node.
pub fn check_target(m: &Manifest, node: &NodeTarget) -> Result<(), ManifestError> {
    let t = &m.targets;
    if !t.groups.is_empty() && !t.groups.contains(&node.group) {
        return Err(ManifestError::NotTargeted(format!(
            "it targets groups {:?}, this node is in {:?}",
            t.groups, node.group
        )));
    }
    if !t.os.is_empty() && !t.os.contains(&node.os) {
        return Err(ManifestError::NotTargeted(format!(
            "it targets os {:?}, this node runs {:?}",
            t.os, node.os
        )));
    }
    if !t.arch.is_empty() && !t.arch.contains(&node.arch) {
        return Err(ManifestError::NotTargeted(format!(
            "it targets arch {:?}, this node is {:?}",
            t.arch, node.arch
        )));
    }
    for (k, v) in &t.labels {
        if node.labels.get(k) != Some(v) {
            return Err(ManifestError::NotTargeted(format!(
                "it needs label {k}={v}, this node has {}",
                node.labels
                    .get(k)
                    .map_or("none".to_string(), |have| format!("{k}={have}"))
            )));
        }
    }
    Ok(())
}

/// Checks the per-component version policy: no downgrade unless signed so.
pub fn check_version(m: &Manifest, installed: Option<&str>) -> Result<(), ManifestError> {
    let Some(installed) = installed else {
        return Ok(());
    };
    let offered = semver::Version::parse(&m.version)
        .map_err(|e| ManifestError::Invalid(format!("version: {e}")))?;
    // An installed version we cannot parse cannot be compared: only an explicit
    // downgrade permission lets the manifest replace it.
    let older = match semver::Version::parse(installed) {
        Ok(have) => offered < have,
        Err(_) => true,
    };
    if older && !m.allow_downgrade {
        return Err(ManifestError::Downgrade {
            component: m.component.clone(),
            installed: installed.to_string(),
            offered: m.version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
