//! The records the server keeps, as stored (JSON) and keyed in the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub mod keys {
    pub const TOKENS: &str = "tokens/";
    pub const NODES: &str = "nodes/";
    pub const MACHINES: &str = "machines/";
    pub const GROUPS: &str = "groups/";
    pub const AUDIT: &str = "audit/";
    /// The newest audit entry's seq and hash, written with it: what a
    /// removed or rewritten newest entry is found by.
    pub const AUDIT_HEAD: &str = "audit-head";
    pub const CREDENTIALS: &str = "credentials/";
    /// Credential name -> the id holding it: the compare-and-swap that keeps names unique.
    pub const CREDENTIAL_NAMES: &str = "credential-names/";
    pub const PATCHES: &str = "patches/";
    /// Publish sequence number -> the patch that took it: two replicas
    /// publishing at once cannot give two patches one number.
    pub const PATCH_SEQS: &str = "patch-seqs/";

    pub fn token(id: &str) -> String {
        format!("{TOKENS}{id}")
    }
    pub fn node(id: &str) -> String {
        format!("{NODES}{id}")
    }
    /// The machine id is hashed so any string is a safe key.
    pub fn machine(machine_id: &str) -> String {
        format!(
            "{MACHINES}{}",
            flotilla_proto::sha256_hex(machine_id.as_bytes())
        )
    }
    pub fn group(name: &str) -> String {
        format!("{GROUPS}{name}")
    }
    pub fn audit(seq: u64) -> String {
        format!("{AUDIT}{seq:020}")
    }
    pub fn credential(id: &str) -> String {
        format!("{CREDENTIALS}{id}")
    }
    /// The name is checked (`[A-Za-z0-9._-]`) before it becomes a key.
    pub fn credential_name(name: &str) -> String {
        format!("{CREDENTIAL_NAMES}{name}")
    }
    pub fn patch(id: &str) -> String {
        format!("{PATCHES}{id}")
    }
    pub fn patch_seq(seq: u64) -> String {
        format!("{PATCH_SEQS}{seq:020}")
    }
    /// Where each node stands with each patch: `patchstate/<patch>/<node>`.
    pub const PATCH_STATES: &str = "patchstate/";
    pub fn patch_state(patch: &str, node: &str) -> String {
        format!("{PATCH_STATES}{patch}/{node}")
    }
    /// The patch states of one patch.
    pub fn patch_states(patch: &str) -> String {
        format!("{PATCH_STATES}{patch}/")
    }
}

/// A published patch as stored: the exact signed bytes and their signatures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchRecord {
    pub id: String,
    /// Publish order; the fleet's patch revision is the highest.
    pub seq: u64,
    /// The manifest JSON exactly as signed (always UTF-8: it parsed as JSON).
    pub manifest: String,
    pub signatures: Vec<String>,
    pub published_at: i64,
    pub published_by: String,
    /// The delta index published with it (`deltas.json`), exactly as sent
    /// (UTF-8: it parsed as JSON); empty when it has none, as in records
    /// stored before deltas existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub deltas: String,
}

/// Where one node stands with one patch, from its reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodePatchRecord {
    pub node_id: String,
    pub phase: String,
    pub first_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: String,
    pub log_tail: String,
    /// The report that set this state: a re-send of it changes nothing.
    #[serde(default)]
    pub last_report_id: String,
    /// How the node downloaded the patch, from the newest report that said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<flotilla_proto::transfer::Transfer>,
    /// When the node had last enrolled (unix seconds, the server's clock) as
    /// this was reported: a record from an earlier enrollment (a host back
    /// with a fresh state directory) may start over from any phase.
    #[serde(default)]
    pub enrolled_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: String,
    pub group: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub max_uses: u32,
    pub uses: u32,
    pub labels: BTreeMap<String, String>,
    pub requires_approval: bool,
    pub revoked: bool,
    pub description: String,
    pub created_by: String,
    /// Hex SHA-256 of the trust policy the token pins ("" when none).
    #[serde(default)]
    pub trust_sha256: String,
    /// A host joining with the machine id of a node another host holds
    /// (online) gets a new node instead of a refusal.
    #[serde(default)]
    pub clones_new_node: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Waiting for an operator (token required approval).
    Pending,
    Accepted,
    Rejected,
    Revoked,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    pub machine_id: String,
    /// The trust policy version the agent holds (0: not known yet).
    #[serde(default)]
    pub trust_version: u64,
    /// Where the agent serves its site's peers (https://IP:PORT); empty when
    /// it does not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site_url: String,
    /// Its host's operator marked it to serve its site.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serve_site: bool,
    /// What its site cache holds: artifacts and bytes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub site_cache_files: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub site_cache_bytes: u64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub group: String,
    pub status: NodeStatus,
    pub role: Role,
    pub facts: Facts,
    pub labels: BTreeMap<String, String>,
    pub joined_at: i64,
    pub token_id: String,
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// The public key of its current certificate (hex of the raw ECDSA P-256
    /// point; "" for another kind of key): what a proof of its key is checked
    /// against.
    #[serde(default)]
    pub public_key: String,
    /// When it last joined or re-joined (unix seconds; 0 for records from
    /// before this was kept).
    #[serde(default)]
    pub enrolled_at: i64,
    /// The certificate before the last renewal: still accepted, so an agent that
    /// died between the server's answer and saving its new certificate can renew
    /// again instead of being locked out.
    #[serde(default)]
    pub prev_cert_serial: String,
    /// Grows on every change of this node's own desired state (role, status).
    /// The revision sent to the agent is this plus the group's revision, a sum of
    /// two counters that only grow.
    pub revision: u64,
    /// Last time a session of this node ended or was seen; 0 if never.
    pub last_seen: i64,
    /// Component -> version, from the patches the node committed.
    #[serde(default)]
    pub installed: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// None: no desired count, every accepted node is active.
    pub desired: Option<u32>,
    pub max_unavailable: u32,
    /// Grows on every change of the group's part of desired state.
    pub revision: u64,
    /// IANA time zone of the maintenance windows ("" is UTC).
    #[serde(default)]
    pub timezone: String,
    /// Maintenance windows ("mon-fri 22:00-04:00"); none: any time.
    #[serde(default)]
    pub windows: Vec<String>,
    /// Rollout defaults for patches reaching this group.
    #[serde(default)]
    pub rollout: crate::rollout::policy::PolicySpec,
    /// Patch SLA per severity ("critical=30,high=90"); "" is the default.
    #[serde(default)]
    pub sla: String,
    /// Deleted: the record stays so a group made again under this name goes
    /// on from its revision (its nodes' desired-state revisions only grow).
    #[serde(default)]
    pub deleted: bool,
    /// The node label whose value is a node's site (None: `site`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_label: Option<String>,
}

