//! The dashboard in a real headless Chromium against a real server with real
//! agents: an operator signs in with the credential file, watches a node's
//! phase change on a live rollout page without a reload, pauses it (seen in
//! `flotilla rollout show`), a form from another site is refused, and
//! sign-out kills the cookie; a viewer finds no buttons, a forged POST is
//! refused, and a node label holding HTML shows as text. Screenshots of the
//! overview and the rollout page, desktop and phone, are written under the
//! build's temp dir (paths printed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_e2e::browser::Browser;
use flotilla_e2e::patch::{FleetOptions, build, cli, files_spec, fleet, key, noise, sign, tar};
use flotilla_e2e::web::Dashboard;
use flotilla_e2e::{Server, wait_until};

const XSS: &str = "<img src=x onerror=alert(1)>";

/// Publishes patch `id` (one file of `size` bytes) whose first wave is one
/// node and then bakes for an hour: it stays running.
fn publish(server: &Server, dir: &Path, key: &flotilla_e2e::patch::Key, id: &str, size: usize) {
    let tar_path = dir.join(format!("{id}.tar"));
    tar(&tar_path, &[("bin/tool", &noise(size, 7), 0o755)]);
    let spec = files_spec(dir, id, "1.0.0", &tar_path, "");
    let manifest = build(server, &spec, &dir.join(id));
    sign(server, &manifest, key);
    let (ok, out, err) = cli(
        server,
        &[
            "patch",
            "publish",
            manifest.to_str().unwrap(),
            "--waves",
            "1,100%",
            "--bake",
            "1h",
        ],
    );
    assert!(ok, "{out}{err}");
}

fn rollout_state(server: &Server, id: &str) -> String {
    server.cli_json(&["rollout", "show", id])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots")
}

/// Signs in through the form: the file picker (the page's script fills the
/// text area from it), or the text pasted.
fn sign_in(b: &Browser, base: &str, credential: &Path, by_file: bool) {
    b.goto(&format!("{base}/signin"));
    if by_file {
        b.send_keys("#credential-file", credential.to_str().unwrap());
        b.wait_for(
            "the file's text in the form",
            Duration::from_secs(10),
            "return document.getElementById('credential').value.includes('credential')",
        );
    } else {
        let text = std::fs::read_to_string(credential).unwrap();
        b.send_keys("#credential", &text);
    }
    b.click("form.signin button[type=submit]");
    b.wait_for(
        "the overview",
        Duration::from_secs(20),
        "return document.querySelector('h1') && document.querySelector('h1').textContent === 'Fleet overview'",
    );
}

