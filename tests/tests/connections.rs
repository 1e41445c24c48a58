//! Idle connection floods: thousands of connections that never finish TLS, from
//! one address and from many, do not lock anyone out. While they last an agent
//! joins, a running agent keeps its session, and an operator's call answers;
//! the flood's connections are closed at their deadline, and the refusals are
//! logged at a bounded rate. Connections that finish TLS and make requests
//! that authenticate nobody (a health check, an operator call without a right
//! credential) are closed at the same deadline; one connection cannot open
//! more than its streams, nor make the server hold more than a few unfinished
//! messages.

use std::time::{Duration, Instant};

use flotilla_e2e::{Agent, Server, h2, wait_until};

/// Connections the flood opens from 127.0.0.1 ...
const FROM_ONE: usize = 800;
/// ... and from each of 127.0.0.2 up.
const PER_OTHER: usize = 40;
const OTHERS: usize = 40;

const LIMIT_LINE: &str = "connections refused or closed by the connection limits";

/// Opens `n` TCP connections to `addr` from `source` that never send a byte.
async fn flood(addr: std::net::SocketAddr, source: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        // The kernel completes the connection whatever the server then does.
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr)).await
        {
            out.push(s);
        }
    }
    out
}

/// How many of `conns` the server has closed (a read sees the end or an error).
fn closed(conns: &[tokio::net::TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    conns
        .iter()
        .filter(|c| match c.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

#[test]
fn an_idle_connection_flood_locks_nobody_out() {
    // The flood holds thousands of descriptors in this process.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (server, running, running_id, token) = server_with_an_agent(
        dir.path(),
        Duration::from_secs(3),
        &["--max-pending-per-source", "32"],
    );
    let url = server.url();

    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut held = rt.block_on(flood(addr, "127.0.0.1", FROM_ONE));
    for i in 0..OTHERS {
        held.extend(rt.block_on(flood(addr, &format!("127.0.0.{}", i + 2), PER_OTHER)));
    }
    assert!(
        held.len() > 1000,
        "the flood opened {} connections",
        held.len()
    );

    // While the flood holds its connections: an operator's call answers, a new
    // agent joins, and the running agent keeps its session.
    let whoami = server.cli(&["whoami"]);
    assert!(whoami.contains("admin"), "{whoami}");
    let joined = Agent::new(dir.path(), "newcomer").join(&url, &token);
    assert!(joined.starts_with("node-"));
    let node = server.node(&running_id);
    assert_eq!(node["online"], true, "{node}");

    // Every flood connection is closed: refused at once, evicted for newer
    // ones, or at its deadline.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = closed(&held);
            if n == held.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{n} of {} flood connections closed after 30 s",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let elapsed = started.elapsed();
    // The running agent held its session through all of it (heartbeats were
    // answered: an agent the server heard nothing from would be offline).
    let node = server.node(&running_id);
    assert_eq!(node["online"], true, "{node}");
    assert!(running.is_running());

    // Refusals are logged at most once every ten seconds, with counts.
    let log = std::fs::read_to_string(&server.log).unwrap();
    let lines = log.matches(LIMIT_LINE).count();
    let bound = 2 + elapsed.as_secs() as usize / 10;
    assert!(
        (1..=bound).contains(&lines),
        "{lines} refusal lines in {elapsed:?}"
    );
}

/// How long a connection may go without its peer proving who it is, in the
/// tests below.
const PENDING: Duration = Duration::from_secs(3);
/// What the tests allow past a deadline for the server to act on it.
const SLACK: Duration = Duration::from_secs(2);

/// A server with short deadlines (`pending` for connections whose peer has
/// not proven who it is), and a running agent holding its session.
fn server_with_an_agent(
    dir: &std::path::Path,
    pending: Duration,
    extra_args: &[&str],
) -> (Server, Agent, String, String) {
    // Floods hold hundreds of descriptors in this process.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let mut server = Server::init(dir);
    server.extra_args.extend(
        [
            "--max-connections",
            "600",
            "--pending-timeout",
            &format!("{}s", pending.as_secs()),
            "--tls-handshake-timeout",
            "2s",
            "--max-connections-per-sec",
            "0",
        ]
        .map(String::from),
    );
    server
        .extra_args
        .extend(extra_args.iter().map(|a| a.to_string()));
    server.start();
    let token = server.token("pos", 2, &[]);
    let mut running = Agent::new(dir, "running");
    let id = running.join(&server.url(), &token);
    running.start(&[server.url()]);
    wait_until("the running agent online", Duration::from_secs(30), || {
        (server.node(&id)["online"] == true).then_some(())
    });
    (server, running, id, token)
}

/// The operator credential in the server's admin.credential.
fn bearer(server: &Server) -> String {
    std::fs::read_to_string(server.credential())
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("credential = \"")?
                .strip_suffix('"')
                .map(String::from)
        })
        .expect("a credential in admin.credential")
}

