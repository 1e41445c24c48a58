//! `<state-dir>/status.json`: what the agent is, holds and is doing, for other
//! processes (`flotilla-agent status`, monitoring, tests).
//!
//! The database is locked against a second process, so status is published as a
//! separate file, replaced atomically whenever identity, desired state or connection
//! state changes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cert::{CertError, cert_info, unix_now};
use crate::state::{Desired, Identity, Role};

/// File name in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Why status could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "not joined: no {path} (run `flotilla-agent join` first, or pass the right --state-dir)"
    )]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid status file: {source}")]
    Invalid {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// The content of status.json. Field names are a published interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Id the server assigned.
    pub node_id: String,
    /// The node's group.
    pub group: String,
    /// Role held.
    pub role: Role,
    /// The group's desired node count.
    pub desired_count: u32,
    /// True when the group has no desired count.
    pub unmanaged: bool,
    /// Revision of the desired state held.
    pub revision: u64,
    /// Server URLs in use.
    pub servers: Vec<String>,
    /// Whether a session is open now.
    pub connected: bool,
    /// Serial of the node certificate, lower-case hex.
    pub cert_serial: String,
    /// End of the certificate's validity, Unix seconds.
    pub cert_not_after: i64,
    /// Certificate renewals since join.
    pub renewals: u64,
    /// The fleet's trust policy version the host holds (0: keys pinned from
    /// files, version not learnt yet).
    #[serde(default)]
    pub trust_version: u64,
    /// How many patch-signing keys it pins, and how many must sign.
    #[serde(default)]
    pub trusted_keys: usize,
    #[serde(default)]
    pub trust_threshold: u32,
    /// When this file was written, Unix seconds.
    pub updated_at: i64,
}

impl Status {
    /// Status from what the agent holds, stamped now.
    pub fn new(
        identity: &Identity,
        desired: &Desired,
        servers: &[String],
        connected: bool,
    ) -> Result<Self, CertError> {
        let cert = cert_info(&identity.cert_pem)?;
        Ok(Self {
            node_id: identity.node_id.clone(),
            group: identity.group.clone(),
            role: desired.role,
            desired_count: desired.desired_count,
            unmanaged: desired.unmanaged,
            revision: desired.revision,
            servers: servers.to_vec(),
            connected,
            cert_serial: cert.serial_hex,
            cert_not_after: cert.not_after,
            renewals: identity.renewals,
            trust_version: identity.trust_version,
            trusted_keys: identity.trusted_keys.len(),
            trust_threshold: identity.trust_threshold,
            updated_at: unix_now(),
        })
    }

    /// Replaces `<state_dir>/status.json` atomically.
    pub fn write(&self, state_dir: &Path) -> Result<(), StatusError> {
        let path = state_dir.join(STATUS_FILE);
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| StatusError::Invalid {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        flotilla_proto::durable::write_atomic(&path, &json, 0o644)
            .map_err(|source| StatusError::Write { path, source })
    }

    /// Reads `<state_dir>/status.json`.
    pub fn read(state_dir: &Path) -> Result<Self, StatusError> {
        let path = state_dir.join(STATUS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StatusError::Missing { path });
            }
            Err(source) => return Err(StatusError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StatusError::Invalid { path, source })
    }

    /// A few lines for people.
    fn trust_summary(&self) -> String {
        let keys = format!(
            "{} of {} key(s) must sign",
            self.trust_threshold, self.trusted_keys
        );
        match (self.trusted_keys, self.trust_version) {
            (0, _) => "no patch-signing keys pinned".to_string(),
            (_, 0) => format!("keys pinned at join, version not known yet; {keys}"),
            (_, v) => format!("v{v}; {keys}"),
        }
    }

    pub fn summary(&self) -> String {
        let count = if self.unmanaged {
            "unmanaged (no desired count)".to_string()
        } else {
            self.desired_count.to_string()
        };
        let connection = if self.connected {
            "connected"
        } else {
            "disconnected"
        };
        let rows = [
            ("node", self.node_id.clone()),
            ("group", self.group.clone()),
            ("role", self.role.to_string()),
            ("desired count", count),
            ("revision", self.revision.to_string()),
            ("session", connection.to_string()),
            ("servers", self.servers.join(", ")),
            ("certificate", format!("serial {}", self.cert_serial)),
            (
                "cert expires",
                format!(
                    "{} ({})",
                    flotilla_proto::when::unix_secs(self.cert_not_after),
                    ago_or_in(self.cert_not_after)
                ),
            ),
            ("renewals", self.renewals.to_string()),
            ("trust policy", self.trust_summary()),
            (
                "updated",
                format!(
                    "{} ({})",
                    flotilla_proto::when::unix_secs(self.updated_at),
                    ago_or_in(self.updated_at)
                ),
            ),
        ];
        rows.iter().map(|(k, v)| format!("{k:<14} {v}\n")).collect()
    }
}

/// "in 3h 2m" or "5s ago", relative to now.
fn ago_or_in(at: i64) -> String {
    let now = unix_now();
    let secs = at.abs_diff(now);
    let d = std::time::Duration::from_secs(secs);
    let text = humantime::format_duration(d).to_string();
    if at >= now {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            node_id: "n-1".into(),
            group: "g".into(),
            role: Role::Standby,
            desired_count: 3,
            unmanaged: false,
            revision: 12,
            servers: vec!["https://s:7443".into()],
            connected: true,
            cert_serial: "0abc".into(),
            cert_not_after: 2_000_000_000,
            renewals: 1,
            trust_version: 0,
            trusted_keys: 0,
            trust_threshold: 0,
            updated_at: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip_with_the_published_field_names() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Status::read(dir.path()),
            Err(StatusError::Missing { .. })
        ));
        sample().write(dir.path()).unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), sample());
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
        let mut keys: Vec<&str> = raw
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "cert_not_after",
                "cert_serial",
                "connected",
                "desired_count",
                "group",
                "node_id",
                "renewals",
                "revision",
                "role",
                "servers",
                "trust_threshold",
                "trust_version",
                "trusted_keys",
                "unmanaged",
                "updated_at"
            ]
        );
        assert_eq!(raw["role"], "standby");
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn summary_names_the_node_and_role() {
        let text = sample().summary();
        assert!(text.contains("n-1"));
        assert!(text.contains("standby"));
        assert!(text.contains("connected"));
    }
}
