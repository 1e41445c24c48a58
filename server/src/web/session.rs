//! Dashboard sessions: an operator credential's secret is exchanged once for
//! a random session token in a cookie (`HttpOnly`, `Secure`,
//! `SameSite=Strict`, `__Host-` prefixed). The store keeps only the token's
//! SHA-256, so any replica answers for a session and a sign-out ends it
//! everywhere. Each request checks the credential again (revoked, expired,
//! role changed). Every form carries the session's CSRF token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use flotilla_proto::pb;
use flotilla_proto::pb::admin_service_server::AdminService;
use maud::html;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Web;
use super::layout::{self, PageError};
use crate::credentials::{self, Authenticated, Caller};
use crate::model::now_ms;
use crate::store::Db;

/// How long a session lasts from its sign-in, whatever is done with it.
pub const SESSION_TTL: Duration = Duration::from_secs(3600);
/// Sessions one credential may hold at once: a new sign-in past it ends the
/// credential's oldest (the store stays bounded however often one signs in).
const SESSIONS_PER_CREDENTIAL: usize = 16;
/// How long the sign-in form's token is good for.
const SIGNIN_TTL_SECS: u64 = 600;
/// Expired sessions are removed this often (and whenever one is presented).
const SWEEP_EVERY: Duration = Duration::from_secs(600);

const SESSION_COOKIE: &str = "__Host-flotilla-session";
const SIGNIN_COOKIE: &str = "__Host-flotilla-signin";
const PREFIX: &str = "web-sessions/";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    /// The credential's id: checked again at every request.
    credential: String,
    csrf: String,
    created_ms: i64,
    expires_ms: i64,
    source: String,
}

pub struct Sessions {
    db: Db,
    /// Sign-ins per credential: each is a session write and an audit entry,
    /// kept for good. Counted only once the credential checked out (a wrong
    /// secret is the guess guard's), so nobody can use up another's.
    signins: governor::DefaultKeyedRateLimiter<String>,
}

/// Sign-ins one credential may make back to back, then one a minute.
const SIGNIN_BURST: u32 = 10;

fn key(token: &str) -> String {
    format!("{PREFIX}{}", flotilla_proto::sha256_hex(token.as_bytes()))
}

/// 256 random bits, in hex.
fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    pub fn new(db: Db) -> Self {
        let quota = governor::Quota::per_minute(std::num::NonZeroU32::MIN)
            .allow_burst(std::num::NonZeroU32::new(SIGNIN_BURST).expect("non-zero"));
        Self {
            db,
            signins: governor::RateLimiter::keyed(quota),
        }
    }

    /// A new session for `credential`; its token (for the cookie) and CSRF token.
    async fn create(&self, credential: &str, source: &str) -> Result<(String, String), PageError> {
        let now = now_ms();
        self.prune(Some(credential)).await?;
        let token = random_token();
        let record = SessionRecord {
            credential: credential.to_string(),
            csrf: random_token(),
            created_ms: now,
            expires_ms: now + SESSION_TTL.as_millis() as i64,
            source: source.to_string(),
        };
        // Durable before the cookie is handed out.
        self.db
            .put(&key(&token), &record)
            .await
            .map_err(PageError::internal)?;
        Ok((token, record.csrf))
    }

    /// Removes expired sessions, and when `credential` is given, its oldest
    /// past the per-credential bound (making room for one more).
    async fn prune(&self, credential: Option<&str>) -> Result<(), PageError> {
        let now = now_ms();
        let all: Vec<(String, SessionRecord)> = self
            .db
            .list_keyed(PREFIX)
            .await
            .map_err(PageError::internal)?;
        let mut mine = Vec::new();
        for (k, s) in all {
            if s.expires_ms <= now {
                self.db
                    .raw()
                    .delete(&k)
                    .await
                    .map_err(PageError::internal)?;
            } else if Some(s.credential.as_str()) == credential {
                mine.push((s.created_ms, k));
            }
        }
        mine.sort();
        let excess = (mine.len() + 1).saturating_sub(SESSIONS_PER_CREDENTIAL);
        for (_, k) in mine.into_iter().take(excess) {
            self.db
                .raw()
                .delete(&k)
                .await
                .map_err(PageError::internal)?;
        }
        Ok(())
    }

    async fn find(&self, token: &str) -> Result<Option<(String, SessionRecord)>, PageError> {
        if token.len() != 64 {
            return Ok(None);
        }
        let k = key(token);
        let Some(s) = self
            .db
            .get::<SessionRecord>(&k)
            .await
            .map_err(PageError::internal)?
        else {
            return Ok(None);
        };
        if s.expires_ms <= now_ms() {
            self.db
                .raw()
                .delete(&k)
                .await
                .map_err(PageError::internal)?;
            return Ok(None);
        }
        Ok(Some((k, s)))
    }
}

