//! Events and webhooks against a real server: a receiver sees deficit, then
//! the join that fills it, then the rollout completed, in order and with valid
//! HMACs; events queued while the receiver is down survive a `kill -9` of the
//! server and arrive once it is up, every id at least once (the receiver
//! de-duplicates by id); an event older than the maximum age is dropped with
//! an audit entry; `flotilla events --follow` streams the same events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_e2e::{Agent, Server, bin, patch, wait_until};
use hmac::{Hmac, Mac};

const SECRET: &str = "a-webhook-secret-of-some-length";

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
struct Delivery {
    id: u64,
    kind: String,
    body: serde_json::Value,
}

/// An HTTP receiver on loopback that checks each delivery's signature and
/// answers 503 while `down`.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    down: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/flotilla", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (g, d, b) = (got.clone(), down.clone(), bad.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut headers = Vec::new();
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line.trim().is_empty() {
                        break;
                    }
                    headers.push(line.trim().to_ascii_lowercase());
                    line.clear();
                }
                let header = |name: &str| {
                    headers
                        .iter()
                        .find_map(|h| h.strip_prefix(&format!("{name}: ")).map(str::to_string))
                };
                let len: usize = header("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let status = if d.load(Ordering::SeqCst) {
                    "503 Service Unavailable"
                } else {
                    // t=<secs>,v1=<hex>: HMAC-SHA256 of "<t>.<body>".
                    let sig = header("flotilla-signature").unwrap_or_default();
                    let t = sig
                        .split(',')
                        .find_map(|p| p.strip_prefix("t="))
                        .unwrap_or("");
                    let v1 = sig
                        .split(',')
                        .find_map(|p| p.strip_prefix("v1="))
                        .unwrap_or("");
                    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                    mac.update(format!("{t}.").as_bytes());
                    mac.update(&body);
                    let fresh = t.parse::<i64>().is_ok_and(|t| {
                        (time::OffsetDateTime::now_utc().unix_timestamp() - t).abs() < 300
                    });
                    let valid = hex::decode(v1).is_ok_and(|v| mac.verify_slice(&v).is_ok());
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if !valid || !fresh {
                        b.lock()
                            .unwrap()
                            .push(format!("bad signature {sig:?} for {json}"));
                    }
                    let id = json["id"].as_u64().unwrap_or(0);
                    assert_eq!(header("flotilla-event-id"), Some(id.to_string()));
                    g.lock().unwrap().push(Delivery {
                        id,
                        kind: json["kind"].as_str().unwrap_or("").to_string(),
                        body: json,
                    });
                    "200 OK"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Self {
            url,
            got,
            down,
            bad,
        }
    }

    fn kinds(&self) -> Vec<(u64, String)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|d| (d.id, d.kind.clone()))
            .collect()
    }

    fn wait_for(&self, kind: &str, what: impl Fn(&serde_json::Value) -> bool) -> Delivery {
        wait_until(
            &format!("a {kind} delivery"),
            Duration::from_secs(60),
            || {
                self.got
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|d| d.kind == kind && what(&d.body))
                    .cloned()
            },
        )
    }
}

fn add_webhook(server: &Server, dir: &Path, url: &str, events: &str) -> serde_json::Value {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    server.cli_json(&[
        "webhook",
        "add",
        url,
        "--events",
        events,
        "--secret-file",
        secret.to_str().unwrap(),
    ])
}

