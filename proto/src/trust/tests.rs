use super::*;

struct Key {
    line: String,
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

fn key() -> Key {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let text = kp.pk.to_box().unwrap().into_string();
    Key {
        line: text.lines().last().unwrap().trim().to_string(),
        sk: kp.sk,
        pk: kp.pk,
    }
}

fn doc(version: u64, keys: &[&Key], threshold: u32) -> PolicyDoc {
    PolicyDoc {
        version,
        keys: keys.iter().map(|k| k.line.clone()).collect(),
        threshold,
    }
}

fn signed(d: &PolicyDoc, by: &[&Key]) -> SignedPolicy {
    let bytes = d.to_bytes();
    SignedPolicy {
        signatures: by
            .iter()
            .map(|k| {
                minisign::sign(Some(&k.pk), &k.sk, bytes.as_slice(), None, None)
                    .unwrap()
                    .into_string()
            })
            .collect(),
        document: bytes.into(),
    }
}

fn held(d: &PolicyDoc) -> Held {
    Held {
        version: d.version,
        policy: d.policy().unwrap(),
    }
}

struct Fleet {
    a: Key,
    b: Key,
    c: Key,
    d: Key,
}

fn fleet() -> Fleet {
    Fleet {
        a: key(),
        b: key(),
        c: key(),
        d: key(),
    }
}

#[test]
fn a_rotation_signed_by_both_thresholds_is_taken() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b, &f.c], 2);
    let v2 = doc(2, &[&f.b, &f.c, &f.d], 2);
    let got = verify_next(&held(&v1), &signed(&v2, &[&f.b, &f.c, &f.d])).unwrap();
    assert_eq!(got, v2);
}

#[test]
fn a_rotation_below_the_old_threshold_is_refused() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b, &f.c], 2);
    let v2 = doc(2, &[&f.b, &f.c, &f.d], 2);
    // One of v1's keys (B) and two of its own (B, D).
    let e = verify_next(&held(&v1), &signed(&v2, &[&f.b, &f.d])).unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::NotSignedByPrevious {
                held: 1,
                version: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("not signed by the keys of v1"),
        "{e}"
    );
}

#[test]
fn a_rotation_its_own_keys_did_not_sign_is_refused() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b, &f.c], 2);
    // The old keys alone cannot hand the fleet to keys that never signed.
    let v2 = doc(2, &[&f.d], 1);
    let e = verify_next(&held(&v1), &signed(&v2, &[&f.a, &f.b])).unwrap_err();
    assert!(
        matches!(e, TrustError::NotSignedByItself { version: 2, .. }),
        "{e}"
    );
}

#[test]
fn versions_must_follow_one_by_one() {
    let f = fleet();
    let v1 = doc(1, &[&f.a], 1);
    let v3 = doc(3, &[&f.a], 1);
    let e = verify_next(&held(&v1), &signed(&v3, &[&f.a])).unwrap_err();
    assert_eq!(
        e,
        TrustError::NotNext {
            held: 1,
            version: 3
        }
    );
    let again = verify_next(&held(&v1), &signed(&v1, &[&f.a])).unwrap_err();
    assert_eq!(
        again,
        TrustError::NotNext {
            held: 1,
            version: 1
        }
    );
}

#[test]
fn tampered_bytes_are_refused() {
    let f = fleet();
    let v1 = doc(1, &[&f.a], 1);
    let mut s = signed(&doc(2, &[&f.a, &f.b], 1), &[&f.a]);
    // Same meaning, other bytes: signatures are over the bytes.
    let mut bytes = s.document.to_vec();
    bytes.insert(0, b' ');
    s.document = bytes.into();
    let e = verify_next(&held(&v1), &s).unwrap_err();
    assert!(matches!(e, TrustError::NotSignedByPrevious { .. }), "{e}");
}

#[test]
fn a_host_walks_every_version_it_missed_in_any_order() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b, &f.c], 2);
    let v2 = doc(2, &[&f.b, &f.c, &f.d], 2);
    let v3 = doc(3, &[&f.c, &f.d], 2);
    let chain = vec![
        signed(&v3, &[&f.c, &f.d]),
        signed(&v1, &[]),
        signed(&v2, &[&f.b, &f.c, &f.d]),
    ];
    let (reached, stopped) = walk(&held(&v1), &chain);
    assert_eq!(reached, Some(v3));
    assert_eq!(stopped, None);
}

#[test]
fn a_walk_stops_at_the_first_bad_version_and_keeps_what_it_reached() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b], 2);
    let v2 = doc(2, &[&f.b, &f.c], 2);
    // v3 signed only by C: below v2's threshold.
    let v3 = doc(3, &[&f.c, &f.d], 1);
    let chain = vec![signed(&v2, &[&f.a, &f.b, &f.c]), signed(&v3, &[&f.c, &f.d])];
    let (reached, stopped) = walk(&held(&v1), &chain);
    assert_eq!(reached, Some(v2));
    assert!(matches!(
        stopped,
        Some(TrustError::NotSignedByPrevious { held: 2, .. })
    ));
}

