//! The durable patch journal: one entry per manifest, in the table "journal" of
//! the agent's database, keyed by manifest id.
//!
//! Each step of a patch is recorded (and flushed to disk) before the agent acts on it,
//! so after a crash or power loss the agent resumes from what the journal says. A
//! phase only moves forward, one step at a time, or ends in a final phase; a final
//! entry never changes, which is what makes sure the same manifest is never applied
//! twice. The one exception is undoing a committed patch at the server's request:
//! Committed → Reverting → RolledBack (or Failed), which never leads back to an
//! install.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{Keyspace, KvError};

pub use flotilla_proto::phase::Phase;

/// One manifest's record.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Entry {
    /// The manifest's id (the key).
    pub manifest_id: String,
    /// The manifest exactly as signed.
    pub manifest: Vec<u8>,
    /// Its minisign signatures.
    pub signatures: Vec<String>,
    /// The component it changes.
    pub component: String,
    /// The component's version after the patch.
    pub version: String,
    /// Where it stands.
    pub phase: Phase,
    /// Unix seconds when the update started: expiry is judged against this.
    pub started_at: i64,
    /// Unix seconds of the last change.
    pub updated_at: i64,
    /// Why, for RolledBack, Failed and Rejected.
    pub error: Option<String>,
    /// The tail of an install script's or health check's output.
    pub log_tail: String,
    /// How the artifacts were downloaded (attempts, failures, bytes by source);
    /// sent with every later report, so the last one still says it.
    #[serde(default)]
    pub transfer: Option<flotilla_proto::transfer::Transfer>,
    /// The delta index offered with the manifest (`deltas.json`, untrusted;
    /// empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub deltas: String,
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("patch journal database error: {0}")]
    Db(#[from] KvError),
    #[error("patch journal entry {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode the patch journal entry of manifest {id}: {source}")]
    Encode {
        id: String,
        source: serde_json::Error,
    },
    #[error("a patch journal entry needs a manifest id")]
    EmptyId,
    #[error("manifest {id}: its patch cannot move from {from} to {to}")]
    IllegalTransition { from: Phase, to: Phase, id: String },
    #[error(
        "manifest {id}: a new patch journal entry must start as received, rejected or failed, not {phase}"
    )]
    IllegalStart { phase: Phase, id: String },
}

/// Handle on the journal tree. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tree: Keyspace,
}

impl Journal {
    /// The journal kept in `tree` (the agent's "journal" tree; see
    /// [`crate::state::Store::tree`]).
    pub fn open(tree: impl Into<Keyspace>) -> Self {
        Self { tree: tree.into() }
    }