/// What a flood connection's peer does once TLS is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing at all.
    Silent,
    /// A health check, then nothing.
    HealthCheck,
    /// An operator call without a credential, then nothing.
    NoCredential,
    /// An operator call with a made-up credential, then nothing.
    WrongCredential,
}

/// How one flood connection went.
#[derive(Debug)]
struct Outcome {
    kind: Kind,
    /// Its request was answered (for the kinds that make one).
    answered: bool,
    /// From its connect to the server closing it; None: still open when the
    /// worker gave up waiting.
    lived: Option<Duration>,
}

/// One flood connection of `kind` from `source`; None if TLS never completed
/// (refused by the per-source caps).
async fn flood_once(
    addr: std::net::SocketAddr,
    source: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
    kind: Kind,
) -> Option<Outcome> {
    let opened = Instant::now();
    let tls = h2::tls(addr, source, config).await.ok()?;
    let mut answered = false;
    let gone = if kind == Kind::Silent {
        // Not even the HTTP/2 preface: wait for the server to close.
        let (mut read, _write) = tokio::io::split(tls);
        let mut buf = [0u8; 64];
        let wait = tokio::time::timeout(PENDING + 10 * SLACK, async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut read, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        wait.await.is_ok()
    } else {
        let mut conn = h2::Conn::start(tls).await.ok()?;
        let (path, extra): (&str, Vec<(&str, &str)>) = match kind {
            Kind::HealthCheck => ("/grpc.health.v1.Health/Check", vec![]),
            Kind::NoCredential => ("/flotilla.v1.AdminService/WhoAmI", vec![]),
            _ => (
                "/flotilla.v1.AdminService/WhoAmI",
                vec![("authorization", "Bearer cred000000.not-the-secret")],
            ),
        };
        let mut request = h2::frame(
            h2::HEADERS,
            h2::END_HEADERS,
            1,
            &h2::request_headers(path, &extra),
        );
        request.extend(h2::frame(h2::DATA, h2::END_STREAM, 1, &h2::grpc_prefix(0)));
        conn.send(&request).await.ok()?;
        let deadline = PENDING + 10 * SLACK;
        let end = conn
            .wait_for(deadline, |f| {
                f.stream == 1 && f.kind == h2::HEADERS && f.flags & h2::END_STREAM != 0
            })
            .await;
        answered = matches!(end, Ok(Some(_)));
        // Then idle (answering pings) until the server closes it.
        matches!(end, Ok(None)) || matches!(conn.wait_for(deadline, |_| false).await, Ok(None))
    };
    Some(Outcome {
        kind,
        answered,
        lived: gone.then(|| opened.elapsed()),
    })
}

#[test]
fn connections_that_authenticate_nobody_are_closed_at_the_pending_deadline() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let (server, running, running_id, token) = server_with_an_agent(dir.path(), PENDING, &[]);
    let url = server.url();
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let config = h2::tls_config(&server.ca_pem());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // An operator's connection: its call authenticated, so it stays.
    let operator = rt.block_on(async {
        let tls = h2::tls(addr, "127.0.0.1", &config).await.unwrap();
        let mut conn = h2::Conn::start(tls).await.unwrap();
        let auth = format!("Bearer {}", bearer(&server));
        let mut request = h2::frame(
            h2::HEADERS,
            h2::END_HEADERS,
            1,
            &h2::request_headers(
                "/flotilla.v1.AdminService/WhoAmI",
                &[("authorization", &auth)],
            ),
        );
        request.extend(h2::frame(h2::DATA, h2::END_STREAM, 1, &h2::grpc_prefix(0)));
        conn.send(&request).await.unwrap();
        let answer = conn
            .wait_for(Duration::from_secs(10), |f| {
                f.stream == 1 && f.kind == h2::HEADERS && f.flags & h2::END_STREAM != 0
            })
            .await;
        assert!(
            matches!(answer, Ok(Some(_))),
            "the operator's call: {answer:?}"
        );
        conn
    });
    let operator_since = Instant::now();

    // The flood: workers that open a connection, make their request, wait for
    // the server to close it, and start over, until told to stop. From one
    // address, more silent connections than its pending cap (64) lets in.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (source, kind, n) in [
        ("127.0.0.2", Kind::Silent, 100),
        ("127.0.0.3", Kind::HealthCheck, 16),
        ("127.0.0.4", Kind::NoCredential, 16),
        ("127.0.0.5", Kind::WrongCredential, 16),
    ] {
        for _ in 0..n {
            let (stop, answered, config) = (stop.clone(), answered.clone(), config.clone());
            workers.push(rt.spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match flood_once(addr, source, &config, kind).await {
                        Some(o) => {
                            if o.answered {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            outcomes.push(o);
                        }
                        // Refused: the per-source cap holds. Again shortly.
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                outcomes
            }));
        }
    }
    wait_until(
        "the flood's requests answered",
        Duration::from_secs(30),
        || (answered.load(Ordering::SeqCst) >= 48).then_some(()),
    );

    // While the flood lasts: an operator's call answers, a new agent joins,
    // and the running agent keeps its session.
    let whoami = server.cli(&["whoami"]);
    assert!(whoami.contains("admin"), "{whoami}");
    let joined = Agent::new(dir.path(), "newcomer").join(&url, &token);
    assert!(joined.starts_with("node-"));
    assert_eq!(server.node(&running_id)["online"], true);

    // The flood goes on through at least two deadlines.
    let flood_until = operator_since + 2 * PENDING + SLACK;
    wait_until("the flood's time", 3 * PENDING + SLACK, || {
        (Instant::now() >= flood_until).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = rt.block_on(async {
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    });

    // Every connection was closed at its deadline, whatever it asked: none
    // lived past the pending deadline (and the handshake) by more than the
    // slack, and those that made a request were answered first.
    for kind in [
        Kind::Silent,
        Kind::HealthCheck,
        Kind::NoCredential,
        Kind::WrongCredential,
    ] {
        let of_kind: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
        assert!(
            of_kind.len() >= 16,
            "{kind:?}: only {} connections",
            of_kind.len()
        );
        for o in &of_kind {
            let lived = o
                .lived
                .unwrap_or_else(|| panic!("a connection never closed: {o:?}"));
            assert!(lived <= PENDING + SLACK, "{o:?}");
            assert!(kind == Kind::Silent || o.answered, "{o:?}");
        }
    }
    eprintln!(
        "{} flood connections, each closed within {:?}",
        outcomes.len(),
        outcomes.iter().filter_map(|o| o.lived).max().unwrap()
    );

    // The operator's connection is still open past its pending deadline: a
    // ping comes back.
    let mut operator = operator;
    assert!(operator_since.elapsed() > PENDING + SLACK);
    let pong = rt.block_on(async {
        operator
            .send(&h2::frame(h2::PING, 0, 0, b"flotilla"))
            .await
            .unwrap();
        operator
            .wait_for(Duration::from_secs(10), |f| {
                f.kind == h2::PING && f.flags & h2::ACK != 0
            })
            .await
    });
    assert!(
        matches!(pong, Ok(Some(_))),
        "the operator's connection: {pong:?}"
    );
    assert_eq!(server.node(&running_id)["online"], true);
    assert!(running.is_running());
}

#[test]
fn a_connection_cannot_hold_more_streams_or_bodies_than_its_limits() {
    use std::collections::{BTreeMap, BTreeSet};

    let dir = tempfile::tempdir().unwrap();
    // Time enough to fill what the server takes before the deadline.
    let pending = 3 * PENDING;
    let (server, running, running_id, _) = server_with_an_agent(dir.path(), pending, &[]);
    let addr: std::net::SocketAddr = server.url().trim_start_matches("https://").parse().unwrap();
    let config = h2::tls_config(&server.ca_pem());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    /// Streams the test opens: more than the server's limit.
    const OPENED: u32 = 100;
    /// What each stream's message claims to be: the largest the server takes.
    const CLAIMED: u32 = 4 * 1024 * 1024;

    let (mut conn, opened_at) = rt.block_on(async {
        let opened_at = Instant::now();
        let tls = h2::tls(addr, "127.0.0.2", &config).await.unwrap();
        (h2::Conn::start(tls).await.unwrap(), opened_at)
    });
    // The server says how many streams it takes, and how much each may send.
    let settings = rt
        .block_on(conn.wait_for(Duration::from_secs(10), |f| {
            f.kind == h2::SETTINGS && f.flags & h2::ACK == 0
        }))
        .unwrap()
        .expect("the server's settings")
        .settings();
    let setting = |id| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    assert_eq!(
        setting(h2::MAX_CONCURRENT_STREAMS),
        Some(64),
        "{settings:?}"
    );
    let stream_window = i64::from(setting(h2::INITIAL_WINDOW_SIZE).unwrap_or(65_535));

    // OPENED join requests, each with the start of a message it never finishes.
    let streams: Vec<u32> = (0..OPENED).map(|i| 2 * i + 1).collect();
    let mut bytes = Vec::new();
    for &s in &streams {
        bytes.extend(h2::frame(
            h2::HEADERS,
            h2::END_HEADERS,
            s,
            &h2::request_headers("/flotilla.v1.AgentService/Enroll", &[]),
        ));
        bytes.extend(h2::frame(h2::DATA, 0, s, &h2::grpc_prefix(CLAIMED)));
    }
    rt.block_on(conn.send(&bytes)).unwrap();
    let mut sent: BTreeMap<u32, i64> = streams.iter().map(|&s| (s, 5)).collect();
    let mut window: BTreeMap<u32, i64> = streams.iter().map(|&s| (s, stream_window - 5)).collect();
    let mut connection = h2::DEFAULT_WINDOW - 5 * i64::from(OPENED);

    // Streams past the limit are refused.
    let mut refused = BTreeSet::new();
    /// Takes in a frame from the server: a refusal, or more room to send.
    fn take(
        f: &h2::Frame,
        refused: &mut BTreeSet<u32>,
        window: &mut BTreeMap<u32, i64>,
        connection: &mut i64,
    ) {
        match f.kind {
            // The data sent with a refused stream's headers may be answered
            // with another reset (STREAM_CLOSED).
            h2::RST_STREAM if refused.contains(&f.stream) => {}
            h2::RST_STREAM => {
                assert_eq!(f.u32_at(0), h2::REFUSED_STREAM, "stream {} reset", f.stream);
                refused.insert(f.stream);
            }
            h2::WINDOW_UPDATE if f.stream == 0 => *connection += i64::from(f.u32_at(0)),
            h2::WINDOW_UPDATE => {
                if let Some(w) = window.get_mut(&f.stream) {
                    *w += i64::from(f.u32_at(0));
                }
            }
            h2::GOAWAY => panic!("the server gave up the connection early: {f:?}"),
            _ => {}
        }
    }
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while refused.len() < (OPENED - 64) as usize {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = conn
                .wait_for(left, |_| true)
                .await
                .unwrap_or_else(|()| panic!("{} streams refused in 10 s", refused.len()))
                .expect("the connection is open");
            take(&f, &mut refused, &mut window, &mut connection);
        }
    });
    let refused_expected: BTreeSet<u32> = streams[64..].iter().copied().collect();
    assert_eq!(
        refused, refused_expected,
        "the streams past the 64th are refused"
    );

    // Send the open streams' bodies as fast as the server lets (its flow
    // control), never finishing one: what it takes in before it stops
    // granting more is what it holds for this connection.
    let open: Vec<u32> = streams[..64].to_vec();
    let total = rt.block_on(async {
        let chunk = vec![0x42u8; h2::MAX_FRAME];
        loop {
            let mut progressed = false;
            for &s in &open {
                let room = window[&s]
                    .min(connection)
                    .min(i64::from(CLAIMED) - sent[&s])
                    .min(h2::MAX_FRAME as i64);
                if room <= 0 {
                    continue;
                }
                let n = room as usize;
                if conn
                    .send(&h2::frame(h2::DATA, 0, s, &chunk[..n]))
                    .await
                    .is_err()
                {
                    break;
                }
                *sent.get_mut(&s).unwrap() += room;
                *window.get_mut(&s).unwrap() -= room;
                connection -= room;
                progressed = true;
            }
            // More room comes with the server's window updates; none for a
            // while means it takes nothing more.
            let wait = if progressed {
                Duration::from_millis(1)
            } else {
                SLACK
            };
            match conn.wait_for(wait, |_| true).await {
                Ok(Some(f)) => take(&f, &mut refused, &mut window, &mut connection),
                Ok(None) => break,
                Err(()) if !progressed => break,
                Err(()) => {}
            }
        }
        sent.values().sum::<i64>()
    });
    // A few messages being read (4 at once on a connection that has
    // authenticated nobody) and one connection window (1 MiB) waiting, with
    // 1 MiB to spare: not 64 streams' worth of 4 MiB messages.
    let bound = 4 * i64::from(CLAIMED) + 2 * 1024 * 1024;
    eprintln!(
        "the server took {total} bytes of unfinished bodies on one connection (bound {bound})"
    );
    assert!(total > 1024 * 1024, "the test sent {total} bytes");
    assert!(
        total <= bound,
        "the server took {total} bytes of unfinished bodies"
    );

    // Others are served meanwhile.
    let whoami = server.cli(&["whoami"]);
    assert!(whoami.contains("admin"), "{whoami}");
    // And the connection, which authenticated nobody, is closed at its
    // deadline with everything it holds.
    let end = rt.block_on(conn.wait_for(pending + 2 * SLACK, |_| false));
    assert!(
        matches!(end, Ok(None)),
        "still open after {:?}",
        opened_at.elapsed()
    );
    assert!(
        opened_at.elapsed() <= pending + SLACK,
        "{:?}",
        opened_at.elapsed()
    );
    assert_eq!(server.node(&running_id)["online"], true);
    assert!(running.is_running());
}