#[test]
fn an_older_or_equal_version_changes_nothing() {
    let f = fleet();
    let v1 = doc(1, &[&f.a], 1);
    let v2 = doc(2, &[&f.b], 1);
    let h = held(&v2);
    // A server that sends an old policy (v1, or a forged "v2") moves nobody back.
    let forged = doc(2, &[&f.d], 1);
    let (reached, stopped) = walk(&h, &[signed(&v1, &[&f.a]), signed(&forged, &[&f.d])]);
    assert_eq!((reached, stopped), (None, None));
}

#[test]
fn keys_pinned_without_a_version_find_theirs() {
    let f = fleet();
    let v1 = doc(1, &[&f.a, &f.b], 1);
    let v2 = doc(2, &[&f.b, &f.c], 1);
    let chain = vec![signed(&v1, &[]), signed(&v2, &[&f.b])];
    let pinned = TrustPolicy::new(&[f.b.line.clone(), f.a.line.clone()], 1).unwrap();
    assert_eq!(anchor(&pinned, 0, &chain), Some(1));
    // Held at v1 already: nothing above it is those keys' own.
    assert_eq!(anchor(&pinned, 1, &chain), None);
    let other = TrustPolicy::new(std::slice::from_ref(&f.a.line), 1).unwrap();
    assert_eq!(anchor(&other, 0, &chain), None);
    let other_threshold = TrustPolicy::new(&[f.a.line.clone(), f.b.line.clone()], 2).unwrap();
    assert_eq!(anchor(&other_threshold, 0, &chain), None);
}

#[test]
fn a_version_number_alone_does_not_place_pinned_keys() {
    let f = fleet();
    let v1 = doc(1, &[&f.a], 1);
    let v2 = doc(2, &[&f.b], 1);
    let v3 = doc(3, &[&f.a], 1);
    let pinned = TrustPolicy::new(std::slice::from_ref(&f.a.line), 1).unwrap();
    // The host's own keys offered unsigned as "v999" (or signed by other
    // keys): no version, so the real rotations are not skipped.
    let forged = doc(999, &[&f.a], 1);
    let real = vec![signed(&v1, &[]), signed(&v2, &[&f.a, &f.b])];
    let mut chain = real.clone();
    chain.push(signed(&forged, &[]));
    assert_eq!(anchor(&pinned, 0, &chain), Some(1));
    chain.push(signed(&forged, &[&f.c]));
    assert_eq!(anchor(&pinned, 0, &chain), Some(1));
    // An unsigned "v1" does not move a host that already holds a version.
    assert_eq!(anchor(&pinned, 1, &chain), None);
    // A later version its own keys signed does place them (every rotation
    // is signed by its own keys), above one held already too.
    let mut chain = real;
    chain.push(signed(&v3, &[&f.b, &f.a]));
    assert_eq!(anchor(&pinned, 0, &chain), Some(3));
    assert_eq!(anchor(&pinned, 1, &chain), Some(3));
    assert_eq!(anchor(&pinned, 3, &chain), None);
}

#[test]
fn documents_are_checked_before_anything_else() {
    assert!(matches!(
        PolicyDoc::parse(&vec![b' '; MAX_POLICY_BYTES + 1]),
        Err(TrustError::TooLarge { .. })
    ));
    assert!(matches!(
        PolicyDoc::parse(br#"{"version":1,"keys":[],"threshold":1}"#),
        Err(TrustError::Invalid { .. })
    ));
    assert!(matches!(
        PolicyDoc::parse(br#"{"version":1,"keys":["x"],"threshold":1,"extra":1}"#),
        Err(TrustError::Malformed(_))
    ));
    let f = fleet();
    let zero = PolicyDoc {
        version: 0,
        ..doc(1, &[&f.a], 1)
    };
    assert!(PolicyDoc::parse(&zero.to_bytes()).is_err());
    let two_of_one = PolicyDoc {
        threshold: 2,
        ..doc(1, &[&f.a], 1)
    };
    assert!(PolicyDoc::parse(&two_of_one.to_bytes()).is_err());
    // The hash ignores key order and version.
    let ab = doc(1, &[&f.a, &f.b], 1);
    let ba = doc(5, &[&f.b, &f.a], 1);
    assert_eq!(ab.sha256(), ba.sha256());
}

#[test]
fn a_key_file_and_its_base64_line_are_the_same_key() {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let text = kp.pk.to_box().unwrap().into_string();
    let line = text.lines().last().unwrap().trim().to_string();
    let from_file = TrustPolicy::new(std::slice::from_ref(&text), 1).unwrap();
    let from_line = TrustPolicy::new(std::slice::from_ref(&line), 1).unwrap();
    assert!(from_file.same_as(&from_line));
}
