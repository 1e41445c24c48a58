//! Signed patch manifests: the JSON schema, strict parsing, and the checks every
//! agent makes before touching its host. Signatures are verified over the exact
//! bytes received (never a re-serialisation) with `minisign-verify`, prehashed
//! signatures only, and a k-of-n threshold of distinct trusted keys.

mod schema;
mod verify;

pub use schema::*;
pub use verify::*;

/// Largest manifest document accepted.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Most signatures attached to one manifest.
pub const MAX_SIGNATURES: usize = 16;
/// Largest single signature (a minisign .minisig file is about 300 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 2048;
/// Most artifacts in one manifest.
pub const MAX_ARTIFACTS: usize = 16;
/// Largest artifact any manifest may declare (a host's own cap is usually lower).
pub const MAX_ARTIFACT_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// Most keys in a trust policy.
pub const MAX_TRUSTED_KEYS: usize = 32;
/// Most entries in a target list.
pub const MAX_TARGET_ENTRIES: usize = 256;
/// Longest command line of a health check.
pub const MAX_COMMAND_ARGS: usize = 64;
/// The schema version this code reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a manifest was refused. Each check has its own variant and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge { size: usize },
    #[error("{count} signatures attached; the limit is {MAX_SIGNATURES}")]
    TooManySignatures { count: usize },
    #[error("signature {index} is not a minisign signature: {reason}")]
    BadSignature { index: usize, reason: String },
    #[error(
        "signature {index} is a legacy (non-prehashed) minisign signature; sign with a current minisign (prehashed is its default)"
    )]
    LegacySignature { index: usize },
    #[error(
        "no signature is from a trusted key (each was made with a key the trust policy does not hold)"
    )]
    Untrusted,
    #[error(
        "signature {index} is from a trusted key but over other bytes (was the manifest rebuilt or changed after signing?)"
    )]
    OtherBytes { index: usize },
    #[error("signed by {have} distinct trusted key(s); the trust policy needs {need}")]
    BelowThreshold { have: usize, need: usize },
    #[error("manifest is not valid JSON for schema {SCHEMA_VERSION}: {0}")]
    Parse(String),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("manifest expired at {expires_at} (checked against {now})")]
    Expired { expires_at: String, now: String },
    #[error(
        "manifest is not valid before {issued_at} (checked against {now}; is the clock right?)"
    )]
    NotYetValid { issued_at: String, now: String },
    #[error("manifest does not target this node: {0}")]
    NotTargeted(String),
    #[error(
        "{component} {offered} would downgrade the installed {installed}; the signed manifest does not allow downgrades"
    )]
    Downgrade {
        component: String,
        installed: String,
        offered: String,
    },
    #[error("invalid trust policy: {0}")]
    Policy(String),
}
