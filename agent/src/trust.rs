//! The host's patch-signing keys: taken at join (from key files, or from the
//! server checked against the hash the join token pins), then replaced only by
//! newer versions of the fleet's trust policy from the chain a desired state
//! carries, each only when the version held signed it (and it signed itself),
//! never going back. The server only carries the documents; what the host
//! trusts follows from what it was given at join.

use flotilla_proto::manifest::TrustPolicy;
use flotilla_proto::pb;
use flotilla_proto::trust::{self, Held, PolicyDoc, SignedPolicy};

use crate::state::Identity;

/// Why a join refuses the server's trust policy.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "the server's trust policy is not the one the join token pins (sha256 {pinned}; the \
         server offered {offered}): refusing to join. The server may not be the fleet's, or its \
         policy was changed; ask for a new token, or join with --trusted-key files"
    )]
    Mismatch { pinned: String, offered: String },
}

/// Keys a host joining with a token that pins `pin` takes from `chain`: the
/// keys and threshold that hash to `pin`, at the version they provably hold
/// (see [`trust::anchor`]; 0 when the chain proves none, to be learnt
/// later), walked on to the newest version that follows from it.
pub fn pinned_at_join(pin: &str, chain: &[pb::SignedTrustPolicy]) -> Result<PolicyDoc, PinError> {
    let chain: Vec<SignedPolicy> = chain.iter().cloned().map(Into::into).collect();
    let docs: Vec<PolicyDoc> = chain
        .iter()
        .take(trust::MAX_CHAIN)
        .filter_map(|s| PolicyDoc::parse(&s.document).ok())
        .collect();
    let Some(root) = docs.iter().find(|d| d.sha256() == pin) else {
        let offered = if docs.is_empty() {
            "none".to_string()
        } else {
            docs.iter()
                .map(|d| format!("v{} {}", d.version, d.sha256()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(PinError::Mismatch {
            pinned: pin.to_string(),
            offered: flotilla_proto::limits::clip(&offered, 1024),
        });
    };
    let policy = root.policy().expect("parsed documents have a valid policy");
    let Some(version) = trust::anchor(&policy, 0, &chain) else {
        tracing::warn!(
            "the server's trust policy documents do not prove which version the pinned keys \
             are; they are held without a version until one that does is offered"
        );
        return Ok(PolicyDoc {
            version: 0,
            ..root.clone()
        });
    };
    let at = PolicyDoc {
        version,
        ..root.clone()
    };
    let (reached, stopped) = trust::walk(&Held { version, policy }, &chain);
    if let Some(e) = stopped {
        tracing::warn!(held = version, error = %e, "a trust policy version was refused");
    }
    Ok(reached.unwrap_or(at))
}

/// The identity with the newest trust policy version `chain` leads to from
/// the one `node` holds, or None when nothing changes. Keys pinned without a
/// version first learn theirs from the chain (nothing new is trusted by that).
pub fn adopt(node: &Identity, chain: &[pb::SignedTrustPolicy]) -> Option<Identity> {
    if chain.is_empty() || node.trusted_keys.is_empty() {
        return None;
    }
    let policy = match TrustPolicy::new(&node.trusted_keys, node.trust_threshold as usize) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "the pinned trust policy cannot be used; newer versions are not taken");
            return None;
        }
    };
    let chain: Vec<SignedPolicy> = chain.iter().cloned().map(Into::into).collect();
    // Keys held without a version, or a version below the highest their own
    // signatures place them at, learn it first (nothing new is trusted).
    let version = match trust::anchor(&policy, node.trust_version, &chain) {
        Some(v) => v,
        None if node.trust_version == 0 => {
            tracing::warn!(
                "the keys pinned at join are no version of the fleet's trust policy that the \
                 documents offered prove; newer versions are not taken (join again with the \
                 fleet's keys)"
            );
            return None;
        }
        None => node.trust_version,
    };
    let (reached, stopped) = trust::walk(&Held { version, policy }, &chain);
    if let Some(e) = stopped {
        tracing::warn!(held = version, error = %e, "a trust policy version was refused");
    }
    let mut next = node.clone();
    match reached {
        Some(doc) => {
            tracing::info!(
                from = node.trust_version,
                to = doc.version,
                keys = doc.keys.len(),
                threshold = doc.threshold,
                "trust policy rotated"
            );
            next.trusted_keys = doc.keys;
            next.trust_threshold = doc.threshold;
            next.trust_version = doc.version;
        }
        None if version != node.trust_version => next.trust_version = version,
        None => return None,
    }
    Some(next)
}

