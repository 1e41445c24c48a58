//! Telling a server that refuses the node apart from one that is merely unreachable.
//!
//! A refused node (revoked, removed) must stop and say so: retrying forever
//! would only hammer the server. Only a refusal the server is known to have
//! sent counts: a gRPC status (PermissionDenied, Unauthenticated) over a
//! connection whose server certificate checked out against the pinned CA. A
//! TLS alert that rejects the client certificate during the handshake is only
//! reported: it may come before the server has proven anything (a plaintext
//! alert before ServerHello can be sent by anyone on the path), so it is
//! retried like an unreachable server, with backoff.

use std::error::Error;

use rustls::AlertDescription;
use tonic::{Code, Status};

/// What a failure means for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The server refused the node: stop.
    Refused(String),
    /// Anything else: try again later, maybe elsewhere.
    Transient(String),
}

impl Refusal {
    /// The same, with the server's URL in front of the reason.
    pub fn prefixed(self, url: &str) -> Self {
        match self {
            Self::Refused(r) => Self::Refused(format!("{url}: {r}")),
            Self::Transient(r) => Self::Transient(format!("{url}: {r}")),
        }
    }
}

/// Alerts a server sends when it will not accept the client's certificate
/// (named in the retry's reason, never fatal: see the module's text).
const REFUSAL_ALERTS: [AlertDescription; 8] = [
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::CertificateRequired,
];

fn refusal_alert(e: &rustls::Error) -> Option<AlertDescription> {
    match e {
        rustls::Error::AlertReceived(alert) if REFUSAL_ALERTS.contains(alert) => Some(*alert),
        _ => None,
    }
}

/// The error and its sources as one line.
pub fn chain_text(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The TLS alert by which the server refused our certificate, if that is what
/// `e` is about.
fn tls_refusal(e: &(dyn Error + 'static)) -> Option<String> {
    let mut current = Some(e);
    while let Some(err) = current {
        let rustls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(alert) = rustls_err.and_then(refusal_alert) {
            return Some(describe(alert));
        }
        current = err.source();
    }
    // Some layers (h2) print their cause but do not expose it as a source.
    let text = chain_text(e);
    REFUSAL_ALERTS
        .iter()
        .find(|alert| text.contains(&format!("received fatal alert: {alert:?}")))
        .map(|alert| describe(*alert))
}

fn describe(alert: AlertDescription) -> String {
    format!(
        "the TLS handshake ended with a {alert:?} alert: the server (or whatever answered at \
         its address before the server proved itself) rejected the node certificate; retrying, \
         as an unauthenticated alert cannot stop the agent"
    )
}

/// Classifies a transport error (connecting): always worth retrying.
pub fn classify_error(e: &(dyn Error + 'static)) -> Refusal {
    Refusal::Transient(tls_refusal(e).unwrap_or_else(|| chain_text(e)))
}

/// Classifies a gRPC status (a call, or a session that ended with one).
pub fn classify_status(status: &Status) -> Refusal {
    let reason = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => {
            Refusal::Refused(format!("{:?}: {reason}", status.code()))
        }
        _ => Refusal::Transient(match tls_refusal(status) {
            Some(reason) => reason,
            None => format!("{:?}: {}", status.code(), chain_text(status)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_denied_and_unauthenticated_are_refusals() {
        let s = Status::permission_denied("node n-1 is revoked");
        assert_eq!(
            classify_status(&s),
            Refusal::Refused("PermissionDenied: node n-1 is revoked".into())
        );
        assert!(matches!(
            classify_status(&Status::unauthenticated("")),
            Refusal::Refused(_)
        ));
        assert!(matches!(
            classify_status(&Status::unavailable("restarting")),
            Refusal::Transient(_)
        ));
        assert!(matches!(
            classify_status(&Status::invalid_argument("bad hello")),
            Refusal::Transient(_)
        ));
    }

    #[test]
    fn a_certificate_alert_is_named_but_never_stops_the_agent() {
        // Unauthenticated: anyone on the path can send one before ServerHello.
        let io = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateRevoked,
        ));
        let r = classify_error(&io);
        assert!(
            matches!(&r, Refusal::Transient(m) if m.contains("CertificateRevoked")
                && m.contains("rejected the node certificate")),
            "{r:?}"
        );
        // Inside a status, as tonic wraps transport errors.
        let status = Status::from_error(Box::new(std::io::Error::other(
            rustls::Error::AlertReceived(AlertDescription::BadCertificate),
        )));
        assert!(matches!(
            classify_status(&status),
            Refusal::Transient(m) if m.contains("BadCertificate")
        ));
        // Only printed, not exposed as a source.
        let printed = std::io::Error::other("h2: received fatal alert: UnknownCA");
        assert!(matches!(
            classify_error(&printed),
            Refusal::Transient(m) if m.contains("UnknownCA")
        ));
    }

    #[test]
    fn other_transport_errors_are_transient() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(classify_error(&io), Refusal::Transient(_)));
        let handshake = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure,
        ));
        assert!(matches!(classify_error(&handshake), Refusal::Transient(_)));
    }
}
