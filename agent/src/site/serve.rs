//! The site service of a serving agent: mutual TLS with the fleet's node
//! certificates (its own, taken again when renewed), each request authorized
//! by the server (a peer of this site, an artifact of a patch offered to it),
//! and the artifact streamed from the site cache, while it fills if need be.
//! The server is asked at every request, never remembered: a node revoked a
//! moment ago is refused at once (one small call per peer download).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flotilla_proto::limits;
use flotilla_proto::manifest::Artifact;
use flotilla_proto::pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Request, Response, Status};

use super::cache::{Fill, SiteCache};
use crate::state::Store;
use crate::uplink::Uplink;

/// Peers' downloads served at once; more are told to go to the servers.
const MAX_STREAMS: usize = 64;
/// Connections held at once (handshaking or open); more wait in the
/// listener's backlog.
pub(super) const MAX_CONNECTIONS: usize = 256;
/// How often a reader at the end of a growing file looks for more.
const GROWING_POLL: Duration = Duration::from_millis(100);

/// The node's current certificate, for the handshakes of its site service.
pub(super) struct NodeCert {
    store: Store,
    current: Mutex<Option<(String, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCert")
    }
}

impl NodeCert {
    pub(super) fn new(store: Store) -> Self {
        Self {
            store,
            current: Mutex::new(None),
        }
    }

    fn load(cert_pem: &str, key_pem: &str) -> Option<Arc<CertifiedKey>> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).ok()?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

impl ResolvesServerCert for NodeCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = self.store.identity().ok()??;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((pem, key)) = current.as_ref()
            && *pem == identity.cert_pem
        {
            return Some(key.clone());
        }
        let key = Self::load(&identity.cert_pem, &identity.key_pem)?;
        *current = Some((identity.cert_pem, key.clone()));
        Some(key)
    }
}

/// The TLS configuration of the site service: this node's certificate, and
/// a client certificate of the fleet's CA required of every peer.
pub(super) fn tls_config(store: Store, ca_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let verifier = WebPkiClientVerifier::builder(roots.into())
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(NodeCert::new(store)));
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(config))
}

/// The site service.
pub(super) struct SiteApi {
    pub(super) cache: Arc<SiteCache>,
    pub(super) uplink: Uplink,
    streams: Arc<Semaphore>,
}

impl SiteApi {
    pub(super) fn new(cache: Arc<SiteCache>, uplink: Uplink) -> Self {
        Self {
            cache,
            uplink,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    /// The size of artifact `sha256` if the server lets `peer` have it.
    async fn authorize(&self, peer: &str, sha256: &str) -> Result<u64, Status> {
        let clients = self
            .uplink
            .clients()
            .map_err(|e| Status::unavailable(format!("cannot ask the servers: {e}")))?;
        let mut last = Status::unavailable("no server to ask");
        for (name, mut client) in clients {
            let asked = client
                .authorize_site_peer(pb::AuthorizeSitePeerRequest {
                    peer_node_id: peer.to_string(),
                    sha256: sha256.to_string(),
                })
                .await;
            match asked {
                Ok(r) => return Ok(r.into_inner().size),
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    return Err(Status::permission_denied(format!(
                        "the fleet refuses: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    last = Status::unavailable(format!(
                        "cannot ask {name} about this peer: {}",
                        s.message()
                    ));
                }
            }
        }
        Err(last)
    }
}

/// The node a request comes from, by its client certificate's subject.
fn peer_of<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a node certificate of this fleet is needed"))?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first)
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|id| id.starts_with("node-"))
        .map(str::to_string)
        .ok_or_else(|| Status::unauthenticated("the client certificate does not name a node"))
}

fn check_sha256(sha: &str) -> Result<(), Status> {
    if sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "sha256 must be 64 lower-case hex characters",
        ))
    }
}

type ChunkStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ArtifactChunk, Status>>;

#[tonic::async_trait]
impl pb::site_service_server::SiteService for SiteApi {
    type FetchArtifactStream = ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let peer = peer_of(&request)?;
        let r = request.into_inner();
        check_sha256(&r.sha256)?;
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("this agent serves as many peers as it can; use the servers")
        })?;
        let size = self.authorize(&peer, &r.sha256).await?;
        if r.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the artifact's {size} bytes",
                r.offset
            )));
        }
        let artifact = Artifact {
            name: r.sha256.clone(),
            sha256: r.sha256.clone(),
            size,
        };
        let cache_error =
            |e: std::io::Error| Status::internal(format!("cannot read the site cache: {e}"));
        self.cache.start_fill(artifact.clone());
        let reader = match self.cache.reader(&r.sha256).await.map_err(cache_error)? {
            Some(reader) => Some(reader),
            None => {
                // Removed as damaged, or evicted meanwhile: fetched again.
                self.cache.start_fill(artifact);
                self.cache.reader(&r.sha256).await.map_err(cache_error)?
            }
        }
        .ok_or_else(|| Status::unavailable("the site cache cannot get this artifact now"))?;
        tracing::debug!(%peer, artifact = %r.sha256, offset = r.offset, "serving a site peer");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(status) = stream(reader, r.offset, size, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ChunkStream::new(rx)))
    }
}

