//! The agent's durable state: its identity and the last desired state it holds,
//! in a redb database, `<state-dir>/agent.redb` (the journal and the outbox
//! are tables of the same file).
//!
//! Every write is durable before the call returns, so the agent never acts on,
//! or acknowledges, something a crash could take back. redb locks its file
//! against a second process; `status.json` (see [`crate::status`]) is what other
//! processes read. redb runs no background threads: an idle agent sleeps
//! between heartbeats. A state directory of an older agent, a sled database
//! in `<state-dir>/db`, is copied over at the first start and then removed.
//!
//! A program that runs many agents in one process (the fleet simulator) opens
//! one sled database and gives each agent a namespace in it
//! ([`Store::open_shared`]).

use std::fmt;
#[cfg(test)]
use std::fs;
#[cfg(test)]
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flotilla_proto::pb;
use serde::{Deserialize, Serialize};

use crate::files::ensure_private_dir;

mod keyspace;
pub use keyspace::{Keyspace, KvError};

/// Heartbeat interval used until the server says otherwise.
pub const DEFAULT_HEARTBEAT_MS: u32 = 15_000;

const IDENTITY_KEY: &[u8] = b"identity";
const DESIRED_KEY: &[u8] = b"desired";
const HOOKED_ROLE_KEY: &[u8] = b"hooked_role";
/// How long opening waits for a store lock that is being let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is in use by another flotilla-agent process \
         (stop it first, or pick another --state-dir)"
    )]
    Locked { path: PathBuf },
    #[error("cannot open the agent database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("cannot move the agent database in {path} to the new format: {reason}")]
    Migrate { path: PathBuf, reason: String },
    #[error("agent database error: {0}")]
    Db(#[from] KvError),
    #[error("agent database holds a corrupt {what} record: {source}")]
    Corrupt {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot open the patch records: {0}")]
    Patches(String),
    #[error("invalid store namespace {0:?}: it must be non-empty and contain no '/'")]
    Namespace(String),
}

/// Where a node stands in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Waiting for an operator's approval.
    Pending,
    /// In service.
    Active,
    /// Joined and healthy, beyond the desired count.
    Standby,
}

impl Role {
    /// The role a protobuf enum value names; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::Role::try_from(value).ok()? {
            pb::Role::Pending => Some(Self::Pending),
            pb::Role::Active => Some(Self::Active),
            pb::Role::Standby => Some(Self::Standby),
            pb::Role::Unspecified => None,
        }
    }

    /// Lower-case name, as in status.json and the hook's environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Standby => "standby",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who this node is: what enrollment gave it, kept across restarts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Id the server assigned.
    pub node_id: String,
    /// Group the node belongs to.
    pub group: String,
    /// The node's private key, PKCS#8 PEM. Never leaves the host.
    pub key_pem: String,
    /// The node's client certificate, PEM.
    pub cert_pem: String,
    /// The server CA pinned at join, PEM.
    pub ca_pem: String,
    /// Server URLs given at join, tried in order.
    pub servers: Vec<String>,
    /// Id (not secret) of the token the node joined with.
    pub token_id: String,
    /// Machine id stated at join; sent again in every Hello.
    pub machine_id: String,
    /// Certificate renewals since join.
    pub renewals: u64,
    /// minisign public keys pinned at join: the only keys whose signatures
    /// count. No server can change them.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// How many distinct trusted keys must sign a manifest.
    #[serde(default)]
    pub trust_threshold: u32,
    /// The version of the fleet's trust policy these keys are (0: pinned from
    /// files, version not learnt yet). Only grows: a policy is replaced only
    /// by the next version, signed by this one's keys.
    #[serde(default)]
    pub trust_version: u64,
}

// The private key stays out of debug output and logs.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("group", &self.group)
            .field("servers", &self.servers)
            .field("token_id", &self.token_id)
            .field("machine_id", &self.machine_id)
            .field("renewals", &self.renewals)
            .finish_non_exhaustive()
    }
}

/// The last desired state the agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// Revision; only ever grows.
    pub revision: u64,
    /// The node's role.
    pub role: Role,
    /// The group's desired node count (0 when unmanaged).
    pub desired_count: u32,
    /// True when the group has no desired count.
    pub unmanaged: bool,
    /// Heartbeat interval the server asked for.
    pub heartbeat_interval_ms: u32,
}

/// How a received desired state relates to the one held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Older than the one held: ignored.
    Older,
    /// The same revision: nothing to do.
    Same,
    /// Newer: to persist and act on.
    Newer,
}

impl Desired {
    /// The desired state enrollment implies: revision 0 with the role the server gave.
    pub fn initial(role: Role) -> Self {
        Self {
            revision: 0,
            role,
            desired_count: 0,
            unmanaged: false,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_MS,
        }
    }

