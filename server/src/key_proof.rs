//! Checking a node's proof of its key (`flotilla_proto::key_proof`): an ECDSA
//! P-256 signature by the key of the node's current certificate, over what the
//! caller asks for, made within a few minutes of now.

use flotilla_proto::key_proof::{MAX_SKEW_SECS, message};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

use crate::error::{Error, Result};
use crate::model::NodeRecord;

/// A proof as a caller sends it.
#[derive(Debug, Clone)]
pub struct KeyProof {
    pub node_id: String,
    pub at_unix: i64,
    pub signature: Vec<u8>,
}

/// Longest signature accepted (a DER ECDSA P-256 signature is at most 72 bytes).
const MAX_SIGNATURE_BYTES: usize = 128;

/// Checks that `proof` was made for `purpose` and `csr_der` by the key of
/// `node`'s current certificate, at most [`MAX_SKEW_SECS`] from `now`.
pub fn verify(
    node: &NodeRecord,
    purpose: &str,
    csr_der: &[u8],
    proof: &KeyProof,
    now: i64,
) -> Result<()> {
    let refused = |why: &str| {
        Error::PermissionDenied(format!(
            "the proof of node {}'s key is not valid: {why}",
            node.id
        ))
    };
    if proof.node_id != node.id {
        return Err(refused("it names another node"));
    }
    if (proof.at_unix - now).abs() > MAX_SKEW_SECS {
        return Err(refused(
            "it was not made within 5 minutes of now (check the host's clock)",
        ));
    }
    if proof.signature.len() > MAX_SIGNATURE_BYTES {
        return Err(refused("the signature is too long"));
    }
    let key = hex::decode(&node.public_key)
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| refused("the server holds no key it can check for this node"))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(
            &message(purpose, &node.id, csr_der, proof.at_unix),
            &proof.signature,
        )
        .map_err(|_| refused("the signature does not verify with the node's key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::key_proof::REJOIN;
    use rcgen::{KeyPair, SigningKey};

    fn node(key: &KeyPair) -> NodeRecord {
        let mut n: NodeRecord = serde_json::from_value(serde_json::json!({
            "id": "node-1", "group": "g", "status": "accepted", "role": "active",
            "facts": {"hostname": "h", "os": "linux", "arch": "x86_64", "agent_version": "0", "machine_id": "m"},
            "labels": {}, "joined_at": 0, "token_id": "t", "cert_serial": "00", "cert_not_after": 0,
            "prev_cert_serial": "", "revision": 1, "last_seen": 0, "installed": {}
        }))
        .unwrap();
        n.public_key = hex::encode(key.public_key_raw());
        n
    }

    fn proof(key: &KeyPair, purpose: &str, csr: &[u8], at: i64) -> KeyProof {
        KeyProof {
            node_id: "node-1".into(),
            at_unix: at,
            signature: key.sign(&message(purpose, "node-1", csr, at)).unwrap(),
        }
    }

    #[test]
    fn only_the_nodes_key_for_this_csr_and_now_passes() {
        let key = KeyPair::generate().unwrap();
        let n = node(&key);
        verify(&n, REJOIN, b"csr", &proof(&key, REJOIN, b"csr", 1000), 1000).unwrap();
        let other = KeyPair::generate().unwrap();
        for (p, now, why) in [
            (proof(&other, REJOIN, b"csr", 1000), 1000, "does not verify"),
            (
                proof(&key, "reenroll", b"csr", 1000),
                1000,
                "does not verify",
            ),
            (proof(&key, REJOIN, b"other", 1000), 1000, "does not verify"),
            (
                proof(&key, REJOIN, b"csr", 1000),
                1000 + MAX_SKEW_SECS + 1,
                "5 minutes",
            ),
        ] {
            let e = verify(&n, REJOIN, b"csr", &p, now).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        let mut unknown = n.clone();
        unknown.public_key.clear();
        let e = verify(
            &unknown,
            REJOIN,
            b"csr",
            &proof(&key, REJOIN, b"csr", 1000),
            1000,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no key"), "{e}");
    }
}
