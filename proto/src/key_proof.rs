//! Proof that a caller holds a node's enrolled private key, for the calls made
//! without a valid client certificate: a re-join that keeps its node, and the
//! renewal of a certificate that expired while the host was away. The agent
//! signs, with the key the server issued the node's certificate for, a message
//! naming what it asks for, the node, the new CSR and the time; the server
//! checks it against the public key it recorded. A proof answers for one CSR
//! (whose key only the agent holds), so a replayed one gets nobody a usable
//! certificate.

/// Re-joining with a token, keeping the node.
pub const REJOIN: &str = "rejoin";
/// Renewing a certificate that expired.
pub const REENROLL: &str = "reenroll";
/// How far the signer's clock may be from the server's.
pub const MAX_SKEW_SECS: i64 = 300;

/// The bytes signed.
pub fn message(purpose: &str, node_id: &str, csr_der: &[u8], at_unix: i64) -> Vec<u8> {
    format!(
        "flotilla-key-proof\n{purpose}\n{node_id}\n{}\n{at_unix}",
        crate::sha256_hex(csr_der)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_in_the_message() {
        let m = message(REJOIN, "node-1", b"csr", 7);
        let other = [
            message(REENROLL, "node-1", b"csr", 7),
            message(REJOIN, "node-2", b"csr", 7),
            message(REJOIN, "node-1", b"csr2", 7),
            message(REJOIN, "node-1", b"csr", 8),
        ];
        assert!(other.iter().all(|o| *o != m));
    }
}