    /// Where `incoming_revision` stands against this held revision. Revisions only
    /// grow, so a lower one is a stale message (a slow replica, a reordered push).
    pub fn order(&self, incoming_revision: u64) -> Ordering {
        match incoming_revision.cmp(&self.revision) {
            std::cmp::Ordering::Less => Ordering::Older,
            std::cmp::Ordering::Equal => Ordering::Same,
            std::cmp::Ordering::Greater => Ordering::Newer,
        }
    }

    /// The desired state a server message describes. `None` if it names no valid
    /// role (a protocol error: acting on it could demote the node by accident).
    /// A zero heartbeat interval means "unchanged".
    pub fn from_proto(msg: &pb::DesiredState, current_heartbeat_ms: u32) -> Option<Self> {
        Some(Self {
            revision: msg.revision,
            role: Role::from_proto(msg.role)?,
            desired_count: msg.desired_count,
            unmanaged: msg.unmanaged,
            heartbeat_interval_ms: if msg.heartbeat_interval_ms == 0 {
                current_heartbeat_ms
            } else {
                msg.heartbeat_interval_ms
            },
        })
    }
}

#[derive(Clone)]
enum Db {
    Redb(std::sync::Arc<redb::Database>),
    Sled(sled::Db),
}

/// The database file of a real agent, in its state directory.
const DB_FILE: &str = "agent.redb";
/// An older agent's sled database directory, migrated at the first start.
const SLED_DIR: &str = "db";
/// The sled tree that held the identity and desired state.
const SLED_MAIN_TREE: &[u8] = b"__sled__default";
/// The redb table that holds them.
const MAIN_TABLE: &str = "main";

