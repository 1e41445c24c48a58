//! Running a program (an install or rollback script, a health check) directly, with
//! no shell: a clean environment, no stdin, the tail of its output kept, in its own
//! process group so a timeout kills everything it started.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinSet;

use super::InstallError;

/// How much of a program's output is kept (the end of it) for reports.
pub const TAIL_BYTES: usize = 4096;
/// The only PATH a program gets, whatever the agent's own environment holds.
const CLEAN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long to keep reading after the program exited: a daemon it started may hold
/// the pipes open for ever, and must not hold up the patch.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed group's leader to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// How a program ended, and the last `TAIL_BYTES` of its stdout and stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptOutput {
    pub success: bool,
    /// Exit code; None when a signal ended it.
    pub code: Option<i32>,
    pub tail: String,
}

/// Runs `program` with `args` and only `env` (plus `PATH`, unless `env` sets it).
/// A non-zero exit is a result, not an error; failing to start and running past
/// `timeout` (the whole process group is then killed) are errors.
pub async fn run_program(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<ScriptOutput, InstallError> {
    run(program, args, env, timeout, None).await
}

/// Like [`run_program`], but records the program's process group in `pgid_file`
/// while it runs, so that after a crash of the agent [`kill_recorded`] can stop
/// a script that outlived it before anything else touches the host.
pub async fn run_program_recorded(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
    pgid_file: &Path,
) -> Result<ScriptOutput, InstallError> {
    run(program, args, env, timeout, Some(pgid_file)).await
}

/// Kills the process group recorded in `pgid_file` by [`run_program_recorded`]
/// if its leader still carries `marker` (a `KEY=value` the agent put in the
/// script's environment, which survives `exec`; a recycled id belongs to someone
/// else and is left alone), then removes the record.
pub fn kill_recorded(pgid_file: &Path, marker: &str, program: &Path) {
    let Ok(text) = std::fs::read_to_string(pgid_file) else {
        return;
    };
    if let Ok(pgid) = text.trim().parse::<i32>() {
        let environ = std::fs::read(format!("/proc/{pgid}/environ")).unwrap_or_default();
        let ours = environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes());
        if ours {
            tracing::warn!(pgid, program = %program.display(), "stopping a script that outlived the agent");
            kill_group(Some(pgid), program);
        }
    }
    let _ = std::fs::remove_file(pgid_file);
}

async fn run(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
    pgid_file: Option<&Path>,
) -> Result<ScriptOutput, InstallError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // Only the leader: a backstop if this future is dropped mid-run.
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| InstallError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    // process_group(0) makes the child its own group's leader: pgid == pid.
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    if let (Some(file), Some(id)) = (pgid_file, pgid)
        && let Err(e) = write_synced(file, &id.to_string())
    {
        kill_group(pgid, program);
        return Err(InstallError::Io {
            action: "record the script's process group in",
            path: file.to_path_buf(),
            source: e,
        });
    }
    let result = wait_for(&mut child, pgid, program, timeout).await;
    if let Some(file) = pgid_file {
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Writes `text` to `path` and fsyncs it.
fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

async fn wait_for(
    child: &mut tokio::process::Child,
    pgid: Option<i32>,
    program: &Path,
    timeout: Duration,
) -> Result<ScriptOutput, InstallError> {
    let tail = Arc::new(Mutex::new(Vec::with_capacity(2 * TAIL_BYTES)));
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(pump(out, Arc::clone(&tail)));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(pump(err, Arc::clone(&tail)));
    }

    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            kill_group(pgid, program);
            return Err(InstallError::Wait {
                program: program.to_path_buf(),
                source,
            });
        }
        Err(_) => {
            kill_group(pgid, program);
            let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
            drain(&mut readers).await;
            return Err(InstallError::Timeout {
                program: program.to_path_buf(),
                timeout,
                tail: take_tail(&tail),
            });
        }
    };
    drain(&mut readers).await;
    Ok(ScriptOutput {
        success: status.success(),
        code: status.code(),
        tail: take_tail(&tail),
    })
}

/// SIGKILL to the program's whole group: it and everything it started that did not
/// leave the group.
fn kill_group(pgid: Option<i32>, program: &Path) {
    // Never 0 or 1: killpg would hit our own group or init's.
    let Some(pgid) = pgid.filter(|&p| p > 1) else {
        return;
    };
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(program = %program.display(), pgid, "cannot kill the process group: {e}");
        }
    }
}

/// Waits for the output readers to reach end of file, at most `DRAIN_GRACE`.
async fn drain(readers: &mut JoinSet<()>) {
    let all = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_GRACE, all).await.is_err() {
        readers.abort_all();
    }
}

/// Appends what `from` produces to the shared buffer, trimming it now and then so
/// a chatty program costs at most a few KiB.
async fn pump<R: AsyncRead + Unpin>(mut from: R, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(mut t) = tail.lock() else { return };
        t.extend_from_slice(&buf[..n]);
        if t.len() > 2 * TAIL_BYTES {
            let cut = t.len() - TAIL_BYTES;
            t.drain(..cut);
        }
    }
}

fn take_tail(tail: &Mutex<Vec<u8>>) -> String {
    let bytes = match tail.lock() {
        Ok(t) => t.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let mut start = bytes.len().saturating_sub(TAIL_BYTES);
    // Do not start in the middle of a UTF-8 character.
    while start < bytes.len() && start > 0 && bytes[start] & 0xC0 == 0x80 {
        start += 1;
    }
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