/// Removes expired sessions every [`SWEEP_EVERY`] until `shutdown`.
pub async fn sweep(sessions: Arc<Sessions>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        if let Err(e) = sessions.prune(None).await {
            tracing::warn!("cannot remove expired dashboard sessions: {}", e.message);
        }
    }
}

/// The signed-in operator a request comes from.
#[derive(Debug, Clone)]
pub struct Signed {
    pub caller: Caller,
    pub csrf: String,
    key: String,
}

impl Signed {
    /// A request to an admin call made on this operator's behalf.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.extensions_mut()
            .insert(Authenticated(self.caller.clone()));
        r
    }

    /// Which session this is (the stream places it holds are counted by it).
    pub fn session_key(&self) -> &str {
        &self.key
    }

    /// Whether this operator's role allows `needed` (what a page shows; the
    /// admin call checks again).
    pub fn may(&self, needed: crate::model::OperatorRole) -> bool {
        self.caller.role.allows(needed)
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, sent: &str) -> Result<(), PageError> {
        if crate::tokens::digest_eq(sent, &self.csrf) {
            Ok(())
        } else {
            Err(PageError::forbidden(
                "the form's CSRF token is missing or is not this session's: reload the page and try again",
            ))
        }
    }

    /// Whether the session still stands (not signed out or expired, its
    /// credential still valid): for a long-lived stream opened with it.
    pub async fn still_valid(&self, web: &Web) -> Result<(), PageError> {
        let s: Option<SessionRecord> = web
            .app
            .db
            .get(&self.key)
            .await
            .map_err(PageError::internal)?;
        match s {
            Some(s) if s.expires_ms > now_ms() => credentials::current(&web.app.db, &s.credential)
                .await
                .map(|_| ())
                .map_err(|e| PageError::signin_because(&e.to_string())),
            _ => Err(PageError::signin()),
        }
    }

    /// The first 8 hex digits of the session's key: what the audit log names.
    fn short(&self) -> &str {
        &self.key[PREFIX.len()..PREFIX.len() + 8]
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<Web> for Signed {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, Self::Rejection> {
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(PageError::signin());
        };
        let Some((key, s)) = web.sessions.find(token).await? else {
            return Err(PageError::signin());
        };
        let caller = match credentials::current(&web.app.db, &s.credential).await {
            Ok(c) => c,
            Err(crate::error::Error::Unauthenticated(why)) => {
                // The credential was revoked or expired: the session ends with it.
                web.app
                    .db
                    .raw()
                    .delete(&key)
                    .await
                    .map_err(PageError::internal)?;
                return Err(PageError::signin_because(&why));
            }
            Err(e) => return Err(PageError::internal(e)),
        };
        // A live session: the connection is a signed-in browser's, kept
        // past the pending deadline (see `web::serve`).
        web.connections.authenticated(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        );
        Ok(Signed {
            caller,
            csrf: s.csrf,
            key,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    credential: String,
}

const SECURE_COOKIE: &str = "Path=/; Secure; HttpOnly; SameSite=Strict";

fn set_cookie(name: &str, value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; {SECURE_COOKIE}; Max-Age={max_age}"
    ))
    .expect("cookie values are URL-safe")
}

/// The sign-in form, with a fresh sign-in token in a cookie and in the form
/// (a form posted from another site has neither).
pub async fn signin_page() -> Response {
    signin_form(None, axum::http::StatusCode::OK)
}

fn signin_form(problem: Option<&str>, status: axum::http::StatusCode) -> Response {
    let token = random_token();
    let body = html! {
        h1 { "Sign in" }
        @if let Some(p) = problem {
            p.problem role="alert" { (p) }
        }
        form.signin method="post" action="/signin" {
            input type="hidden" name="csrf" value=(token);
            label for="credential-file" { "Credential file" }
            input #credential-file type="file" accept=".toml,.txt,text/plain" data-fills="credential";
            label for="credential" { "or paste it (the whole file, or the " code { "id.secret" } " line)" }
            textarea #credential name="credential" rows="6" required autocomplete="off" spellcheck="false" {}
            button type="submit" { "Sign in" }
        }
        p.hint {
            "The secret is exchanged for a session of "
            (SESSION_TTL.as_secs() / 60)
            " minutes; the dashboard never keeps it."
        }
    };
    let mut r = (status, layout::page("Sign in", None, body)).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SIGNIN_COOKIE, &token, SIGNIN_TTL_SECS),
    );
    r
}

