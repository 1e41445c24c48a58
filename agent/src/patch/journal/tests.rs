//! Journal tests: phase transitions, crash safety, and the installed-versions index.

use super::*;
use Phase::*;
use flotilla_proto::pb;

fn entry(id: &str, component: &str, version: &str, phase: Phase, at: i64) -> Entry {
    Entry {
        manifest_id: id.into(),
        manifest: br#"{"id":"x"}"#.to_vec(),
        signatures: vec!["sig".into()],
        component: component.into(),
        version: version.into(),
        phase,
        started_at: at,
        updated_at: at,
        error: None,
        log_tail: String::new(),
        transfer: None,
        deltas: String::new(),
    }
}

fn journal() -> (sled::Db, Journal) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let j = Journal::open(db.open_tree("journal").unwrap());
    (db, j)
}

#[test]
fn the_transition_table() {
    let forward = [
        Received, Verified, Downloaded, Applying, Applied, Healthy, Committed,
    ];
    for from in Phase::ALL {
        for to in Phase::ALL {
            let expected = if from == Committed {
                to == Reverting
            } else if from == Reverting {
                matches!(to, RolledBack | Failed)
            } else if from.is_final() || to == Reverting {
                false
            } else if to == Superseded {
                matches!(from, Received | Verified | Downloaded)
            } else if matches!(to, RolledBack | Failed | Rejected) || from == to {
                true
            } else {
                let i = forward.iter().position(|p| *p == from).unwrap();
                forward.get(i + 1) == Some(&to)
            };
            assert_eq!(from.may_become(to), expected, "{from} -> {to}");
        }
    }
    // Spot checks of the table above.
    assert!(Received.may_become(Verified));
    assert!(!Received.may_become(Downloaded), "no skipping");
    assert!(!Applied.may_become(Applying), "no going back");
    assert!(Applying.may_become(RolledBack));
    assert!(!Committed.may_become(RolledBack));
    assert!(!Rejected.may_become(Rejected));
    assert!(Received.may_start() && Rejected.may_start() && Failed.may_start());
    assert!(!Applying.may_start() && !Committed.may_start());
    // Undoing a committed patch: its own path, never back to an install.
    assert!(Committed.may_become(Reverting));
    assert!(Reverting.may_become(RolledBack) && Reverting.may_become(Failed));
    assert!(!Reverting.may_become(Committed) && !Reverting.may_become(Rejected));
    assert!(!Reverting.may_become(Applying) && !Reverting.may_become(Reverting));
    assert!(!Healthy.may_become(Reverting) && !Applying.may_become(Reverting));
    assert!(!RolledBack.may_become(Reverting) && !Failed.may_become(Reverting));
    assert!(!Reverting.is_final() && !Reverting.may_start());
    assert_eq!(Reverting.to_proto(), pb::PatchPhase::Reverting);
    assert_eq!(Reverting.as_str(), "reverting");
    // Overtaken by a newer version: decided at verification, final, not a failure.
    assert!(Received.may_become(Superseded) && Downloaded.may_become(Superseded));
    assert!(!Applying.may_become(Superseded) && !Committed.may_become(Superseded));
    assert!(Superseded.is_final() && !Superseded.may_start());
    assert_eq!(Superseded.to_proto(), pb::PatchPhase::Superseded);
}

