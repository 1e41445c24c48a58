//! The role hook: a local program the agent runs when the node's role changes, so
//! the host can start or stop serving (promote a standby, drain a demoted node).
//!
//! The program runs directly (no shell, so nothing in the environment is
//! interpreted), with a timeout after which it is killed. A failing hook is logged,
//! never fatal: the agent must keep its session whatever the host's scripts do.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::state::Role;

/// How long a hook may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the hook's output (stdout and stderr, interleaved) is kept for the log.
pub const TAIL_BYTES: usize = 4096;
/// After the hook exits, how long to wait for its output pipes to close. A hook that
/// starts a daemon may leave the daemon holding them open for good.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// A configured role hook.
#[derive(Debug, Clone)]
pub struct RoleHook {
    program: PathBuf,
    timeout: Duration,
}

/// A role change, as the hook sees it in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    /// `FLOTILLA_NODE_ID`.
    pub node_id: String,
    /// `FLOTILLA_GROUP`.
    pub group: String,
    /// `FLOTILLA_ROLE`: the new role.
    pub role: Role,
    /// `FLOTILLA_PREVIOUS_ROLE` (empty when unknown).
    pub previous_role: Option<Role>,
    /// `FLOTILLA_DESIRED_COUNT`.
    pub desired_count: u32,
}

/// How a hook run ended.
#[derive(Debug)]
pub enum HookOutcome {
    /// The program ran and exited (or was killed by a signal).
    Exited {
        status: ExitStatus,
        output_tail: String,
    },
    /// The program ran past its timeout and was killed.
    TimedOut { output_tail: String },
    /// The program could not be started.
    NotStarted { error: String },
}

impl HookOutcome {
    /// Whether the hook ran and exited with status 0.
    pub fn succeeded(&self) -> bool {
        matches!(self, Self::Exited { status, .. } if status.success())
    }
}

/// The last `TAIL_BYTES` bytes written to it.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > TAIL_BYTES {
            let excess = self.0.len() - TAIL_BYTES;
            self.0.drain(..excess);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).trim_end().to_string()
    }
}

async fn drain(mut pipe: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if let Ok(mut t) = tail.lock() {
            t.push(&buf[..n]);
        }
    }
}

