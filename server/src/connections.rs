//! Connection limits: what idle or flooding peers can hold. Every accepted
//! connection is counted per source (an IPv4 address, an IPv6 /64) and in
//! all; one whose peer has not yet proven who it is is *pending*: in TLS
//! handshake, connected and silent, or making calls that authenticate nobody
//! (a failed join, an operator call without a valid credential, a health
//! check). A connection leaves pending only through [`Registry::authenticated`],
//! which the services call once a caller checked out (a node's or replica's
//! client certificate, an operator's credential, a join that succeeded), so
//! sending requests cannot keep a connection alive. Pending connections are
//! capped per source, closed after a deadline, and, when too many are pending
//! in all, the oldest makes room for the newest, so a flood cannot hold the
//! descriptors that sessions, the store and operators need. Refusals are
//! logged at a bounded rate.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Requests one pending connection has served at once; more wait, unread.
/// A request's body is read whole (up to a message, 4 MiB) before its handler
/// can look at the caller, so this, not the stream limit, bounds what a
/// connection that authenticated nobody makes the server hold: about
/// PENDING_CALLS messages, plus the HTTP/2 window of what waits.
pub const PENDING_CALLS: usize = 4;
/// Descriptors kept back from connections at start: the store, artifact files,
/// logs, and room for an operator when everything else is taken.
pub const DESCRIPTOR_RESERVE: u64 = 1024;
/// A log line about refused connections at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The limits, from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections one source may hold (0: no limit).
    pub max_per_source: usize,
    /// Pending connections one source may hold (0: no limit).
    pub max_pending_per_source: usize,
    /// Pending connections in all; past this the oldest is closed for a new one.
    pub max_pending: usize,
    /// How long a connection may stay pending (TLS handshake included).
    pub pending_timeout: Duration,
}

/// Marks a call made in-process for a connection of another listener (the
/// dashboard's, which keeps a registry of its own): its peer address names
/// none of the gRPC listener's connections, so the call ends no pending time
/// there (the same address and port may well be connected to both).
#[derive(Debug, Clone, Copy)]
pub struct OtherListener;

pub use flotilla_proto::limits::source_of;

/// Raises the process's soft open-files limit to its hard limit, and returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the open-files limit: {e}");
            1024
        }
    }
}

/// One accepted connection as the registry sees it.
#[derive(Debug)]
struct Conn {
    addr: SocketAddr,
    /// Its peer proved who it is: no longer pending.
    used: AtomicBool,
    /// Places for requests served while it is pending (see [`PENDING_CALLS`]).
    calls: Arc<tokio::sync::Semaphore>,
    /// Cancelled to close it (evicted for a newer pending connection).
    close: CancellationToken,
}

#[derive(Debug, Default, Clone, Copy)]
struct SourceCount {
    open: usize,
    pending: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_addr: HashMap<SocketAddr, Arc<Conn>>,
    sources: HashMap<IpAddr, SourceCount>,
    total: usize,
    pending: usize,
    /// Pending connections, oldest first (entries of used or closed ones are
    /// skipped as they come up).
    pending_order: VecDeque<Weak<Conn>>,
}

/// Counts of what was refused or closed since the last log line.
#[derive(Debug, Default)]
struct Refusals {
    per_source: AtomicU64,
    global: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// The server's connections.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    inner: Mutex<Inner>,
    refusals: Refusals,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    PerSource,
    Global,
}

