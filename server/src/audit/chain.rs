//! The audit log's hash chain: each entry carries the hash of the one before
//! and its own, and the store's head names the newest. Editing, removing,
//! reordering or inserting an entry breaks the chain at that entry; checking
//! it needs only the entries (an export can be checked away from the server).
//! Rewriting the whole chain from some entry on is found by an anchor: a
//! (seq, hash) recorded earlier, e.g. from a previous check or export.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::AuditRecord;

/// The newest entry, as the store's head records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub sha256: String,
}

/// SHA-256 (hex) of `rec`'s JSON with its own hash left out. An entry written
/// before the chain has neither `prev` nor `sha256`, so its hash is that of
/// its stored JSON: the first chained entry links to it all the same.
pub fn hash(rec: &AuditRecord) -> String {
    let unhashed = AuditRecord {
        sha256: String::new(),
        ..rec.clone()
    };
    // A struct of strings, numbers and a JSON value: cannot fail.
    let bytes = serde_json::to_vec(&unhashed).expect("audit entry serialises");
    hex::encode(Sha256::digest(bytes))
}

/// Where the chain is broken: the first entry found wrong, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub reason: String,
}

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub entries: u64,
    /// The first entry that carries a hash (None: none does).
    pub chained_from: Option<u64>,
    /// The newest entry's seq and hash.
    pub newest: Option<Head>,
}

fn describe(e: &AuditRecord) -> String {
    format!("{} by {} on {}", e.action, e.actor, e.target)
}

/// Checks `entries` (oldest first, as stored or exported), against `head`
/// when the store's is given (an export has none) and each anchor. `whole`:
/// the entries start at the log's first (an export `--since` does not).
pub fn verify(
    entries: &[AuditRecord],
    head: Option<&Head>,
    anchors: &[Head],
    whole: bool,
) -> Result<Intact, Broken> {
    let mut v = Verifier::new(anchors, whole);
    for e in entries {
        v.push(e)?;
    }
    v.finish(head)
}

/// The previous entry, as far as the checks of the next need it.
struct Seen {
    seq: u64,
    what: String,
    own: String,
}

/// [`verify`] one entry at a time, holding only the previous one and the
/// anchors: a log of any length is checked in bounded memory.
pub struct Verifier<'a> {
    anchors: &'a [Head],
    whole: bool,
    prev: Option<Seen>,
    chained_from: Option<u64>,
    entries: u64,
    /// The hash of each anchor's entry, as met.
    anchored: Vec<Option<String>>,
}

impl<'a> Verifier<'a> {
    pub fn new(anchors: &'a [Head], whole: bool) -> Self {
        Self {
            anchors,
            whole,
            prev: None,
            chained_from: None,
            entries: 0,
            anchored: vec![None; anchors.len()],
        }
    }

    /// The next entry (oldest first).
    pub fn push(&mut self, e: &AuditRecord) -> Result<(), Broken> {
        let broken = |seq: u64, reason: String| Err(Broken { seq, reason });
        let own = hash(e);
        if !e.sha256.is_empty() && e.sha256 != own {
            return broken(
                e.seq,
                format!(
                    "entry {} ({}) was changed: its content does not match its hash",
                    e.seq,
                    describe(e)
                ),
            );
        }
        match &self.prev {
            None if self.whole && e.seq != 1 => {
                return broken(
                    1,
                    format!(
                        "entries 1 to {} are missing: the log starts at {}",
                        e.seq - 1,
                        e.seq
                    ),
                );
            }
            Some(p) if e.seq <= p.seq => {
                return broken(
                    e.seq,
                    format!(
                        "entry {} is out of order (it follows entry {})",
                        e.seq, p.seq
                    ),
                );
            }
            Some(p) if e.seq != p.seq + 1 => {
                return broken(
                    p.seq + 1,
                    format!(
                        "entry {} is missing: the log goes from {} to {}",
                        p.seq + 1,
                        p.seq,
                        e.seq
                    ),
                );
            }
            _ => {}
        }
        if e.sha256.is_empty() {
            if self.chained_from.is_some() {
                return broken(
                    e.seq,
                    format!(
                        "entry {} ({}) carries no hash, though the entries before it do: it was replaced",
                        e.seq,
                        describe(e)
                    ),
                );
            }
        } else {
            self.chained_from.get_or_insert(e.seq);
            if let Some(p) = &self.prev
                && e.prev != p.own
            {
                return broken(
                    p.seq,
                    format!(
                        "entry {} ({}) was changed or replaced: entry {} records another hash for it",
                        p.seq, p.what, e.seq
                    ),
                );
            }
        }
        for (a, seen) in self.anchors.iter().zip(&mut self.anchored) {
            if a.seq == e.seq {
                *seen = Some(own.clone());
            }
        }
        self.entries += 1;
        self.prev = Some(Seen {
            seq: e.seq,
            what: describe(e),
            own,
        });
        Ok(())
    }