/// Handle on the agent's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// The identity and desired-state records: the default tree, under the
    /// namespace's prefix (none for a real agent).
    main: Keyspace,
    dir: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("namespace", &String::from_utf8_lossy(self.main.prefix()))
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir`, moving an older
    /// agent's sled database into it first.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        ensure_private_dir(state_dir).map_err(|source| StateError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        // A store just dropped (by an agent that just exited) can hold the
        // lock a moment longer: wait a little before calling the directory in
        // use.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            let opened = redb::Database::builder()
                // A handful of small records: a small cache.
                .set_cache_size(1 << 20)
                .create(&path);
            match opened {
                Ok(db) => break std::sync::Arc::new(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StateError::Locked {
                            path: state_dir.to_path_buf(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(StateError::Open {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        };
        let sled_dir = state_dir.join(SLED_DIR);
        if sled_dir.exists() {
            migrate_from_sled(&sled_dir, &db).map_err(|reason| StateError::Migrate {
                path: sled_dir.clone(),
                reason,
            })?;
        }
        Ok(Self {
            main: Keyspace::redb(db.clone(), MAIN_TABLE),
            db: Db::Redb(db),
            dir: state_dir.to_path_buf(),
        })
    }

    /// One agent's store inside a database shared by many (the fleet simulator):
    /// its records and trees live under the prefix `<namespace>/` of the shared
    /// trees, so agents never see each other's. `state_dir` is still its own
    /// (status.json, downloads and patch work files go there). `namespace` must be
    /// non-empty and free of `/`, so no prefix is the start of another.
    pub fn open_shared(
        db: &sled::Db,
        namespace: &str,
        state_dir: &Path,
    ) -> Result<Self, StateError> {
        if namespace.is_empty() || namespace.contains('/') {
            return Err(StateError::Namespace(namespace.to_string()));
        }
        ensure_private_dir(state_dir).map_err(|source| StateError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            db: Db::Sled(db.clone()),
            main: Keyspace::prefixed(sled::Tree::clone(db), format!("{namespace}/")),
            dir: state_dir.to_path_buf(),
        })
    }

    /// The state directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The named table (tree) of this database, under this store's namespace:
    /// the other durable records (the patch journal, the report outbox) live
    /// beside the identity, in the same file.
    pub fn tree(&self, name: &str) -> Result<Keyspace, StateError> {
        match &self.db {
            Db::Redb(db) => Ok(Keyspace::redb(db.clone(), name)),
            Db::Sled(db) => Ok(Keyspace::prefixed(
                db.open_tree(name).map_err(KvError::from)?,
                self.main.prefix().to_vec(),
            )),
        }
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StateError> {
        match self.main.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { what, source }),
        }
    }

    fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(value).map_err(|source| StateError::Corrupt { what, source })
    }

    /// Writes `entries` atomically and makes them durable.
    fn commit(&self, entries: &[(&[u8], Vec<u8>)]) -> Result<(), StateError> {
        self.main.apply(entries)?;
        self.main.flush()?;
        Ok(())
    }

    /// The node's identity, if it has joined.
    pub fn identity(&self) -> Result<Option<Identity>, StateError> {
        self.get(IDENTITY_KEY, "identity")
    }

    /// The desired state held, if any.
    pub fn desired(&self) -> Result<Option<Desired>, StateError> {
        self.get(DESIRED_KEY, "desired state")
    }

    /// The role the role hook last ran for (or was skipped for, with no hook set).
    /// Differs from the held role only if the agent stopped between persisting a
    /// role change and running its hook: the hook is then run at the next start.
    pub fn hooked_role(&self) -> Result<Option<Role>, StateError> {
        self.get(HOOKED_ROLE_KEY, "hooked role")
    }

    /// Stores what a join produced, in one atomic, flushed write. The first role
    /// counts as already handled: the hook runs on role changes, not at join.
    pub fn save_joined(&self, identity: &Identity, desired: &Desired) -> Result<(), StateError> {
        self.commit(&[
            (IDENTITY_KEY, Self::encode(identity, "identity")?),
            (DESIRED_KEY, Self::encode(desired, "desired state")?),
            (HOOKED_ROLE_KEY, Self::encode(&desired.role, "hooked role")?),
        ])
    }

    /// Replaces the identity (after a renewal), flushed.
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StateError> {
        self.commit(&[(IDENTITY_KEY, Self::encode(identity, "identity")?)])
    }

    /// Replaces the desired state held, flushed.
    pub fn save_desired(&self, desired: &Desired) -> Result<(), StateError> {
        self.commit(&[(DESIRED_KEY, Self::encode(desired, "desired state")?)])
    }

    /// Replaces identity and desired state together (a desired state that moved the
    /// node to another group), flushed.
    pub fn save_identity_and_desired(
        &self,
        identity: &Identity,
        desired: &Desired,
    ) -> Result<(), StateError> {
        self.commit(&[
            (IDENTITY_KEY, Self::encode(identity, "identity")?),
            (DESIRED_KEY, Self::encode(desired, "desired state")?),
        ])
    }

    /// Records that the hook has handled `role`, flushed.
    pub fn save_hooked_role(&self, role: Role) -> Result<(), StateError> {
        self.commit(&[(HOOKED_ROLE_KEY, Self::encode(&role, "hooked role")?)])
    }
}

/// Copies every tree of an older agent's sled database into `db` in one
/// transaction, then removes the sled directory. A crash before the commit
/// leaves the sled database to copy again; after it, the copy is whole, and a
/// sled directory still there is only removed (a table already holding data
/// is never written over).
fn migrate_from_sled(sled_dir: &Path, db: &redb::Database) -> Result<(), String> {
    use redb::ReadableDatabase;
    let already = {
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        tx.list_tables()
            .map_err(|e| e.to_string())?
            .next()
            .is_some()
    };
    if !already {
        let old = sled::Config::new()
            .path(sled_dir)
            .flush_every_ms(None)
            .open()
            .map_err(|e| e.to_string())?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        let mut copied = 0usize;
        for name in old.tree_names() {
            let tree = old.open_tree(&name).map_err(|e| e.to_string())?;
            let table = if name.as_ref() == SLED_MAIN_TREE {
                MAIN_TABLE.to_string()
            } else {
                String::from_utf8_lossy(&name).into_owned()
            };
            let mut t = tx
                .open_table(redb::TableDefinition::<&[u8], &[u8]>::new(&table))
                .map_err(|e| e.to_string())?;
            for item in tree.iter() {
                let (k, v) = item.map_err(|e| e.to_string())?;
                t.insert(k.as_ref(), v.as_ref())
                    .map_err(|e| e.to_string())?;
                copied += 1;
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
        drop(old);
        tracing::info!(records = copied, from = %sled_dir.display(), "moved the agent database to the new format");
    }
    std::fs::remove_dir_all(sled_dir)
        .map_err(|e| format!("cannot remove it after the copy: {e}"))?;
    if let Some(parent) = sled_dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            node_id: "n-123".into(),
            group: "stores-eu".into(),
            key_pem: "KEY".into(),
            cert_pem: "CERT".into(),
            ca_pem: "CA".into(),
            servers: vec!["https://a:7443".into(), "https://b:7443".into()],
            token_id: "abcdefghij".into(),
            machine_id: "m1".into(),
            renewals: 2,
            trusted_keys: Vec::new(),
            trust_threshold: 0,
            trust_version: 0,
        }
    }

    #[test]
    fn state_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let desired = Desired {
            revision: 7,
            role: Role::Standby,
            desired_count: 3,
            unmanaged: false,
            heartbeat_interval_ms: 5000,
        };
        {
            let store = Store::open(&state_dir).unwrap();
            assert!(store.identity().unwrap().is_none());
            store
                .save_joined(&identity(), &Desired::initial(Role::Active))
                .unwrap();
            store.save_desired(&desired).unwrap();
        }
        let store = Store::open(&state_dir).unwrap();
        assert_eq!(store.identity().unwrap(), Some(identity()));
        assert_eq!(store.desired().unwrap(), Some(desired));
        assert_eq!(store.hooked_role().unwrap(), Some(Role::Active));
        let mode = fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_second_opener_is_told_the_directory_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        // sled's lock is per process (fcntl) on some platforms; a second open in
        // the same process may succeed. When it fails, it must say why.
        if let Err(e) = Store::open(dir.path()) {
            assert!(matches!(e, StateError::Locked { .. }), "{e}");
        }
    }

    #[test]
    fn older_revisions_are_ignored_and_equal_ones_are_no_ops() {
        let held = Desired {
            revision: 10,
            ..Desired::initial(Role::Active)
        };
        assert_eq!(held.order(9), Ordering::Older);
        assert_eq!(held.order(0), Ordering::Older);
        assert_eq!(held.order(10), Ordering::Same);
        assert_eq!(held.order(11), Ordering::Newer);
    }

    #[test]
    fn desired_from_proto_checks_the_role_and_keeps_the_interval() {
        let msg = pb::DesiredState {
            revision: 4,
            node_id: "n".into(),
            group: "g".into(),
            desired_count: 2,
            unmanaged: false,
            role: pb::Role::Standby as i32,
            heartbeat_interval_ms: 0,
            ..Default::default()
        };
        let d = Desired::from_proto(&msg, 9000).unwrap();
        assert_eq!(d.role, Role::Standby);
        assert_eq!(d.heartbeat_interval_ms, 9000);
        let msg = pb::DesiredState {
            role: pb::Role::Unspecified as i32,
            ..msg
        };
        assert!(Desired::from_proto(&msg, 9000).is_none());
        assert!(Desired::from_proto(&pb::DesiredState { role: 99, ..msg }, 1).is_none());
    }

    #[test]
    fn namespaced_stores_share_a_database_but_not_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let a = Store::open_shared(&db, "a1", &dir.path().join("a1")).unwrap();
        let b = Store::open_shared(&db, "a10", &dir.path().join("a10")).unwrap();
        a.save_joined(&identity(), &Desired::initial(Role::Active))
            .unwrap();
        assert_eq!(a.identity().unwrap(), Some(identity()));
        assert!(b.identity().unwrap().is_none());
        assert!(b.desired().unwrap().is_none());
        a.tree("journal").unwrap().insert("m", b"x").unwrap();
        assert!(b.tree("journal").unwrap().get("m").unwrap().is_none());
        assert_eq!(a.dir(), dir.path().join("a1"));
        // The records sit under the namespace in the shared default tree.
        assert!(db.get("a1/identity").unwrap().is_some());
        assert!(db.get("identity").unwrap().is_none());
        for bad in ["", "a/b"] {
            assert!(matches!(
                Store::open_shared(&db, bad, dir.path()),
                Err(StateError::Namespace(_))
            ));
        }
    }

    #[test]
    fn an_older_agents_sled_database_is_moved_over_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an agent before the move to redb left: sled in <state>/db.
            let db = sled::open(dir.path().join("db")).unwrap();
            let ident = serde_json::to_vec(&identity()).unwrap();
            let desired = serde_json::to_vec(&Desired::initial(Role::Standby)).unwrap();
            db.insert("identity", ident).unwrap();
            db.insert("desired", desired).unwrap();
            db.open_tree("journal").unwrap().insert("m", b"x").unwrap();
            db.open_tree("outbox")
                .unwrap()
                .insert(7u64.to_be_bytes(), b"r")
                .unwrap();
            db.flush().unwrap();
        }
        for _ in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.identity().unwrap().unwrap().node_id, "n-123");
            assert_eq!(store.desired().unwrap().unwrap().role, Role::Standby);
            assert_eq!(
                store.tree("journal").unwrap().get("m").unwrap().unwrap(),
                b"x"
            );
            assert_eq!(
                store.tree("outbox").unwrap().last().unwrap().unwrap().0,
                7u64.to_be_bytes()
            );
            assert!(!dir.path().join("db").exists(), "the sled copy is gone");
            assert!(dir.path().join(DB_FILE).exists());
        }
    }

    #[test]
    fn a_second_process_is_refused_after_a_short_wait() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }

    #[test]
    fn debug_output_leaves_out_the_private_key() {
        assert!(!format!("{:?}", identity()).contains("KEY"));
    }
}
