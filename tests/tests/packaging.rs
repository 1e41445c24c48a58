//! What the packaged systemd units rely on (`Type=notify`, `WatchdogSec=`):
//! the real server and agent, started the way systemd starts a notify service
//! (NOTIFY_SOCKET, WATCHDOG_USEC), tell a socket the test listens on that they
//! are ready only once they can do their job, ping the watchdog while they run,
//! and say they are stopping on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_e2e::{Agent, Server, bin, output_text};

const T: Duration = Duration::from_secs(30);
/// The watchdog timeout the test "configures": pings every 200 ms.
const WATCHDOG_USEC: &str = "400000";

/// The service manager's end: a datagram socket in a temp dir.
struct NotifySocket {
    path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self { path, sock }
    }

    /// The next state line sent (one datagram may hold several), or None when
    /// nothing comes by `deadline`.
    fn next_until(&self, deadline: Instant, pending: &mut Vec<String>) -> Option<String> {
        loop {
            if !pending.is_empty() {
                return Some(pending.remove(0));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 4096];
            match self.sock.recv(&mut buf) {
                Ok(n) => pending.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                ),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }

    /// Reads until `state` arrives (panics after `timeout`); returns what came
    /// before it.
    fn wait_for(&self, state: &str, timeout: Duration, pending: &mut Vec<String>) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            match self.next_until(deadline, pending) {
                Some(s) if s == state => return before,
                Some(s) => before.push(s),
                None => panic!("no {state} within {timeout:?}; got {before:?}"),
            }
        }
    }
}

/// A process started as systemd would start a notify service; killed on drop.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(mut cmd: Command, notify: &NotifySocket, log: PathBuf) -> Self {
        let child = cmd
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the service");
        Self { child, log }
    }

    fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        flotilla_e2e::wait_until("the service to exit", T, || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- service log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_server_is_ready_once_it_serves_pings_the_watchdog_and_says_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    // Only for its data dir: this test starts `run` itself, with the
    // notification environment.
    let server = Server::init(dir.path());
    let mut cmd = Command::new(bin("flotilla-server"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir);
    let mut service = Service::spawn(cmd, &notify, dir.path().join("notified-server.log"));
    let mut pending = Vec::new();

    let before = notify.wait_for("READY=1", T, &mut pending);
    assert!(before.is_empty(), "sent before READY=1: {before:?}");
    // Ready means serving: the address is written and the first call, made
    // at once and only once, is answered.
    let addr = std::fs::read_to_string(server.data_dir.join("server.addr"))
        .expect("server.addr written before READY=1");
    let out = Command::new(bin("flotilla"))
        .args(["group", "list", "--json"])
        .env("FLOTILLA_SERVER", format!("https://{}", addr.trim()))
        .env("FLOTILLA_CREDENTIAL", server.credential())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));

    // Pings every half timeout while it runs (a few, so not only one).
    for _ in 0..3 {
        let other = notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &mut pending);
        assert!(other.is_empty(), "unexpected: {other:?}");
    }

    service.terminate();
    notify.wait_for("STOPPING=1", T, &mut pending);
    assert!(service.wait_exit().success());
}

#[test]
fn the_agent_is_ready_once_its_first_session_is_up_and_says_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let mut server = Server::init(dir.path());
    server.start();
    let token = server.token("depot", 1, &[]);
    let agent = Agent::new(dir.path(), "a1");
    agent.join(&server.url(), &token);
    server.stop();

    let mut cmd = Command::new(bin("flotilla-agent"));
    cmd.arg("run")
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .args(["--max-backoff", "1s"]);
    let mut service = Service::spawn(cmd, &notify, dir.path().join("agent.log"));
    let mut pending = Vec::new();

    // The server is down: the agent is alive (it pings the watchdog) but not
    // ready, however many pings go by.
    for _ in 0..5 {
        let other = notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &mut pending);
        assert!(
            other.is_empty(),
            "sent while the server was down: {other:?}"
        );
    }

    // The server comes back on the same address: the session opens, READY=1.
    server.start();
    let before = notify.wait_for("READY=1", T, &mut pending);
    assert!(
        before.iter().all(|s| s == "WATCHDOG=1"),
        "unexpected: {before:?}"
    );
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(agent.state_dir.join("status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["connected"], true, "{status}");
    let other = notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &mut pending);
    assert!(other.is_empty(), "unexpected: {other:?}");

    // A dropped and reopened session is not a second start.
    server.stop();
    server.start();
    flotilla_e2e::wait_until("the session to reopen", T, || {
        let log = std::fs::read_to_string(&service.log).unwrap_or_default();
        (log.matches("session open").count() >= 2).then_some(())
    });

    service.terminate();
    let before = notify.wait_for("STOPPING=1", T, &mut pending);
    assert!(
        before.iter().all(|s| s == "WATCHDOG=1"),
        "READY=1 once only: {before:?}"
    );
    assert!(service.wait_exit().success());
}
