//! What one HTTP/2 connection may hold, whoever is at the other end: the
//! bounds every gRPC listener of the fleet (the server's, a site cache's)
//! puts on its peers.

use tonic::transport::Server;

/// Streams one connection may have open at once: an agent uses a session, a
/// report and a few downloads; the CLI a handful of calls. Beyond it the
/// peer's new streams are refused (REFUSED_STREAM), and well-behaved clients
/// queue them.
pub const MAX_STREAMS: u32 = 64;
/// Bytes a peer may send on one stream, and on the whole connection, that the
/// listener has not read yet (hyper's defaults, pinned).
pub const WINDOW: u32 = 1024 * 1024;

/// Streams the listener may reset on a connection because of the peer's
/// errors before it closes the connection.
pub const MAX_LOCAL_RESETS: usize = 1024;

/// `server` with the bounds on each connection: a request's body is read as
/// it arrives, up to a whole message (4 MiB), before its handler looks at the
/// caller, so a connection's memory is bounded by its streams: at most
/// [`MAX_STREAMS`] at once. No request timeout: sessions, event follows and
/// artifact transfers are long-lived streams. Keepalive is the caller's.
pub fn limits(server: Server) -> Server {
    server
        .max_concurrent_streams(Some(MAX_STREAMS))
        // Flow control: what a peer may send ahead of the listener's reading.
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(WINDOW))
        .max_frame_size(Some(16 * 1024))
        .http2_max_header_list_size(Some(16 * 1024))
        // Streams a peer opens and resets at once cost work without counting
        // against MAX_STREAMS (CVE-2023-44487): past this many queued the
        // connection is closed.
        .http2_max_pending_accept_reset_streams(Some(MAX_STREAMS as usize))
        // So do streams it makes the listener reset by sending frames that
        // are errors (CVE-2025-8671; tonic leaves this unbounded). Streams
        // refused past MAX_STREAMS count too, so the bound is hyper's own
        // default, well above what refusals of a busy client come to.
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
}
