//! The dashboard: server-rendered HTML pages over HTTPS (`--web-listen`) for
//! the people on call. It reads the fleet as the CLI does and acts through
//! the same admin calls, made in-process on behalf of a signed-in operator
//! credential, so every role check and audit entry is the CLI's.

mod assets;
mod audit;
mod compliance;
mod guard;
mod layout;
mod nodes;
mod overview;
mod patches;
mod rollouts;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::grpc::admin::AdminApi;

pub use session::SESSION_TTL;

/// Browser connections open at once; past it new ones wait in the accept
/// queue (a dashboard has a handful of people on it, not thousands).
const MAX_CONNECTIONS: usize = 256;
/// TLS handshakes at once, each given [`HANDSHAKE_TIMEOUT`].
const MAX_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must arrive within this, and so must the next
/// request's on a kept-alive connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request body taken (forms are a few hundred bytes; a pasted
/// credential file a few KiB).
const MAX_BODY: usize = 64 * 1024;

/// What every page handler is given.
#[derive(Clone)]
pub struct Web {
    app: Arc<App>,
    api: Arc<AdminApi>,
    sessions: Arc<session::Sessions>,
    /// Live rollout streams open at once.
    streams: Arc<tokio::sync::Semaphore>,
}

/// Live streams open at once across every browser.
const MAX_STREAMS: usize = 64;

fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/signin", get(session::signin_page).post(session::signin))
        .route("/signout", post(session::signout))
        .route("/rollouts/{id}", get(rollouts::page))
        .route("/rollouts/{id}/live", get(rollouts::live))
        .route("/rollouts/{id}/confirm", get(rollouts::confirm))
        .route("/rollouts/{id}/act", post(rollouts::act))
        .route("/patches/{id}", get(patches::page))
        .route("/nodes", get(nodes::list))
        .route("/nodes/{id}", get(nodes::node))
        .route("/approvals", get(nodes::approvals))
        .route("/nodes/{id}/decide", post(nodes::decide))
        .route("/compliance", get(compliance::page))
        .route("/compliance.csv", get(compliance::csv))
        .route("/audit", get(audit::page))
        .route("/static/{name}", get(assets::serve))
        .fallback(layout::not_found)
        .layer(axum::middleware::from_fn(guard::headers_and_origin))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(web)
}

/// Binds `at`; the address bound (port 0 picks one) is what the dashboard is
/// served on.
pub async fn bind(at: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(at)
        .await
        .with_context(|| format!("cannot listen for the dashboard on {at}"))
}

/// Serves the dashboard on `listener` with `tls` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    let sessions = Arc::new(session::Sessions::new(app.db.clone()));
    tokio::spawn(session::sweep(sessions.clone(), shutdown.clone()));
    let web = Web {
        api: Arc::new(AdminApi { app: app.clone() }),
        app,
        sessions,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
    };
    let router = router(web);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Accepted only while a slot is free: past the bound, connections wait
    // in the kernel's queue instead of costing descriptors and tasks here.
    let incoming =
        futures::stream::unfold((listener, slots.clone()), |(listener, slots)| async move {
            loop {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Pages are written as a few small TLS records: without
                        // this, Nagle's algorithm holds the last one until the
                        // browser's delayed ACK (tens of milliseconds a page).
                        let _ = stream.set_nodelay(true);
                        return Some((
                            Ok(Accepted {
                                stream,
                                peer,
                                _slot: slot,
                            }),
                            (listener, slots),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!("cannot accept a dashboard connection: {e}");
                        drop(slot);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    let tls_conns = flotilla_proto::tls::accept(incoming, tls, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES);
    tokio::pin!(tls_conns);
    loop {
        let conn = tokio::select! {
            () = shutdown.cancelled() => return,
            conn = tls_conns.next() => match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let (io, _) = conn.get_ref();
            let peer = io.peer;
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let mut router = router.clone();
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    async move {
                        tower_service::Service::call(&mut router, req.map(axum::body::Body::new))
                            .await
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!("dashboard connection: {e}");
                },
                () = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// A TCP connection holding one of the dashboard's connection slots until
/// it is dropped.
pub struct Accepted {
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