/// The bearer string in what was pasted: a credential file (TOML) or the
/// `id.secret` line itself.
fn bearer_of(pasted: &str) -> Option<String> {
    let pasted = pasted.trim();
    if let Ok(file) = toml::from_str::<crate::credential_file::CredentialFile>(pasted) {
        return Some(file.credential);
    }
    let line = pasted.strip_prefix("credential").map_or(pasted, |rest| {
        rest.trim_start()
            .trim_start_matches('=')
            .trim()
            .trim_matches('"')
    });
    (!line.is_empty() && line.len() <= 256 && !line.contains(char::is_whitespace))
        .then(|| line.to_string())
}

pub async fn signin(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let expected = cookie(&headers, SIGNIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !crate::tokens::digest_eq(&form.csrf, expected) {
        return PageError::forbidden(
            "the sign-in form's token is missing or stale: open the sign-in page again",
        )
        .into_response();
    }
    let Some(bearer) = bearer_of(&form.credential) else {
        return signin_form(
            Some("That is not a credential file or an id.secret credential."),
            axum::http::StatusCode::BAD_REQUEST,
        );
    };
    // Checked by the admin API itself, so a wrong secret is counted and
    // audited (`auth.failed`) for this address as the CLI's are.
    let mut req = tonic::Request::new(pb::WhoAmIRequest {});
    if let Ok(v) = format!("Bearer {bearer}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req.extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(peer),
        });
    req.extensions_mut()
        .insert(crate::connections::OtherListener);
    let who = match web.api.who_am_i(req).await {
        Ok(who) => who.into_inner(),
        Err(status) => {
            return signin_form(
                Some(&flotilla_proto::limits::clip(status.message(), 300)),
                axum::http::StatusCode::UNAUTHORIZED,
            );
        }
    };
    let Some(id) = credentials::bearer_id(&bearer) else {
        return PageError::internal("an accepted credential without an id").into_response();
    };
    web.connections.authenticated(Some(peer));
    if web.sessions.signins.check_key(&id.to_string()).is_err() {
        return signin_form(
            Some(&format!(
                "{SIGNIN_BURST} sign-ins with this credential came just now: wait a minute \
                 (its sessions last an hour; signing out and in again is not needed)"
            )),
            axum::http::StatusCode::TOO_MANY_REQUESTS,
        );
    }
    let source = peer.ip().to_string();
    let (token, _) = match web.sessions.create(id, &source).await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let short = &key(&token)[PREFIX.len()..PREFIX.len() + 8];
    if let Err(e) = web
        .app
        .audit
        .record(
            &who.name,
            crate::audit::Action::DashboardSignIn,
            "dashboard",
            serde_json::json!({ "source": source, "session": short }),
        )
        .await
    {
        return PageError::internal(e).into_response();
    }
    let mut r = Redirect::to("/").into_response();
    let headers = r.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &token, SESSION_TTL.as_secs()),
    );
    headers.append(header::SET_COOKIE, set_cookie(SIGNIN_COOKIE, "", 0));
    r
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// A form that asks for one action (pause, accept, ...), with its CSRF token.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub action: String,
}

/// Ends the session in the store (the cookie is useless from then on, on
/// every replica) and clears the cookie.
pub async fn signout(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    signed: Signed,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    signed.check_csrf(&form.csrf)?;
    web.app
        .db
        .raw()
        .delete(&signed.key)
        .await
        .map_err(PageError::internal)?;
    web.app
        .audit
        .record(
            &signed.caller.name,
            crate::audit::Action::DashboardSignOut,
            "dashboard",
            serde_json::json!({ "source": peer.ip().to_string(), "session": signed.short() }),
        )
        .await
        .map_err(PageError::internal)?;
    let mut r = Redirect::to("/signin").into_response();
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_found_in_a_file_or_on_its_own() {
        let file = "credential = \"abcdefghij.s3cret\"\nca_certificate = \"PEM\"\n";
        assert_eq!(bearer_of(file).as_deref(), Some("abcdefghij.s3cret"));
        assert_eq!(
            bearer_of("  abcdefghij.s3cret\n").as_deref(),
            Some("abcdefghij.s3cret")
        );
        assert_eq!(
            bearer_of("credential = \"abcdefghij.s3cret\"").as_deref(),
            Some("abcdefghij.s3cret")
        );
        assert_eq!(bearer_of("two words"), None);
        assert_eq!(bearer_of(""), None);
    }

    #[test]
    fn cookies_are_read_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x__Host-flotilla-session=no; __Host-flotilla-session=yes"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("yes"));
        assert_eq!(cookie(&h, SIGNIN_COOKIE), None);
    }
}
