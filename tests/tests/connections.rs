//! Idle connection floods: thousands of connections that never finish TLS, from
//! one address and from many, do not lock anyone out. While they last an agent
//! joins, a running agent keeps its session, and an operator's call answers;
//! the flood's connections are closed at their deadline, and the refusals are
//! logged at a bounded rate.

use std::time::{Duration, Instant};

use flotilla_e2e::{Agent, Server, wait_until};

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
    let mut server = Server::init(dir.path());
    server.extra_args.extend(
        [
            "--max-connections",
            "600",
            "--max-pending-per-source",
            "32",
            "--pending-timeout",
            "3s",
            "--tls-handshake-timeout",
            "2s",
            "--max-connections-per-sec",
            "0",
        ]
        .map(String::from),
    );
    server.start();
    let url = server.url();
    let token = server.token("pos", 2, &[]);
    let mut running = Agent::new(dir.path(), "running");
    let running_id = running.join(&url, &token);
    running.start(std::slice::from_ref(&url));
    wait_until("the running agent online", Duration::from_secs(30), || {
        (server.node(&running_id)["online"] == true).then_some(())
    });

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
