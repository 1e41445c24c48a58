//! Applying a verified patch to the host: unpacking a `files` artifact with atomic
//! replacement and an exact rollback, running a `script` program under a timeout, and
//! running the health check.
//!
//! Crash safety of a `files` install rests on the per-patch work directory the
//! pipeline hands in: backups of every file about to be replaced and a `plan.json`
//! that lists every path the install touches are made durable there before the first
//! change to the host, so `rollback_files` can restore the previous state after a
//! crash at any point (see `files.rs` for the layout).

mod archive;
mod beneath;
mod error;
mod files;
mod health;
mod plan;
mod rollback;
mod script;

#[cfg(test)]
mod tests_confine;
#[cfg(test)]
mod tests_files;
#[cfg(test)]
mod tests_refusals;
#[cfg(test)]
mod tests_script;
#[cfg(test)]
mod tests_space;
#[cfg(test)]
pub(crate) mod tests_util;

use std::path::{Component, Path, PathBuf};

pub use error::InstallError;
pub use files::{FilesReport, install_files};
pub(crate) use files::{SPACE_SLACK, free_space};
pub use health::health_check;
pub use rollback::rollback_files;
pub use script::{ScriptOutput, kill_recorded, run_program, run_program_recorded};

/// Most entries a `files` artifact may have; every input has a limit.
pub const MAX_TAR_ENTRIES: usize = 10_000;

/// What carries out a verified patch's install plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Executor {
    /// Changes the host: unpacks files, runs scripts and health checks, undoes
    /// them. The only mode of a real agent.
    #[default]
    Host,
    /// Changes nothing. Every step is still verified, downloaded, journaled and
    /// reported; installing, the health check and undoing succeed without touching
    /// the host. For the fleet simulator, which runs thousands of agents in one
    /// process.
    NoOp,
}

impl Executor {
    /// Whether steps that change the host (or run its programs) are skipped.
    pub fn skips_host(self) -> bool {
        self == Self::NoOp
    }
}

/// What this host lets patches do, whatever the signed manifest asks. Set by the
/// host's operator in the agent's config, not by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPolicy {
    /// Directories under which `files` installs may write.
    pub allowed_paths: Vec<PathBuf>,
    /// Whether `script` installs and rollback scripts may run at all, and
    /// health checks through a shell or interpreter.
    pub allow_scripts: bool,
    /// Whether a health check may run (a program run directly, never through
    /// a shell or interpreter unless `allow_scripts`).
    pub allow_health_checks: bool,
    /// Cap on an artifact's size, and on what a `files` artifact unpacks to.
    pub max_artifact_bytes: u64,
}

impl LocalPolicy {
    /// Whether `path` is one of `allowed_paths` or lies under one. The comparison is
    /// component-wise (`/opt/app2` is not under `/opt/app`), and a path that is not
    /// absolute or has a `..` component is never allowed: `..` could climb out of the
    /// allowed directory while still sharing its prefix.
    pub fn allows(&self, path: &Path) -> bool {
        is_normal_absolute(path)
            && self
                .allowed_paths
                .iter()
                .any(|a| is_normal_absolute(a) && path.starts_with(a))
    }

    /// Why this host refuses to run `command` as a health check, if it does.
    pub fn refuses_health_check(&self, command: &[String]) -> Option<String> {
        if !self.allow_health_checks {
            return Some(
                "this host's policy does not allow health checks (allow_health_checks = false)"
                    .into(),
            );
        }
        let program = command.first()?;
        if self.allow_scripts {
            return None;
        }
        let what = if is_interpreter(program) {
            "a shell or interpreter"
        } else if is_runner(program) {
            "a program that runs the program named in its arguments, like a shell or interpreter"
        } else {
            return None;
        };
        Some(format!(
            "the health check runs {program}, {what}: this host allows health checks only \
             as a program run directly (scripts need --allow-scripts)"
        ))
    }

