//! The fleet's patch-signing trust policy as the server keeps it: a chain of
//! versions (public keys and a threshold each), the first set by an admin,
//! every later one signed by a threshold of the version before and of its own
//! keys (`flotilla_proto::trust`). The server checks every publish against the
//! newest; each agent walks the chain from the version it holds and checks
//! every manifest against what it reached, so a server cannot hand agents
//! keys the fleet's signers did not sign for.

use flotilla_proto::manifest::TrustPolicy;
use flotilla_proto::trust::{self as chain, Held, PolicyDoc, SignedPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::now_secs;
use crate::store::Db;

/// Where each version is stored: `trust/policy/<version, 20 digits>`.
pub const PREFIX: &str = "trust/policy/";
/// The single, unversioned policy of servers before the chain: read once and
/// stored as version 1.
const LEGACY_KEY: &str = "meta/trust";

pub fn key(version: u64) -> String {
    format!("{PREFIX}{version:020}")
}

/// One stored version of the trust policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRecord {
    pub version: u64,
    /// The document, byte for byte as signed.
    pub document: String,
    /// Its signatures (none for version 1).
    pub signatures: Vec<String>,
    pub published_at: i64,
    pub published_by: String,
}

impl PolicyRecord {
    pub fn doc(&self) -> Result<PolicyDoc> {
        PolicyDoc::parse(self.document.as_bytes())
            .map_err(|e| Error::Internal(format!("stored trust policy is invalid: {e}")))
    }

    pub fn policy(&self) -> Result<TrustPolicy> {
        self.doc()?
            .policy()
            .map_err(|e| Error::Internal(format!("stored trust policy is invalid: {e}")))
    }

    pub fn signed(&self) -> SignedPolicy {
        SignedPolicy {
            document: self.document.clone().into_bytes().into(),
            signatures: self.signatures.clone(),
        }
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

/// Public keys as a policy document holds them: base64 lines, each once.
pub fn normalise_keys(keys: &[String]) -> Vec<String> {
    let mut normalised = Vec::new();
    for k in keys {
        let line = base64_line(k);
        if !normalised.contains(&line) {
            normalised.push(line);
        }
    }
    normalised
}

/// The first version's document (keys normalised).
pub fn first_document(keys: &[String], threshold: u32) -> Result<PolicyDoc> {
    let doc = PolicyDoc {
        version: 1,
        keys: normalise_keys(keys),
        threshold,
    };
    doc.policy()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(doc)
}

/// Every stored version, oldest first.
pub async fn chain(db: &Db) -> Result<Vec<PolicyRecord>> {
    let mut all: Vec<PolicyRecord> = db.list(PREFIX).await?;
    all.sort_by_key(|r| r.version);
    Ok(all)
}

/// The newest version, if any.
pub async fn current(db: &Db) -> Result<Option<PolicyRecord>> {
    Ok(db.last(PREFIX).await?)
}

/// The versions a joining host is given: from the newest whose keys and
/// threshold hash to `pin` (all when there is no pin, or none matches: the
/// agent then refuses the join), at most `MAX_CHAIN`.
pub async fn for_join(db: &Db, pin: &str) -> Result<Vec<SignedPolicy>> {
    let all = chain(db).await?;
    let start = all
        .iter()
        .rposition(|r| !pin.is_empty() && r.doc().is_ok_and(|d| d.sha256() == pin))
        .unwrap_or(0);
    Ok(all[start..]
        .iter()
        .take(flotilla_proto::trust::MAX_CHAIN)
        .map(PolicyRecord::signed)
        .collect())
}

/// Stores the first version; FailedPrecondition once there is one (later
/// versions are rotations, signed by the one before).
pub async fn set_first(db: &Db, doc: &PolicyDoc, by: &str) -> Result<PolicyRecord> {
    let record = PolicyRecord {
        version: 1,
        document: String::from_utf8(doc.to_bytes()).expect("JSON is UTF-8"),
        signatures: Vec::new(),
        published_at: now_secs(),
        published_by: by.to_string(),
    };
    if let Some(cur) = current(db).await? {
        if cur.doc()?.sha256() == doc.sha256() {
            return Ok(cur);
        }
        return Err(Error::FailedPrecondition(format!(
            "the fleet's trust policy is at v{}: change it by a signed rotation \
             (flotilla trust propose, trust sign, trust publish)",
            cur.version
        )));
    }
    if !db.create(&key(1), &record).await? {
        return Err(Error::FailedPrecondition(
            "another admin set the trust policy at the same time: see flotilla trust show".into(),
        ));
    }
    Ok(record)
}

/// Checks a rotation against the newest version and stores it.
pub async fn publish_next(db: &Db, signed: &SignedPolicy, by: &str) -> Result<PolicyRecord> {
    let cur = current(db).await?.ok_or_else(|| {
        Error::FailedPrecondition(
            "no trust policy yet: an admin sets the first one (flotilla trust set)".into(),
        )
    })?;
    let held = Held {
        version: cur.version,
        policy: cur.policy()?,
    };
    let doc = chain::verify_next(&held, signed)
        .map_err(|e| Error::InvalidArgument(format!("trust policy refused: {e}")))?;
    let document = String::from_utf8(signed.document.to_vec())
        .map_err(|_| Error::InvalidArgument("trust policy document is not UTF-8".into()))?;
    let record = PolicyRecord {
        version: doc.version,
        document,
        signatures: signed.signatures.clone(),
        published_at: now_secs(),
        published_by: by.to_string(),
    };
    if !db.create(&key(doc.version), &record).await? {
        return Err(Error::FailedPrecondition(format!(
            "trust policy v{} was published at the same time by someone else: see flotilla trust show",
            doc.version
        )));
    }
    Ok(record)
}

/// The policy of a server from before the chain, as version 1 (once).
#[derive(Deserialize)]
struct LegacyRecord {
    public_keys: Vec<String>,
    threshold: u32,
}

/// Stores a pre-chain policy as version 1, unless the chain has begun.
pub async fn migrate_legacy(db: &Db) -> Result<()> {
    let Some(old) = db.get::<LegacyRecord>(LEGACY_KEY).await? else {
        return Ok(());
    };
    if current(db).await?.is_some() {
        return Ok(());
    }
    let doc = first_document(&old.public_keys, old.threshold)?;
    set_first(db, &doc, "(policy set before versions)").await?;
    Ok(())
}