    /// The entry of manifest `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Entry>, JournalError> {
        self.tree
            .get(id.as_bytes())?
            .map(|bytes| decode(id.as_bytes(), &bytes))
            .transpose()
    }

    /// Writes `entry` and flushes it to disk before returning: callers act only
    /// after this. Refuses a phase change the journal does not allow.
    pub fn record(&self, entry: &Entry) -> Result<(), JournalError> {
        let id = &entry.manifest_id;
        if id.is_empty() || id.starts_with(INDEX_PREFIX) {
            return Err(JournalError::EmptyId);
        }
        let new = serde_json::to_vec(entry).map_err(|source| JournalError::Encode {
            id: id.clone(),
            source,
        })?;
        let mut was_committed = false;
        loop {
            let old = self.tree.get(id.as_bytes())?;
            match &old {
                None if !entry.phase.may_start() => {
                    return Err(JournalError::IllegalStart {
                        phase: entry.phase,
                        id: id.clone(),
                    });
                }
                None => {}
                Some(bytes) => {
                    let from = decode(id.as_bytes(), bytes)?.phase;
                    was_committed = from == Phase::Committed;
                    if !from.may_become(entry.phase) {
                        return Err(JournalError::IllegalTransition {
                            from,
                            to: entry.phase,
                            id: id.clone(),
                        });
                    }
                }
            }
            // What is installed changes: the index is marked stale first, so
            // a crash before it is brought up to date leaves it rebuilt.
            let moves_installed = was_committed != (entry.phase == Phase::Committed);
            if moves_installed {
                self.tree.remove(INDEX_OK)?;
            }
            // Compare-and-swap: a concurrent writer cannot slip an illegal change in
            // between the check and the write.
            if self
                .tree
                .compare_and_swap(id.as_bytes(), old.as_deref(), Some(new.as_slice()))?
            {
                if moves_installed {
                    self.update_index(entry, was_committed)?;
                }
                break;
            }
        }
        self.tree.flush()?;
        Ok(())
    }

    /// Brings the component's installed version up to date after `entry`
    /// became committed (a newer commit wins) or stopped being so (the newest
    /// other commit of the component, found by a scan: undoing is rare).
    fn update_index(&self, entry: &Entry, was_committed: bool) -> Result<(), JournalError> {
        let key = index_key(&entry.component);
        let held: Option<Installed> = self
            .tree
            .get(&key)?
            .map(|b| decode_index(&key, &b))
            .transpose()?;
        let next = if !was_committed {
            let mine = Installed::of(entry);
            Some(match held {
                Some(h) if h.order() > mine.order() => h,
                _ => mine,
            })
        } else if held
            .as_ref()
            .is_some_and(|h| h.manifest_id != entry.manifest_id)
        {
            held
        } else {
            self.scan()?.remove(&entry.component)
        };
        let mut batch: Vec<(&[u8], Vec<u8>)> = vec![(INDEX_OK, Vec::new())];
        let encoded;
        match next {
            Some(n) => {
                encoded = serde_json::to_vec(&n).expect("an index record encodes");
                batch.insert(0, (key.as_slice(), encoded));
            }
            None => {
                self.tree.remove(&key)?;
            }
        }
        self.tree.apply(&batch)?;
        Ok(())
    }

    /// The latest committed entry of each component, from every entry.
    fn scan(&self) -> Result<BTreeMap<String, Installed>, JournalError> {
        let mut latest: BTreeMap<String, Installed> = BTreeMap::new();
        for e in self.all()? {
            if e.phase != Phase::Committed {
                continue;
            }
            let mine = Installed::of(&e);
            if latest
                .get(&e.component)
                .is_none_or(|held| mine.order() > held.order())
            {
                latest.insert(e.component.clone(), mine);
            }
        }
        Ok(latest)
    }

    /// Every entry, by manifest id.
    pub fn all(&self) -> Result<Vec<Entry>, JournalError> {
        self.tree
            .iter()?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(INDEX_PREFIX.as_bytes()))
            .map(|(key, value)| decode(&key, &value))
            .collect()
    }

    /// Entries not in a final phase, the oldest started first.
    pub fn unfinished(&self) -> Result<Vec<Entry>, JournalError> {
        let mut entries: Vec<Entry> = self
            .all()?
            .into_iter()
            .filter(|e| !e.phase.is_final())
            .collect();
        entries.sort_by(|a, b| {
            (a.started_at, a.updated_at, &a.manifest_id).cmp(&(
                b.started_at,
                b.updated_at,
                &b.manifest_id,
            ))
        });
        Ok(entries)
    }

    /// Component -> version, from the latest committed entry of each component (by
    /// `updated_at`; ties broken by manifest id, so the answer is stable). A patch
    /// being undone or undone no longer counts: its component is back at its newest
    /// other committed entry, or absent. Read from the index (a few bytes per
    /// component), not from the entries; rebuilt from them when it is missing or
    /// a crash left it stale.
    pub fn installed_versions(&self) -> Result<BTreeMap<String, String>, JournalError> {
        if self.tree.get(INDEX_OK)?.is_none() {
            self.rebuild_index()?;
        }
        let mut out = BTreeMap::new();
        let prefix = index_key("");
        for (key, value) in self.tree.scan(&prefix)? {
            if let Some(component) = key.strip_prefix(prefix.as_slice()) {
                let i = decode_index(&key, &value)?;
                out.insert(String::from_utf8_lossy(component).into_owned(), i.version);
            }
        }
        Ok(out)
    }

    /// The manifest id of the committed entry `component` is at now (the one
    /// `installed_versions` reports), if any.
    pub fn installed_id(&self, component: &str) -> Result<Option<String>, JournalError> {
        if self.tree.get(INDEX_OK)?.is_none() {
            self.rebuild_index()?;
        }
        let key = index_key(component);
        Ok(match self.tree.get(&key)? {
            Some(b) => Some(decode_index(&key, &b)?.manifest_id),
            None => None,
        })
    }

    /// Notes that `entry`, just recorded Rejected, was refused before its
    /// signatures checked out: anyone who can reach the agent as its server
    /// can send such offers, each with an id of its own, so the journal keeps
    /// only the newest [`MAX_UNTRUSTED`] of them (without their bytes: see
    /// `pipeline`). Removes the older ones and returns their ids. One that is
    /// offered again is checked again, and refused again: what its bytes say
    /// does not change, only the keys it is checked against may, and a
    /// manifest signed by a key the host trusts is never one of these.
    pub fn note_untrusted(&self, entry: &Entry) -> Result<Vec<String>, JournalError> {
        let key = untrusted_key(entry.updated_at, &entry.manifest_id);
        self.tree.insert(&key, b"")?;
        let noted = self.tree.scan(UNTRUSTED_PREFIX.as_bytes())?;
        let mut removed = Vec::new();
        // Keys sort by time (fixed width), oldest first.
        for (k, _) in noted.iter().take(noted.len().saturating_sub(MAX_UNTRUSTED)) {
            let id = String::from_utf8_lossy(&k[UNTRUSTED_PREFIX.len() + 21..]).into_owned();
            // Only an entry still as it was noted goes.
            if self
                .get(&id)?
                .is_some_and(|e| e.phase == Phase::Rejected && e.manifest.is_empty())
            {
                self.tree.remove(id.as_bytes())?;
                removed.push(id);
            }
            self.tree.remove(k)?;
        }
        self.tree.flush()?;
        Ok(removed)
    }

    fn rebuild_index(&self) -> Result<(), JournalError> {
        let stale: Vec<_> = self
            .tree
            .scan(&index_key(""))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            self.tree.remove(&k)?;
        }
        let latest = self.scan()?;
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = latest
            .iter()
            .map(|(c, i)| {
                (
                    index_key(c),
                    serde_json::to_vec(i).expect("an index record encodes"),
                )
            })
            .collect();
        let mut batch: Vec<(&[u8], Vec<u8>)> = encoded
            .iter()
            .map(|(k, v)| (k.as_slice(), v.clone()))
            .collect();
        batch.push((INDEX_OK, Vec::new()));
        self.tree.apply(&batch)?;
        self.tree.flush()?;
        Ok(())
    }
}

