//! A bare HTTP/2 client over TLS, frame by frame, for tests of what a peer
//! that does not play by the rules can make the server hold: streams past the
//! server's limit, bodies never finished, a connection that sends one request
//! and then idles. Real clients (tonic) queue streams and finish bodies, so
//! they cannot be made to do that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// Settings.
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
/// RST_STREAM's code for a stream the server would not take.
pub const REFUSED_STREAM: u32 = 0x7;
/// The largest frame payload a peer must accept before it says otherwise.
pub const MAX_FRAME: usize = 16 * 1024;
/// The flow-control window every stream and the connection start with.
pub const DEFAULT_WINDOW: i64 = 65_535;

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The 32-bit value at `at` of the payload (error codes, increments).
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.payload[at..at + 4].try_into().expect("4 bytes")) & 0x7fff_ffff
    }

    /// A SETTINGS frame's (id, value) pairs.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect()
    }
}

/// A TLS client configuration that trusts `ca_pem` and offers HTTP/2 only.
pub fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("a usable CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` from the local address `source`.
pub async fn tls(
    addr: SocketAddr,
    source: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source address"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let name = ServerName::try_from("localhost").expect("a server name");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// The bytes of one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a frame's length");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// A gRPC request's header block, HPACK literals without indexing (what any
/// decoder takes without a table).
pub fn request_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    let fields = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    for (name, value) in fields.iter().chain(extra) {
        out.push(0x00);
        for s in [name, value] {
            assert!(s.len() < 127, "a short literal");
            out.push(s.len() as u8);
            out.extend(s.as_bytes());
        }
    }
    out
}

/// A gRPC message's frame prefix (uncompressed) claiming `len` bytes.
pub fn grpc_prefix(len: u32) -> Vec<u8> {
    let mut out = vec![0];
    out.extend(len.to_be_bytes());
    out
}

/// A connection under test: frames are written by hand, and every frame the
/// server sends arrives on `frames` (which ends when the connection does).
pub struct Conn {
    write: WriteHalf<TlsStream<TcpStream>>,
    pub frames: mpsc::UnboundedReceiver<Frame>,
}

impl Conn {
    /// Sends the client preface and empty SETTINGS on `tls`.
    pub async fn start(tls: TlsStream<TcpStream>) -> std::io::Result<Self> {
        let (read, mut write) = tokio::io::split(tls);
        write.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        write.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(read_frames(read, tx));
        Ok(Self { write, frames })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await
    }

    /// The next frame within `timeout`: None if the connection ended (or
    /// nothing came in time: `Err`).
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Frame>, ()> {
        tokio::time::timeout(timeout, self.frames.recv())
            .await
            .map_err(|_| ())
    }

    /// Reads frames until `until` holds for one (returned), answering pings
    /// and acknowledging settings; None if the connection ended first, Err if
    /// `timeout` passed.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut until: impl FnMut(&Frame) -> bool,
    ) -> Result<Option<Frame>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(f) = self.next(left).await? else {
                return Ok(None);
            };
            self.answer(&f).await;
            if until(&f) {
                return Ok(Some(f));
            }
        }
    }

    /// What a client owes the server for a frame: an ACK of its settings or
    /// pings (write errors are the connection ending, seen on `frames`).
    pub async fn answer(&mut self, f: &Frame) {
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            let _ = self.send(&frame(SETTINGS, ACK, 0, &[])).await;
        } else if f.kind == PING && f.flags & ACK == 0 {
            let _ = self.send(&frame(PING, ACK, 0, &f.payload)).await;
        }
    }
}

async fn read_frames(mut read: ReadHalf<TlsStream<TcpStream>>, tx: mpsc::UnboundedSender<Frame>) {
    loop {
        let mut head = [0u8; 9];
        if read.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        if read.read_exact(&mut payload).await.is_err() {
            return;
        }
        let f = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff,
            payload,
        };
        if tx.send(f).is_err() {
            return;
        }
    }
}
