//! What a process costs, read from /proc: resident memory, threads, CPU time
//! (clock ticks from `stat`, and the finer on-CPU nanoseconds of `schedstat`
//! summed over the live threads), and when it started.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Clock ticks per second of /proc's `stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_S: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcSample {
    pub pid: u32,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
    /// utime + stime of all threads, live and exited, in ms (10 ms steps).
    pub cpu_ms: u64,
    /// On-CPU time of the live threads (schedstat), in ns.
    pub sched_ns: u64,
    /// When the process started, Unix ms (10 ms steps).
    pub started_unix_ms: i64,
    /// Bytes the process caused to be written to storage (`write_bytes` of
    /// /proc/PID/io; 0 when not readable).
    pub io_write_bytes: u64,
}

/// Where to find the process to watch: a fixed pid, or a file holding it (re-read
/// at every sample, so a restarted server is followed).
#[derive(Debug, Clone)]
pub enum Target {
    Pid(u32),
    PidFile(PathBuf),
}

impl Target {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Pid(p) => Some(*p),
            Self::PidFile(f) => std::fs::read_to_string(f).ok()?.trim().parse().ok(),
        }
    }

    /// A sample of the process now; `None` when it is not there (or not readable).
    pub fn sample(&self) -> Option<ProcSample> {
        sample(self.pid()?)
    }
}

/// A sample of process `pid`; `None` when it is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (cpu_ticks, start_ticks) = parse_stat(&stat)?;
    Some(ProcSample {
        pid,
        rss_kib: status_field(&status, "VmRSS:").unwrap_or(0),
        hwm_kib: status_field(&status, "VmHWM:").unwrap_or(0),
        threads: status_field(&status, "Threads:").unwrap_or(0),
        cpu_ms: cpu_ticks * 1000 / TICKS_PER_S,
        sched_ns: sched_ns(&dir),
        started_unix_ms: boot_unix_ms()
            .map(|b| b + (start_ticks * 1000 / TICKS_PER_S) as i64)
            .unwrap_or(0),
        io_write_bytes: std::fs::read_to_string(dir.join("io"))
            .ok()
            .and_then(|io| status_field(&io, "write_bytes:"))
            .unwrap_or(0),
    })
}

/// The number after `name` in /proc/PID/status (kB for memory) or /proc/PID/io.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// (utime + stime, starttime) in clock ticks, from /proc/PID/stat. The command
/// name may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the full line, utime 14, stime 15,
    // starttime 22; here they are at 0, 11, 12 and 19.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((utime + stime, start))
}

/// The first field of every live thread's schedstat (ns on CPU), summed.
fn sched_ns(dir: &Path) -> u64 {
    let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// When the machine booted, Unix ms (`btime` of /proc/stat).
fn boot_unix_ms() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: i64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(secs * 1000)
}

/// Total size in bytes of the files under `dir` (apparent and allocated), for a
/// database's growth; (0, 0) when it cannot be read. Bounded in depth.
pub fn dir_size(dir: &Path) -> (u64, u64) {
    fn walk(dir: &Path, depth: u32, acc: &mut (u64, u64)) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if depth < 8 {
                    walk(&e.path(), depth + 1, acc);
                }
            } else {
                acc.0 += meta.len();
                acc.1 += meta.blocks() * 512;
            }
        }
    }
    let mut acc = (0, 0);
    walk(dir, 0, &mut acc);
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (flotilla (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 0 0 20 0 11 0 123456 1000000 2500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((200, 123456)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_fields() {
        let status =
            "Name:\tflotilla-server\nVmHWM:\t   20480 kB\nVmRSS:\t   16384 kB\nThreads:\t11\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(16384));
        assert_eq!(status_field(status, "VmHWM:"), Some(20480));
        assert_eq!(status_field(status, "Threads:"), Some(11));
        assert_eq!(status_field(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.threads >= 1);
        assert!(me.started_unix_ms > 1_600_000_000_000);
        assert!(sample(u32::MAX).is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![0u8; 3000]).unwrap();
        assert_eq!(dir_size(dir.path()).0, 3000);
        let pid_file = dir.path().join("pid");
        std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(Target::PidFile(pid_file).pid(), Some(std::process::id()));
    }
}
