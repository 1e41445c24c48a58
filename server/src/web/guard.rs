//! What every dashboard answer carries (a strict Content-Security-Policy and
//! the other security headers, no caching of pages), and the refusal of any
//! state-changing request that another site sent: `Sec-Fetch-Site` or
//! `Origin` must name this dashboard (the per-session CSRF token is checked
//! as well, by each form's handler).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::layout::PageError;

/// Scripts, styles, images and connections from this origin only; no
/// inline script or style, no plugins, no framing, forms post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub async fn headers_and_origin(req: Request, next: Next) -> Response {
    let refused = if req.method() == Method::GET || req.method() == Method::HEAD {
        None
    } else {
        cross_site(req.headers())
    };
    let mut r = match refused {
        Some(why) => PageError::forbidden(why).into_response(),
        None => next.run(req).await,
    };
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // Not no-referrer: with it, browsers send `Origin: null` on same-origin
    // form posts, and the origin check could not tell them from forgeries.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    set(
        h,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        h,
        header::HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        h,
        header::HeaderName::from_static("permissions-policy"),
        "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    r
}

/// Why a state-changing request is refused as coming from another site, if
/// it is: a browser says where a request comes from in `Sec-Fetch-Site`
/// (and `Origin`), which a page cannot forge.
fn cross_site(h: &HeaderMap) -> Option<&'static str> {
    if let Some(site) = h.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Some("refused: this request was sent by another site");
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("https://"));
        if origin.is_none() || origin != host {
            return Some("refused: this request's Origin is not this dashboard");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn requests_from_other_sites_are_told_apart() {
        assert!(cross_site(&headers(&[])).is_none());
        assert!(
            cross_site(&headers(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "https://a:1"),
                ("host", "a:1")
            ]))
            .is_none()
        );
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert!(cross_site(&headers(&[("origin", "https://evil:1"), ("host", "a:1")])).is_some());
        assert!(cross_site(&headers(&[("origin", "null"), ("host", "a:1")])).is_some());
        assert!(cross_site(&headers(&[("origin", "http://a:1"), ("host", "a:1")])).is_some());
    }
}
