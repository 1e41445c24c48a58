//! A browser's requests to the dashboard without a browser: plain HTTPS/1.1
//! requests (trusting the fleet's CA) whose cookies and headers a test sets
//! and reads itself, for the HTTP-level tests of the dashboard.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;

use crate::{Server, wait_until};

/// The dashboard of a server run with `--web-listen`.
pub struct Dashboard {
    pub addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Runtime,
}

/// One answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every `Set-Cookie` line.
    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `name=value` of the cookie `name` this answer sets (non-empty).
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies().into_iter().find_map(|c| {
            let pair = c.split(';').next()?.trim();
            let (n, v) = pair.split_once('=')?;
            (n == name && !v.is_empty()).then(|| pair.to_string())
        })
    }

    /// The value of the first hidden `csrf` field in the page.
    pub fn csrf(&self) -> Option<String> {
        let at = self.body.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
        Some(self.body[at..].split('"').next()?.to_string())
    }
}

/// `application/x-www-form-urlencoded` of `fields`.
pub fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Dashboard {
    /// The dashboard of `server` (started with `--web-listen 127.0.0.1:0`).
    pub fn of(server: &Server) -> Self {
        let file = server.data_dir.join("web.addr");
        let addr = wait_until("the dashboard to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&file).ok()?.trim().parse().ok()
        });
        Self::at(addr, &server.ca_pem())
    }

    /// The dashboard at `addr`, whose certificate is from the CA in `ca_pem`.
    pub fn at(addr: SocketAddr, ca_pem: &str) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA cert");
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            addr,
            tls: Arc::new(tls),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A fresh HTTP/1.1 connection over TLS.
    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the dashboard");
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        send
    }

    /// One request on a fresh connection; `headers` as given (a `Host`
    /// header is added).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        self.rt.block_on(async {
            let mut send = self.connect().await;
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", self.addr.to_string());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
                .await
                .expect("an answer in time")
                .expect("an answer");
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            Answer {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            }
        })
    }

    /// Follows a server-sent event stream: each chunk of the body, as it
    /// comes, is sent to `chunks` until the stream ends (then the status).
    pub fn follow(&self, path: &str, cookie: &str, chunks: std::sync::mpsc::Sender<String>) -> u16 {
        self.rt.block_on(async {
            let mut send = self.connect().await;
            let req = hyper::Request::get(path)
                .header("host", self.addr.to_string())
                .header("cookie", cookie)
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = send.send_request(req).await.expect("an answer");
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref()
                    && chunks
                        .send(String::from_utf8_lossy(data).into_owned())
                        .is_err()
                {
                    break;
                }
            }
            status
        })
    }

    pub fn get(&self, path: &str, cookie: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        self.request("GET", path, &headers, "")
    }

    /// A form posted as a same-origin browser posts it.
    pub fn post(&self, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Answer {
        let origin = self.url();
        let mut headers = vec![
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", origin.as_str()),
            ("sec-fetch-site", "same-origin"),
        ];
        if let Some(c) = cookie {
            headers.push(("cookie", c));
        }
        self.request("POST", path, &headers, &form(fields))
    }

    /// Signs in with a credential file's text; the session cookie
    /// (`name=value`) and its CSRF token.
    pub fn sign_in(&self, credential_file: &std::path::Path) -> (String, String) {
        let page = self.get("/signin", None);
        let pre = page
            .cookie("__Host-flotilla-signin")
            .expect("sign-in cookie");
        let csrf = page.csrf().expect("sign-in form token");
        let text = std::fs::read_to_string(credential_file).expect("credential file");
        let done = self.post(
            "/signin",
            Some(&pre),
            &[("csrf", &csrf), ("credential", &text)],
        );
        assert_eq!(done.status, 303, "sign-in: {}", done.body);
        let session = done
            .cookie("__Host-flotilla-session")
            .expect("a session cookie");
        let home = self.get("/", Some(&session));
        assert_eq!(home.status, 200, "{}", home.body);
        let csrf = home.csrf().expect("the page's CSRF token");
        (session, csrf)
    }
}
