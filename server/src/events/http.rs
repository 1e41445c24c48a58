//! One HTTP(S) POST to a webhook: a fresh connection per delivery (webhooks
//! are few and events rare; a receiver that restarts is reached without
//! stale pooled connections), HTTP/1.1, bounded in time and in what is read
//! back. HTTPS trusts the webhook's own CA when it has one, else the host's
//! CA bundle.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Where Debian keeps the CAs the host trusts.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Most of a receiver's answer read (for the error text).
const MAX_ANSWER: usize = 1024;

/// A webhook URL, checked: http or https, a host, a port.
#[derive(Debug, Clone)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?}: a webhook URL is http:// or https://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(Self {
            https,
            host,
            port,
            path,
        })
    }
}

fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let pem = if ca_pem.is_empty() {
        std::fs::read(HOST_CA_BUNDLE)
            .map_err(|e| format!("cannot read the host's CA bundle {HOST_CA_BUNDLE}: {e}"))?
    } else {
        ca_pem.as_bytes().to_vec()
    };
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("bad CA certificate: {e}"))?;
        // The host's bundle may hold a certificate rustls cannot use: skip it.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err("no usable CA certificate to check the receiver's with".into());
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// POSTs `body` with `headers`; the receiver's status, or why there is none.
pub async fn post(
    target: &Target,
    ca_pem: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<u16, String> {
    tokio::time::timeout(timeout, post_now(target, ca_pem, headers, body))
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
}

async fn post_now(
    target: &Target,
    ca_pem: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
    let _ = tcp.set_nodelay(true);
    if target.https {
        let name = ServerName::try_from(target.host.clone())
            .map_err(|e| format!("{:?} is not a TLS name: {e}", target.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config(ca_pem)?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {} failed: {e}", target.host))?;
        send(TokioIo::new(tls), target, headers, body).await
    } else {
        send(TokioIo::new(tcp), target, headers, body).await
    }
}

async fn send<T>(
    io: TokioIo<T>,
    target: &Target,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<u16, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let host = if (target.https && target.port == 443) || (!target.https && target.port == 80) {
        target.host.clone()
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let mut req = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("flotilla-server/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot make the request: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = res.status();
    // A bounded look at the answer, for the error text.
    let mut answer = Vec::new();
    let mut b = res.into_body();
    while answer.len() < MAX_ANSWER {
        match b.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    answer.extend_from_slice(&d[..d.len().min(MAX_ANSWER - answer.len())]);
                }
            }
            _ => break,
        }
    }
    conn.abort();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        let text = String::from_utf8_lossy(&answer);
        Err(format!(
            "answered {status}{}",
            if text.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", flotilla_proto::limits::clip(text.trim(), 200))
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertAuthority, TlsPaths};

    /// An HTTPS receiver with a certificate for `localhost` from its own CA,
    /// answering `status`; returns its port, its CA and what it received.
    async fn receiver(
        dir: &std::path::Path,
        status: u16,
    ) -> (u16, String, tokio::sync::mpsc::Receiver<(String, Vec<u8>)>) {
        let paths = TlsPaths::in_dir(dir);
        let ca = CertAuthority::create(&paths, &["localhost".into()]).unwrap();
        let cert = crate::tls::ServerCert::load(&paths).unwrap();
        let tls = crate::tls::server_config(cert, ca.cert_pem()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls.clone())
                    .accept(tcp)
                    .await
                else {
                    continue;
                };
                let tx = tx.clone();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let sig = req
                                .headers()
                                .get("flotilla-signature")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let _ = tx.send((sig, body)).await;
                            let mut res =
                                hyper::Response::new(Full::new(Bytes::from_static(b"nope")));
                            *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (port, ca.cert_pem().to_string(), rx)
    }

    #[tokio::test]
    async fn an_https_receiver_is_reached_with_its_ca_and_refused_without() {
        let dir = tempfile::tempdir().unwrap();
        let (port, ca, mut got) = receiver(dir.path(), 204).await;
        let target = Target::parse(&format!("https://localhost:{port}/hook?x=1")).unwrap();
        assert_eq!(target.path, "/hook?x=1");
        let headers = [("flotilla-signature", "t=1,v1=ab".to_string())];
        let status = post(
            &target,
            &ca,
            &headers,
            b"{}".to_vec(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(status, 204);
        let (sig, body) = got.recv().await.unwrap();
        assert_eq!((sig.as_str(), body.as_slice()), ("t=1,v1=ab", &b"{}"[..]));

        // Another CA: the receiver is not trusted, and nothing is sent.
        let other = tempfile::tempdir().unwrap();
        let (_, other_ca, _) = receiver(other.path(), 204).await;
        let err = post(
            &target,
            &other_ca,
            &headers,
            b"{}".to_vec(),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(err.contains("TLS"), "{err}");
        assert!(got.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_error_answer_is_a_failed_delivery_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (port, ca, _got) = receiver(dir.path(), 503).await;
        let target = Target::parse(&format!("https://localhost:{port}/")).unwrap();
        let err = post(&target, &ca, &[], b"{}".to_vec(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(err.contains("503") && err.contains("nope"), "{err}");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("https:///nohost").is_err());
    }
}