    /// Refuses a policy under which a patch could write the agent's own
    /// files: an allowed path (as the host sees it, under `root`) that holds
    /// `state_dir` or lies in it (the journal, the pinned keys, the node's
    /// key), or that holds the config file (which says what is allowed). A
    /// signed patch must not be able to widen its own limits.
    pub fn check_own_files(
        &self,
        root: &Path,
        state_dir: &Path,
        config: Option<&Path>,
    ) -> Result<(), String> {
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let state = real(state_dir);
        for a in &self.allowed_paths {
            let host = real(&root.join(a.strip_prefix("/").unwrap_or(a)));
            if state.starts_with(&host) || host.starts_with(&state) {
                return Err(format!(
                    "allowed path {} overlaps the agent's state directory {}: a patch could \
                     replace its journal and pinned keys; allow paths apart from it",
                    a.display(),
                    state_dir.display()
                ));
            }
            if let Some(c) = config
                && real(c).starts_with(&host)
            {
                return Err(format!(
                    "allowed path {} holds the agent's config file {}: a patch could widen \
                     its own limits; allow paths apart from it",
                    a.display(),
                    c.display()
                ));
            }
        }
        Ok(())
    }

    /// Whether anything at or under `dir` may be written: `dir` is allowed, or it
    /// contains an allowed path (destination `/opt/app` with only `/opt/app/bin`
    /// allowed). Each entry is then checked on its own.
    pub(crate) fn overlaps(&self, dir: &Path) -> bool {
        self.allows(dir)
            || (is_normal_absolute(dir)
                && self
                    .allowed_paths
                    .iter()
                    .any(|a| is_normal_absolute(a) && a.starts_with(dir)))
    }
}

/// Programs that run a script handed to them as an argument. A guard against
/// a health check that is plainly a script, not a sandbox: any program a
/// signed manifest names runs with the agent's rights.
fn is_interpreter(program: &str) -> bool {
    const NAMES: &[&str] = &[
        "sh",
        "bash",
        "dash",
        "zsh",
        "ksh",
        "mksh",
        "ash",
        "fish",
        "csh",
        "tcsh",
        "busybox",
        "env",
        "python",
        "perl",
        "ruby",
        "node",
        "nodejs",
        "php",
        "lua",
        "tclsh",
        "awk",
        "gawk",
        "mawk",
        "nawk",
        "osascript",
        "pwsh",
    ];
    NAMES.contains(&program_name(program))
}

/// Programs whose job is to run another program named in their arguments
/// (`timeout 5 sh -c …`, `nice bash …`, `find / -exec sh …`): refused like a
/// shell, or the guard would be one word away from useless.
fn is_runner(program: &str) -> bool {
    const NAMES: &[&str] = &[
        "nice",
        "nohup",
        "timeout",
        "setsid",
        "stdbuf",
        "chroot",
        "sudo",
        "su",
        "runuser",
        "doas",
        "sg",
        "xargs",
        "flock",
        "ionice",
        "taskset",
        "chrt",
        "unshare",
        "nsenter",
        "setpriv",
        "capsh",
        "prlimit",
        "numactl",
        "cgexec",
        "systemd-run",
        "script",
        "watch",
        "strace",
        "ltrace",
        "gdb",
        "time",
        "expect",
        "find",
        "make",
        "parallel",
        "ssh",
        "bwrap",
        "firejail",
        "run-parts",
        "start-stop-daemon",
    ];
    NAMES.contains(&program_name(program))
}

/// A program's name as the lists above spell it: the file name without its
/// directory and without a version (python3, python3.12, perl5.36).
fn program_name(program: &str) -> &str {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.')
}