/// The label a node's site is read from when its group sets none.
pub const DEFAULT_SITE_LABEL: &str = "site";

impl GroupRecord {
    /// The label key whose value is a node's site in this group.
    pub fn site_label(&self) -> &str {
        self.site_label.as_deref().unwrap_or(DEFAULT_SITE_LABEL)
    }
}

impl GroupRecord {
    pub fn unmanaged(name: &str) -> Self {
        Self {
            name: name.to_string(),
            desired: None,
            max_unavailable: 1,
            revision: 1,
            timezone: String::new(),
            windows: Vec::new(),
            rollout: Default::default(),
            sla: String::new(),
            deleted: false,
            site_label: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    Viewer,
    Operator,
    Publisher,
    Admin,
}

impl OperatorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Publisher => "publisher",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            "publisher" => Some(Self::Publisher),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// Whether a credential with this role may do what `needed` guards.
    /// Roles are not a ladder: a publisher publishes but does not manage tokens.
    pub fn allows(self, needed: OperatorRole) -> bool {
        self == Self::Admin || self == needed || needed == Self::Viewer
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub name: String,
    pub role: OperatorRole,
    pub secret_sha256: String,
    pub created_at: i64,
    #[serde(default)]
    pub revoked: bool,
    /// Unix seconds after which it is refused (0: never).
    #[serde(default)]
    pub expires_at: i64,
    /// The lifetime it was given (0: none): a rotation gives the new secret as long.
    #[serde(default)]
    pub ttl_secs: u64,
    /// Unix seconds of the last rotation (0: never).
    #[serde(default)]
    pub rotated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
    /// The previous entry's hash (see `audit::chain`); empty in entries
    /// written before the log was chained.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prev: String,
    /// This entry's hash: SHA-256 of its JSON with this field empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// A node's report on a patch, as received (kept as the node's patch state,
/// not on its own).
#[derive(Debug, Clone)]
pub struct ReportRecord {
    pub report_id: String,
    pub node_id: String,
    pub manifest_id: String,
    pub phase: flotilla_proto::phase::Phase,
    pub at_ms: i64,
    pub error: String,
    pub log_tail: String,
    pub transfer: Option<flotilla_proto::transfer::Transfer>,
}

#[cfg(test)]
mod tests {
    use super::OperatorRole::*;

    #[test]
    fn roles_are_not_a_ladder() {
        assert!(Viewer.allows(Viewer));
        assert!(!Viewer.allows(Operator));
        assert!(Operator.allows(Operator));
        assert!(!Operator.allows(Publisher));
        assert!(!Publisher.allows(Operator));
        assert!(Publisher.allows(Viewer));
        assert!(Admin.allows(Admin) && Admin.allows(Operator) && Admin.allows(Publisher));
        assert!(!Operator.allows(Admin));
    }

    #[test]
    fn patch_records_from_before_deltas_read_and_write_as_they_were() {
        let old = r#"{"id":"p","seq":1,"manifest":"{}","signatures":[],"published_at":1,"published_by":"x"}"#;
        let record: super::PatchRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.deltas, "");
        // The same bytes again: compare-and-swap against a stored record
        // compares bytes.
        assert_eq!(serde_json::to_string(&record).unwrap(), old);
        let with = super::PatchRecord {
            deltas: "{}".into(),
            ..record
        };
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.ends_with(r#","deltas":"{}"}"#), "{text}");
    }
}
