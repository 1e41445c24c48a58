//! Crashes and bad networks in the middle of a patch, with real processes: a
//! connection cut mid-download, a download that only trickles, and `kill -9` of the
//! agent while it downloads, applies and health-checks. Each ends committed or with
//! the host restored — never half-applied, never applied twice — and the server's
//! final report says so.
//!
//! The network faults come from the server's test-only `fault-injection` feature
//! (`scripts/test` builds the binaries with it): `FLOTILLA_FAULT_ARTIFACT_RATE`
//! throttles artifact streams, `FLOTILLA_FAULT_ARTIFACT_CUT_AFTER` breaks the first
//! one; the harness passes them to the server's environment.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_e2e::patch::{self, FleetOptions, Key};
use flotilla_e2e::{Agent, Server, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);
const ID: &str = "demo-2.0.0";
const FAULTS_MISSING: &str = "the server did not inject the fault: build the binaries with \
     `cargo build --workspace --bins --features flotilla-server/fault-injection` (scripts/test does)";

/// One server (with `faults`) trusting one key, and one joined, running agent with
/// its own root and `run_args`.
fn fleet(dir: &Path, faults: &[(&str, String)], run_args: &[&str]) -> (Server, Agent, Key) {
    let key = patch::key(dir, "release");
    let (server, mut agents) = patch::fleet(
        dir,
        FleetOptions {
            agents: 1,
            server_keys: &[&key],
            pinned: &[&key],
            run_args,
            server_env: faults,
            ..FleetOptions::default()
        },
    );
    let agent = agents.pop().expect("one agent");
    (server, agent, key)
}

/// Writes a spec by hand (artifacts as (name, path), then `rest`: [install] and
/// the optional sections), builds, signs and publishes it; returns the manifest.
fn release(
    server: &Server,
    dir: &Path,
    key: &Key,
    artifacts: &[(&str, &Path)],
    rest: &str,
) -> Value {
    release_expiring(server, dir, key, artifacts, rest, "30d")
}

/// [`release`], the patch expiring `expires_in` after it is built.
fn release_expiring(
    server: &Server,
    dir: &Path,
    key: &Key,
    artifacts: &[(&str, &Path)],
    rest: &str,
    expires_in: &str,
) -> Value {
    let mut spec = format!(
        "id = \"{ID}\"\ncomponent = \"demo\"\nversion = \"2.0.0\"\nseverity = \"critical\"\nexpires_in = \"{expires_in}\"\n"
    );
    for (name, path) in artifacts {
        spec.push_str(&format!(
            "[[artifacts]]\nname = \"{name}\"\npath = \"{}\"\n",
            path.display()
        ));
    }
    spec.push_str(rest);
    let spec_path = dir.join(format!("{ID}.toml"));
    fs::write(&spec_path, spec).unwrap();
    let manifest = patch::build(server, &spec_path, &dir.join(ID));
    patch::sign(server, &manifest, key);
    let (ok, _, err) = patch::publish(server, &manifest);
    assert!(ok, "publish failed: {err}");
    serde_json::from_str(&fs::read_to_string(&manifest).unwrap()).unwrap()
}

/// sha256 of the manifest's artifact `name`.
fn sha_of(manifest: &Value, name: &str) -> String {
    manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .and_then(|a| a["sha256"].as_str())
        .unwrap_or_else(|| panic!("no artifact {name} in {manifest}"))
        .to_string()
}

/// Deterministic, incompressible bytes (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The node's (phase, error) of the patch as the server reports it.
fn server_phase(server: &Server) -> (String, String) {
    let st = patch::status(server, ID);
    let node = &st["nodes"][0];
    (
        node["phase"].as_str().unwrap_or("none").to_string(),
        node["error"].as_str().unwrap_or("").to_string(),
    )
}

/// Every phase the server's status showed while polling, with when it was first
/// seen (from the start of the watch).
#[derive(Default)]
struct History {
    start: Option<Instant>,
    seen: Vec<(String, Duration)>,
}

