//! The end-to-end harness: starts the real `flotilla-server`, `flotilla-agent` and
//! `flotilla` binaries in temp dirs on port 0, waits on conditions with deadlines,
//! and kills every process it started when dropped.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod enroll;
pub mod etcd;
pub mod h2;
pub mod measure;
pub mod patch;
pub mod web;

/// A built binary of the workspace. The test command builds them first
/// (`cargo build --workspace --bins`); they sit next to the test's `deps/` dir,
/// or in `FLOTILLA_E2E_BIN_DIR` when set (the release-build pass of
/// scripts/test).
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("FLOTILLA_E2E_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir of the test executable")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (scripts/test does: cargo build --workspace --bins --features flotilla-server/fault-injection)",
        path.display()
    );
    path
}

/// Runs `flotilla-server` with `args`, then each `(flag, path)` pair.
pub fn server_cmd(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin("flotilla-server"));
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.output().expect("run flotilla-server")
}

/// A command's stdout then stderr, as text (for messages and assertions).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` every 50 ms until it returns Some, or panics after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`wait_until`], but returns None on timeout instead of panicking.
pub fn wait_until_or_none<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_to(path: &Path) -> Stdio {
    Stdio::from(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("log file"),
    )
}

fn kill_child(child: &mut Option<Child>, signal: nix::sys::signal::Signal) {
    if let Some(c) = child.as_mut() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        let _ = c.wait();
    }
    *child = None;
}

/// Timing the tests give the server, short so grace periods pass quickly.
pub const HEARTBEAT: &str = "300ms";
pub const OFFLINE_GRACE: Duration = Duration::from_secs(2);

/// One `flotilla-server` with its data dir.
pub struct Server {
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub addr: Option<SocketAddr>,
    pub extra_args: Vec<String>,
    /// Extra environment for `flotilla-server run` (test-only fault injection).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    /// `flotilla-server init` in `dir/server`.
    pub fn init(dir: &Path) -> Self {
        Self::init_with(dir, &[])
    }

    /// `flotilla-server init` in `dir/server` with `store_args` (e.g. the
    /// etcd store's), which `run` is given too.
    pub fn init_with(dir: &Path, store_args: &[&str]) -> Self {
        let data_dir = dir.join("server");
        let out = Command::new(bin("flotilla-server"))
            .args([
                "init",
                "--name",
                "127.0.0.1",
                "--name",
                "localhost",
                "--data-dir",
            ])
            .arg(&data_dir)
            .args(store_args)
            .output()
            .expect("run flotilla-server init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::existing(&dir.join("server.log"), data_dir, store_args)
    }

    /// A server on a data dir made some other way (a restore), logging to
    /// `log`, run with `store_args`; not started.
    pub fn existing(log: &Path, data_dir: PathBuf, store_args: &[&str]) -> Self {
        Self {
            log: log.to_path_buf(),
            data_dir,
            addr: None,
            extra_args: store_args
                .iter()
                .map(|a| a.to_string())
                .chain([
                    "--heartbeat-interval".into(),
                    HEARTBEAT.into(),
                    "--offline-grace".into(),
                    format!("{}s", OFFLINE_GRACE.as_secs()),
                    "--startup-grace".into(),
                    "6s".into(),
                ])
                .collect(),
            env: Vec::new(),
            child: None,
        }
    }

    /// Starts the server (on port 0 the first time, on the same address after)
    /// and waits until it listens.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let addr_file = self.data_dir.join("server.addr");
        let _ = fs::remove_file(&addr_file);
        let listen = self
            .addr
            .map_or("127.0.0.1:0".to_string(), |a| a.to_string());
        let child = Command::new(bin("flotilla-server"))
            .args(["run", "--listen", &listen])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("FLOTILLA_LOG", "info,flotilla_server=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_to(&self.log))
            .spawn()
            .expect("start flotilla-server");
        self.child = Some(child);
        let addr = wait_until("the server to listen", Duration::from_secs(20), || {
            fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse::<SocketAddr>()
                .ok()
        });
        self.addr = Some(addr);
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr.expect("server started"))
    }

    pub fn credential(&self) -> PathBuf {
        self.data_dir.join("admin.credential")
    }

