//! The server's side of TLS: its certificate, taken again without a restart
//! when it changes on disk (`flotilla-server cert renew`) or renewed from the
//! CA when a third of its lifetime is left (handshakes are
//! `flotilla_proto::tls::accept`'s). Agents and the CLI pin the CA, not this
//! certificate, so sessions go on across a renewal.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::ca::{CertAuthority, TlsPaths};

/// How often the certificate files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Handshakes in progress at once, at most (the connection limits bound the
/// connections before that).
pub const MAX_HANDSHAKES: usize = 4096;

/// The server certificate in use, swapped whole when it is renewed.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// The PEM it was loaded from: a change on disk is a renewal.
    loaded_pem: RwLock<String>,
}

/// A certificate and key pair read from the data directory.
struct Pair {
    key: CertifiedKey,
    cert_pem: String,
}

fn read_pair(paths: &TlsPaths) -> anyhow::Result<Pair> {
    use anyhow::Context;
    let cert_pem = std::fs::read_to_string(&paths.server_cert)
        .with_context(|| format!("cannot read {}", paths.server_cert.display()))?;
    let key_pem = std::fs::read(&paths.server_key)
        .with_context(|| format!("cannot read {}", paths.server_key.display()))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the server certificate is not PEM")?;
    anyhow::ensure!(
        !chain.is_empty(),
        "no certificate in {}",
        paths.server_cert.display()
    );
    let key = PrivateKeyDer::from_pem_slice(&key_pem).context("the server key is not PEM")?;
    let signer = any_supported_type(&key).context("the server key cannot sign")?;
    let key = CertifiedKey::new(chain, signer);
    // A renewal writes the key, then the certificate: between the two, they
    // do not match, and the pair is taken at the next look.
    key.keys_match()
        .context("the server certificate and key do not match")?;
    Ok(Pair { key, cert_pem })
}

impl ServerCert {
    /// The pair in the data directory.
    pub fn load(paths: &TlsPaths) -> anyhow::Result<Arc<Self>> {
        let pair = read_pair(paths)?;
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(pair.key)),
            loaded_pem: RwLock::new(pair.cert_pem),
        }))
    }

    /// Takes the pair on disk if it changed; true when it did.
    fn reload(&self, paths: &TlsPaths) -> anyhow::Result<bool> {
        let on_disk = std::fs::read_to_string(&paths.server_cert)?;
        if *self.loaded_pem.read().expect("cert lock") == on_disk {
            return Ok(false);
        }
        let pair = read_pair(paths)?;
        *self.current.write().expect("cert lock") = Arc::new(pair.key);
        *self.loaded_pem.write().expect("cert lock") = pair.cert_pem;
        Ok(true)
    }

    /// The leaf certificate in use.
    fn leaf(&self) -> CertificateDer<'static> {
        self.current.read().expect("cert lock").cert[0].clone()
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock").clone())
    }
}

/// The names and validity of a certificate.
pub struct CertFacts {
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub serial_hex: String,
}

/// What a DER certificate says of itself.
pub fn cert_facts(der: &[u8]) -> anyhow::Result<CertFacts> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("the server certificate does not parse: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(ip) => {
                    match ip.len() {
                        4 => names
                            .push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip)?).to_string()),
                        16 => names
                            .push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip)?).to_string()),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertFacts {
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial_hex: hex::encode(cert.raw_serial()),
    })
}

/// Re-issues the server certificate from the CA in the data directory for
/// `names` (see `CertAuthority::write_server_cert`).
pub fn renew(paths: &TlsPaths, names: &[String]) -> anyhow::Result<CertFacts> {
    let ca = CertAuthority::load(paths)?;
    ca.write_server_cert(paths, names)?;
    let pair = read_pair(paths)?;
    cert_facts(&pair.key.cert[0])
}

/// The TLS configuration: this certificate, client certificates of the CA
/// optional (joins and operator calls come without one), HTTP/2.
pub fn server_config(cert: Arc<ServerCert>, ca_pem: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = WebPkiClientVerifier::builder(roots.into())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(config))
}

/// The dashboard's: the same certificate (renewals taken alike), no client
/// certificate asked for, HTTP/1.1.
pub fn web_config(cert: Arc<ServerCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols.push(b"http/1.1".to_vec());
    Arc::new(config)
}

/// Whether a certificate has a third of its lifetime left, or less.
fn due_for_renewal(c: &CertFacts, now: i64) -> bool {
    c.not_after - now <= (c.not_after - c.not_before) / 3
}

/// Keeps the certificate current until `shutdown`: takes a renewal made on
/// disk, and renews it from the CA when a third of its lifetime is left.
/// Every change is logged and handed to `changed` (which audits it).
pub async fn keep_current(
    cert: Arc<ServerCert>,
    paths: TlsPaths,
    shutdown: CancellationToken,
    changed: impl Fn(CertFacts, &'static str),
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        match cert.reload(&paths) {
            Ok(true) => {
                if let Ok(f) = cert_facts(&cert.leaf()) {
                    tracing::info!(serial = %f.serial_hex, names = ?f.names, not_after = f.not_after, "took the renewed server certificate");
                    changed(f, "renewed on disk");
                }
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("the server certificate on disk cannot be taken yet: {e:#}");
                continue;
            }
        }
        let Ok(facts) = cert_facts(&cert.leaf()) else {
            continue;
        };
        if !due_for_renewal(&facts, crate::model::now_secs()) {
            continue;
        }
        match renew(&paths, &facts.names) {
            Ok(_) => {
                tracing::info!(names = ?facts.names, "renewing the server certificate: a third of its lifetime is left")
            }
            Err(e) => tracing::error!("cannot renew the server certificate: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let c = CertFacts {
            names: vec!["fleet".into()],
            not_before: 0,
            not_after: 300,
            serial_hex: "01".into(),
        };
        assert!(!due_for_renewal(&c, 0));
        assert!(!due_for_renewal(&c, 199));
        assert!(due_for_renewal(&c, 200));
        assert!(due_for_renewal(&c, 400), "and past its end");
    }

    #[test]
    fn a_renewed_pair_is_taken_only_once_key_and_certificate_match() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::in_dir(dir.path());
        let ca = CertAuthority::create(&paths, &["fleet.test".into()]).unwrap();
        let cert = ServerCert::load(&paths).unwrap();
        let first = cert_facts(&cert.leaf()).unwrap();
        assert_eq!(first.names, vec!["fleet.test".to_string()]);
        assert!(!cert.reload(&paths).unwrap(), "nothing changed");
        // Half a renewal: a new key beside the old certificate.
        let key = std::fs::read(&paths.server_key).unwrap();
        ca.write_server_cert(&paths, &["fleet.test".into(), "other.test".into()])
            .unwrap();
        let renewed_cert = std::fs::read(&paths.server_cert).unwrap();
        let new_key = std::fs::read(&paths.server_key).unwrap();
        std::fs::write(&paths.server_key, &key).unwrap();
        assert!(
            cert.reload(&paths).is_err(),
            "a mismatched pair is not taken"
        );
        assert_eq!(
            cert_facts(&cert.leaf()).unwrap().serial_hex,
            first.serial_hex
        );
        std::fs::write(&paths.server_key, &new_key).unwrap();
        std::fs::write(&paths.server_cert, &renewed_cert).unwrap();
        assert!(cert.reload(&paths).unwrap());
        let now = cert_facts(&cert.leaf()).unwrap();
        assert_ne!(now.serial_hex, first.serial_hex);
        assert_eq!(
            now.names,
            vec!["fleet.test".to_string(), "other.test".to_string()]
        );
    }
}