/// Sends the file from `offset` to `size` in chunks; at the end of a file
/// still filling, waits for more.
async fn stream(
    reader: super::cache::Reader,
    mut offset: u64,
    size: u64,
    tx: &mpsc::Sender<Result<pb::ArtifactChunk, Status>>,
) -> Result<(), Status> {
    let super::cache::Reader { mut file, mut fill } = reader;
    let io = |e: std::io::Error| Status::internal(format!("cannot read the site cache: {e}"));
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(io)?;
    let mut buf = vec![0u8; limits::ARTIFACT_CHUNK_BYTES];
    let mut last_look = false;
    while offset < size {
        let want = usize::try_from(size - offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = file.read(&mut buf[..want]).await.map_err(io)?;
        if n > 0 {
            let chunk = pb::ArtifactChunk {
                offset,
                data: buf[..n].to_vec().into(),
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
            offset += n as u64;
            continue;
        }
        let state = fill.as_ref().map(|f| f.borrow().clone());
        match state {
            Some(Fill::Running) => {
                let f = fill.as_mut().expect("matched");
                tokio::select! {
                    _ = f.changed() => {}
                    () = tokio::time::sleep(GROWING_POLL) => {}
                    () = tx.closed() => return Ok(()),
                }
            }
            // Filled: what is left is on disk now; one more look.
            Some(Fill::Done) if !last_look => last_look = true,
            Some(Fill::Failed(why)) => {
                return Err(Status::unavailable(format!(
                    "the site cache could not fetch this artifact: {why}"
                )));
            }
            _ => {
                return Err(Status::data_loss(format!(
                    "the cached artifact ends at byte {offset} of {size}"
                )));
            }
        }
    }
    Ok(())
}

/// A peer connection holding one of the site service's connection slots,
/// and one of its source's, until it closes.
pub(super) struct Slotted {
    inner: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// Connections one source (an IPv4 address, an IPv6 /64) may hold: a peer
/// agent opens one per download it takes from here, a few at once. So one
/// host on the site's network, holding connections in TLS handshake (each
/// for up to its deadline), takes at most an eighth of the slots the site's
/// other peers need.
pub(super) const MAX_PER_SOURCE: usize = MAX_CONNECTIONS / 8;

/// Open connections by source.
#[derive(Clone, Default)]
struct Sources(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Sources {
    /// A place for a connection from `ip`, or None when its source holds
    /// `max` already.
    fn take(&self, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let source = flotilla_proto::limits::source_of(ip);
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(source).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            source,
        })
    }
}

/// One connection's place in its source's count, given back when dropped.
struct SourceSlot {
    sources: Sources,
    source: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self
            .sources
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

impl tokio::io::AsyncRead for Slotted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Slotted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Slotted {
    // The TCP kind, so the peer's certificates reach requests.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The listener's connections, at most `max` held at once and
/// `max_per_source` from one source; one past its source's bound is closed
/// at once (logged at most once a minute).
pub(super) fn incoming(
    listener: tokio::net::TcpListener,
    max: usize,
    max_per_source: usize,
) -> impl futures::Stream<Item = std::io::Result<Slotted>> {
    let slots = Arc::new(Semaphore::new(max));
    let state = (
        listener,
        slots,
        Sources::default(),
        None::<std::time::Instant>,
    );
    futures::stream::unfold(
        state,
        move |(listener, slots, sources, mut logged)| async move {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            loop {
                match listener.accept().await {
                    Ok((inner, peer)) => {
                        let Some(source) = sources.take(peer.ip(), max_per_source) else {
                            if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                                tracing::warn!(%peer, "refused a site peer's connection: its address holds {max_per_source} already");
                                logged = Some(std::time::Instant::now());
                            }
                            continue;
                        };
                        let _ = inner.set_nodelay(true);
                        let conn = Slotted {
                            inner,
                            _slot: slot,
                            _source: source,
                        };
                        return Some((Ok(conn), (listener, slots, sources, logged)));
                    }
                    // Out of descriptors, or a connection gone before it was
                    // taken: an error would end the accept loop.
                    Err(e) => {
                        tracing::warn!("cannot accept a site peer's connection: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn connections_past_the_bound_wait_until_one_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::incoming(listener, 2, 8));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();
        let third = tokio::time::timeout(std::time::Duration::from_millis(200), incoming.next());
        assert!(third.await.is_err(), "a third connection waits for a slot");
        drop(first);
        let third = tokio::time::timeout(std::time::Duration::from_secs(5), incoming.next());
        assert!(
            third.await.unwrap().unwrap().is_ok(),
            "taken once one closed"
        );
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::incoming(listener, 16, 3));
        let connect = |from: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let mut held = Vec::new();
        let mut from_one = Vec::new();
        for _ in 0..5 {
            from_one.push(connect("127.0.0.1").await);
        }
        for _ in 0..3 {
            held.push(incoming.next().await.unwrap().unwrap());
        }
        // Another address still gets in; the two past the first's share
        // were closed as they were taken.
        let _other = connect("127.0.0.2").await;
        let taken = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            taken.inner.peer_addr().unwrap().ip().to_string(),
            "127.0.0.2"
        );
        let mut buf = [0u8; 1];
        for c in &mut from_one[3..] {
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf));
            assert!(matches!(read.await, Ok(Ok(0) | Err(_))), "closed at once");
        }
        // One closes: its source may connect again.
        held.pop();
        let _again = connect("127.0.0.1").await;
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), incoming.next());
        assert!(again.await.unwrap().unwrap().is_ok());
    }
}