#[test]
fn a_receiver_gets_deficit_join_and_completion_in_order_and_survives_a_server_kill() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);
    server.cli(&["group", "create", "store"]);
    let rx = Receiver::start();
    let hook = add_webhook(
        &server,
        dir.path(),
        &rx.url,
        "deficit,surplus,node.joined,rollout.completed",
    );
    let id = hook["id"].as_str().unwrap().to_string();

    // The group wants a node it does not have.
    server.cli(&["group", "set", "store", "--desired", "1"]);
    rx.wait_for("deficit", |b| b["data"]["deficit"] == 1);
    // A host joins and takes the role.
    let token = server.token("store", 1, &["--label", "site=berlin"]);
    let mut agent = Agent::new(dir.path(), "host00").with_root();
    let out = agent.join_output(
        &server.url(),
        &token,
        &["--trusted-key", k.public.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.start(&[server.url()]);
    rx.wait_for("node.joined", |_| true);
    rx.wait_for("deficit", |b| b["data"]["deficit"] == 0);
    // A patch rolled out to it.
    let tar = dir.path().join("app.tar");
    patch::tar(&tar, &[("VERSION", b"1\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "fix-1", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("fix-1"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let done = rx.wait_for("rollout.completed", |b| b["subject"] == "fix-1");
    let seq = rx.kinds();
    let pos = |kind: &str| seq.iter().position(|(_, k)| k == kind).unwrap();
    assert!(
        pos("deficit") < pos("node.joined") && pos("node.joined") < pos("rollout.completed"),
        "{seq:?}"
    );
    assert!(
        seq.windows(2).all(|w| w[0].0 < w[1].0),
        "out of order: {seq:?}"
    );
    assert_eq!(done.body["data"]["patch"], "fix-1");
    assert!(
        rx.bad.lock().unwrap().is_empty(),
        "{:?}",
        rx.bad.lock().unwrap()
    );

    // The receiver goes down; events queue; the server is killed and
    // restarted; the receiver comes back and gets them all.
    rx.down.store(true, Ordering::SeqCst);
    let before = rx.got.lock().unwrap().len();
    let last = rx.kinds().last().unwrap().0;
    server.cli(&["group", "set", "store", "--desired", "3"]);
    wait_until("the delivery to fail", Duration::from_secs(30), || {
        let list = server.cli_json(&["webhook", "list"]);
        (list[0]["failures"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    server.kill9();
    server.start();
    server.cli(&["group", "set", "store", "--desired", "2"]);
    rx.down.store(false, Ordering::SeqCst);
    rx.wait_for("deficit", |b| {
        b["data"]["deficit"] == 1 && b["id"].as_u64().unwrap() > last
    });
    // Every event of the kinds asked for, by id: none missing.
    let wanted: Vec<u64> = String::from_utf8(
        server
            .cli_as(
                &server.credential(),
                &[
                    "--json",
                    "events",
                    "--last",
                    "1000",
                    "--kinds",
                    "deficit,surplus,node.joined,rollout.completed",
                ],
            )
            .stdout,
    )
    .unwrap()
    .lines()
    .map(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
            .as_u64()
            .unwrap()
    })
    .collect();
    let got: std::collections::BTreeSet<u64> = rx.kinds().into_iter().map(|(id, _)| id).collect();
    let wanted: std::collections::BTreeSet<u64> = wanted.into_iter().collect();
    assert_eq!(got, wanted, "delivered ids against the log's");
    assert!(rx.got.lock().unwrap().len() > before);
    assert!(
        rx.got.lock().unwrap()[before..]
            .iter()
            .any(|d| d.body["data"]["deficit"] == 2)
    );
    assert!(rx.bad.lock().unwrap().is_empty());
    let list = server.cli_json(&["webhook", "list"]);
    assert_eq!(list[0]["id"], id.as_str());

    // Removed: nothing more is sent.
    server.cli(&["webhook", "remove", &id]);
    assert_eq!(server.cli_json(&["webhook", "list"]), serde_json::json!([]));
}

#[test]
fn an_event_past_the_maximum_age_is_dropped_with_an_audit_entry_and_events_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.env = vec![("FLOTILLA_WEBHOOK_MAX_AGE".into(), "2s".into())];
    server.start();
    server.cli(&["group", "create", "store"]);
    let rx = Receiver::start();
    rx.down.store(true, Ordering::SeqCst);
    add_webhook(&server, dir.path(), &rx.url, "deficit");

    // A follower sees it as it happens.
    let mut follow = Command::new(bin("flotilla"))
        .args(["--json", "events", "--follow", "--kinds", "deficit"])
        .env("FLOTILLA_SERVER", server.url())
        .env("FLOTILLA_CREDENTIAL", server.credential())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    server.cli(&["group", "set", "store", "--desired", "2"]);
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("a followed event");
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(followed["kind"], "deficit");
    assert_eq!(followed["data"]["deficit"], 2);

    // Down past the maximum age: dropped, audited, never sent.
    let audit = wait_until("the event dropped", Duration::from_secs(60), || {
        let audit = server.cli_json(&["audit"]).to_string();
        audit.contains("webhook.dropped").then_some(audit)
    });
    assert!(audit.contains("\"kind\":\"deficit\""), "{audit}");
    rx.down.store(false, Ordering::SeqCst);
    let list = server.cli_json(&["webhook", "list"]);
    assert_eq!(list[0]["dropped"], 1, "{list}");
    assert_eq!(list[0]["delivered_id"], followed["id"], "{list}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rx.kinds().is_empty(),
        "a dropped event was sent: {:?}",
        rx.kinds()
    );
}