impl History {
    fn new() -> Self {
        Self {
            start: Some(Instant::now()),
            seen: Vec::new(),
        }
    }

    /// Polls the server until `done(phase)`, recording every change; returns
    /// (phase, error).
    fn until(
        &mut self,
        server: &Server,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> (String, String) {
        self.until_with(server, what, |phase, _| done(phase))
    }

    /// Waits until `done(phase, error)` holds of one look at the server.
    fn until_with(
        &mut self,
        server: &Server,
        what: &str,
        done: impl Fn(&str, &str) -> bool,
    ) -> (String, String) {
        let start = self.start.expect("started");
        wait_until(what, T, || {
            let (phase, error) = server_phase(server);
            if self.seen.last().map(|(p, _)| p.as_str()) != Some(phase.as_str()) {
                self.seen.push((phase.clone(), start.elapsed()));
            }
            done(&phase, &error).then_some((phase, error))
        })
    }

    fn phases(&self) -> Vec<&str> {
        self.seen.iter().map(|(p, _)| p.as_str()).collect()
    }

    fn print(&self, test: &str) {
        let line: Vec<String> = self
            .seen
            .iter()
            .map(|(p, t)| format!("{p}@{:.1}s", t.as_secs_f64()))
            .collect();
        eprintln!("{test}: phases seen on the server: {}", line.join(" -> "));
    }
}

fn is_final(phase: &str) -> bool {
    matches!(phase, "committed" | "rolled_back" | "failed" | "rejected")
}

/// Offsets of every `artifact fetch` of `sha` the server logged, in order.
fn fetch_offsets(server: &Server, sha: &str) -> Vec<u64> {
    fs::read_to_string(&server.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("artifact fetch") && l.contains(sha))
        .filter_map(|l| {
            let rest = &l[l.find("offset=")? + "offset=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

fn server_log_has(server: &Server, text: &str) -> bool {
    fs::read_to_string(&server.log)
        .unwrap_or_default()
        .contains(text)
}

/// The patch's phase in the agent's own journal (read while the agent is stopped).
fn journal_phase(agent: &Agent) -> String {
    assert!(
        !agent.is_running(),
        "the agent's database is locked while it runs"
    );
    let store = flotilla_agent::Store::open(&agent.state_dir).expect("open the agent's database");
    let raw = store
        .tree("journal")
        .unwrap()
        .get(ID)
        .unwrap()
        .expect("a journal entry for the patch");
    let entry: Value = serde_json::from_slice(&raw).unwrap();
    entry["phase"].as_str().unwrap().to_string()
}

/// The component versions the server holds for the (only) node.
fn installed(server: &Server) -> Value {
    server.nodes()[0]["installed"].clone()
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

#[test]
fn download_resumes_after_a_broken_connection() {
    let dir = tempfile::tempdir().unwrap();
    let blob = noise(3 << 20, 1);
    let tar = dir.path().join("payload.tar");
    patch::tar(&tar, &[("blob.bin", &blob, 0o644)]);
    let size = fs::metadata(&tar).unwrap().len();
    let cut = size / 3;
    let (server, agent, key) = fleet(
        dir.path(),
        &[("FLOTILLA_FAULT_ARTIFACT_CUT_AFTER", cut.to_string())],
        &[],
    );
    let started = Instant::now();
    let manifest = release(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
    );
    let sha = sha_of(&manifest, "payload.tar");
    let mut history = History::new();
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    history.print("broken connection");
    eprintln!(
        "broken connection: {size}-byte artifact cut after {cut} bytes; publish -> {phase} in {:?}",
        started.elapsed()
    );
    assert!(
        server_log_has(&server, "fault injection: cut"),
        "{FAULTS_MISSING}"
    );
    assert_eq!((phase.as_str(), error.as_str()), ("committed", ""));
    let offsets = fetch_offsets(&server, &sha);
    eprintln!("broken connection: fetch offsets the server saw: {offsets:?}");
    assert_eq!(
        offsets.first(),
        Some(&0),
        "the first fetch starts at 0: {offsets:?}"
    );
    assert!(
        offsets.len() >= 2 && offsets[1] > 0,
        "the download after the cut resumed from zero: {offsets:?}"
    );
    assert_eq!(
        offsets[1], cut,
        "it resumes exactly where the cut left it: {offsets:?}"
    );
    assert!(
        agent.log_text().contains("fault injection: cut"),
        "the agent saw the cut as a failed attempt"
    );
    assert_eq!(
        fs::read(agent.root().join("opt/demo/blob.bin")).unwrap(),
        blob
    );
    assert_eq!(installed(&server)["demo"], "2.0.0");
}

/// A server that refuses the first downloads (as one briefly down): the agent
/// tries again with backoff, past the attempts of one try, and commits the same
/// patch; the node's report counts every attempt and says why they failed.
#[test]
fn refused_downloads_are_tried_again_until_they_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let blob = noise(200 << 10, 3);
    let tar = dir.path().join("payload.tar");
    patch::tar(&tar, &[("blob.bin", &blob, 0o644)]);
    let size = fs::metadata(&tar).unwrap().len();
    // One try makes 6 attempts: 8 refusals need a second try.
    let (server, agent, key) = fleet(
        dir.path(),
        &[("FLOTILLA_FAULT_ARTIFACT_REFUSE_FIRST", "8".to_string())],
        &["--max-download-rate", "1000000"],
    );
    let _ = release(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
    );
    let mut history = History::new();
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    history.print("refused");
    assert!(
        server_log_has(&server, "fault injection: refusing"),
        "{FAULTS_MISSING}"
    );
    assert_eq!((phase.as_str(), error.as_str()), ("committed", ""));
    let st = patch::status(&server, ID);
    let transfer = &st["nodes"][0]["transfer"];
    eprintln!(
        "refused: transfer {transfer}, served {}",
        st["served_bytes"]
    );
    assert_eq!(transfer["attempts"], 9, "8 refused, then 1: {transfer}");
    let failures = transfer["failures"].as_array().expect("failures");
    assert!(
        !failures.is_empty()
            && failures
                .iter()
                .all(|f| f.as_str().unwrap().contains("fault injection: refused")),
        "{transfer}"
    );
    assert_eq!(transfer["server_bytes"], size, "{transfer}");
    assert_eq!(st["served_bytes"], size, "every byte sent once");
    assert!(
        agent
            .log_text()
            .contains("download not complete after 6 attempt(s); trying again"),
        "the first try's end was journaled and reported"
    );
    let (_, list, _) = patch::cli(&server, &["--json", "patch", "list"]);
    let ids: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        ids.as_array().map(Vec::len),
        Some(1),
        "no new patch id: {ids}"
    );
    assert_eq!(
        fs::read(agent.root().join("opt/demo/blob.bin")).unwrap(),
        blob
    );
}

/// A download that keeps failing stops being tried once the server no longer
/// offers the patch (its rollout aborted): the node is not failed, the host
/// untouched.
#[test]
fn a_download_stops_being_tried_when_the_rollout_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("payload.tar");
    patch::tar(&tar, &[("blob.bin", &noise(16 << 10, 4), 0o644)]);
    let (server, agent, key) = fleet(
        dir.path(),
        &[(
            "FLOTILLA_FAULT_ARTIFACT_REFUSE_FIRST",
            "1000000".to_string(),
        )],
        &[],
    );
    let before = patch::snapshot(&agent.root());
    let _ = release(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
    );
    let mut history = History::new();
    let (_, note) = history.until_with(&server, "a try to end and be reported", |p, error| {
        p == "verified" && error.contains("trying again")
    });
    assert!(note.contains("fault injection: refused"), "{note}");
    server.cli(&["rollout", "abort", ID]);
    wait_until("the agent to stop trying", T, || {
        agent
            .log_text()
            .contains("the server no longer offers this patch")
            .then_some(())
    });
    history.print("aborted");
    let (phase, _) = server_phase(&server);
    assert_eq!(phase, "verified", "not failed: {:?}", history.phases());
    assert_eq!(
        patch::snapshot(&agent.root()),
        before,
        "the host is untouched"
    );
}

/// A download that trickles ends each try at its deadline, is tried again
/// (reported, the host untouched) and fails only when the patch expires.
#[test]
fn trickling_download_is_bounded_by_its_deadline_and_the_patch_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("payload.tar");
    patch::tar(&tar, &[("blob.bin", &noise(16 << 10, 2), 0o644)]);
    let (server, agent, key) = fleet(
        dir.path(),
        &[("FLOTILLA_FAULT_ARTIFACT_RATE", "20".to_string())],
        // The agent has no flag for the rate window (10 s): the deadline is what
        // must end a download that trickles on and on.
        &["--min-download-rate", "1000", "--download-deadline", "5s"],
    );
    let before = patch::snapshot(&agent.root());
    let started = Instant::now();
    let _ = release_expiring(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
        "25s",
    );
    let mut history = History::new();
    let (_, note) = history.until_with(&server, "a try to end and be reported", |p, error| {
        p == "verified" && error.contains("trying again")
    });
    eprintln!("trickle: reported while waiting: {note}");
    assert!(
        note.contains("not complete within 5s") || note.contains("below the minimum"),
        "the note names the deadline or the rate: {note}"
    );
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    let took = started.elapsed();
    history.print("trickle");
    eprintln!("trickle: 20 B/s, deadline 5s; publish -> {phase} in {took:?}: {error}");
    assert!(
        server_log_has(&server, "fault injection: artifact stream"),
        "{FAULTS_MISSING}"
    );
    assert_eq!(phase, "failed", "{error}");
    assert!(
        error.contains("expires at") && error.contains("attempt"),
        "the error names the expiry and the attempts: {error}"
    );
    assert!(
        !history.phases().contains(&"applying"),
        "{:?}",
        history.phases()
    );
    assert_eq!(
        patch::snapshot(&agent.root()),
        before,
        "the host is untouched"
    );
    let partial: Vec<String> = fs::read_dir(agent.state_dir.join("artifacts"))
        .map(|rd| {
            rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    eprintln!("trickle: left in the agent's artifact dir after the failure: {partial:?}");
    assert!(installed(&server).get("demo").is_none());
}

#[test]
fn kill9_while_downloading_then_restart_commits() {
    let dir = tempfile::tempdir().unwrap();
    let blob = noise(4 << 20, 3);
    let tar = dir.path().join("payload.tar");
    patch::tar(&tar, &[("blob.bin", &blob, 0o644)]);
    let (server, mut agent, key) = fleet(
        dir.path(),
        &[("FLOTILLA_FAULT_ARTIFACT_RATE", "200000".to_string())],
        &[],
    );
    let started = Instant::now();
    let manifest = release(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n",
    );
    let sha = sha_of(&manifest, "payload.tar");
    let part = agent
        .state_dir
        .join("artifacts")
        .join(format!("{sha}.part"));
    let mut history = History::new();
    let (phase, _) = history.until(&server, "the download to start", |p| {
        p != "waiting" && p != "received"
    });
    if phase != "verified" {
        assert!(
            server_log_has(&server, "fault injection: artifact stream"),
            "{FAULTS_MISSING}"
        );
    }
    assert_eq!(phase, "verified", "{:?}", history.phases());
    wait_until("some bytes downloaded", T, || {
        (fs::metadata(&part).ok()?.len() >= 256 << 10).then_some(())
    });
    agent.kill9();
    let had = fs::metadata(&part).unwrap().len();
    let killed_at = started.elapsed();
    assert_eq!(
        journal_phase(&agent),
        "Verified",
        "killed while downloading"
    );
    eprintln!("kill9 download: killed at {killed_at:?} with {had} bytes in the partial file");
    agent.start(&[server.url()]);
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    history.print("kill9 download");
    eprintln!(
        "kill9 download: publish -> {phase} in {:?}",
        started.elapsed()
    );
    assert!(
        server_log_has(&server, "fault injection: artifact stream"),
        "{FAULTS_MISSING}"
    );
    assert_eq!((phase.as_str(), error.as_str()), ("committed", ""));
    let offsets = fetch_offsets(&server, &sha);
    eprintln!("kill9 download: fetch offsets the server saw: {offsets:?}");
    assert!(
        offsets.iter().skip(1).any(|&o| o == had),
        "the restarted agent resumed its partial download from byte {had}: {offsets:?}"
    );
    assert_eq!(
        fs::read(agent.root().join("opt/demo/blob.bin")).unwrap(),
        blob
    );
    assert!(!part.exists(), "no partial download left behind");
    assert_eq!(installed(&server)["demo"], "2.0.0");
}

/// Kills the process group an orphaned install script leads (it is its own group's
/// leader; a `kill -9` of the agent leaves it running).
struct ScriptGroup(PathBuf);

impl ScriptGroup {
    fn pid(&self) -> Option<i32> {
        fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }

    /// Running, not merely a zombie nobody reaped (its parent, the killed agent,
    /// is gone, and this machine's init may not reap orphans).
    fn alive(&self) -> bool {
        self.pid().is_some_and(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let state = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .next()?
                        .to_string();
                    Some(state != "Z" && state != "X")
                })
                .unwrap_or(false)
        })
    }
}

impl Drop for ScriptGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn kill9_while_applying_then_restart_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("install.pid");
    let install = dir.path().join("install.sh");
    fs::write(
        &install,
        format!(
            "#!/bin/sh\nmkdir -p \"$FLOTILLA_ROOT/opt/demo\"\necho $$ > '{}'\necho installed >> \"$FLOTILLA_ROOT/opt/demo/install.count\"\nexec sleep 30\n",
            pid_file.display()
        ),
    )
    .unwrap();
    let rollback = dir.path().join("rollback.sh");
    fs::write(
        &rollback,
        "#!/bin/sh\nmkdir -p \"$FLOTILLA_ROOT/opt/demo\"\necho rolled back >> \"$FLOTILLA_ROOT/opt/demo/rollback.count\"\n",
    )
    .unwrap();
    let script = ScriptGroup(pid_file);
    let (server, mut agent, key) = fleet(dir.path(), &[], &["--allow-scripts"]);
    let counts = agent.root().join("opt/demo");
    let started = Instant::now();
    let _ = release(
        &server,
        dir.path(),
        &key,
        &[("install.sh", &install), ("rollback.sh", &rollback)],
        "[install]\ntype = \"script\"\nartifact = \"install.sh\"\ntimeout_secs = 60\n\
         [rollback]\ntype = \"script\"\nartifact = \"rollback.sh\"\n",
    );
    let mut history = History::new();
    history.until(&server, "the install to start", |p| {
        p == "applying" || is_final(p)
    });
    wait_until("install.sh to run", T, || {
        (lines(&counts.join("install.count")) == 1).then_some(())
    });
    agent.kill9();
    let killed_at = started.elapsed();
    assert_eq!(journal_phase(&agent), "Applying", "killed while applying");
    eprintln!(
        "kill9 apply: killed at {killed_at:?}; install script still running: {}",
        script.alive()
    );
    agent.start(&[server.url()]);
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    history.print("kill9 apply");
    eprintln!(
        "kill9 apply: publish -> {phase} in {:?}; orphaned install script still running after the rollback: {}",
        started.elapsed(),
        script.alive()
    );
    assert_eq!(phase, "rolled_back", "{error}");
    assert!(
        error.contains("the agent stopped while applying"),
        "the error says why: {error}"
    );
    assert_eq!(
        lines(&counts.join("install.count")),
        1,
        "never applied twice"
    );
    assert_eq!(lines(&counts.join("rollback.count")), 1, "rolled back once");
    assert!(
        !script.alive(),
        "the install script that outlived the agent was stopped before the rollback"
    );
    assert_eq!(journal_phase_after_stop(&mut agent), "RolledBack");
    assert!(installed(&server).get("demo").is_none());
}

