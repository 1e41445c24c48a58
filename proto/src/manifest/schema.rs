//! The manifest document (schema 1). Unknown fields and duplicate keys are refused;
//! every name that becomes a path or an id is validated when parsed.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use super::{
    MAX_ARTIFACT_BYTES, MAX_ARTIFACTS, MAX_COMMAND_ARGS, MAX_TARGET_ENTRIES, ManifestError,
    SCHEMA_VERSION,
};
use crate::limits::{self, check_name, check_text};

/// How urgent a patch is; compliance SLAs are set per severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// A patch manifest, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Schema version; must be 1.
    pub schema: u32,
    /// Unique id of this patch ([A-Za-z0-9._-], up to 128 bytes).
    pub id: String,
    /// The component it changes (e.g. "openssl", "pos-app").
    pub component: String,
    /// The component's version after the patch (semantic versioning).
    pub version: String,
    pub severity: Severity,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Allow installing an older version than the one installed.
    #[serde(default)]
    pub allow_downgrade: bool,
    #[serde(default)]
    pub targets: Targets,
    pub artifacts: Vec<Artifact>,
    pub install: Install,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// What undoes the patch. `files` installs are always restored from their
    /// backup; a script install needs a rollback script to be undone.
    #[serde(default)]
    pub rollback: Option<Rollback>,
}

/// Which nodes a manifest is for. An empty list matches everything; all given
/// conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, deserialize_with = "unique_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub os: Vec<String>,
    #[serde(default)]
    pub arch: Vec<String>,
}

/// One file the patch needs, content-addressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name ([A-Za-z0-9._-]; no path).
    pub name: String,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    /// Exact size in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

/// How the patch is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Install {
    /// Unpack a tar artifact into `destination` (an absolute directory), each file
    /// replaced atomically, the previous ones backed up.
    Files {
        artifact: String,
        destination: String,
        #[serde(default)]
        compression: Compression,
    },
    /// Run a program from an artifact.
    Script {
        artifact: String,
        #[serde(default = "default_script_timeout")]
        timeout_secs: u64,
        #[serde(default)]
        args: Vec<String>,
    },
}

fn default_script_timeout() -> u64 {
    300
}

fn default_check_timeout() -> u64 {
    30
}

fn default_retries() -> u32 {
    3
}

fn default_interval() -> u64 {
    2
}

/// A command that must exit 0 after the install for the patch to be kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Program (absolute path) and arguments.
    pub command: Vec<String>,
    #[serde(default = "default_check_timeout")]
    pub timeout_secs: u64,
    /// Attempts before giving up.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
}

/// How the patch is undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Rollback {
    /// Restore the files the install replaced (files installs).
    Restore,
    /// Run a program from an artifact.
    Script {
        artifact: String,
        #[serde(default = "default_script_timeout")]
        timeout_secs: u64,
    },
}

/// Refuses a JSON object with the same key twice (serde_json keeps the last).
fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

fn invalid(msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(msg.into())
}

fn check_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// Checks a file name that becomes a path component.
pub fn check_artifact_name(name: &str) -> Result<(), ManifestError> {
    check_name("artifact name", name, 128).map_err(|e| invalid(e.to_string()))?;
    if name == "." || name == ".." {
        return Err(invalid("artifact name may not be . or .."));
    }
    Ok(())
}

fn check_list(what: &str, list: &[String]) -> Result<(), ManifestError> {
    if list.len() > MAX_TARGET_ENTRIES {
        return Err(invalid(format!("too many {what} targets")));
    }
    for v in list {
        check_name("target", v, limits::MAX_GROUP_NAME_LEN)
            .map_err(|e| invalid(format!("{what}: {e}")))?;
    }
    Ok(())
}

