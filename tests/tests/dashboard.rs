//! The dashboard over HTTP (real server, real TLS, no browser): the security
//! headers on every answer, the session cookie's attributes, sign-in and
//! sign-out, CSRF and cross-site refusals, and each endpoint's answer for
//! each role (viewer, operator, publisher, admin).

use std::path::PathBuf;
use std::time::Duration;

use flotilla_e2e::patch::{FleetOptions, fleet, key, phases, publish_signed};
use flotilla_e2e::web::Dashboard;
use flotilla_e2e::{Agent, Server, wait_until};

const ROLES: [&str; 4] = ["viewer", "operator", "publisher", "admin"];

struct Setup {
    _dir: tempfile::TempDir,
    server: Server,
    _agents: Vec<Agent>,
    web: Dashboard,
    /// Credential file per role, in [`ROLES`] order.
    creds: Vec<PathBuf>,
    /// A patch whose rollout waits for its (offline) nodes: running.
    patch: String,
    /// Nodes waiting for approval.
    pending: Vec<String>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let release = key(dir.path(), "release");
    // Two agents; the rollout's first wave (one node) commits, then it bakes
    // for an hour: running for the whole test.
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
    let web = Dashboard::of(&server);
    let creds = ROLES
        .iter()
        .map(|r| server.new_credential(dir.path(), &format!("web-{r}"), r))
        .collect();
    server.cli(&[
        "group", "config", "store", "--waves", "1,100%", "--bake", "1h",
    ]);
    let approval = server.token("store", 3, &["--approval"]);
    let pending = ["p1", "p2", "p3"]
        .iter()
        .map(|n| Agent::new(dir.path(), n).join(&server.url(), &approval))
        .collect();
    let (ok, out) = publish_signed(&server, dir.path(), "web-1", "1.0.0", "", &[&release]);
    assert!(ok, "{out}");
    wait_until("the first wave to commit", Duration::from_secs(60), || {
        let p = phases(&server, "web-1");
        (p.iter().filter(|(_, ph, _)| ph == "committed").count() == 1).then_some(())
    });
    assert_eq!(rollout_state(&server, "web-1"), "running");
    Setup {
        _dir: dir,
        server,
        _agents,
        web,
        creds,
        patch: "web-1".into(),
        pending,
    }
}

