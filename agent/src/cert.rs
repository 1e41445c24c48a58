//! The node's key and certificate: generating a key pair and CSR (the private key
//! never leaves the host), reading what the server issued, and deciding when to renew.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};

/// Common name of every CSR; the server ignores the subject and names the
/// certificate after the node id it assigns.
pub const CSR_COMMON_NAME: &str = "flotilla-agent";

/// Why key or certificate material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate the node key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the node certificate is not a valid PEM X.509 certificate: {0}")]
    Parse(String),
    #[error("the certificate the server issued does not carry this node's public key")]
    KeyMismatch,
}

/// A fresh key pair and the CSR that asks for a certificate on it.
pub struct KeyAndCsr {
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
    /// The raw public key (the bits of SubjectPublicKeyInfo): what the issued
    /// certificate must carry.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr").finish_non_exhaustive()
    }
}

/// Generates a P-256 key pair and a CSR for it.
pub fn new_key_and_csr() -> Result<KeyAndCsr, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CSR_COMMON_NAME);
    params.distinguished_name = name;
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_der: csr.der().to_vec(),
        public_key: key.der_bytes().to_vec(),
    })
}

/// What the agent needs to know about its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lower-case hex of its raw bytes.
    pub serial_hex: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// The raw public key (the bits of SubjectPublicKeyInfo). Compared without its
    /// algorithm wrapper, which encoders may spell differently.
    pub public_key: Vec<u8>,
}

/// Reads the first certificate of a PEM string.
pub fn cert_info(pem: &str) -> Result<CertInfo, CertError> {
    let der =
        flotilla_proto::tls::first_pem_der(pem).map_err(|e| CertError::Parse(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Parse(e.to_string()))?;
    let validity = cert.validity();
    Ok(CertInfo {
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

impl CertInfo {
    /// Checks the certificate carries `public_key`: a server bug or a crossed
    /// response must not leave the node with a certificate it cannot use.
    pub fn check_key(&self, public_key: &[u8]) -> Result<(), CertError> {
        if self.public_key == public_key {
            Ok(())
        } else {
            Err(CertError::KeyMismatch)
        }
    }

    /// When to renew, Unix seconds: see [`renewal_deadline`].
    pub fn renew_at(&self) -> i64 {
        renewal_deadline(self.not_before, self.not_after)
    }
}

/// The moment two thirds of a certificate's lifetime have passed, Unix seconds.
/// Renewing then leaves a third of the lifetime to ride out a server outage.
pub fn renewal_deadline(not_before: i64, not_after: i64) -> i64 {
    let lifetime = i128::from(not_after) - i128::from(not_before);
    let at = i128::from(not_before) + lifetime.max(0) * 2 / 3;
    // Both ends are i64, so a point between them fits.
    i64::try_from(at).unwrap_or(not_after)
}

/// Current time, Unix seconds.
pub fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// How long from `now` until Unix second `at` (zero if it has passed).
pub fn until(at: i64, now: i64) -> Duration {
    Duration::from_secs(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
}

/// Proof that this host holds `node`'s key (see `flotilla_proto::key_proof`),
/// made for `purpose` and the new CSR `csr_der`.
pub fn prove_key(
    node: &crate::state::Identity,
    purpose: &str,
    csr_der: &[u8],
) -> Result<flotilla_proto::pb::KeyProof, CertError> {
    use rcgen::SigningKey;
    let key = KeyPair::from_pem(&node.key_pem)?;
    let at_unix = unix_now();
    let message = flotilla_proto::key_proof::message(purpose, &node.node_id, csr_der, at_unix);
    Ok(flotilla_proto::pb::KeyProof {
        node_id: node.node_id.clone(),
        at_unix,
        signature: key.sign(&message)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_two_thirds_into_the_lifetime() {
        assert_eq!(renewal_deadline(1000, 1300), 1200);
        assert_eq!(renewal_deadline(0, 90 * 24 * 3600), 60 * 24 * 3600);
        // A degenerate certificate renews at once.
        assert_eq!(renewal_deadline(500, 500), 500);
        assert_eq!(renewal_deadline(500, 400), 500);
        // No overflow at the extremes.
        assert!(renewal_deadline(i64::MIN, i64::MAX) > 0);
    }

    #[test]
    fn until_saturates_at_zero() {
        assert_eq!(until(110, 100), Duration::from_secs(10));
        assert_eq!(until(90, 100), Duration::ZERO);
    }

    #[test]
    fn csr_and_issued_certificate_agree_on_the_key() {
        let kc = new_key_and_csr().unwrap();
        let csr =
            rcgen::CertificateSigningRequestParams::from_der(&kc.csr_der.clone().into()).unwrap();
        let cn = csr.params.distinguished_name.get(&DnType::CommonName);
        assert!(matches!(cn, Some(rcgen::DnValue::Utf8String(s)) if s == CSR_COMMON_NAME));

        // Issue a certificate for the CSR's key, as the server does.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params = CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 4);
        params.serial_number = Some(vec![0x0a, 0xbc].into());
        let issued = params.signed_by(&csr.public_key, &issuer).unwrap();
        drop(ca);

        let info = cert_info(&issued.pem()).unwrap();
        assert_eq!(info.serial_hex, "0abc");
        assert_eq!(info.not_after - info.not_before, 3 * 24 * 3600);
        assert_eq!(info.renew_at(), info.not_before + 2 * 24 * 3600);
        info.check_key(&kc.public_key).unwrap();
        let other = new_key_and_csr().unwrap();
        assert!(matches!(
            info.check_key(&other.public_key),
            Err(CertError::KeyMismatch)
        ));
        assert!(cert_info("not a pem").is_err());
    }
}
