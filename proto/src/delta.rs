//! The delta index (`deltas.json`): which zstd deltas (`--patch-from`) a patch
//! bundle carries beside its signed manifest, each rebuilding one artifact of
//! the manifest from one older artifact a host may already hold.
//!
//! The index is deliberately not part of the signed manifest: the manifest
//! stays schema 1 and strict, so agents of earlier releases (which refuse
//! unknown fields) still install a patch that has deltas, from the full
//! artifacts. It needs no signature either, because nothing in it is trusted:
//! a host uses a delta only with a base it holds (digest checked), and uses
//! the rebuilt artifact only if its digest and size are the ones the signed
//! manifest gives; anything else falls back to the full artifact. The checks
//! here only keep a bad index from costing more than a failed attempt.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::manifest::{MAX_ARTIFACTS, Manifest, check_artifact_name};

/// The index's file name in a patch bundle, beside `manifest.json`.
pub const INDEX_FILE: &str = "deltas.json";
/// The index schema this code reads and writes.
pub const INDEX_SCHEMA: u32 = 1;
/// Largest index document accepted.
pub const MAX_INDEX_BYTES: usize = 64 * 1024;
/// Most deltas one index lists.
pub const MAX_DELTAS: usize = MAX_ARTIFACTS;
/// The largest zstd window a delta may use (2^27 = 128 MiB): what a host's
/// decoder allows, so rebuilding one artifact holds at most the base (at most
/// [`MAX_DELTA_BYTES`]) plus one window of output in memory, about 256 MiB.
pub const MAX_DELTA_WINDOW_LOG: u32 = 27;
/// Largest base and largest target of a delta: one window.
pub const MAX_DELTA_BYTES: u64 = 1 << MAX_DELTA_WINDOW_LOG;
/// zstd's smallest window log.
const MIN_WINDOW_LOG: u32 = 10;

/// Why a delta index was refused. Each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaIndexError {
    #[error("delta index is {size} bytes; the limit is {MAX_INDEX_BYTES}")]
    TooLarge { size: usize },
    #[error("delta index is not valid JSON for schema {INDEX_SCHEMA}: {0}")]
    Parse(String),
    #[error("delta index schema {0} is not supported (this reads schema {INDEX_SCHEMA})")]
    Schema(u32),
    #[error("delta index lists {count} deltas; the limit is {MAX_DELTAS}")]
    TooMany { count: usize },
    #[error("delta index is for the manifest with sha256 {index}, not this one ({manifest})")]
    OtherManifest { index: String, manifest: String },
    #[error("delta {name}: {reason}")]
    Delta { name: String, reason: String },
    #[error("delta index: {0}")]
    Invalid(String),
}

/// The delta index document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaIndex {
    /// Must be [`INDEX_SCHEMA`].
    pub schema: u32,
    /// SHA-256 of the exact `manifest.json` bytes this index goes with.
    pub manifest_sha256: String,
    pub deltas: Vec<Delta>,
}

/// One delta: the zstd frame that rebuilds `artifact` (the target) with an
/// older artifact (the base) as its reference prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// The name of the manifest's artifact it rebuilds.
    pub artifact: String,
    /// The base a host must hold: its digest and size.
    pub base_sha256: String,
    pub base_size: u64,
    /// The delta file's name in the bundle (an artifact name's rules).
    pub name: String,
    /// The delta file's digest and size: it travels as an artifact.
    pub sha256: String,
    pub size: u64,
    /// What it rebuilds: the manifest's digest and size of `artifact`.
    pub target_sha256: String,
    pub target_size: u64,
}

impl Delta {
    /// The delta file's name for `artifact` from a base with digest
    /// `base_sha256`: `<artifact>.delta-<first 12 hex of the base>.zst`.
    pub fn file_name(artifact: &str, base_sha256: &str) -> String {
        let short = base_sha256.get(..12).unwrap_or(base_sha256);
        format!("{artifact}.delta-{short}.zst")
    }