#[test]
fn record_walks_forward_and_refuses_illegal_moves() {
    let (_db, j) = journal();
    let mut e = entry("m1", "app", "1.0.0", Applying, 10);
    let err = j.record(&e).unwrap_err();
    assert!(
        matches!(&err, JournalError::IllegalStart { phase: Applying, id } if id == "m1"),
        "{err}"
    );
    for phase in [Received, Verified, Downloaded, Applying, Applied, Healthy] {
        e.phase = phase;
        j.record(&e).unwrap();
        assert_eq!(j.get("m1").unwrap().unwrap().phase, phase);
    }
    e.phase = Verified;
    let err = j.record(&e).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::IllegalTransition { from: Healthy, to: Verified, id } if id == "m1"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("healthy") && err.to_string().contains("m1"));
    e.phase = Committed;
    j.record(&e).unwrap();
    e.phase = RolledBack;
    assert!(matches!(
        j.record(&e),
        Err(JournalError::IllegalTransition {
            from: Committed,
            to: RolledBack,
            ..
        })
    ));
    assert_eq!(j.get("m1").unwrap().unwrap().phase, Committed);
    // Undone at the server's request, then never touched again.
    e.phase = Reverting;
    j.record(&e).unwrap();
    assert_eq!(j.unfinished().unwrap().len(), 1, "an undo to resume");
    e.phase = RolledBack;
    j.record(&e).unwrap();
    for phase in [Reverting, Committed, Received] {
        e.phase = phase;
        assert!(j.record(&e).is_err(), "{phase}");
    }
    assert_eq!(j.get("m1").unwrap().unwrap().phase, RolledBack);
    assert!(j.unfinished().unwrap().is_empty());
    assert!(j.get("other").unwrap().is_none());
    e.manifest_id = String::new();
    assert!(matches!(j.record(&e), Err(JournalError::EmptyId)));
}

#[test]
fn unfinished_are_oldest_first_and_installed_versions_take_the_latest_commit() {
    let (_db, j) = journal();
    let mut e = entry("late", "app", "2.0.0", Received, 300);
    j.record(&e).unwrap();
    e = entry("early", "app", "1.5.0", Received, 100);
    j.record(&e).unwrap();
    e = entry("failed", "app", "9.0.0", Failed, 50);
    j.record(&e).unwrap();
    let ids: Vec<String> = j
        .unfinished()
        .unwrap()
        .into_iter()
        .map(|e| e.manifest_id)
        .collect();
    assert_eq!(ids, ["early", "late"]);

    let commit = |id: &str, component: &str, version: &str, at: i64| {
        let mut e = entry(id, component, version, Received, at);
        j.record(&e).unwrap();
        for phase in [Verified, Downloaded, Applying, Applied, Healthy, Committed] {
            e.phase = phase;
            j.record(&e).unwrap();
        }
    };
    commit("a1", "app", "1.0.0", 10);
    commit("a2", "app", "1.1.0", 20);
    commit("o1", "openssl", "3.0.1", 15);
    let installed = j.installed_versions().unwrap();
    assert_eq!(installed.len(), 2);
    assert_eq!(installed["app"], "1.1.0");
    assert_eq!(installed["openssl"], "3.0.1");
    assert_eq!(j.all().unwrap().len(), 6);

    // Undoing the newest commit of a component goes back to the one before;
    // undoing that one too leaves the component out.
    let mut a2 = j.get("a2").unwrap().unwrap();
    a2.phase = Reverting;
    j.record(&a2).unwrap();
    assert_eq!(j.installed_versions().unwrap()["app"], "1.0.0");
    a2.phase = RolledBack;
    j.record(&a2).unwrap();
    assert_eq!(j.installed_versions().unwrap()["app"], "1.0.0");
    let mut a1 = j.get("a1").unwrap().unwrap();
    for phase in [Reverting, Failed] {
        a1.phase = phase;
        j.record(&a1).unwrap();
    }
    let installed = j.installed_versions().unwrap();
    assert!(!installed.contains_key("app"), "{installed:?}");
    assert_eq!(installed["openssl"], "3.0.1");
}

