//! A real headless Chromium (Debian's `chromium`, driven by its
//! `chromedriver` over WebDriver) for the dashboard's browser tests. Each
//! browser gets a fresh profile, sends nothing off the machine, and is
//! stopped with its driver when dropped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::{free_addr, wait_until};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    pub client: Client,
    rt: tokio::runtime::Runtime,
    driver: Child,
    _profile: tempfile::TempDir,
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
        let caps = json!({
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
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = caps.as_object().expect("object").clone();
        let url = format!("http://127.0.0.1:{port}");
        let client = rt
            .block_on(async {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&url)
                    .await
            })
            .expect("a Chromium session");
        Self {
            client,
            rt,
            driver,
            _profile: profile,
        }
    }

    /// Runs a browser step to its end.
    pub fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    pub fn goto(&self, url: &str) {
        self.run(self.client.goto(url)).expect("navigate");
    }

    /// The page's URL path.
    pub fn path(&self) -> String {
        self.run(self.client.current_url())
            .expect("current url")
            .path()
            .to_string()
    }

    pub fn source(&self) -> String {
        self.run(self.client.source()).expect("page source")
    }

    /// The value of a script run in the page.
    pub fn eval(&self, script: &str) -> serde_json::Value {
        self.run(self.client.execute(script, vec![]))
            .expect("script")
    }

    /// Clicks the element, found afresh if a live update replaced it
    /// between finding and clicking.
    pub fn click(&self, css: &str) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let tried = self.run(async {
                self.client
                    .wait()
                    .at_most(Duration::from_secs(20))
                    .for_element(Locator::Css(css))
                    .await?
                    .click()
                    .await
            });
            match tried {
                Ok(()) => return,
                Err(e) if e.to_string().contains("stale") && Instant::now() < until => {}
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    }

    pub fn exists(&self, css: &str) -> bool {
        !self
            .run(self.client.find_all(Locator::Css(css)))
            .expect("find")
            .is_empty()
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
        self.run(self.client.get_alert_text()).is_ok()
    }

    /// Resizes the window (390×844 is a phone).
    pub fn size(&self, width: u32, height: u32) {
        self.run(self.client.set_window_size(width, height))
            .expect("resize");
    }

    /// A PNG of the viewport, written to `dir/name.png`; its path.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let png = self.run(self.client.screenshot()).expect("screenshot");
        std::fs::create_dir_all(dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// A cookie's value as the browser holds it (WebDriver sees HttpOnly ones).
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.run(self.client.get_named_cookie(name))
            .ok()
            .map(|c| c.value().to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), client.close()).await
        });
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