impl Registry {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
            refusals: Refusals::default(),
        })
    }

    /// Takes a connection, or refuses it (it is closed when dropped).
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<LimitedStream> {
        let addr = stream.peer_addr().ok()?;
        let conn = match self.register(addr) {
            Ok(conn) => conn,
            Err(why) => {
                let (counter, reason) = match why {
                    Refusal::PerSource => (&self.refusals.per_source, "per_source"),
                    Refusal::Global => (&self.refusals.global, "global"),
                };
                metrics::counter!("flotilla_connections_refused_total", "reason" => reason)
                    .increment(1);
                counter.fetch_add(1, Ordering::Relaxed);
                self.maybe_log();
                return None;
            }
        };
        let deadline = tokio::time::sleep(self.limits.pending_timeout);
        Some(LimitedStream {
            closed: Box::pin(conn.close.clone().cancelled_owned()),
            pending: Some(Box::pin(deadline)),
            expired: false,
            inner: stream,
            conn,
            registry: Arc::clone(self),
        })
    }

    fn register(&self, addr: SocketAddr) -> Result<Arc<Conn>, Refusal> {
        let l = &self.limits;
        let mut inner = self.inner.lock().expect("connection registry");
        let source = inner
            .sources
            .get(&source_of(addr.ip()))
            .copied()
            .unwrap_or_default();
        if (l.max_pending_per_source > 0 && source.pending >= l.max_pending_per_source)
            || (l.max_per_source > 0 && source.open >= l.max_per_source)
        {
            return Err(Refusal::PerSource);
        }
        if inner.pending >= l.max_pending || inner.total >= l.max_connections {
            // The oldest pending connection makes room; its descriptor is free
            // as soon as it sees it is closed.
            if !self.evict_oldest(&mut inner) && inner.total >= l.max_connections {
                return Err(Refusal::Global);
            }
        }
        let conn = Arc::new(Conn {
            addr,
            used: AtomicBool::new(false),
            calls: Arc::new(tokio::sync::Semaphore::new(PENDING_CALLS)),
            close: CancellationToken::new(),
        });
        inner.by_addr.insert(addr, Arc::clone(&conn));
        let s = inner.sources.entry(source_of(addr.ip())).or_default();
        s.open += 1;
        s.pending += 1;
        inner.total += 1;
        inner.pending += 1;
        inner.pending_order.push_back(Arc::downgrade(&conn));
        Ok(conn)
    }

    fn evict_oldest(&self, inner: &mut Inner) -> bool {
        while let Some(weak) = inner.pending_order.pop_front() {
            if let Some(c) = weak.upgrade()
                && !c.used.load(Ordering::Acquire)
                && !c.close.is_cancelled()
            {
                c.close.cancel();
                self.refusals.evicted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("flotilla_connections_refused_total", "reason" => "evicted")
                    .increment(1);
                self.maybe_log();
                return true;
            }
        }
        false
    }

    /// The peer of the connection from `addr` proved who it is (a node's or
    /// replica's certificate checked out, an operator's credential did, or a
    /// join succeeded): the connection is no longer pending, and keeps no
    /// deadline. Requests alone never do this: a peer that authenticates
    /// nobody stays pending however many calls it makes. None (a request
    /// without a peer address) changes nothing.
    pub fn authenticated(&self, addr: Option<SocketAddr>) {
        let Some(addr) = addr else {
            return;
        };
        let mut inner = self.inner.lock().expect("connection registry");
        let Some(conn) = inner.by_addr.get(&addr).cloned() else {
            return;
        };
        if !conn.used.swap(true, Ordering::AcqRel) {
            inner.pending -= 1;
            if let Some(s) = inner.sources.get_mut(&source_of(addr.ip())) {
                s.pending -= 1;
            }
        }
    }

    /// The places for requests of the connection from `addr` while it is
    /// pending; None once its peer authenticated (or for an unknown address).
    fn pending_calls(&self, addr: SocketAddr) -> Option<Arc<tokio::sync::Semaphore>> {
        let inner = self.inner.lock().expect("connection registry");
        let conn = inner.by_addr.get(&addr)?;
        (!conn.used.load(Ordering::Acquire)).then(|| Arc::clone(&conn.calls))
    }

    fn release(&self, conn: &Conn) {
        let mut inner = self.inner.lock().expect("connection registry");
        if inner
            .by_addr
            .get(&conn.addr)
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), conn))
        {
            inner.by_addr.remove(&conn.addr);
        }
        let was_pending = !conn.used.swap(true, Ordering::AcqRel);
        inner.total -= 1;
        if was_pending {
            inner.pending -= 1;
        }
        let ip = source_of(conn.addr.ip());
        if let Some(s) = inner.sources.get_mut(&ip) {
            s.open -= 1;
            if was_pending {
                s.pending -= 1;
            }
            if s.open == 0 {
                inner.sources.remove(&ip);
            }
        }
        // Keep the queue from growing with connections long gone.
        if inner.pending_order.len() > 2 * inner.pending + 64 {
            inner
                .pending_order
                .retain(|w| w.upgrade().is_some_and(|c| !c.used.load(Ordering::Acquire)));
        }
    }

    /// Open and pending connections now.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("connection registry");
        (inner.total, inner.pending)
    }

    /// One line for everything refused or closed since the last, at most every
    /// REFUSAL_LOG_EVERY.
    fn maybe_log(&self) {
        let now = Instant::now();
        {
            let mut last = self.refusals.last_log.lock().expect("refusal log");
            if last.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let (per_source, global, evicted, timed_out) = (
            take(&self.refusals.per_source),
            take(&self.refusals.global),
            take(&self.refusals.evicted),
            take(&self.refusals.timed_out),
        );
        let (open, pending) = self.counts();
        tracing::warn!(
            per_source,
            global,
            evicted,
            timed_out,
            open,
            pending,
            "connections refused or closed by the connection limits (counts since the last such line)"
        );
    }
}

