//! A real headless Chromium (Debian's `chromium`, driven by its
//! `chromedriver`) for the dashboard's browser tests. The W3C WebDriver
//! commands the tests use are a dozen JSON requests, sent here over the
//! harness's own HTTP client (a WebDriver crate would bring a second HTTP
//! stack and an MPL-licensed protocol crate for them). Each browser gets a
//! fresh profile, sends nothing off the machine, and is stopped with its
//! driver when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::{free_addr, wait_until};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How W3C WebDriver names an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver_port: u16,
    session: String,
    rt: tokio::runtime::Runtime,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// A WebDriver error: its `error` code and message.
#[derive(Debug)]
pub struct DriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

impl Browser {
    /// A new browser at desktop size (1280×900). The test command installs
    /// Chromium and its driver; a missing one fails the test, never skips it.
    pub fn start() -> Self {
        for p in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: scripts/test installs chromium and chromium-driver"
            );
        }
        let port = free_addr().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        wait_until("chromedriver to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Self {
            driver_port: port,
            session: String::new(),
            rt,
            driver,
            _profile: profile,
        };
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // The dashboard's certificate is from the fleet's own CA.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ],
            },
        } } });
        let made = b
            .send("POST", "/session".into(), Some(caps))
            .expect("a Chromium session");
        b.session = made["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b
    }

    /// One WebDriver command; its `value`, or the driver's error.
    fn send(&self, method: &str, path: String, body: Option<Value>) -> Result<Value, DriverError> {
        let port = self.driver_port;
        self.rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect to chromedriver");
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", format!("127.0.0.1:{port}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(60), send.send_request(req))
                .await
                .expect("chromedriver answers in time")
                .expect("an answer");
            let ok = resp.status().is_success();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            let v: Value = serde_json::from_slice(&bytes).expect("JSON from chromedriver");
            let value = v.get("value").cloned().unwrap_or(Value::Null);
            if ok {
                Ok(value)
            } else {
                Err(DriverError {
                    error: value["error"].as_str().unwrap_or("unknown").to_string(),
                    message: value["message"].as_str().unwrap_or("").to_string(),
                })
            }
        })
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, DriverError> {
        self.send(method, format!("/session/{}/{what}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url })))
            .expect("navigate");
    }

    /// The page's URL path.
    pub fn path(&self) -> String {
        self.eval("return location.pathname")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn source(&self) -> String {
        self.cmd("GET", "source", None)
            .expect("page source")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The value of a script run in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .expect("script")
    }

    /// The value an asynchronous script hands to its last argument.
    pub fn eval_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/async",
            Some(json!({ "script": script, "args": [] })),
        )
        .expect("async script")
    }

    fn find(&self, css: &str) -> Result<String, DriverError> {
        let v = self.cmd(
            "POST",
            "element",
            Some(json!({ "using": "css selector", "value": css })),
        )?;
        Ok(v[ELEMENT].as_str().expect("element id").to_string())
    }

    /// Acts on the element `css` names once it is there, found afresh if a
    /// live update replaced it between finding and acting.
    fn on_element(&self, css: &str, what: &str, body: Value) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let tried = self.find(css).and_then(|id| {
                self.cmd("POST", &format!("element/{id}/{what}"), Some(body.clone()))
            });
            match tried {
                Ok(_) => return,
                Err(e)
                    if Instant::now() < until
                        && (e.error == "no such element"
                            || e.error == "stale element reference") =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{what} on {css}: {e}"),
            }
        }
    }

    pub fn click(&self, css: &str) {
        self.on_element(css, "click", json!({}));
    }

    /// Types `text` into the element (for a file input: the file's path).
    pub fn send_keys(&self, css: &str, text: &str) {
        self.on_element(css, "value", json!({ "text": text }));
    }

    pub fn exists(&self, css: &str) -> bool {
        let v = self
            .cmd(
                "POST",
                "elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .expect("find");
        !v.as_array().expect("a list").is_empty()
    }

    /// Waits until the script run in the page returns true.
    pub fn wait_for(&self, what: &str, timeout: Duration, script: &str) {
        let until = Instant::now() + timeout;
        loop {
            if self.eval(script) == json!(true) {
                return;
            }
            if Instant::now() >= until {
                let seen = self.eval(
                    "return location.href + '\\n' + (document.body ? document.body.innerText : '')",
                );
                panic!("timed out after {timeout:?} waiting for {what}; the page: {seen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a dialog (an `alert` a script opened) is showing.
    pub fn alert_open(&self) -> bool {
        self.cmd("GET", "alert/text", None).is_ok()
    }

    /// Resizes the window (390×844 is a phone).
    pub fn size(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .expect("resize");
    }

    /// A PNG of the viewport, written to `dir/name.png`; its path.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "screenshot", None).expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64"))
            .expect("PNG");
        std::fs::create_dir_all(dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// A cookie's value as the browser holds it (WebDriver sees HttpOnly ones).
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cmd("GET", &format!("cookie/{name}"), None)
            .ok()
            .and_then(|c| c["value"].as_str().map(str::to_string))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.send("DELETE", format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