#[test]
fn an_operator_follows_a_rollout_live_and_pauses_it() {
    let dir = tempfile::tempdir().unwrap();
    let release = key(dir.path(), "release");
    // Downloads trickle (64 KiB/s), so the first node's phase changes while
    // the page is open.
    let (server, _agents) = fleet(
        dir.path(),
        FleetOptions {
            agents: 3,
            server_keys: &[&release],
            pinned: &[&release],
            server_args: &["--web-listen", "127.0.0.1:0"],
            server_env: &[("FLOTILLA_FAULT_ARTIFACT_RATE", "65536".into())],
            ..FleetOptions::default()
        },
    );
    let web = Dashboard::of(&server);
    let base = web.url();
    let operator = server.new_credential(dir.path(), "oncall", "operator");
    let b = Browser::start();
    sign_in(&b, &base, &operator, true);
    let shots = screenshots();

    publish(&server, dir.path(), &release, "live-1", 256 * 1024);
    b.goto(&format!("{base}/rollouts/live-1"));
    // Marks this page: a reload would lose it.
    b.eval("window.sameDocument = 42; return true");
    assert!(
        !b.eval("return document.querySelector('#rollout-nodes').textContent")
            .as_str()
            .unwrap()
            .contains("committed"),
        "the first node finished before the page was open: slow the download further"
    );
    b.wait_for(
        "a node shown committed by the live stream",
        Duration::from_secs(60),
        "return [...document.querySelectorAll('#rollout-nodes td.phase')].some(td => td.textContent === 'committed')",
    );
    assert_eq!(
        b.eval("return window.sameDocument"),
        serde_json::json!(42),
        "the page was reloaded"
    );
    assert!(
        b.eval("return Number(document.getElementById('live').dataset.updates)")
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(rollout_state(&server, "live-1"), "running");

    // Screenshots at desktop and phone sizes.
    b.screenshot(&shots, "rollout-desktop");
    b.size(390, 844);
    b.screenshot(&shots, "rollout-phone");
    b.goto(&format!("{base}/"));
    b.screenshot(&shots, "overview-phone");
    b.size(1280, 900);
    b.goto(&format!("{base}/"));
    b.screenshot(&shots, "overview-desktop");

    // Pause, confirmed on its own page.
    b.goto(&format!("{base}/rollouts/live-1"));
    b.click("button[data-act=pause]");
    wait_until("the confirmation page", Duration::from_secs(10), || {
        b.path().ends_with("/confirm").then_some(())
    });
    b.click("#confirm");
    b.wait_for(
        "the page to show the rollout paused",
        Duration::from_secs(20),
        "return !!document.querySelector('#rollout-state') && document.querySelector('#rollout-state').textContent.includes('paused')",
    );
    assert_eq!(rollout_state(&server, "live-1"), "paused");
    assert!(b.exists("button[data-act=resume]"));

    // Another site's page posts a form to the dashboard (no CSRF token, and
    // the browser says where it comes from): refused, nothing changes.
    let attacker = attacker_page(&format!("{base}/rollouts/live-1/act"));
    b.goto(&attacker.url);
    b.wait_for(
        "the dashboard's answer to the cross-site form",
        Duration::from_secs(20),
        "return location.port !== '' && document.body && document.body.textContent.includes('refused')",
    );
    assert!(b.source().contains("another site"), "{}", b.source());
    assert_eq!(rollout_state(&server, "live-1"), "paused");

    // Sign-out ends the session on the server: the cookie is useless after.
    b.goto(&format!("{base}/"));
    let cookie = b
        .cookie("__Host-flotilla-session")
        .expect("the session cookie");
    b.click("header form button[type=submit]");
    wait_until("the sign-in page", Duration::from_secs(10), || {
        (b.path() == "/signin").then_some(())
    });
    assert!(b.cookie("__Host-flotilla-session").is_none());
    let again = web.get("/", Some(&format!("__Host-flotilla-session={cookie}")));
    assert_eq!(again.status, 303, "{}", again.body);
    assert_eq!(again.header("location"), Some("/signin"));
}

/// A page on another origin (http://localhost:port) holding a form that
/// posts itself to `target` with no token, as a cross-site attack would.
struct Attacker {
    url: String,
    _serve: std::thread::JoinHandle<()>,
}

fn attacker_page(target: &str) -> Attacker {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = format!(
        "<!doctype html><html><body><form id=f method=post action=\"{target}\">\
         <input type=hidden name=action value=resume></form>\
         <script>document.getElementById('f').submit()</script></body></html>"
    );
    let serve = std::thread::spawn(move || {
        // One page, to one browser: a bounded number of connections.
        for conn in listener.incoming().take(4) {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    Attacker {
        url: format!("http://localhost:{port}/"),
        _serve: serve,
    }
}

#[test]
fn a_viewer_sees_no_buttons_is_refused_and_hostile_labels_stay_text() {
    let dir = tempfile::tempdir().unwrap();
    let release = key(dir.path(), "release");
    let (server, _agents) = fleet(
        dir.path(),
        FleetOptions {
            agents: 2,
            server_keys: &[&release],
            pinned: &[&release],
            server_args: &["--web-listen", "127.0.0.1:0"],
            ..FleetOptions::default()
        },
    );
    let base = Dashboard::of(&server).url();
    let node = server.nodes()[0]["id"].as_str().unwrap().to_string();
    server.cli(&["nodes", "set-labels", &node, &format!("note={XSS}")]);
    publish(&server, dir.path(), &release, "view-1", 1024);
    wait_until("the first wave to commit", Duration::from_secs(60), || {
        let p = flotilla_e2e::patch::phases(&server, "view-1");
        p.iter().any(|(_, ph, _)| ph == "committed").then_some(())
    });
    let viewer = server.new_credential(dir.path(), "auditor", "viewer");
    let b = Browser::start();
    sign_in(&b, &base, &viewer, false);

    // The label is shown, as text, on the list and on the node's page: no
    // image element, no dialog.
    for page in ["/nodes".to_string(), format!("/nodes/{node}")] {
        b.goto(&format!("{base}{page}"));
        b.wait_for(
            "the page",
            Duration::from_secs(10),
            "return document.readyState === 'complete'",
        );
        assert!(!b.alert_open(), "{page}: a script ran");
        assert_eq!(b.eval("return document.querySelectorAll('img').length"), 0);
        let shown = b.eval("return document.querySelector('main').textContent");
        assert!(shown.as_str().unwrap().contains(XSS), "{page}: {shown}");
        assert!(b.source().contains("&lt;img src=x onerror=alert(1)&gt;"));
    }

    // No action buttons for a viewer.
    b.goto(&format!("{base}/rollouts/view-1"));
    assert!(b.exists("#rollout-state"));
    assert!(
        !b.exists("button[data-act]"),
        "a viewer sees an action button"
    );
    // A POST forged from the page with the session's own token: the
    // server refuses it for the role.
    let status = b.eval_async(
        "const done = arguments[arguments.length - 1];\
         const csrf = document.querySelector('input[name=csrf]').value;\
         fetch('/rollouts/view-1/act', {method: 'POST', body: new URLSearchParams({csrf, action: 'pause'})})\
           .then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(status, 403);
    assert_eq!(rollout_state(&server, "view-1"), "running");
}