fn rollout_state(server: &Server, id: &str) -> String {
    server.cli_json(&["rollout", "show", id])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_answer_carries_the_security_headers_and_sessions_end_at_sign_out() {
    let s = setup();
    let web = &s.web;
    // Signed out: every page sends to the sign-in page; static files and
    // errors carry the headers too.
    let home = web.get("/", None);
    assert_eq!(home.status, 303);
    assert_eq!(home.header("location"), Some("/signin"));
    let signin = web.get("/signin", None);
    let css = signin
        .body
        .split('"')
        .find(|p| p.starts_with("/static/app.") && p.ends_with(".css"))
        .expect("a hashed stylesheet name")
        .to_string();
    let asset = web.get(&css, None);
    assert_eq!(asset.status, 200);
    assert_eq!(
        asset.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(web.get("/static/app.css", None).status, 404);
    for answer in [&home, &signin, &asset, &web.get("/no/such/page", None)] {
        let csp = answer.header("content-security-policy").expect("CSP");
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(part), "{csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(answer.header("x-frame-options"), Some("DENY"));
        assert_eq!(answer.header("referrer-policy"), Some("same-origin"));
        assert!(answer.header("strict-transport-security").is_some());
    }
    assert_eq!(home.header("cache-control"), Some("no-store"));

    // The sign-in form's own token: a post without it (as another site's
    // form would send) is refused, and nothing is signed in.
    let text = std::fs::read_to_string(&s.creds[1]).unwrap();
    let forged = web.post("/signin", None, &[("csrf", "x"), ("credential", &text)]);
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged.cookie("__Host-flotilla-session").is_none());

    // A wrong secret: refused, and audited as the CLI's refusals are.
    let page = web.get("/signin", None);
    let pre = page.cookie("__Host-flotilla-signin").unwrap();
    let csrf = page.csrf().unwrap();
    let id = text
        .split('"')
        .nth(1)
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string();
    let wrong = web.post(
        "/signin",
        Some(&pre),
        &[
            ("csrf", &csrf),
            ("credential", &format!("{id}.notthesecret")),
        ],
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.body.contains("not valid"), "{}", wrong.body);
    let audit = s.server.cli_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "auth.failed" && e["target"] == id.as_str()),
        "{audit}"
    );

    // A right one: the session cookie is host-only, secure, script-proof
    // and never sent cross-site.
    let page = web.get("/signin", None);
    let pre = page.cookie("__Host-flotilla-signin").unwrap();
    let ok = web.post(
        "/signin",
        Some(&pre),
        &[("csrf", &page.csrf().unwrap()), ("credential", &text)],
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    let line = ok
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("__Host-flotilla-session="))
        .expect("session cookie")
        .to_string();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(line.contains(attr), "{line}");
    }
    assert!(!line.contains("Domain"), "{line}");
    let session = ok.cookie("__Host-flotilla-session").unwrap();
    let home = web.get("/", Some(&session));
    assert_eq!(home.status, 200);
    assert!(home.body.contains("web-operator"), "{}", home.body);
    let csrf = home.csrf().unwrap();

    // A live rollout stream is open on this session.
    let (tx, rx) = std::sync::mpsc::channel();
    let follower = Dashboard::at(web.addr, &s.server.ca_pem());
    let (live_path, cookie) = (format!("/rollouts/{}/live", s.patch), session.clone());
    let live = std::thread::spawn(move || follower.follow(&live_path, &cookie, tx));
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a first update");
    assert!(first.contains("event: update"), "{first}");

    // Sign-out without the CSRF token is refused and ends nothing.
    assert_eq!(web.post("/signout", Some(&session), &[]).status, 403);
    assert_eq!(web.get("/", Some(&session)).status, 200);
    let out = web.post("/signout", Some(&session), &[("csrf", &csrf)]);
    assert_eq!(out.status, 303);
    // The open stream ends with the session (within its next look).
    let mut rest = String::new();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(20)) {
        rest.push_str(&chunk);
    }
    assert!(rest.contains("event: end"), "{rest}");
    assert_eq!(live.join().unwrap(), 200);
    // The server forgot the session: the old cookie is useless.
    assert_eq!(web.get("/", Some(&session)).status, 303);
    assert_eq!(web.get("/nodes", Some(&session)).status, 303);
    let actions: Vec<String> = s
        .server
        .cli_json(&["audit"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "web-operator")
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions, ["dashboard.signin", "dashboard.signout"]);

    // A revoked credential ends its sessions at once.
    let (session, _) = web.sign_in(&s.creds[0]);
    s.server.cli(&["credential", "revoke", "web-viewer"]);
    assert_eq!(web.get("/", Some(&session)).status, 303);

    // Sign-ins of one credential in a loop: each is a session and an audit
    // entry kept for good, so past a burst they wait (and others do not).
    let text = std::fs::read_to_string(&s.creds[3]).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..14 {
        let page = web.get("/signin", None);
        let pre = page.cookie("__Host-flotilla-signin").unwrap();
        let csrf = page.csrf().unwrap();
        let done = web.post(
            "/signin",
            Some(&pre),
            &[("csrf", &csrf), ("credential", &text)],
        );
        if done.status == 429 {
            assert!(done.body.contains("wait a minute"), "{}", done.body);
        }
        statuses.push(done.status);
    }
    let signed_in = statuses.iter().filter(|&&c| c == 303).count();
    assert!((1..=10).contains(&signed_in), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    web.sign_in(&s.creds[2]);
    let audit = s.server.cli_json(&["audit", "--limit", "200"]);
    let entries = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "web-admin" && e["action"] == "dashboard.signin")
        .count();
    assert_eq!(entries, signed_in, "{audit}");
}