#[cfg(test)]
mod tests {
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
            line: text.lines().last().unwrap().to_string(),
            sk: kp.sk,
            pk: kp.pk,
        }
    }

    fn signed(version: u64, keys: &[&Key], threshold: u32, by: &[&Key]) -> pb::SignedTrustPolicy {
        let doc = trust::PolicyDoc {
            version,
            keys: keys.iter().map(|k| k.line.clone()).collect(),
            threshold,
        }
        .to_bytes();
        pb::SignedTrustPolicy {
            signatures: by
                .iter()
                .map(|k| {
                    minisign::sign(Some(&k.pk), &k.sk, doc.as_slice(), None, None)
                        .unwrap()
                        .into_string()
                })
                .collect(),
            document: doc.into(),
        }
    }

    fn node(keys: &[&Key], threshold: u32, version: u64) -> Identity {
        Identity {
            node_id: "n".into(),
            group: "g".into(),
            key_pem: String::new(),
            cert_pem: String::new(),
            ca_pem: String::new(),
            servers: Vec::new(),
            token_id: String::new(),
            machine_id: "m".into(),
            renewals: 0,
            trusted_keys: keys.iter().map(|k| k.line.clone()).collect(),
            trust_threshold: threshold,
            trust_version: version,
        }
    }

    #[test]
    fn a_signed_rotation_replaces_the_pinned_keys() {
        let (a, b, c) = (key(), key(), key());
        let held = node(&[&a, &b], 2, 1);
        let v2 = signed(2, &[&b, &c], 2, &[&a, &b, &c]);
        let next = adopt(&held, &[v2]).unwrap();
        assert_eq!(next.trust_version, 2);
        assert_eq!(next.trusted_keys, vec![b.line.clone(), c.line.clone()]);
        assert_eq!(next.trust_threshold, 2);
    }

    #[test]
    fn keys_from_files_learn_their_version_then_walk() {
        let (a, b) = (key(), key());
        let held = node(&[&a], 1, 0);
        let chain = [signed(1, &[&a], 1, &[]), signed(2, &[&b], 1, &[&a, &b])];
        let next = adopt(&held, &chain).unwrap();
        assert_eq!(
            (next.trust_version, next.trusted_keys),
            (2, vec![b.line.clone()])
        );
        // Only the root in the chain: the version is learnt, the keys stay.
        let next = adopt(&held, &chain[..1]).unwrap();
        assert_eq!(
            (next.trust_version, next.trusted_keys),
            (1, vec![a.line.clone()])
        );
    }

    #[test]
    fn a_pinned_token_takes_its_policy_and_walks_on() {
        let (a, b) = (key(), key());
        let v1 = signed(1, &[&a], 1, &[]);
        let v2 = signed(2, &[&b], 1, &[&a, &b]);
        let pin = trust::policy_sha256(std::slice::from_ref(&a.line), 1);
        let got = pinned_at_join(&pin, &[v1.clone(), v2]).unwrap();
        assert_eq!((got.version, got.keys), (2, vec![b.line.clone()]));
        let only_root = pinned_at_join(&pin, &[v1]).unwrap();
        assert_eq!(only_root.version, 1);
    }

    #[test]
    fn a_policy_the_token_does_not_pin_refuses_the_join() {
        let (a, evil) = (key(), key());
        let pin = trust::policy_sha256(std::slice::from_ref(&a.line), 1);
        let e = pinned_at_join(&pin, &[signed(1, &[&evil], 1, &[])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not the one the join token pins") && e.contains(&pin),
            "{e}"
        );
        assert!(
            pinned_at_join(&pin, &[])
                .unwrap_err()
                .to_string()
                .contains("offered none")
        );
    }

    #[test]
    fn a_forged_or_old_policy_changes_nothing() {
        let (a, b, evil) = (key(), key(), key());
        let held = node(&[&a, &b], 2, 2);
        // Signed by the attacker's key only, or older than what is held.
        let forged = signed(3, &[&evil], 1, &[&evil]);
        let old = signed(1, &[&a], 1, &[&a]);
        assert!(adopt(&held, &[forged, old]).is_none());
        // Keys from files that are no version of the chain learn nothing.
        let stranger = node(&[&evil], 1, 0);
        assert!(adopt(&stranger, &[signed(1, &[&a], 1, &[])]).is_none());
    }

    #[test]
    fn an_unsigned_version_number_never_places_the_hosts_keys() {
        let (a, b, c) = (key(), key(), key());
        // The host's own keys offered unsigned as "v999", beside the real
        // chain: the real version is learnt and the rotation taken.
        let forged = signed(999, &[&a], 1, &[]);
        let v1 = signed(1, &[&a], 1, &[]);
        let v2 = signed(2, &[&b], 1, &[&a, &b]);
        let v3 = signed(3, &[&c], 1, &[&b, &c]);
        let next = adopt(
            &node(&[&a], 1, 0),
            &[forged.clone(), v1.clone(), v2.clone()],
        )
        .unwrap();
        assert_eq!(
            (next.trust_version, next.trusted_keys),
            (2, vec![b.line.clone()])
        );
        // Only the forgery: nothing learnt, and a later honest chain still walks.
        assert!(adopt(&node(&[&a], 1, 0), std::slice::from_ref(&forged)).is_none());
        // Held at v2 (b): a forged "v999" of b's keys does not hide v3.
        let held = node(&[&b], 1, 2);
        let forged_b = signed(999, &[&b], 1, &[]);
        let next = adopt(&held, &[forged_b.clone(), v3.clone()]).unwrap();
        assert_eq!(next.trust_version, 3);
        assert!(adopt(&held, &[forged_b]).is_none());
        // At join: the pin proves the keys, not a version.
        let pin = trust::policy_sha256(std::slice::from_ref(&a.line), 1);
        let got = pinned_at_join(&pin, std::slice::from_ref(&forged)).unwrap();
        assert_eq!((got.version, got.keys), (0, vec![a.line.clone()]));
        let got = pinned_at_join(&pin, &[forged, v1, v2, v3]).unwrap();
        assert_eq!((got.version, got.keys), (3, vec![c.line.clone()]));
    }
}