/// The server's layer under every service: a request on a pending connection
/// waits for one of its [`PENDING_CALLS`] places before it is served (its body
/// read); requests on connections whose peer authenticated go straight on.
#[derive(Clone)]
pub struct PendingCallsLayer {
    registry: Arc<Registry>,
}

impl PendingCallsLayer {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl<S> tower_layer::Layer<S> for PendingCallsLayer {
    type Service = PendingCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PendingCalls {
            inner,
            registry: Arc::clone(&self.registry),
        }
    }
}

/// See [`PendingCallsLayer`].
#[derive(Clone)]
pub struct PendingCalls<S> {
    inner: S,
    registry: Arc<Registry>,
}

/// The peer address tonic put in a request's extensions.
fn remote_addr<B>(req: &tonic::codegen::http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::TlsConnectInfo;
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
}

impl<S, B> tower_service::Service<tonic::codegen::http::Request<B>> for PendingCalls<S>
where
    S: tower_service::Service<tonic::codegen::http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let Some(places) = remote_addr(&req).and_then(|a| self.registry.pending_calls(a)) else {
            return Box::pin(self.inner.call(req));
        };
        // The instance that was made ready serves this request; a clone
        // takes its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // Never closed: the semaphore lives as long as its connection.
            let _place = places.acquire_owned().await;
            inner.call(req).await
        })
    }
}

/// A connection under the limits: closed when evicted or when it stays pending
/// past its deadline; counted out when dropped.
pub struct LimitedStream {
    inner: TcpStream,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    pending: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The pending deadline passed (counted once).
    expired: bool,
}

