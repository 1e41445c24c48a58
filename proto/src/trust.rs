//! The fleet's trust policy as a signed, versioned document: which minisign
//! keys sign patches and how many of them must. Version N+1 counts only when
//! a threshold of version N's keys **and** a threshold of its own keys signed
//! its exact bytes (the root-rotation rule of TUF), so a host walks from the
//! version it holds to the newest without trusting the server that carries
//! the documents. Version 1 is the root: it is trusted because the host was
//! given it at join (key files, or a token that pins its hash), not because
//! of any signature.

use serde::{Deserialize, Serialize};

use crate::manifest::{MAX_SIGNATURES, ManifestError, TrustPolicy};

/// Largest policy document.
pub const MAX_POLICY_BYTES: usize = 16 * 1024;
/// Most policy documents one desired state carries (a host further behind
/// walks the rest on the next ones).
pub const MAX_CHAIN: usize = 32;

/// Why a policy document is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("trust policy document is {size} bytes; the limit is {MAX_POLICY_BYTES}")]
    TooLarge { size: usize },
    #[error("trust policy document does not parse: {0}")]
    Malformed(String),
    #[error("trust policy v{version}: {reason}")]
    Invalid { version: u64, reason: String },
    #[error(
        "trust policy v{version} does not follow v{held} (each rotation adds exactly one version)"
    )]
    NotNext { held: u64, version: u64 },
    #[error("trust policy v{version} is not signed by the keys of v{held}: {reason}")]
    NotSignedByPrevious {
        held: u64,
        version: u64,
        reason: ManifestError,
    },
    #[error("trust policy v{version} is not signed by its own keys: {reason}")]
    NotSignedByItself { version: u64, reason: ManifestError },
}

/// A trust policy document, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// 1 for the root; each rotation adds one.
    pub version: u64,
    /// minisign public keys (their base64 lines).
    pub keys: Vec<String>,
    /// How many distinct keys must sign a manifest (and the next version).
    pub threshold: u32,
}

impl PolicyDoc {
    /// Parses and checks a document: size, fields, keys, threshold.
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(TrustError::TooLarge { size: bytes.len() });
        }
        let doc: Self =
            serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed(e.to_string()))?;
        if doc.version == 0 {
            return Err(TrustError::Invalid {
                version: 0,
                reason: "versions start at 1".into(),
            });
        }
        doc.policy()?;
        Ok(doc)
    }

    /// The document's bytes as `propose` writes them (what signers sign).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a policy always serialises");
        b.push(b'\n');
        b
    }

    /// The keys and threshold as a verifier.
    pub fn policy(&self) -> Result<TrustPolicy, TrustError> {
        TrustPolicy::new(&self.keys, self.threshold as usize).map_err(|e| TrustError::Invalid {
            version: self.version,
            reason: e.to_string(),
        })
    }

    /// Hex SHA-256 over the keys (sorted) and the threshold, not the version:
    /// what a join token pins and `trust show` prints.
    pub fn sha256(&self) -> String {
        policy_sha256(&self.keys, self.threshold)
    }
}

/// Hex SHA-256 over normalised keys (base64 lines, sorted) and a threshold.
pub fn policy_sha256(keys: &[String], threshold: u32) -> String {
    let mut keys = keys.to_vec();
    keys.sort();
    crate::sha256_hex(format!("{}\n{threshold}", keys.join("\n")).as_bytes())
}

/// A policy document's exact bytes and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    pub document: bytes::Bytes,
    pub signatures: Vec<String>,
}

impl From<crate::pb::SignedTrustPolicy> for SignedPolicy {
    fn from(p: crate::pb::SignedTrustPolicy) -> Self {
        Self {
            document: p.document,
            signatures: p.signatures,
        }
    }
}

impl From<&SignedPolicy> for crate::pb::SignedTrustPolicy {
    fn from(p: &SignedPolicy) -> Self {
        Self {
            document: p.document.clone(),
            signatures: p.signatures.clone(),
        }
    }
}

/// What a host holds: a version and its keys and threshold.
#[derive(Debug, Clone)]
pub struct Held {
    pub version: u64,
    pub policy: TrustPolicy,
}

/// Checks `next` against the policy held: it is exactly the next version, a
/// threshold of the held keys signed it, and a threshold of its own keys did.
pub fn verify_next(held: &Held, next: &SignedPolicy) -> Result<PolicyDoc, TrustError> {
    let doc = PolicyDoc::parse(&next.document)?;
    if doc.version != held.version + 1 {
        return Err(TrustError::NotNext {
            held: held.version,
            version: doc.version,
        });
    }
    if next.signatures.len() > MAX_SIGNATURES * 2 {
        return Err(TrustError::Invalid {
            version: doc.version,
            reason: format!("{} signatures attached", next.signatures.len()),
        });
    }
    held.policy
        .check_signatures(&next.document, &next.signatures)
        .map_err(|reason| TrustError::NotSignedByPrevious {
            held: held.version,
            version: doc.version,
            reason,
        })?;
    doc.policy()?
        .check_signatures(&next.document, &next.signatures)
        .map_err(|reason| TrustError::NotSignedByItself {
            version: doc.version,
            reason,
        })?;
    Ok(doc)
}

/// Walks from `held` through `chain` (any order; versions at or below the
/// held one are skipped) as far as each next version verifies. Returns the
/// newest document reached (None: none), and why the walk stopped short of
/// the newest version offered.
pub fn walk(held: &Held, chain: &[SignedPolicy]) -> (Option<PolicyDoc>, Option<TrustError>) {
    let mut docs: Vec<(u64, &SignedPolicy)> = chain
        .iter()
        .take(MAX_CHAIN)
        .filter_map(|s| {
            let v = PolicyDoc::parse(&s.document).ok()?.version;
            (v > held.version).then_some((v, s))
        })
        .collect();
    docs.sort_by_key(|(v, _)| *v);
    let mut at = held.clone();
    let mut reached = None;
    for (_, signed) in docs {
        match verify_next(&at, signed) {
            Ok(doc) => {
                let policy = doc.policy().expect("checked by verify_next");
                at = Held {
                    version: doc.version,
                    policy,
                };
                reached = Some(doc);
            }
            Err(e) => return (reached, Some(e)),
        }
    }
    (reached, None)
}

/// The highest version in `chain` above `held` that is provably the pinned
/// keys' own: a later version a threshold of those keys signed (every
/// rotation is signed by its own keys), or, for a host holding no version
/// yet, the root (version 1, unsigned by design) holding exactly those keys.
/// A version number alone proves nothing: a server that offers the host's
/// own keys as "version 999" unsigned gives it no version, so real
/// rotations 2 to 998 are not skipped. Nothing new is trusted by this: only
/// a version number is given to keys the host already holds.
pub fn anchor(pinned: &TrustPolicy, held: u64, chain: &[SignedPolicy]) -> Option<u64> {
    chain
        .iter()
        .take(MAX_CHAIN)
        .filter(|s| s.signatures.len() <= MAX_SIGNATURES * 2)
        .filter_map(|s| Some((PolicyDoc::parse(&s.document).ok()?, s)))
        .filter(|(d, _)| d.version > held && d.policy().is_ok_and(|p| p.same_as(pinned)))
        .filter(|(d, s)| {
            (d.version == 1 && held == 0)
                || pinned.check_signatures(&s.document, &s.signatures).is_ok()
        })
        .map(|(d, _)| d.version)
        .max()
}

#[cfg(test)]
mod tests;