/// Absolute, with no `.` or `..` parts (`Path::components` already drops inner `.`).
fn is_normal_absolute(path: &Path) -> bool {
    let mut parts = path.components();
    parts.next() == Some(Component::RootDir) && parts.all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn policy(paths: &[&str]) -> LocalPolicy {
        LocalPolicy {
            allowed_paths: paths.iter().map(PathBuf::from).collect(),
            allow_scripts: false,
            allow_health_checks: true,
            max_artifact_bytes: 1 << 20,
        }
    }

    #[test]
    fn health_checks_run_programs_not_scripts_unless_allowed() {
        let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut p = policy(&["/opt"]);
        assert_eq!(
            p.refuses_health_check(&cmd(&["/usr/bin/systemctl", "is-active", "x"])),
            None
        );
        assert_eq!(p.refuses_health_check(&cmd(&["/opt/app/bin/check"])), None);
        for shell in [
            "/bin/sh",
            "bash",
            "/usr/bin/python3.12",
            "/usr/bin/env",
            "/bin/busybox",
        ] {
            let why = p
                .refuses_health_check(&cmd(&[shell, "-c", "true"]))
                .unwrap();
            assert!(why.contains("a shell or interpreter"), "{shell}: {why}");
        }
        // A shell one word away, behind a program that runs programs.
        for runner in [
            &["timeout", "5", "/bin/sh", "-c", "true"][..],
            &["/usr/bin/nice", "-n", "5", "bash", "-c", "true"],
            &[
                "/usr/bin/find",
                "/",
                "-maxdepth",
                "0",
                "-exec",
                "sh",
                "-c",
                "true",
                ";",
            ],
            &["xargs", "sh", "-c"],
            &["/usr/bin/setsid", "perl", "-e", "1"],
            &["/usr/bin/systemd-run", "--wait", "/bin/sh"],
        ] {
            let why = p.refuses_health_check(&cmd(runner)).unwrap();
            assert!(
                why.contains("runs the program named in its arguments"),
                "{runner:?}: {why}"
            );
        }
        assert_eq!(
            p.refuses_health_check(&cmd(&["/usr/bin/curl", "-fsS", "http://127.0.0.1/"])),
            None
        );
        p.allow_scripts = true;
        assert_eq!(
            p.refuses_health_check(&cmd(&["/bin/sh", "-c", "true"])),
            None
        );
        p.allow_health_checks = false;
        let why = p.refuses_health_check(&cmd(&["/usr/bin/true"])).unwrap();
        assert!(why.contains("does not allow health checks"), "{why}");
    }

    #[test]
    fn allows_is_component_wise() {
        let p = policy(&["/opt/app", "/srv/data/"]);
        assert!(p.allows(Path::new("/opt/app")));
        assert!(p.allows(Path::new("/opt/app/bin/x")));
        assert!(p.allows(Path::new("/srv/data/x")));
        assert!(!p.allows(Path::new("/opt/app2")));
        assert!(!p.allows(Path::new("/opt/app2/x")));
        assert!(!p.allows(Path::new("/opt")));
        assert!(!p.allows(Path::new("/opt/app/../../etc/passwd")));
        assert!(!p.allows(Path::new("opt/app/x")));
    }

    #[test]
    fn relative_allowed_paths_allow_nothing() {
        let p = policy(&["opt/app", ""]);
        assert!(!p.allows(Path::new("/opt/app/x")));
        assert!(!p.allows(Path::new("/x")));
    }

    #[test]
    fn allowed_paths_never_reach_the_agents_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let state = root.join("var/lib/flotilla-agent");
        std::fs::create_dir_all(&state).unwrap();
        let config = root.join("etc/flotilla/agent.toml");
        let at = |p: &[&str]| LocalPolicy {
            allowed_paths: p.iter().map(PathBuf::from).collect(),
            ..policy(&[])
        };
        let check = |p: &[&str]| at(p).check_own_files(Path::new("/"), &state, Some(&config));
        let state_s = state.to_str().unwrap();
        let above = root.join("var").to_string_lossy().into_owned();
        let inside = state.join("keys").to_string_lossy().into_owned();
        let etc = root.join("etc").to_string_lossy().into_owned();
        let opt = root.join("opt").to_string_lossy().into_owned();
        for p in [state_s, above.as_str(), inside.as_str()] {
            let e = check(&[p]).unwrap_err();
            assert!(e.contains("state directory"), "{p}: {e}");
        }
        assert!(check(&[&etc]).unwrap_err().contains("config file"));
        check(&[&opt]).unwrap();
        // Under --root, the allowed paths are the root's.
        let rooted = at(&["/var"]).check_own_files(root, &state, None);
        assert!(rooted.unwrap_err().contains("state directory"));
        at(&["/opt"]).check_own_files(root, &state, None).unwrap();
    }

    #[test]
    fn overlaps_takes_a_parent_of_an_allowed_path() {
        let p = policy(&["/opt/app/bin"]);
        assert!(p.overlaps(Path::new("/opt/app")));
        assert!(p.overlaps(Path::new("/opt/app/bin/sub")));
        assert!(!p.overlaps(Path::new("/opt/other")));
        assert!(!p.allows(Path::new("/opt/app")));
    }
}