impl RoleHook {
    /// A hook running `program` with `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout,
        }
    }

    /// The program run.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    fn command(&self, change: &RoleChange) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.env("FLOTILLA_NODE_ID", &change.node_id)
            .env("FLOTILLA_GROUP", &change.group)
            .env("FLOTILLA_ROLE", change.role.as_str())
            .env(
                "FLOTILLA_PREVIOUS_ROLE",
                change.previous_role.map(Role::as_str).unwrap_or(""),
            )
            .env("FLOTILLA_DESIRED_COUNT", change.desired_count.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started too.
            .process_group(0)
            // If the agent stops mid-hook, the hook goes too; the change is still
            // unhandled in the state, so the hook runs again at the next start.
            .kill_on_drop(true);
        cmd
    }

    /// Runs the hook for `change`, logs how it ended, and returns that.
    pub async fn run(&self, change: &RoleChange) -> HookOutcome {
        let outcome = self.execute(change).await;
        let program = self.program.display();
        let previous = change.previous_role.map(Role::as_str).unwrap_or("");
        match &outcome {
            HookOutcome::Exited {
                status,
                output_tail,
            } if status.success() => tracing::info!(
                %program, role = %change.role, previous, %status, output = %output_tail,
                "role hook succeeded"
            ),
            HookOutcome::Exited {
                status,
                output_tail,
            } => tracing::warn!(
                %program, role = %change.role, previous, %status, output = %output_tail,
                "role hook failed"
            ),
            HookOutcome::TimedOut { output_tail } => tracing::warn!(
                %program, role = %change.role, previous, timeout = ?self.timeout,
                output = %output_tail, "role hook timed out and was killed"
            ),
            HookOutcome::NotStarted { error } => tracing::warn!(
                %program, role = %change.role, previous, %error, "role hook could not start"
            ),
        }
        outcome
    }

    async fn execute(&self, change: &RoleChange) -> HookOutcome {
        let mut child = match self.spawn(change).await {
            Ok(c) => c,
            Err(e) => {
                return HookOutcome::NotStarted {
                    error: e.to_string(),
                };
            }
        };
        let tail = Arc::new(Mutex::new(Tail::default()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(drain(out, tail.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(drain(err, tail.clone())));
        }
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let waited = tokio::time::timeout(self.timeout, child.wait()).await;
        if waited.is_err() {
            // The whole group (what the hook started holds its pipes open
            // too), then kill and reap; a kill can only fail if the child
            // already exited. Never 0 or 1: our own group or init's.
            if let Some(pgid) = pgid.filter(|&p| p > 1) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
        }
        for reader in &mut readers {
            if tokio::time::timeout(PIPE_GRACE, &mut *reader)
                .await
                .is_err()
            {
                reader.abort();
            }
        }
        let output_tail = tail.lock().map(|t| t.text()).unwrap_or_default();
        match waited {
            Ok(Ok(status)) => HookOutcome::Exited {
                status,
                output_tail,
            },
            Ok(Err(e)) => HookOutcome::NotStarted {
                error: format!("waiting for the hook failed: {e}"),
            },
            Err(_) => HookOutcome::TimedOut { output_tail },
        }
    }

    /// Spawns the hook, retrying briefly if its file is still open for writing
    /// somewhere (ETXTBSY: it is being installed or edited right now).
    async fn spawn(&self, change: &RoleChange) -> std::io::Result<tokio::process::Child> {
        let mut attempt = 0u32;
        loop {
            match self.command(change).spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempt < 10 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("hook.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn change() -> RoleChange {
        RoleChange {
            node_id: "n-42".into(),
            group: "depots".into(),
            role: Role::Active,
            previous_role: Some(Role::Standby),
            desired_count: 3,
        }
    }

    #[tokio::test]
    async fn runs_with_the_role_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.txt");
        let hook = script(
            dir.path(),
            &format!(
                "env | grep '^FLOTILLA_' | sort > '{}'\necho done",
                out.display()
            ),
        );
        let outcome = RoleHook::new(&hook, DEFAULT_TIMEOUT).run(&change()).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        let env = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            env,
            "FLOTILLA_DESIRED_COUNT=3\nFLOTILLA_GROUP=depots\nFLOTILLA_NODE_ID=n-42\n\
             FLOTILLA_PREVIOUS_ROLE=standby\nFLOTILLA_ROLE=active\n"
        );
        match outcome {
            HookOutcome::Exited { output_tail, .. } => assert_eq!(output_tail, "done"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failing_hook_reports_its_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "echo 'cannot drain' >&2\nexit 3");
        let outcome = RoleHook::new(&hook, DEFAULT_TIMEOUT).run(&change()).await;
        match outcome {
            HookOutcome::Exited {
                status,
                output_tail,
            } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(output_tail, "cannot drain");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_slow_hook_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("finished");
        let hook = script(
            dir.path(),
            &format!("echo started\nsleep 30\ntouch '{}'", marker.display()),
        );
        let started = std::time::Instant::now();
        let outcome = RoleHook::new(&hook, Duration::from_millis(300))
            .run(&change())
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        match outcome {
            HookOutcome::TimedOut { output_tail } => assert_eq!(output_tail, "started"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_hook_started_too() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let hook = script(
            dir.path(),
            &format!(
                "sleep 30 &
echo $! > '{}'
sleep 30",
                pidfile.display()
            ),
        );
        let outcome = RoleHook::new(&hook, Duration::from_millis(500))
            .run(&change())
            .await;
        assert!(
            matches!(outcome, HookOutcome::TimedOut { .. }),
            "{outcome:?}"
        );
        crate::install::tests_util::wait_dead(&pidfile, Duration::from_secs(10)).await;
    }

    #[tokio::test]
    async fn a_missing_program_is_reported_not_fatal() {
        let outcome = RoleHook::new("/nonexistent/flotilla-hook", DEFAULT_TIMEOUT)
            .run(&change())
            .await;
        assert!(matches!(outcome, HookOutcome::NotStarted { .. }));
        assert!(!outcome.succeeded());
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; TAIL_BYTES]);
        t.push(b"end");
        assert_eq!(t.0.len(), TAIL_BYTES);
        assert!(t.text().ends_with("aend"));
    }
}