    pub fn ca_pem(&self) -> String {
        fs::read_to_string(self.data_dir.join("tls/ca.pem")).expect("ca.pem")
    }

    /// Stops with SIGKILL: nothing gets a chance to flush.
    pub fn kill9(&mut self) {
        kill_child(&mut self.child, nix::sys::signal::Signal::SIGKILL);
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets but does nothing,
    /// as a paused VM or a hung process does.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("server running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
            .expect("signal the server");
    }

    /// Stops with SIGTERM and returns how long the server took to exit
    /// (killing it after 30 s).
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(c) = self.child.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let exited =
                wait_until_or_none(Duration::from_secs(30), || c.try_wait().ok().flatten());
            if exited.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.child = None;
        started.elapsed()
    }

    /// Runs the `flotilla` CLI against this server with `credential`.
    pub fn cli_as(&self, credential: &Path, args: &[&str]) -> Output {
        Command::new(bin("flotilla"))
            .args(args)
            .env("FLOTILLA_SERVER", self.url())
            .env("FLOTILLA_CREDENTIAL", credential)
            .output()
            .expect("run flotilla")
    }

    /// Runs the CLI as admin; panics unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_as(&self.credential(), args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs the CLI as admin with `--json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli(&a)).expect("CLI printed JSON")
    }

    /// Creates an operator credential `name` with `role`, written to
    /// `dir/<name>.credential`; its path.
    pub fn new_credential(&self, dir: &Path, name: &str, role: &str) -> PathBuf {
        let path = dir.join(format!("{name}.credential"));
        self.cli(&[
            "credential",
            "create",
            "--name",
            name,
            "--role",
            role,
            "--out",
            path.to_str().expect("UTF-8 path"),
        ]);
        path
    }

    /// Creates a join token and returns it.
    pub fn token(&self, group: &str, max_uses: u32, extra: &[&str]) -> String {
        let uses = max_uses.to_string();
        let mut args = vec!["token", "create", "--group", group, "--max-uses", &uses];
        args.extend_from_slice(extra);
        self.cli_json(&args)["token"]
            .as_str()
            .expect("token string")
            .to_string()
    }

    /// The status of one group.
    pub fn group(&self, name: &str) -> Value {
        let groups = self.cli_json(&["group", "list"]);
        groups
            .as_array()
            .expect("array")
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Every node, as `flotilla nodes list --json` shows them.
    pub fn nodes(&self) -> Vec<Value> {
        self.cli_json(&["nodes", "list"])
            .as_array()
            .expect("array")
            .clone()
    }

    pub fn node(&self, id: &str) -> Value {
        self.cli_json(&["nodes", "show", id])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- server log ---\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        self.kill9();
    }
}