/// Stops the agent and reads its journal phase.
fn journal_phase_after_stop(agent: &mut Agent) -> String {
    agent.kill9();
    journal_phase(agent)
}

#[test]
fn kill9_during_health_check_then_restart_commits_without_reapplying() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("payload.tar");
    patch::tar(
        &tar,
        &[
            ("VERSION", b"2\n", 0o644),
            ("bin/tool", b"#!/bin/sh\necho v2\n", 0o755),
        ],
    );
    // A health check runs a command, so the host must allow scripts.
    let (server, mut agent, key) = fleet(dir.path(), &[], &["--allow-scripts"]);
    // The version before the patch: its backup shows whether the install ran twice
    // (a second run would back up 2, not 1).
    fs::create_dir_all(agent.root().join("opt/demo")).unwrap();
    fs::write(agent.root().join("opt/demo/VERSION"), b"1\n").unwrap();
    // The check counts its runs outside the root: the one cut by the kill, then one
    // after the restart (skipping it would be as wrong as applying again).
    let runs = dir.path().join("health.runs");
    let started = Instant::now();
    let _ = release(
        &server,
        dir.path(),
        &key,
        &[("payload.tar", &tar)],
        &format!(
            "[install]\ntype = \"files\"\nartifact = \"payload.tar\"\ndestination = \"/opt/demo\"\n\
             [health_check]\ncommand = [\"/bin/sh\", \"-c\", \"echo run >> '{}'; sleep 4\"]\n\
             timeout_secs = 10\nretries = 1\n",
            runs.display()
        ),
    );
    let mut history = History::new();
    let (phase, _) = history.until(&server, "the install to finish", |p| {
        matches!(p, "applied" | "healthy") || is_final(p)
    });
    assert_eq!(phase, "applied", "{:?}", history.phases());
    wait_until("the health check to run", T, || {
        (lines(&runs) == 1).then_some(())
    });
    agent.kill9();
    let killed_at = started.elapsed();
    assert_eq!(
        journal_phase(&agent),
        "Applied",
        "killed during the health check"
    );
    eprintln!("kill9 health: killed at {killed_at:?}");
    agent.start(&[server.url()]);
    let (phase, error) = history.until(&server, "the patch to finish", is_final);
    history.print("kill9 health");
    eprintln!(
        "kill9 health: publish -> {phase} in {:?}",
        started.elapsed()
    );
    assert_eq!((phase.as_str(), error.as_str()), ("committed", ""));
    let phases = history.phases();
    let applied = phases.iter().position(|p| *p == "applied").unwrap();
    assert!(
        !phases[applied..].contains(&"applying") && !phases[applied..].contains(&"downloaded"),
        "applied again after the restart: {phases:?}"
    );
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("resuming patch")
            && (l.contains("phase=\"applied\"") || l.contains("phase=applied"))),
        "the restarted agent resumed at the health check"
    );
    assert_eq!(
        lines(&runs),
        2,
        "the health check ran again after the restart"
    );
    let root = agent.root().join("opt/demo");
    assert_eq!(fs::read(root.join("VERSION")).unwrap(), b"2\n");
    assert_eq!(
        fs::read(root.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho v2\n"
    );
    // The install's backup holds the version before it: it ran exactly once.
    let backups = agent.state_dir.join("patches").join(ID).join("backup");
    let backed_up: Vec<Vec<u8>> = fs::read_dir(&backups)
        .unwrap_or_else(|e| panic!("{}: {e}", backups.display()))
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(backed_up, vec![b"1\n".to_vec()], "backups: {backed_up:?}");
    assert_eq!(journal_phase_after_stop(&mut agent), "Committed");
    assert_eq!(installed(&server)["demo"], "2.0.0");
}
