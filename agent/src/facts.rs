//! Facts the agent states about its host, and the host's stable machine id.
//!
//! The machine id lets the server give a host that joins again its existing node
//! back instead of creating a duplicate, so it must stay the same across re-joins:
//! the system's id when there is one, otherwise one generated once and kept.

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_proto::limits::{MAX_FACT_LEN, NameError, check_text};
use flotilla_proto::pb;

/// Where systems keep their machine id, in order of preference.
pub const SYSTEM_MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];
/// Name of the generated machine id file in the state directory.
pub const GENERATED_MACHINE_ID_FILE: &str = "machine-id";

/// Why a fact could not be established.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("invalid machine id: {0}")]
    InvalidMachineId(NameError),
    #[error("cannot keep a generated machine id in {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The host's name, as the kernel knows it; "unknown" if it cannot be read.
pub fn hostname() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if name.is_empty() || check_text("hostname", &name, MAX_FACT_LEN).is_err() {
        "unknown".to_string()
    } else {
        name
    }
}

/// Facts for Enroll and Hello (and the session, when they change).
pub fn node_facts(machine_id: &str, trust_version: u64) -> pb::NodeFacts {
    pb::NodeFacts {
        hostname: hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        machine_id: machine_id.to_string(),
        trust_version,
        ..Default::default()
    }
}

fn valid(id: &str) -> Result<String, FactsError> {
    let id = id.trim();
    if id.is_empty() {
        return Err(FactsError::InvalidMachineId(NameError::Empty {
            what: "machine id",
        }));
    }
    check_text("machine id", id, MAX_FACT_LEN).map_err(FactsError::InvalidMachineId)?;
    Ok(id.to_string())
}

/// The machine id: `flag` if given, else the first non-empty, valid one of
/// `system_files`, else the one kept in `<state_dir>/machine-id`, generated (32
/// lower-case hex characters, like systemd's) and kept there the first time.
pub fn machine_id(
    flag: Option<&str>,
    system_files: &[&Path],
    state_dir: &Path,
) -> Result<String, FactsError> {
    if let Some(id) = flag {
        return valid(id);
    }
    for path in system_files {
        // A missing, unreadable, empty or malformed system file is not an error:
        // containers and minimal images often lack one.
        if let Ok(text) = fs::read_to_string(path)
            && let Ok(id) = valid(&text)
        {
            return Ok(id);
        }
    }
    let path = state_dir.join(GENERATED_MACHINE_ID_FILE);
    if let Ok(text) = fs::read_to_string(&path)
        && let Ok(id) = valid(&text)
    {
        return Ok(id);
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    flotilla_proto::durable::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)
        .map_err(|source| FactsError::Persist { path, source })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys-id");
        fs::write(&sys, "system\n").unwrap();
        let id = machine_id(Some("  given "), &[&sys], dir.path()).unwrap();
        assert_eq!(id, "given");
        assert!(machine_id(Some("a\u{7}b"), &[], dir.path()).is_err());
    }

    #[test]
    fn system_files_are_tried_in_order_skipping_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        fs::write(&empty, "\n").unwrap();
        let missing = dir.path().join("missing");
        let second = dir.path().join("second");
        fs::write(&second, "abc123\n").unwrap();
        let id = machine_id(None, &[&missing, &empty, &second], dir.path()).unwrap();
        assert_eq!(id, "abc123");
        assert!(!dir.path().join(GENERATED_MACHINE_ID_FILE).exists());
    }

    #[test]
    fn a_generated_id_is_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let first = machine_id(None, &[&missing], dir.path()).unwrap();
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        let kept = fs::read_to_string(dir.path().join(GENERATED_MACHINE_ID_FILE)).unwrap();
        assert_eq!(kept.trim(), first);
        let again = machine_id(None, &[&missing], dir.path()).unwrap();
        assert_eq!(again, first);
        // Another state dir gets another id.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(machine_id(None, &[&missing], other.path()).unwrap(), first);
    }

    #[test]
    fn facts_name_this_build() {
        let f = node_facts("m", 3);
        assert_eq!(f.trust_version, 3);
        assert_eq!(f.machine_id, "m");
        assert_eq!(f.os, std::env::consts::OS);
        assert_eq!(f.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(!f.hostname.is_empty());
    }
}