impl LimitedStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.conn.addr
    }

    /// An error if the connection is to close now.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection",
            ));
        }
        if self.conn.used.load(Ordering::Acquire) {
            self.pending = None;
        } else if self.expired {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer proved no identity within the pending deadline",
            ));
        } else if let Some(deadline) = self.pending.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            // Counted and logged once, whether reading or writing saw it.
            self.expired = true;
            self.registry
                .refusals
                .timed_out
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("flotilla_connections_refused_total", "reason" => "timed_out")
                .increment(1);
            self.registry.maybe_log();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer proved no identity within the pending deadline",
            ));
        }
        Ok(())
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.registry.release(&self.conn);
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Deadlines bite while writing too: a pending connection's peer that
        // stops reading would otherwise hold it past them.
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn limits() -> Limits {
        Limits {
            max_connections: 8,
            max_per_source: 6,
            max_pending_per_source: 3,
            max_pending: 3,
            pending_timeout: Duration::from_secs(30),
        }
    }

    async fn pair(listener: &tokio::net::TcpListener, from: &str) -> (TcpStream, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn pending_connections_are_capped_per_source_and_the_oldest_makes_room() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reg = Registry::new(limits());
        let mut held = Vec::new();
        for _ in 0..3 {
            let (c, s) = pair(&listener, "127.0.0.1").await;
            held.push((c, reg.admit(s).expect("under the per-source cap")));
        }
        let (_c, s) = pair(&listener, "127.0.0.1").await;
        assert!(reg.admit(s).is_none(), "a fourth pending from one source");
        // An authenticated caller moves one out of pending: its source may
        // open another.
        reg.authenticated(Some(held[0].1.conn.addr));
        let (c, s) = pair(&listener, "127.0.0.1").await;
        held.push((c, reg.admit(s).unwrap()));
        assert_eq!(reg.counts(), (4, 3));
        // Another source: the global pending cap (3) is reached, so the oldest
        // pending connection is closed to make room.
        let (c, s) = pair(&listener, "127.0.0.2").await;
        held.push((c, reg.admit(s).unwrap()));
        let mut buf = [0u8; 1];
        let err = held[1].1.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        // Dropping connections counts them out.
        held.clear();
        assert_eq!(reg.counts(), (0, 0));
    }

    #[test]
    fn ipv6_sources_are_counted_by_64_and_mapped_addresses_as_ipv4() {
        let reg = Registry::new(Limits {
            max_pending: 8,
            ..limits()
        });
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        for i in 1..=3 {
            reg.register(at(&format!("[2001:db8:1:2::{i}]:4000")))
                .expect("under the per-source cap");
        }
        // Any other address of the same /64 is the same source...
        assert_eq!(
            reg.register(at("[2001:db8:1:2:ffff:ffff:ffff:ffff]:4000"))
                .unwrap_err(),
            Refusal::PerSource
        );
        // ... and the next /64 another.
        reg.register(at("[2001:db8:1:3::1]:4000")).unwrap();
        // An IPv4-mapped address counts with its IPv4 address.
        for _ in 0..3 {
            reg.register(at("10.0.0.1:4000")).unwrap();
        }
        assert_eq!(
            reg.register(at("[::ffff:10.0.0.1]:4000")).unwrap_err(),
            Refusal::PerSource
        );
        // Authenticating one of a /64's connections frees a pending place.
        reg.authenticated(Some(at("[2001:db8:1:2::1]:4000")));
        reg.register(at("[2001:db8:1:2::4]:4000")).unwrap();
    }

    /// A service whose calls count themselves in, then wait for `open`.
    #[derive(Clone)]
    struct Gate {
        started: Arc<AtomicU64>,
        open: Arc<tokio::sync::Semaphore>,
    }

    impl tower_service::Service<tonic::codegen::http::Request<()>> for Gate {
        type Response = ();
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<(), Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: tonic::codegen::http::Request<()>) -> Self::Future {
            self.started.fetch_add(1, Ordering::SeqCst);
            let open = Arc::clone(&self.open);
            Box::pin(async move {
                open.acquire().await.expect("open").forget();
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_pending_connection_is_served_a_few_calls_at_a_time() {
        use tower_layer::Layer;
        use tower_service::Service;
        let reg = Registry::new(limits());
        let addr: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let _conn = reg.register(addr).unwrap();
        let gate = Gate {
            started: Arc::default(),
            open: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let mut svc = PendingCallsLayer::new(Arc::clone(&reg)).layer(gate.clone());
        let mut call = || {
            let mut req = tonic::codegen::http::Request::new(());
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(addr),
            });
            tokio::spawn(svc.call(req))
        };
        let started = |n: u64| {
            let gate = gate.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while gate.started.load(Ordering::SeqCst) < n {
                    assert!(Instant::now() < deadline, "{n} calls never started");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let calls: Vec<_> = (0..PENDING_CALLS + 2).map(|_| call()).collect();
        started(PENDING_CALLS as u64).await;
        // The others wait for a place (their bodies would stay unread).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(gate.started.load(Ordering::SeqCst), PENDING_CALLS as u64);
        // One finishes: the next starts.
        gate.open.add_permits(1);
        started(PENDING_CALLS as u64 + 1).await;
        // Once the peer authenticated, calls go straight on.
        reg.authenticated(Some(addr));
        let last = call();
        started(PENDING_CALLS as u64 + 2).await;
        gate.open.add_permits(PENDING_CALLS + 2);
        for c in calls.into_iter().chain([last]) {
            c.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_connection_that_stays_pending_is_closed_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reg = Registry::new(Limits {
            pending_timeout: Duration::from_millis(200),
            ..limits()
        });
        let (_c, s) = pair(&listener, "127.0.0.1").await;
        let mut quiet = reg.admit(s).unwrap();
        let mut buf = [0u8; 1];
        let err = quiet.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // One whose peer authenticated is not.
        let (mut c, s) = pair(&listener, "127.0.0.1").await;
        let mut used = reg.admit(s).unwrap();
        reg.authenticated(Some(used.conn.addr));
        // Well past the deadline, it still reads.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::io::AsyncWriteExt::write_all(&mut c, b"x")
            .await
            .unwrap();
        assert_eq!(used.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_pending_connection_whose_peer_stops_reading_is_closed_while_writing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reg = Registry::new(Limits {
            pending_timeout: Duration::from_millis(300),
            ..limits()
        });
        // The peer never reads: the server's writes fill the socket buffers
        // and then wait, until the deadline ends them.
        let (_peer, s) = pair(&listener, "127.0.0.1").await;
        let mut stuck = reg.admit(s).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let err = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut stuck, &chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the write is still held past the deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Reads see it too.
        let mut buf = [0u8; 1];
        let err = stuck.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