    /// After the last entry: against the store's `head`, if given, and the
    /// anchors.
    pub fn finish(self, head: Option<&Head>) -> Result<Intact, Broken> {
        let broken = |seq: u64, reason: String| Err(Broken { seq, reason });
        if let Some(head) = head {
            match &self.prev {
                None => {
                    return broken(
                        1,
                        format!("every entry is gone: the head records entry {}", head.seq),
                    );
                }
                Some(last) if last.seq < head.seq => {
                    return broken(
                        last.seq + 1,
                        format!(
                            "entries {} to {} were removed: the head records entry {}",
                            last.seq + 1,
                            head.seq,
                            head.seq
                        ),
                    );
                }
                Some(last) if last.seq > head.seq => {
                    return broken(
                        head.seq + 1,
                        format!(
                            "entries {} to {} were not written by the server: the head records entry {}",
                            head.seq + 1,
                            last.seq,
                            head.seq
                        ),
                    );
                }
                Some(last) if last.own != head.sha256 => {
                    return broken(
                        last.seq,
                        format!(
                            "entry {} ({}) was changed or replaced: the head records another hash for it",
                            last.seq, last.what
                        ),
                    );
                }
                _ => {}
            }
        }
        for (a, seen) in self.anchors.iter().zip(&self.anchored) {
            match seen {
                None => {
                    return broken(
                        a.seq,
                        format!("entry {} of the anchor is not in the log", a.seq),
                    );
                }
                Some(h) if *h != a.sha256 => {
                    return broken(
                        a.seq,
                        format!(
                            "entry {} does not match the anchor recorded for it: the log was rewritten from there or before",
                            a.seq
                        ),
                    );
                }
                _ => {}
            }
        }
        Ok(Intact {
            entries: self.entries,
            chained_from: self.chained_from,
            newest: self.prev.map(|p| Head {
                seq: p.seq,
                sha256: p.own,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64, legacy: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for seq in 1..=n {
            let mut e = AuditRecord {
                seq,
                at_ms: seq as i64 * 1000,
                actor: "alice".into(),
                action: "group.set".into(),
                target: format!("g{seq}"),
                detail: serde_json::json!({ "desired": seq }),
                prev: String::new(),
                sha256: String::new(),
            };
            if seq > legacy {
                e.prev = out.last().map(hash).unwrap_or_default();
                e.sha256 = hash(&e);
            }
            out.push(e);
        }
        out
    }

    fn head_of(entries: &[AuditRecord]) -> Head {
        let last = entries.last().unwrap();
        Head {
            seq: last.seq,
            sha256: hash(last),
        }
    }

    #[test]
    fn an_intact_chain_verifies_from_its_first_chained_entry() {
        let log = chain(6, 2);
        let ok = verify(&log, Some(&head_of(&log)), &[], true).unwrap();
        assert_eq!(ok.entries, 6);
        assert_eq!(ok.chained_from, Some(3));
        assert_eq!(ok.newest, Some(head_of(&log)));
    }

    #[test]
    fn every_kind_of_tampering_names_the_first_broken_entry() {
        let log = chain(6, 2);
        let head = head_of(&log);
        let at = |log: &[AuditRecord], head: &Head| verify(log, Some(head), &[], true).unwrap_err();

        // Edited, hash left alone.
        let mut t = log.clone();
        t[3].target = "other".into();
        let b = at(&t, &head);
        assert_eq!(b.seq, 4, "{b:?}");
        assert!(b.reason.contains("was changed"), "{b:?}");
        // Edited and rehashed: the next entry's link names it.
        t[3].sha256 = hash(&t[3]);
        assert_eq!(at(&t, &head).seq, 4);
        // A legacy entry edited: the first chained entry's link names it.
        let mut t = log.clone();
        t[1].detail = serde_json::json!({ "desired": 99 });
        assert_eq!(at(&t, &head).seq, 2);
        // Removed from the middle.
        let mut t = log.clone();
        t.remove(2);
        let b = at(&t, &head);
        assert_eq!(b.seq, 3, "{b:?}");
        assert!(b.reason.contains("missing"), "{b:?}");
        // The newest removed, or changed and rehashed: the head finds it.
        let mut t = log.clone();
        t.pop();
        assert_eq!(at(&t, &head).seq, 6);
        let mut t = log.clone();
        t[5].actor = "mallory".into();
        t[5].sha256 = hash(&t[5]);
        assert_eq!(at(&t, &head).seq, 6);
        // A chained entry replaced by an unchained one.
        let mut t = log.clone();
        t[4].prev.clear();
        t[4].sha256.clear();
        assert_eq!(at(&t, &head).seq, 5);
        // The oldest removed.
        let mut t = log.clone();
        t.remove(0);
        assert_eq!(at(&t, &head).seq, 1);
    }

    #[test]
    fn a_rewritten_chain_is_found_by_an_anchor() {
        let log = chain(5, 0);
        let anchor = Head {
            seq: 3,
            sha256: hash(&log[2]),
        };
        // Entry 2 changed, and every hash after it recomputed, head too.
        let mut t = log.clone();
        t[1].target = "other".into();
        for i in 1..t.len() {
            t[i].prev = hash(&t[i - 1]);
            t[i].sha256 = hash(&t[i]);
        }
        assert!(verify(&t, Some(&head_of(&t)), &[], true).is_ok());
        let b = verify(&t, Some(&head_of(&t)), &[anchor], true).unwrap_err();
        assert_eq!(b.seq, 3, "{b:?}");
        assert!(b.reason.contains("anchor"), "{b:?}");
    }

    #[test]
    fn an_export_since_a_time_verifies_without_its_start() {
        let log = chain(6, 0);
        assert!(verify(&log[2..], None, &[], false).is_ok());
        assert_eq!(verify(&log[2..], None, &[], true).unwrap_err().seq, 1);
    }
}