/// One `flotilla-agent` with its state dir.
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub role_hook: Option<PathBuf>,
    /// Extra arguments for `flotilla-agent run`.
    pub run_args: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            name: name.to_string(),
            state_dir: dir.join(name),
            log: dir.join(format!("{name}.log")),
            role_hook: None,
            run_args: Vec::new(),
            child: None,
        }
    }

    /// This agent's own filesystem root for patches (`--root`).
    pub fn root(&self) -> PathBuf {
        self.state_dir.with_file_name(format!("{}-root", self.name))
    }

    /// Runs patches under its own root, allowing `/opt`.
    pub fn with_root(mut self) -> Self {
        std::fs::create_dir_all(self.root().join("opt")).expect("agent root");
        self.run_args.extend([
            "--root".to_string(),
            self.root().to_string_lossy().into_owned(),
            "--allow-path".to_string(),
            "/opt".to_string(),
        ]);
        self
    }

    /// `flotilla-agent join`, returning the process output.
    pub fn join_output(&self, url: &str, token: &str, extra: &[&str]) -> Output {
        Command::new(bin("flotilla-agent"))
            .args(["join", "--json", "--server", url, "--token", token])
            .args(["--machine-id", &format!("machine-{}", self.name)])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(extra)
            .output()
            .expect("run flotilla-agent join")
    }

    /// Joins and returns the node id; panics on failure.
    pub fn join(&self, url: &str, token: &str) -> String {
        let out = self.join_output(url, token, &[]);
        assert!(
            out.status.success(),
            "join of {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("join --json output");
        v["node_id"].as_str().expect("node_id").to_string()
    }

    /// Starts `flotilla-agent run`.
    pub fn start(&mut self, servers: &[String]) {
        assert!(self.child.is_none(), "agent already running");
        let mut cmd = Command::new(bin("flotilla-agent"));
        cmd.arg("run").arg("--state-dir").arg(&self.state_dir);
        for s in servers {
            cmd.args(["--server", s]);
        }
        cmd.args(["--max-backoff", "1s"]);
        if let Some(h) = &self.role_hook {
            cmd.arg("--role-hook").arg(h);
        }
        cmd.args(&self.run_args);
        let child = cmd
            .env("FLOTILLA_LOG", "info,flotilla_agent=debug")
            .stdout(Stdio::null())
            .stderr(log_to(&self.log))
            .spawn()
            .expect("start flotilla-agent");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        kill_child(&mut self.child, nix::sys::signal::Signal::SIGKILL);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited, and how.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The agent's own view (status.json), if it has written one.
    pub fn status(&self) -> Option<Value> {
        let text = fs::read_to_string(self.state_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
        self.kill9();
    }
}

/// A background `flotilla ... watch --json`, its output in a file.
pub struct Watch {
    pub out: PathBuf,
    child: Option<Child>,
}

impl Watch {
    pub fn start(server: &Server, dir: &Path, group: &str) -> Self {
        Self::command(
            server,
            dir.join(format!("watch-{group}.jsonl")),
            &["group", "watch", group],
        )
    }

    /// A background `flotilla rollout watch PATCH --json`.
    pub fn rollout(server: &Server, dir: &Path, patch: &str) -> Self {
        Self::command(
            server,
            dir.join(format!("rollout-{patch}.jsonl")),
            &["rollout", "watch", patch],
        )
    }

    fn command(server: &Server, out: PathBuf, args: &[&str]) -> Self {
        let child = Command::new(bin("flotilla"))
            .args(args)
            .arg("--json")
            .env("FLOTILLA_SERVER", server.url())
            .env("FLOTILLA_CREDENTIAL", server.credential())
            .stdout(log_to(&out))
            .stderr(Stdio::null())
            .spawn()
            .expect("start a flotilla watch");
        Self {
            out,
            child: Some(child),
        }
    }

    /// Every status printed so far.
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        kill_child(&mut self.child, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Writes an executable role hook that appends "<role> <previous>" to `log`.
pub fn role_hook(dir: &Path, name: &str, log: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{name}-hook.sh"));
    fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$FLOTILLA_ROLE $FLOTILLA_PREVIOUS_ROLE $FLOTILLA_NODE_ID\" >> '{}'\n",
            log.display()
        ),
    )
    .expect("write hook");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    path
}

/// A free loopback address for a server to listen on.
/// A day of the week three days from today (UTC): a maintenance window on it
/// is closed now, whatever the time zone.
pub fn another_day() -> &'static str {
    let today = time::OffsetDateTime::now_utc()
        .weekday()
        .number_days_from_monday() as usize;
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(today + 3) % 7]
}

pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A replica of `first`'s fleet (on etcd, `store` its flags) in `dir/<name>`,
/// made from its CA bundle with `init --replica-of`, with the operator's
/// credential and a listen address of its own; not started.
pub fn replica_of(first: &Server, dir: &Path, store: &[&str], name: &str) -> Server {
    let bundle = dir.join("ca.bundle");
    if !bundle.exists() {
        let out = server_cmd(
            &["export-ca"],
            &[("--data-dir", &first.data_dir), ("--out", &bundle)],
        );
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let data_dir = dir.join(name);
    let mut args = vec![
        "init",
        "--name",
        "127.0.0.1",
        "--replica-of",
        bundle.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(store);
    let out = server_cmd(&args, &[("--data-dir", &data_dir)]);
    assert!(out.status.success(), "{}", output_text(&out));
    fs::copy(first.credential(), data_dir.join("admin.credential")).expect("copy credential");
    let mut replica = Server::existing(&dir.join(format!("{name}.log")), data_dir, store);
    replica.extra_args = first.extra_args.clone();
    replica.addr = Some(free_addr());
    replica
}
