//! The page shell every dashboard page is drawn in (navigation, who is signed
//! in, sign-out), the error page, and small shared pieces (times, links,
//! state badges). maud escapes every value put into a page: node labels,
//! failure reasons and log tails are text a node chose.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};

use super::assets;
use super::session::Signed;

/// A whole page.
pub fn page(title: &str, signed: Option<&Signed>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Flotilla" }
                link rel="stylesheet" href=(assets::css_path());
                script src=(assets::js_path()) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Flotilla" }
                    @if let Some(s) = signed {
                        nav aria-label="Main" {
                            a href="/" { "Overview" }
                            a href="/nodes" { "Nodes" }
                            a href="/approvals" { "Approvals" }
                            a href="/compliance" { "Compliance" }
                            a href="/audit" { "Audit" }
                        }
                        div.who {
                            span { (s.caller.name) " · " (s.caller.role.as_str()) }
                            form method="post" action="/signout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// A request the dashboard cannot answer with its page.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
    /// Not signed in (or the session ended): sent to the sign-in page.
    signin: bool,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: flotilla_proto::limits::clip(&message.into(), 500),
            signin: false,
        }
    }
    pub fn signin() -> Self {
        Self {
            signin: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "sign in first")
        }
    }
    pub fn signin_because(why: &str) -> Self {
        Self {
            signin: true,
            ..Self::new(StatusCode::UNAUTHORIZED, why)
        }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("dashboard: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<tonic::Status> for PageError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::Unauthenticated => return Self::signin_because(s.message()),
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, s.message())
    }
}

impl From<crate::error::Error> for PageError {
    fn from(e: crate::error::Error) -> Self {
        tonic::Status::from(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if self.signin {
            return Redirect::to("/signin").into_response();
        }
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = html! {
            h1 { (self.status.as_u16()) " " (title) }
            p.problem role="alert" { (self.message) }
            p { a href="/" { "Back to the overview" } }
        };
        (self.status, page(title, None, body)).into_response()
    }
}

pub async fn not_found() -> PageError {
    PageError::not_found("no such page")
}

/// A path segment with everything but unreserved characters percent-encoded
/// (ids come from nodes and publishers).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A time in milliseconds since the epoch, in UTC to the second; "—" for none.
pub fn at_ms(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    at_secs(ms / 1000)
}

pub fn at_secs(secs: i64) -> String {
    if secs <= 0 {
        return "—".into();
    }
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "—".into(),
    }
}

/// A state or phase as a badge; its class says how it stands (the word is
/// always shown: color is never the only sign).
pub fn badge(state: &str) -> Markup {
    let class = match state {
        "committed" | "completed" | "accepted" | "online" | "active" | "healthy" | "compliant" => {
            "ok"
        }
        "failed" | "rolled_back" | "aborted" | "rejected" | "revoked" | "overdue" | "offline"
        | "refused" => "bad",
        "paused" | "pending" | "waiting" | "missing" | "standby" => "warn",
        _ => "info",
    };
    html! { span class={ "badge " (class) } { (state) } }
}

/// A page's links to the pages before and after it.
pub fn pager(prev: Option<String>, next: Option<String>) -> Markup {
    html! {
        nav.pager aria-label="Pages" {
            @if let Some(p) = prev { a rel="prev" href=(p) { "← Previous" } }
            @if let Some(n) = next { a rel="next" href=(n) { "Next →" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("pos-app_2.4.1"), "pos-app_2.4.1");
        assert_eq!(seg("a/b c?<"), "a%2Fb%20c%3F%3C");
    }

    #[test]
    fn attacker_text_is_escaped() {
        let label = "<img src=x onerror=alert(1)>";
        let m = html! { td { (label) } td title=(label) {} };
        let s = m.into_string();
        assert!(!s.contains("<img"), "{s}");
        assert!(s.contains("&lt;img src=x onerror=alert(1)&gt;"), "{s}");
    }
}