    fn refuse(&self, reason: impl Into<String>) -> DeltaIndexError {
        DeltaIndexError::Delta {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Checks one entry's shape.
    fn validate(&self) -> Result<(), DeltaIndexError> {
        check_artifact_name(&self.name).map_err(|e| self.refuse(format!("name: {e}")))?;
        check_artifact_name(&self.artifact).map_err(|e| self.refuse(format!("artifact: {e}")))?;
        for (what, sha) in [
            ("base_sha256", &self.base_sha256),
            ("sha256", &self.sha256),
            ("target_sha256", &self.target_sha256),
        ] {
            if !is_sha256(sha) {
                return Err(self.refuse(format!("{what} must be 64 lower-case hex characters")));
            }
        }
        if self.base_sha256 == self.target_sha256 {
            return Err(self.refuse("its base and its target are the same artifact"));
        }
        // The delta file is stored, then removed, under its digest beside the
        // artifacts: one with an artifact's digest would stand for it.
        if self.sha256 == self.base_sha256 || self.sha256 == self.target_sha256 {
            return Err(self.refuse("its digest is its base's or its target's"));
        }
        if self.base_size > MAX_DELTA_BYTES || self.target_size > MAX_DELTA_BYTES {
            return Err(self.refuse(format!(
                "base ({} bytes) and target ({} bytes) must each be at most {MAX_DELTA_BYTES} bytes",
                self.base_size, self.target_size
            )));
        }
        if self.size == 0 || self.size > self.target_size {
            return Err(self.refuse(format!(
                "its size {} must be 1 to the target's {} bytes",
                self.size, self.target_size
            )));
        }
        Ok(())
    }
}

/// Whether `s` is a lower-case hex SHA-256.
fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// The zstd window log for a delta from a base of `base_size` bytes to a
/// target of `target_size`: large enough to reach from anywhere in the target
/// back to the start of the base when both fit in [`MAX_DELTA_WINDOW_LOG`],
/// else the largest (which still covers the larger of the two). None when
/// either is too large for any delta.
pub fn window_log(base_size: u64, target_size: u64) -> Option<u32> {
    if base_size > MAX_DELTA_BYTES || target_size > MAX_DELTA_BYTES {
        return None;
    }
    let reach = (base_size + target_size).max(1);
    // The smallest log with 2^log >= reach.
    let log = u64::BITS - (reach - 1).leading_zeros();
    Some(log.clamp(MIN_WINDOW_LOG, MAX_DELTA_WINDOW_LOG))
}

impl DeltaIndex {
    /// An index of `deltas` for the manifest with these exact bytes.
    pub fn new(manifest_bytes: &[u8], deltas: Vec<Delta>) -> Self {
        Self {
            schema: INDEX_SCHEMA,
            manifest_sha256: crate::sha256_hex(manifest_bytes),
            deltas,
        }
    }

    /// Parses an index strictly: size, unknown fields, duplicate keys,
    /// schema, and every entry's shape. Whether it goes with a manifest is
    /// [`Self::validate_against`].
    pub fn parse(bytes: &[u8]) -> Result<Self, DeltaIndexError> {
        if bytes.len() > MAX_INDEX_BYTES {
            return Err(DeltaIndexError::TooLarge { size: bytes.len() });
        }
        // Derived structs refuse a field given twice ("duplicate field").
        let index: DeltaIndex =
            serde_json::from_slice(bytes).map_err(|e| DeltaIndexError::Parse(e.to_string()))?;
        index.validate()?;
        Ok(index)
    }

    /// Checks the shape of the whole index.
    pub fn validate(&self) -> Result<(), DeltaIndexError> {
        if self.schema != INDEX_SCHEMA {
            return Err(DeltaIndexError::Schema(self.schema));
        }
        if !is_sha256(&self.manifest_sha256) {
            return Err(DeltaIndexError::Invalid(
                "manifest_sha256 must be 64 lower-case hex characters".into(),
            ));
        }
        if self.deltas.len() > MAX_DELTAS {
            return Err(DeltaIndexError::TooMany {
                count: self.deltas.len(),
            });
        }
        let mut names = BTreeSet::new();
        let mut pairs = BTreeSet::new();
        for d in &self.deltas {
            d.validate()?;
            if !names.insert(d.name.as_str()) {
                return Err(d.refuse("is listed twice"));
            }
            if !pairs.insert((d.artifact.as_str(), d.base_sha256.as_str())) {
                return Err(d.refuse(format!(
                    "a second delta of artifact {} from base {}",
                    d.artifact, d.base_sha256
                )));
            }
        }
        Ok(())
    }

    /// Checks that the index goes with this manifest: made for its exact
    /// bytes, every target one of its artifacts with that digest and size,
    /// and no delta file named like one of its artifacts.
    pub fn validate_against(
        &self,
        manifest: &Manifest,
        manifest_bytes: &[u8],
    ) -> Result<(), DeltaIndexError> {
        let sha = crate::sha256_hex(manifest_bytes);
        if sha != self.manifest_sha256 {
            return Err(DeltaIndexError::OtherManifest {
                index: self.manifest_sha256.clone(),
                manifest: sha,
            });
        }
        for d in &self.deltas {
            if manifest.artifact(&d.name).is_some() {
                return Err(d.refuse("has the name of one of the manifest's artifacts"));
            }
            if manifest.artifacts.iter().any(|a| a.sha256 == d.sha256) {
                return Err(d.refuse("has the digest of one of the manifest's artifacts"));
            }
            let Some(a) = manifest.artifact(&d.artifact) else {
                return Err(d.refuse(format!(
                    "its target {:?} is not one of the manifest's artifacts",
                    d.artifact
                )));
            };
            if a.sha256 != d.target_sha256 || a.size != d.target_size {
                return Err(d.refuse(format!(
                    "its target is {} ({} bytes), but the manifest's {} is {} ({} bytes)",
                    d.target_sha256, d.target_size, a.name, a.sha256, a.size
                )));
            }
        }
        Ok(())
    }

    /// The document as written to a bundle: pretty JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("an index serialises");
        bytes.push(b'\n');
        bytes
    }

    /// The deltas that rebuild the artifact called `artifact`.
    pub fn for_artifact<'a>(&'a self, artifact: &'a str) -> impl Iterator<Item = &'a Delta> {
        self.deltas.iter().filter(move |d| d.artifact == artifact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"schema":1,"id":"app-1.0.1","component":"app","version":"1.0.1","severity":"low",
"issued_at":"2026-01-01T00:00:00Z","expires_at":"2026-02-01T00:00:00Z",
"artifacts":[{"name":"app.tar","sha256":"1111111111111111111111111111111111111111111111111111111111111111","size":5000}],
"install":{"type":"files","artifact":"app.tar","destination":"/opt/app"}}"#;

    fn manifest() -> Manifest {
        Manifest::parse(MANIFEST.as_bytes()).unwrap()
    }

    fn delta() -> Delta {
        let base = "2".repeat(64);
        Delta {
            artifact: "app.tar".into(),
            name: Delta::file_name("app.tar", &base),
            base_sha256: base,
            base_size: 4000,
            sha256: "3".repeat(64),
            size: 100,
            target_sha256: "1".repeat(64),
            target_size: 5000,
        }
    }

    fn index(deltas: Vec<Delta>) -> DeltaIndex {
        DeltaIndex::new(MANIFEST.as_bytes(), deltas)
    }

    /// Parses `index` as JSON after `edit`, expecting a refusal containing `want`.
    fn refused(edit: impl FnOnce(&mut serde_json::Value), want: &str) {
        let mut v = serde_json::to_value(index(vec![delta()])).unwrap();
        edit(&mut v);
        let err = DeltaIndex::parse(&serde_json::to_vec(&v).unwrap())
            .and_then(|i| i.validate_against(&manifest(), MANIFEST.as_bytes()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} should say {want:?}");
    }

    #[test]
    fn a_good_index_round_trips_and_goes_with_its_manifest() {
        let i = index(vec![delta()]);
        let parsed = DeltaIndex::parse(&i.to_bytes()).unwrap();
        assert_eq!(parsed, i);
        parsed
            .validate_against(&manifest(), MANIFEST.as_bytes())
            .unwrap();
        assert_eq!(parsed.for_artifact("app.tar").count(), 1);
        assert_eq!(parsed.for_artifact("other").count(), 0);
        assert_eq!(
            parsed.deltas[0].name, "app.tar.delta-222222222222.zst",
            "named after the first 12 hex of the base"
        );
        // No deltas at all is a valid (if useless) index.
        DeltaIndex::parse(&index(Vec::new()).to_bytes()).unwrap();
    }

    #[test]
    fn unknown_fields_and_duplicate_keys_are_refused() {
        refused(|v| v["extra"] = 1.into(), "unknown field `extra`");
        refused(
            |v| v["deltas"][0]["extra"] = 1.into(),
            "unknown field `extra`",
        );
        let text = String::from_utf8(index(vec![delta()]).to_bytes()).unwrap();
        let twice = text.replacen("\"schema\": 1,", "\"schema\": 1, \"schema\": 1,", 1);
        let err = DeltaIndex::parse(twice.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("duplicate field `schema`"), "{err}");
        let twice = text.replacen("\"size\": 100,", "\"size\": 100, \"size\": 1,", 1);
        let err = DeltaIndex::parse(twice.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("duplicate field `size`"), "{err}");
    }

    #[test]
    fn oversized_and_malformed_documents_are_refused() {
        let big = vec![b' '; MAX_INDEX_BYTES + 1];
        assert_eq!(
            DeltaIndex::parse(&big).unwrap_err(),
            DeltaIndexError::TooLarge {
                size: MAX_INDEX_BYTES + 1
            }
        );
        let err = DeltaIndex::parse(b"[1]").unwrap_err().to_string();
        assert!(err.starts_with("delta index is not valid JSON"), "{err}");
        refused(|v| v["schema"] = 2.into(), "schema 2 is not supported");
        refused(
            |v| v["manifest_sha256"] = "AB".into(),
            "manifest_sha256 must be",
        );
    }

    #[test]
    fn too_many_deltas_are_refused() {
        let deltas: Vec<Delta> = (0..=MAX_DELTAS)
            .map(|i| {
                let mut d = delta();
                d.base_sha256 = format!("{i:064x}");
                d.name = Delta::file_name("app.tar", &format!("{i:064x}"));
                d
            })
            .collect();
        let err = DeltaIndex::parse(&index(deltas).to_bytes()).unwrap_err();
        assert_eq!(
            err,
            DeltaIndexError::TooMany {
                count: MAX_DELTAS + 1
            }
        );
    }

    #[test]
    fn bad_names_and_digests_are_refused() {
        refused(|v| v["deltas"][0]["name"] = "../x".into(), "name: ");
        refused(|v| v["deltas"][0]["name"] = "a/b".into(), "name: ");
        refused(|v| v["deltas"][0]["artifact"] = "..".into(), "artifact: ");
        refused(
            |v| v["deltas"][0]["sha256"] = "x".into(),
            "sha256 must be 64",
        );
        refused(
            |v| v["deltas"][0]["base_sha256"] = "1".repeat(64).into(),
            "its base and its target are the same",
        );
        // A delta stored under its base's or target's digest would stand
        // for it (and be removed after use).
        for other in ["2", "1"] {
            refused(
                |v| v["deltas"][0]["sha256"] = other.repeat(64).into(),
                "its digest is its base's or its target's",
            );
        }
    }

    #[test]
    fn sizes_are_bounded() {
        refused(
            |v| v["deltas"][0]["size"] = 5001.into(),
            "its size 5001 must be 1 to the target's 5000 bytes",
        );
        refused(|v| v["deltas"][0]["size"] = 0.into(), "its size 0 must be");
        refused(
            |v| v["deltas"][0]["base_size"] = (MAX_DELTA_BYTES + 1).into(),
            "must each be at most",
        );
    }

    #[test]
    fn one_delta_per_artifact_and_base_and_per_name() {
        let mut other = delta();
        other.name = "another.zst".into();
        let err = DeltaIndex::parse(&index(vec![delta(), other]).to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a second delta of artifact app.tar"), "{err}");
        let mut same_name = delta();
        same_name.base_sha256 = "4".repeat(64);
        let err = DeltaIndex::parse(&index(vec![delta(), same_name]).to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is listed twice"), "{err}");
    }

    #[test]
    fn an_index_for_other_manifest_bytes_is_refused() {
        let i = index(vec![delta()]);
        // Same document, one byte more: other bytes, so another manifest.
        let other = format!("{MANIFEST}\n");
        let err = i
            .validate_against(&manifest(), other.as_bytes())
            .unwrap_err();
        assert!(
            matches!(err, DeltaIndexError::OtherManifest { .. }),
            "{err}"
        );
    }

    #[test]
    fn targets_must_be_the_manifests_artifacts() {
        refused(
            |v| v["deltas"][0]["artifact"] = "other.tar".into(),
            "its target \"other.tar\" is not one of the manifest's artifacts",
        );
        refused(
            |v| v["deltas"][0]["target_sha256"] = "5".repeat(64).into(),
            "but the manifest's app.tar is 1111",
        );
        refused(
            |v| {
                v["deltas"][0]["target_size"] = 6000.into();
            },
            "(6000 bytes), but the manifest's app.tar",
        );
        refused(
            |v| v["deltas"][0]["name"] = "app.tar".into(),
            "has the name of one of the manifest's artifacts",
        );
    }

    #[test]
    fn the_window_covers_base_and_target_up_to_the_cap() {
        assert_eq!(window_log(0, 0), Some(10));
        assert_eq!(window_log(1000, 24), Some(10));
        assert_eq!(window_log(1000, 25), Some(11));
        assert_eq!(window_log(3 << 20, 2 << 20), Some(23));
        assert_eq!(window_log(64 << 20, 64 << 20), Some(27));
        assert_eq!(window_log(MAX_DELTA_BYTES, MAX_DELTA_BYTES), Some(27));
        assert_eq!(window_log(MAX_DELTA_BYTES + 1, 1), None);
        assert_eq!(window_log(1, MAX_DELTA_BYTES + 1), None);
    }
}
