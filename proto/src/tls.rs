//! TLS pieces shared by the agent and the CLI: fetching a server's CA by its pinned
//! fingerprint (trust on first contact, checked before any secret is sent) and
//! building gRPC endpoints that trust only that CA.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};

/// Why a server could not be reached or trusted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error(
        "the server at {url} is not the one the join token names: none of its certificates has \
         fingerprint {expected} (check the server URL, or ask for a token from this server)"
    )]
    FingerprintMismatch { url: String, expected: String },
    #[error("TLS handshake with {url} failed: {source}")]
    Handshake { url: String, source: std::io::Error },
    #[error("invalid TLS material: {0}")]
    Material(String),
}

/// The TLS connections of `incoming`: handshakes run up to `max_handshakes`
/// at a time, each given `timeout`; a connection whose handshake fails or takes longer is
/// dropped (and so closed).
pub fn accept<S, IO>(
    incoming: S,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
    max_handshakes: usize,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<IO>>>
where
    S: futures::Stream<Item = std::io::Result<IO>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures::StreamExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    incoming
        .map(move |conn| {
            let acceptor = acceptor.clone();
            // Each handshake on a task of its own: they are spread over every
            // core, as the CPU of a reconnect storm needs.
            tokio::spawn(async move {
                let conn = conn.ok()?;
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => Some(tls),
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake failed: {e}");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake took longer than {timeout:?}");
                        None
                    }
                }
            })
        })
        .buffer_unordered(max_handshakes)
        .filter_map(|done| async move { done.ok().flatten().map(Ok) })
}

/// Host and port of an `https://host:port` URL.
pub fn host_port(url: &str) -> Result<(String, u16), TlsError> {
    let bad = |reason: &str| TlsError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Captures the CA certificate whose fingerprint matches, then verifies the server
/// certificate against that CA alone.
#[derive(Debug)]
struct PinningVerifier {
    expected: String,
    found: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::sha256_hex(c) == self.expected)
            .ok_or_else(|| rustls::Error::General("CA fingerprint mismatch".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().expect("pin lock") = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to `url`, and returns the server's CA certificate (PEM) if one
/// certificate of the chain it presents has SHA-256 `fingerprint` and the server
/// certificate verifies against it. Only a TLS handshake takes place: nothing
/// secret is sent, so a wrong server learns nothing.
pub async fn fetch_pinned_ca(url: &str, fingerprint: &str) -> Result<String, TlsError> {
    let (host, port) = host_port(url)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinningVerifier {
        expected: fingerprint.to_string(),
        found: Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Material(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let server_name = ServerName::try_from(host.clone()).map_err(|_| TlsError::Url {
        url: url.to_string(),
        reason: "invalid host name".into(),
    })?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| TlsError::Connect {
        url: url.to_string(),
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| TlsError::Connect {
        url: url.to_string(),
        source,
    })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .map_err(|_| TlsError::Handshake {
            url: url.to_string(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?;
    let found = verifier.found.lock().expect("pin lock").take();
    match (result, found) {
        (Ok(_stream), Some(ca)) => Ok(pem_encode("CERTIFICATE", &ca)),
        (Err(e), None) if e.to_string().contains("CA fingerprint mismatch") => {
            Err(TlsError::FingerprintMismatch {
                url: url.to_string(),
                expected: fingerprint.to_string(),
            })
        }
        (Err(source), _) => Err(TlsError::Handshake {
            url: url.to_string(),
            source,
        }),
        (Ok(_), None) => Err(TlsError::FingerprintMismatch {
            url: url.to_string(),
            expected: fingerprint.to_string(),
        }),
    }
}

/// PEM-encodes one DER block.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// SHA-256 fingerprint of the first certificate in a PEM string.
pub fn pem_fingerprint(pem: &str) -> Result<String, TlsError> {
    let der = first_pem_der(pem)?;
    Ok(crate::sha256_hex(&der))
}

/// DER of the first certificate in a PEM string.
pub fn first_pem_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| TlsError::Material(format!("not a PEM certificate: {e}")))?;
    Ok(p.contents)
}

/// A gRPC endpoint for `url` that trusts only `ca_pem` and, for mutual TLS,
/// presents `identity` (certificate PEM, key PEM).
pub fn endpoint(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, TlsError> {
    let (host, _) = host_port(url)?;
    endpoint_named(url, &host, ca_pem, identity)
}

/// [`endpoint`], checking the server's certificate for `name` rather than
/// the URL's host (a site peer, reached by address, is named by its node).
pub fn endpoint_named(
    url: &str,
    name: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, TlsError> {
    host_port(url)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| TlsError::Url {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(|e| TlsError::Material(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    Ok(endpoint)
}
