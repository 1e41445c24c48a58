//! The fleet's TLS certificate authority: created on `init`, it signs the server's
//! own certificate and every node's short-lived client certificate. It is separate
//! from the patch-signing keys, which never live on the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;

/// Why the CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("{0}")]
    Other(String),
}

/// Paths of the TLS material in a data directory.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TlsPaths {
    pub fn in_dir(data_dir: &Path) -> Self {
        let d = data_dir.join("tls");
        Self {
            ca_cert: d.join("ca.pem"),
            ca_key: d.join("ca.key"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
        }
    }
}

/// A certificate the CA issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: i64,
    /// Hex of the certified key's raw ECDSA P-256 point ("" for another
    /// kind of key): what a later proof of this key is checked against.
    pub public_key_hex: String,
}

/// The loaded CA: its certificate and the key that signs with it.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename), with
/// owner-only permissions when `secret`.
pub fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), CaError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mode = if secret { 0o600 } else { 0o644 };
    flotilla_proto::durable::write_atomic(path, contents, mode).map_err(io_err("write", path))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte: a 127-bit random serial.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl CertAuthority {
    /// Creates a new CA and a server certificate for `names` (DNS names or IPs),
    /// writing both into `paths`. Refuses to overwrite an existing CA.
    pub fn create(paths: &TlsPaths, names: &[String]) -> Result<Self, CaError> {
        if paths.ca_cert.exists() {
            return Err(CaError::Other(format!(
                "a CA already exists at {}; refusing to replace it (every joined node trusts it)",
                paths.ca_cert.display()
            )));
        }
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Flotilla fleet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        let ca_cert = params.self_signed(&ca_key)?;
        write_atomic(&paths.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
        write_atomic(&paths.ca_cert, ca_cert.pem().as_bytes(), false)?;
        let ca = Self::load(paths)?;
        ca.write_server_cert(paths, names)?;
        Ok(ca)
    }

    /// Loads the CA from `paths`.
    pub fn load(paths: &TlsPaths) -> Result<Self, CaError> {
        let cert_pem =
            std::fs::read_to_string(&paths.ca_cert).map_err(io_err("read", &paths.ca_cert))?;
        let key_pem =
            std::fs::read_to_string(&paths.ca_key).map_err(io_err("read", &paths.ca_key))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        let fingerprint = flotilla_proto::tls::pem_fingerprint(&cert_pem)
            .map_err(|e| CaError::Other(e.to_string()))?;
        Ok(Self {
            cert_pem,
            issuer,
            fingerprint,
        })
    }

    /// The CA as one PEM text (certificate, then private key), for a new
    /// replica of the same fleet: `import` takes it.
    pub fn export_bundle(paths: &TlsPaths) -> Result<String, CaError> {
        let cert =
            std::fs::read_to_string(&paths.ca_cert).map_err(io_err("read", &paths.ca_cert))?;
        let key = std::fs::read_to_string(&paths.ca_key).map_err(io_err("read", &paths.ca_key))?;
        Ok(format!("{}\n{key}", cert.trim_end_matches('\n')))
    }

    /// Writes the CA of `bundle` (from `export_bundle`) into `paths`, after
    /// checking the key is the certificate's and it is a CA. Refuses to
    /// replace a CA.
    pub fn import(paths: &TlsPaths, bundle: &str) -> Result<Self, CaError> {
        if paths.ca_cert.exists() {
            return Err(CaError::Other(format!(
                "a CA already exists at {}; refusing to replace it",
                paths.ca_cert.display()
            )));
        }
        let block = |label: &str| -> Result<String, CaError> {
            let begin = format!("-----BEGIN {label}-----");
            let end = format!("-----END {label}-----");
            let from = bundle
                .find(&begin)
                .ok_or_else(|| CaError::Other(format!("the CA bundle has no {label} block")))?;
            let to = bundle[from..].find(&end).ok_or_else(|| {
                CaError::Other(format!("the CA bundle's {label} block is cut off"))
            })?;
            Ok(format!("{}\n", &bundle[from..from + to + end.len()]))
        };
        let cert_pem = block("CERTIFICATE")?;
        let key_pem = block("PRIVATE KEY")?;
        let key = KeyPair::from_pem(&key_pem)?;
        let bad = |e: String| CaError::Other(format!("the CA bundle's certificate: {e}"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::Other(
                "the CA bundle's certificate is not a CA".into(),
            ));
        }
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CaError::Other(
                "the CA bundle's private key is not its certificate's".into(),
            ));
        }
        write_atomic(&paths.ca_key, key_pem.as_bytes(), true)?;
        write_atomic(&paths.ca_cert, cert_pem.as_bytes(), false)?;
        Self::load(paths)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Hex SHA-256 of the CA certificate: what join tokens pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Issues the server's TLS certificate for `names` (2 years).
    pub fn write_server_cert(&self, paths: &TlsPaths, names: &[String]) -> Result<(), CaError> {
        if names.is_empty() {
            return Err(CaError::Other(
                "the server certificate needs at least one name (--name)".into(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla-server");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + Duration::from_secs(2 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        write_atomic(&paths.server_key, key.serialize_pem().as_bytes(), true)?;
        // The chain includes the CA so agents can pin it by fingerprint at join.
        let chain = format!("{}{}", cert.pem(), self.cert_pem);
        write_atomic(&paths.server_cert, chain.as_bytes(), false)?;
        Ok(())
    }

    /// Issues a node's client certificate from a CSR. Only the CSR's public key is
    /// used: subject, CA flag, usages, serial and lifetime are the server's own.
    pub fn issue_node_cert(
        &self,
        csr_der: &[u8],
        node_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        if csr_der.len() > flotilla_proto::limits::MAX_CSR_BYTES {
            return Err(CaError::BadCsr(format!(
                "larger than {} bytes",
                flotilla_proto::limits::MAX_CSR_BYTES
            )));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A client of the servers, and the server of its site's peers, under
        // a name no real server can have (see `flotilla_proto::site`).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.subject_alt_names = vec![SanType::DnsName(
            flotilla_proto::site::server_name(node_id)
                .try_into()
                .map_err(|e| CaError::BadCsr(format!("node id {node_id:?}: {e}")))?,
        )];
        // A little slack for clocks that run behind, small against the lifetime so
        // that "renew at two thirds" stays well after issue.
        params.not_before = now - (lifetime / 10).min(Duration::from_secs(300));
        params.not_after = now + lifetime;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let public_key_hex = if csr.public_key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            hex::encode(rcgen::PublicKeyData::der_bytes(&csr.public_key))
        } else {
            String::new()
        };
        Ok(IssuedCert {
            pem: cert.pem(),
            serial_hex,
            not_after: params.not_after.unix_timestamp(),
            public_key_hex,
        })
    }
}

/// The subject prefix of a replica's client certificate (node ids start
/// with `node-`: the server names both, so neither can pass for the other).
pub const REPLICA_CN_PREFIX: &str = "replica-";

impl CertAuthority {
    /// A client certificate (PEM) and its key (PEM) for replica `id` to call
    /// the other replicas with, valid for `lifetime`. Never written to disk.
    pub fn issue_replica_cert(
        &self,
        id: &str,
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{REPLICA_CN_PREFIX}{id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The node id (certificate subject CN) of a client certificate, DER.
pub fn node_id_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cert_ignores_what_the_csr_asks_for() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::in_dir(dir.path());
        let ca = CertAuthority::create(&paths, &["localhost".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        asked
            .distinguished_name
            .push(DnType::CommonName, "flotilla-server");
        asked.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = asked.serialize_request(&key).unwrap();
        let issued = ca
            .issue_node_cert(csr.der(), "node-abc", Duration::from_secs(3600))
            .unwrap();
        let der = flotilla_proto::tls::first_pem_der(&issued.pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(node_id_of(&der).unwrap(), "node-abc");
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth && !eku.any);
        // Its one name is the site-peer name no server can have, not the
        // CSR's.
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["DNSName(node-abc.node.flotilla.invalid)"]);
        // The node's own key is in the certificate.
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertAuthority::create(&TlsPaths::in_dir(dir.path()), &["localhost".into()]).unwrap();
        let err = ca
            .issue_node_cert(b"not a csr", "node-x", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn refuses_to_replace_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::in_dir(dir.path());
        CertAuthority::create(&paths, &["localhost".into()]).unwrap();
        assert!(CertAuthority::create(&paths, &["localhost".into()]).is_err());
        assert!(CertAuthority::load(&paths).is_ok());
    }

    #[test]
    fn a_ca_bundle_moves_the_ca_and_a_wrong_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            TlsPaths::in_dir(&dir.path().join("a")),
            TlsPaths::in_dir(&dir.path().join("b")),
        );
        let ca = CertAuthority::create(&a, &["a".into()]).unwrap();
        let bundle = CertAuthority::export_bundle(&a).unwrap();
        let imported = CertAuthority::import(&b, &bundle).unwrap();
        assert_eq!(imported.fingerprint(), ca.fingerprint());
        // It signs: a server certificate of its own for other names.
        imported.write_server_cert(&b, &["b".into()]).unwrap();
        assert!(CertAuthority::import(&b, &bundle).is_err(), "replaced a CA");
        // Another CA's key with this certificate; the server certificate (not
        // a CA) with its key; a bundle cut short.
        let other = TlsPaths::in_dir(&dir.path().join("other"));
        CertAuthority::create(&other, &["o".into()]).unwrap();
        let other_key = std::fs::read_to_string(&other.ca_key).unwrap();
        let cert = std::fs::read_to_string(&a.ca_cert).unwrap();
        let server_cert = std::fs::read_to_string(&a.server_cert).unwrap();
        let server_key = std::fs::read_to_string(&a.server_key).unwrap();
        let leaf = server_cert
            .split("-----END CERTIFICATE-----")
            .next()
            .unwrap()
            .to_string()
            + "-----END CERTIFICATE-----\n";
        for (n, (bad, why)) in [
            (format!("{cert}{other_key}"), "not its certificate's"),
            (format!("{leaf}{server_key}"), "is not a CA"),
            (cert.clone(), "no PRIVATE KEY block"),
        ]
        .into_iter()
        .enumerate()
        {
            let to = TlsPaths::in_dir(&dir.path().join(format!("bad{n}")));
            let err = CertAuthority::import(&to, &bad)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(why), "{err}");
            assert!(!to.ca_key.exists(), "a refused bundle left its key");
        }
    }
}
