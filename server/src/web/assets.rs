//! The dashboard's stylesheet and script, compiled into the server and served
//! under names holding their content's hash, so a browser may keep them for
//! a year and a new build is fetched at once.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::layout::PageError;

const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

struct Asset {
    path: String,
    body: &'static str,
    content_type: &'static str,
}

fn asset(stem: &str, ext: &str, body: &'static str, content_type: &'static str) -> Asset {
    let hash = flotilla_proto::sha256_hex(body.as_bytes());
    Asset {
        path: format!("/static/{stem}.{}.{ext}", &hash[..16]),
        body,
        content_type,
    }
}

static ASSETS: LazyLock<[Asset; 2]> = LazyLock::new(|| {
    [
        asset("app", "css", CSS, "text/css; charset=utf-8"),
        asset("app", "js", JS, "text/javascript; charset=utf-8"),
    ]
});

pub fn css_path() -> &'static str {
    &ASSETS[0].path
}

pub fn js_path() -> &'static str {
    &ASSETS[1].path
}

pub async fn serve(Path(name): Path<String>) -> Result<Response, PageError> {
    let a = ASSETS
        .iter()
        .find(|a| a.path.strip_prefix("/static/") == Some(name.as_str()))
        .ok_or_else(|| PageError::not_found("no such file"))?;
    Ok((
        [
            (header::CONTENT_TYPE, a.content_type),
            // The name changes with the content: it never needs asking again.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        a.body,
    )
        .into_response())
}
