//! Telling a server that refuses the node apart from one that is merely unreachable.
//!
//! A refused node (revoked, removed, certificate no longer trusted) must stop and
//! say so: retrying forever would only hammer the server. The refusal comes either
//! as a gRPC status (PermissionDenied, Unauthenticated) or, when the server rejects
//! the client certificate during the TLS handshake, as a TLS alert buried in a
//! transport error.

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

/// Alerts a server sends when it will not accept the client's certificate.
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
    format!("the server rejected the node certificate during the TLS handshake ({alert:?})")
}

/// Classifies a transport error (connecting).
pub fn classify_error(e: &(dyn Error + 'static)) -> Refusal {
    match tls_refusal(e) {
        Some(reason) => Refusal::Refused(reason),
        None => Refusal::Transient(chain_text(e)),
    }
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
        _ => match tls_refusal(status) {
            Some(reason) => Refusal::Refused(reason),
            None => Refusal::Transient(format!("{:?}: {}", status.code(), chain_text(status))),
        },
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
    fn a_certificate_alert_inside_a_transport_error_is_a_refusal() {
        let io = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateRevoked,
        ));
        let r = classify_error(&io);
        assert!(
            matches!(&r, Refusal::Refused(m) if m.contains("CertificateRevoked")),
            "{r:?}"
        );
        // Inside a status, as tonic wraps transport errors.
        let status = Status::from_error(Box::new(std::io::Error::other(
            rustls::Error::AlertReceived(AlertDescription::BadCertificate),
        )));
        assert!(matches!(classify_status(&status), Refusal::Refused(_)));
        // Only printed, not exposed as a source.
        let printed = std::io::Error::other("h2: received fatal alert: UnknownCA");
        assert!(matches!(classify_error(&printed), Refusal::Refused(_)));
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