/// Keys of the installed-versions index start with this, which no manifest id
/// can (ids are names that never start with '-').
const INDEX_PREFIX: &str = "-";
/// Present while the index agrees with the entries.
const INDEX_OK: &[u8] = b"-index-ok";
/// Entries refused before their signatures checked out, by time:
/// `-untrusted/<unix seconds, 20 digits>/<id>` (see [`Journal::note_untrusted`]).
const UNTRUSTED_PREFIX: &str = "-untrusted/";
/// Refused untrusted offers the journal remembers.
pub const MAX_UNTRUSTED: usize = 256;

fn untrusted_key(at: i64, id: &str) -> Vec<u8> {
    format!("{UNTRUSTED_PREFIX}{:020}/{id}", at.max(0)).into_bytes()
}

fn index_key(component: &str) -> Vec<u8> {
    format!("{INDEX_PREFIX}installed/{component}").into_bytes()
}

/// One component's installed version, as the index keeps it.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Installed {
    version: String,
    updated_at: i64,
    manifest_id: String,
}

impl Installed {
    fn of(e: &Entry) -> Self {
        Self {
            version: e.version.clone(),
            updated_at: e.updated_at,
            manifest_id: e.manifest_id.clone(),
        }
    }

    fn order(&self) -> (i64, &str) {
        (self.updated_at, &self.manifest_id)
    }
}

fn decode_index(key: &[u8], bytes: &[u8]) -> Result<Installed, JournalError> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<Entry, JournalError> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