impl Manifest {
    /// Parses a manifest strictly: size, unknown fields, duplicate keys, schema,
    /// and every field's shape.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > super::MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() });
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every field's shape and the references between them.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema != SCHEMA_VERSION {
            return Err(invalid(format!(
                "schema {} is not supported (this agent reads schema {SCHEMA_VERSION})",
                self.schema
            )));
        }
        check_name("id", &self.id, 128).map_err(|e| invalid(e.to_string()))?;
        check_name("component", &self.component, 128).map_err(|e| invalid(e.to_string()))?;
        semver::Version::parse(&self.version).map_err(|e| {
            invalid(format!(
                "version {:?} is not semantic versioning: {e}",
                self.version
            ))
        })?;
        if self.expires_at <= self.issued_at {
            return Err(invalid("expires_at must be after issued_at"));
        }
        check_list("group", &self.targets.groups)?;
        check_list("os", &self.targets.os)?;
        check_list("arch", &self.targets.arch)?;
        limits::check_labels(self.targets.labels.iter()).map_err(|e| invalid(e.to_string()))?;
        if self.artifacts.is_empty() || self.artifacts.len() > MAX_ARTIFACTS {
            return Err(invalid(format!(
                "a manifest needs 1 to {MAX_ARTIFACTS} artifacts"
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for a in &self.artifacts {
            check_artifact_name(&a.name)?;
            if !names.insert(a.name.as_str()) {
                return Err(invalid(format!("artifact {:?} is listed twice", a.name)));
            }
            if !check_sha256(&a.sha256) {
                return Err(invalid(format!(
                    "artifact {:?}: sha256 must be 64 lower-case hex characters",
                    a.name
                )));
            }
            if a.size > MAX_ARTIFACT_BYTES {
                return Err(invalid(format!("artifact {:?} is too large", a.name)));
            }
        }
        let known = |name: &str| -> Result<(), ManifestError> {
            if names.contains(name) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{name:?} is not one of the manifest's artifacts"
                )))
            }
        };
        match &self.install {
            Install::Files {
                artifact,
                destination,
                ..
            } => {
                known(artifact)?;
                check_abs_path("destination", destination)?;
            }
            Install::Script {
                artifact,
                timeout_secs,
                args,
            } => {
                known(artifact)?;
                check_timeout(*timeout_secs)?;
                check_args(args)?;
            }
        }
        if let Some(h) = &self.health_check {
            let Some(program) = h.command.first() else {
                return Err(invalid("health_check.command is empty"));
            };
            check_abs_path("health check program", program)?;
            check_args(&h.command)?;
            check_timeout(h.timeout_secs)?;
            if h.retries == 0 || h.retries > 100 || h.interval_secs > 3600 {
                return Err(invalid(
                    "health_check: retries must be 1..=100, interval at most 3600s",
                ));
            }
        }
        match (&self.install, &self.rollback) {
            (
                Install::Script { .. },
                Some(Rollback::Script {
                    artifact,
                    timeout_secs,
                }),
            ) => {
                known(artifact)?;
                check_timeout(*timeout_secs)?;
            }
            (Install::Files { .. }, Some(Rollback::Script { .. })) => {
                return Err(invalid(
                    "a files install is rolled back by restoring its backup: use rollback type \"restore\"",
                ));
            }
            (Install::Script { .. }, Some(Rollback::Restore)) => {
                return Err(invalid(
                    "a script install has no backup to restore: give a rollback script",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The artifact called `name`.
    pub fn artifact(&self, name: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.name == name)
    }
}

fn check_timeout(secs: u64) -> Result<(), ManifestError> {
    if secs == 0 || secs > 24 * 3600 {
        return Err(invalid("timeouts must be between 1s and 24h"));
    }
    Ok(())
}

fn check_args(args: &[String]) -> Result<(), ManifestError> {
    if args.len() > MAX_COMMAND_ARGS {
        return Err(invalid(format!("at most {MAX_COMMAND_ARGS} arguments")));
    }
    for a in args {
        check_text("argument", a, 4096).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(())
}

/// An absolute, normalised path: starts with '/', no '.', '..' or empty parts.
pub fn check_abs_path(what: &str, p: &str) -> Result<(), ManifestError> {
    let bad = || {
        invalid(format!(
            "{what} {p:?} must be an absolute path without . or .."
        ))
    };
    if !p.starts_with('/') || p.len() > 4096 || p.contains('\0') {
        return Err(bad());
    }
    if p == "/" {
        return Ok(());
    }
    for part in p[1..].trim_end_matches('/').split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad());
        }
    }
    Ok(())
}