#[test]
fn state_changes_from_another_site_or_without_the_token_are_refused() {
    let s = setup();
    let web = &s.web;
    let (session, csrf) = web.sign_in(&s.creds[1]);
    let path = format!("/rollouts/{}/act", s.patch);
    let body = flotilla_e2e::web::form(&[("csrf", &csrf), ("action", "pause")]);
    let form = ("content-type", "application/x-www-form-urlencoded");
    let cookie = ("cookie", session.as_str());
    // The browser says another site sent it (Sec-Fetch-Site, Origin): refused
    // even with the right token.
    for headers in [
        vec![form, cookie, ("sec-fetch-site", "cross-site")],
        vec![form, cookie, ("sec-fetch-site", "same-site")],
        vec![form, cookie, ("origin", "https://evil.example")],
        vec![form, cookie, ("origin", "null")],
    ] {
        let a = web.request("POST", &path, &headers, &body);
        assert_eq!(a.status, 403, "{headers:?}: {}", a.body);
        assert!(
            a.body.contains("another site") || a.body.contains("Origin"),
            "{}",
            a.body
        );
    }
    // Same origin, but no token or another session's token.
    let (_, other_csrf) = web.sign_in(&s.creds[3]);
    for fields in [
        vec![("action", "pause")],
        vec![("csrf", ""), ("action", "pause")],
        vec![("csrf", other_csrf.as_str()), ("action", "pause")],
    ] {
        let a = web.post(&path, Some(&session), &fields);
        assert_eq!(a.status, 403, "{fields:?}: {}", a.body);
        assert!(a.body.contains("CSRF"), "{}", a.body);
    }
    assert_eq!(rollout_state(&s.server, &s.patch), "running");
    // The same request, rightly made, goes through.
    let a = web.post(
        &path,
        Some(&session),
        &[("csrf", &csrf), ("action", "pause")],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(rollout_state(&s.server, &s.patch), "paused");
}

#[test]
fn each_endpoint_answers_each_role_as_the_cli_does() {
    let s = setup();
    let web = &s.web;
    let node = s.server.nodes()[0]["id"].as_str().unwrap().to_string();
    let pages = [
        "/".to_string(),
        "/nodes".into(),
        "/nodes?state=pending".into(),
        format!("/nodes/{node}"),
        "/approvals".into(),
        "/compliance".into(),
        "/compliance.csv".into(),
        "/audit".into(),
        format!("/patches/{}", s.patch),
        format!("/rollouts/{}", s.patch),
        format!("/rollouts/{}/confirm?action=pause", s.patch),
    ];
    // Signed out: nothing but the sign-in page.
    for p in &pages {
        assert_eq!(web.get(p, None).status, 303, "{p}");
    }
    for (i, role) in ROLES.iter().enumerate() {
        let (session, csrf) = web.sign_in(&s.creds[i]);
        // Every role reads everything.
        for p in &pages {
            let a = web.get(p, Some(&session));
            assert_eq!(a.status, 200, "{role} {p}: {}", a.body);
        }
        // Buttons only for who may press them.
        let may_operate = matches!(*role, "operator" | "admin");
        let rollout = web.get(&format!("/rollouts/{}", s.patch), Some(&session));
        assert_eq!(
            rollout.body.contains("data-act=\"pause\""),
            may_operate,
            "{role}"
        );
        let approvals = web.get("/approvals", Some(&session));
        assert_eq!(
            approvals.body.contains("value=\"accept\""),
            may_operate,
            "{role}"
        );

        // Every action, asked by each role: the server decides, whatever
        // the page showed.
        let act = |action: &str| {
            web.post(
                &format!("/rollouts/{}/act", s.patch),
                Some(&session),
                &[("csrf", &csrf), ("action", action)],
            )
        };
        let decide = |id: &str, action: &str| {
            web.post(
                &format!("/nodes/{id}/decide"),
                Some(&session),
                &[("csrf", &csrf), ("action", action)],
            )
        };
        if may_operate {
            assert_eq!(act("pause").status, 303);
            assert_eq!(rollout_state(&s.server, &s.patch), "paused");
            assert_eq!(act("resume").status, 303);
            assert_eq!(rollout_state(&s.server, &s.patch), "running");
            let id = &s.pending[if *role == "operator" { 0 } else { 1 }];
            assert_eq!(decide(id, "accept").status, 303);
            assert_eq!(s.server.node(id)["status"], "accepted");
        } else {
            for action in ["pause", "resume", "abort", "abort-rollback"] {
                let a = act(action);
                assert_eq!(a.status, 403, "{role} {action}: {}", a.body);
                assert!(a.body.contains("needs role operator"), "{}", a.body);
            }
            for action in ["accept", "reject"] {
                let a = decide(&s.pending[2], action);
                assert_eq!(a.status, 403, "{role} {action}: {}", a.body);
            }
            assert_eq!(rollout_state(&s.server, &s.patch), "running");
            assert_eq!(s.server.node(&s.pending[2])["status"], "pending");
        }
    }
    // Unknown things are named, not guessed at.
    let (session, csrf) = web.sign_in(&s.creds[3]);
    assert_eq!(web.get("/rollouts/nosuch", Some(&session)).status, 404);
    assert_eq!(web.get("/nodes/nosuch", Some(&session)).status, 404);
    assert_eq!(web.get("/nodes?group=nosuch", Some(&session)).status, 404);
    assert_eq!(web.get("/nodes?state=sideways", Some(&session)).status, 400);
    let bad = web.post(
        &format!("/rollouts/{}/act", s.patch),
        Some(&session),
        &[("csrf", &csrf), ("action", "explode")],
    );
    assert_eq!(bad.status, 400);
    // The last: an admin aborts with rollback.
    let a = web.post(
        &format!("/rollouts/{}/act", s.patch),
        Some(&session),
        &[("csrf", &csrf), ("action", "abort-rollback")],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(rollout_state(&s.server, &s.patch), "aborted");

    // Each action audited under the credential that asked, as the CLI's.
    let audit = s.server.cli_json(&["audit"]);
    let by = |actor: &str, action: &str| {
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == actor && e["action"] == action)
    };
    for actor in ["web-operator", "web-admin"] {
        for action in ["rollout.pause", "rollout.resume", "node.accept"] {
            assert!(by(actor, action), "{actor} {action}: {audit}");
        }
    }
    assert!(by("web-admin", "rollout.abort"));
    assert!(!by("web-viewer", "rollout.pause") && !by("web-publisher", "rollout.pause"));
}

/// Idle connections (TCP only, never a TLS handshake) from one address past
/// its cap, and from many addresses past the pending bound in all: the
/// dashboard's per-source cap closes the excess at once, a browser from
/// another address still signs in and reads pages while the flood lasts
/// (the oldest idle connection makes room), and every idle one is closed at
/// the pending deadline.
#[test]
fn idle_connection_floods_leave_the_dashboard_to_the_people_on_call() {
    use tokio::io::AsyncReadExt;
    // The flood holds a few hundred descriptors in this process.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();

    const PENDING_S: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.extra_args.extend(
        [
            "--web-listen",
            "127.0.0.1:0",
            "--pending-timeout",
            &format!("{PENDING_S}s"),
            "--tls-handshake-timeout",
            "2s",
        ]
        .map(String::from),
    );
    server.start();
    let web = Dashboard::of(&server);
    let cred = server.new_credential(dir.path(), "oncall", "operator");
    let addr = web.addr;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let open = |source: String, n: usize| {
        rt.block_on(async move {
            let mut held = Vec::new();
            for _ in 0..n {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
                held.push(socket.connect(addr).await.expect("connect"));
            }
            held
        })
    };
    // The connections of `conns` the server has not closed within
    // `within` (all watched together), and how many it closed.
    let watch = |conns: Vec<tokio::net::TcpStream>, within: Duration| {
        rt.block_on(async move {
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 16];
                        let read = tokio::time::timeout(within, c.read(&mut buf)).await;
                        (c, matches!(read, Ok(Ok(0) | Err(_))))
                    })
                })
                .collect();
            let (mut open, mut gone) = (Vec::new(), 0);
            for t in tasks {
                match t.await.unwrap() {
                    (_, true) => gone += 1,
                    (c, false) => open.push(c),
                }
            }
            (open, gone)
        })
    };

    // One address: 40 idle connections, of which 16 may stay pending.
    let started = std::time::Instant::now();
    let (one, refused) = watch(open("127.0.0.2".into(), 40), Duration::from_secs(1));
    assert_eq!(refused, 24, "connections past one source's pending cap");
    // Many addresses: 10 x 16 more, past the 128 pending in all.
    let many: Vec<_> = (3..13)
        .flat_map(|i| open(format!("127.0.0.{i}"), 16))
        .collect();

    // While the flood is held, a browser from another address signs in and
    // reads pages.
    let (session, _) = web.sign_in(&cred);
    for path in ["/", "/nodes", "/audit"] {
        let page = web.get(path, Some(&session));
        assert_eq!(page.status, 200, "{path} during the flood: {}", page.body);
    }
    eprintln!(
        "signed in and read 3 pages during the flood, {:?} after it began",
        started.elapsed()
    );

    // Every idle connection is closed by the deadline (or was evicted
    // earlier to make room).
    let deadline = Duration::from_secs(PENDING_S + 10).saturating_sub(started.elapsed());
    let (left, _) = watch(one.into_iter().chain(many).collect(), deadline);
    assert!(
        left.is_empty(),
        "{} idle connections still open {:?} after the flood began",
        left.len(),
        started.elapsed()
    );
    // And the dashboard still answers.
    assert_eq!(web.get("/", Some(&session)).status, 200);
}
