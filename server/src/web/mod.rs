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
mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::connections::{Limits, Registry};
use crate::grpc::admin::AdminApi;

pub use session::SESSION_TTL;

/// Browser connections open at once (a dashboard has a handful of people on
/// it, not thousands). They are held to the same kind of limits as the gRPC
/// listener's (`connections`), in a registry of their own: a connection is
/// *pending* until a request on it carries a live session (or signs in), and
/// pending ones are capped per source and in all, closed at the server's
/// pending deadline, the oldest evicted for the newest; so idle or
/// half-open connections from a few addresses cannot take the dashboard
/// from the people on call, and signed-in browsers keep theirs.
const MAX_CONNECTIONS: usize = 256;
/// Connections one source (an IPv4 address, an IPv6 /64) may hold: an office
/// behind one address, each browser opening a few.
const MAX_PER_SOURCE: usize = 64;
/// Pending connections one source may hold, and all sources together (half
/// of [`MAX_CONNECTIONS`]: the rest is kept for signed-in browsers).
const MAX_PENDING_PER_SOURCE: usize = 16;
const MAX_PENDING: usize = MAX_CONNECTIONS / 2;
/// New connections taken per second (the rest wait in the accept queue).
const ACCEPT_PER_SEC: u32 = 100;
/// TLS handshakes at once, each given the server's handshake deadline.
const MAX_HANDSHAKES: usize = 64;
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
    /// Places for live rollout streams.
    streams: Arc<streams::Streams>,
    /// The dashboard's connections: a request that proves a session ends
    /// its connection's pending time.
    connections: Arc<Registry>,
}

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

/// The server's deadlines, as the gRPC listener has them.
pub struct Deadlines {
    /// For a TLS handshake.
    pub handshake: Duration,
    /// For a connection's peer to show a session (or sign in).
    pub pending: Duration,
}

/// Serves the dashboard on `listener` with `tls` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<App>,
    deadlines: Deadlines,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    let sessions = Arc::new(session::Sessions::new(app.db.clone()));
    tokio::spawn(session::sweep(sessions.clone(), shutdown.clone()));
    let connections = Registry::new(Limits {
        max_connections: MAX_CONNECTIONS,
        max_per_source: MAX_PER_SOURCE,
        max_pending_per_source: MAX_PENDING_PER_SOURCE,
        max_pending: MAX_PENDING,
        pending_timeout: deadlines.pending,
    });
    let web = Web {
        api: Arc::new(AdminApi { app: app.clone() }),
        app,
        sessions,
        streams: Arc::new(streams::Streams::new()),
        connections: connections.clone(),
    };
    let router = router(web);
    // Pages are written as a few small TLS records: the accept loop turns off
    // Nagle's algorithm, which would hold the last one until the browser's
    // delayed ACK (tens of milliseconds a page).
    let incoming = crate::admission::incoming(listener, ACCEPT_PER_SEC, connections);
    let tls_conns = flotilla_proto::tls::accept(incoming, tls, deadlines.handshake, MAX_HANDSHAKES);
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
            let peer = io.peer();
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