#[test]
fn entries_survive_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = crate::state::Store::open(dir.path()).unwrap();
        let j = Journal::open(store.tree("journal").unwrap());
        j.record(&entry("m", "app", "1.0.0", Received, 1)).unwrap();
    }
    let store = crate::state::Store::open(dir.path()).unwrap();
    let j = Journal::open(store.tree("journal").unwrap());
    let e = j.get("m").unwrap().unwrap();
    assert_eq!(e.phase, Received);
    assert_eq!(e.manifest, br#"{"id":"x"}"#);
    assert_eq!(Phase::RolledBack.to_proto(), pb::PatchPhase::RolledBack);
    assert_eq!(Phase::RolledBack.as_str(), "rolled_back");
}

#[test]
fn installed_versions_come_from_the_index_not_the_entries() {
    let (db, j) = journal();
    let commit = |e: &mut Entry| {
        j.record(e).unwrap();
        for phase in [Verified, Downloaded, Applying, Applied, Healthy, Committed] {
            e.phase = phase;
            j.record(e).unwrap();
        }
    };
    commit(&mut entry("a1", "app", "1.0.0", Received, 10));
    commit(&mut entry("a2", "app", "1.1.0", Received, 20));
    assert_eq!(j.installed_versions().unwrap()["app"], "1.1.0");
    // An entry that cannot be decoded (or a huge one) is never read for it.
    db.open_tree("journal")
        .unwrap()
        .insert("junk", b"{not json".to_vec())
        .unwrap();
    assert!(j.all().is_err());
    assert_eq!(j.installed_versions().unwrap()["app"], "1.1.0");
    db.open_tree("journal").unwrap().remove("junk").unwrap();

    // Undone: back to the commit before, from the index.
    let mut a2 = j.get("a2").unwrap().unwrap();
    a2.phase = Reverting;
    j.record(&a2).unwrap();
    assert_eq!(j.installed_versions().unwrap()["app"], "1.0.0");

    // A crash between an entry and its index update leaves the marker
    // missing: the index is rebuilt from the entries.
    db.open_tree("journal").unwrap().remove(INDEX_OK).unwrap();
    db.open_tree("journal")
        .unwrap()
        .insert(
            index_key("app"),
            serde_json::to_vec(&Installed::of(&entry("zz", "app", "9.9.9", Committed, 99)))
                .unwrap(),
        )
        .unwrap();
    assert_eq!(j.installed_versions().unwrap()["app"], "1.0.0");
    // Index keys are not entries.
    assert_eq!(j.all().unwrap().len(), 2);
    assert!(
        j.record(&entry("-installed/app", "app", "1", Received, 1))
            .is_err()
    );
}

#[test]
fn only_the_newest_untrusted_refusals_are_remembered() {
    let (_db, j) = journal();
    // A committed patch, which no number of refusals touches.
    j.record(&entry("good", "c", "1.0.0", Received, 1)).unwrap();
    for p in [Verified, Downloaded, Applying, Applied, Healthy, Committed] {
        j.record(&entry("good", "c", "1.0.0", p, 1)).unwrap();
    }
    let mut removed = Vec::new();
    for i in 0..MAX_UNTRUSTED + 10 {
        let mut e = entry(&format!("bad-{i:04}"), "", "", Rejected, 100 + i as i64);
        e.manifest.clear();
        e.signatures.clear();
        j.record(&e).unwrap();
        removed.extend(j.note_untrusted(&e).unwrap());
    }
    let expected: Vec<String> = (0..10).map(|i| format!("bad-{i:04}")).collect();
    assert_eq!(removed, expected);
    assert_eq!(j.all().unwrap().len(), MAX_UNTRUSTED + 1);
    assert!(j.get("bad-0000").unwrap().is_none());
    assert!(j.get("bad-0010").unwrap().is_some());
    assert_eq!(j.installed_versions().unwrap()["c"], "1.0.0");
    // An id noted, then found holding its bytes (not what was noted), stays.
    let mut kept = entry("kept", "", "", Rejected, 0);
    j.record(&kept).unwrap();
    kept.manifest.clear();
    assert!(j.note_untrusted(&kept).unwrap().is_empty());
    assert!(j.get("kept").unwrap().is_some());
}
