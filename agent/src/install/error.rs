//! Why an install, a rollback, a script or a health check did not go through. The
//! Display text is what the agent reports to the server, so each refusal names the
//! entry, path or limit that was wrong.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can stop `install_files`, `rollback_files`, `run_program` or
/// `health_check`. Refusals found while checking the artifact come before any change
/// to the host; `Io` and the rollback variants may come after.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install destination {} is not an absolute path", .destination.display())]
    DestinationNotAbsolute { destination: PathBuf },

    #[error(
        "install destination {} is outside the paths this host's local policy allows",
        .destination.display()
    )]
    DestinationNotAllowed { destination: PathBuf },

    #[error("install destination {} exists but is not a directory", .destination.display())]
    DestinationNotDirectory { destination: PathBuf },

    #[error("cannot read artifact {}: {source}", .artifact.display())]
    Archive {
        artifact: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("artifact entry {entry:?} has an absolute path")]
    AbsoluteEntry { entry: String },

    #[error("artifact entry {entry:?} has a '..' component")]
    ParentDirEntry { entry: String },

    #[error("artifact entry {entry:?} is not valid UTF-8")]
    NonUtf8Entry { entry: String },

    #[error("artifact entry {entry:?} is refused: {reason}")]
    InvalidEntryName { entry: String, reason: &'static str },

    #[error("artifact entry {entry:?} has a name longer than the filesystem allows")]
    NameTooLong { entry: String },

    #[error(
        "artifact entry {entry:?} uses the name suffix .flotilla-tmp, reserved for the agent's temp files"
    )]
    ReservedName { entry: String },

    #[error(
        "artifact entry {entry:?} would write {}, which this host's local policy does not allow",
        .path.display()
    )]
    EntryNotAllowed { entry: String, path: PathBuf },

    #[error(
        "artifact entry {entry:?} is a {kind}; only files, directories and symlinks are installed"
    )]
    SpecialEntry { entry: String, kind: &'static str },

    #[error("artifact entry {entry:?} is a hard link (to {target:?}); hard links are refused")]
    HardlinkEntry { entry: String, target: String },

    #[error("artifact entry {entry:?} has unsupported tar entry type {kind:?}")]
    UnsupportedEntry { entry: String, kind: String },

    #[error(
        "artifact entry {entry:?} is a symlink to absolute path {target:?}; only relative targets inside the destination are allowed"
    )]
    SymlinkAbsolute { entry: String, target: String },

    #[error("artifact entry {entry:?} is a symlink to {target:?}, which leaves the destination")]
    SymlinkEscapes { entry: String, target: String },

    #[error(
        "artifact entry {entry:?} is a symlink to {target:?}, which goes '..' through the symlink {via:?}"
    )]
    SymlinkThroughSymlink {
        entry: String,
        target: String,
        via: String,
    },

    #[error(
        "artifact entry {entry:?} is a symlink to {target:?}, which has '..' after a name; '..' is allowed only at the start of a target (the name before it may become a symlink, and the link would then lead elsewhere)"
    )]
    SymlinkParentAfterName { entry: String, target: String },

    #[error(
        "artifact {artifact}: its zstd frame needs a window larger than {max_mib} MiB to decode (compressed with --long or --ultra?); recompress it without them"
    )]
    ZstdWindowTooLarge { artifact: PathBuf, max_mib: u64 },

    #[error("artifact entry {entry:?} is a symlink with an empty target")]
    SymlinkEmpty { entry: String },

    #[error(
        "artifact entry {entry:?} lies under {parent:?}, which the artifact makes a file or symlink, not a directory"
    )]
    EntryUnderNonDirectory { entry: String, parent: String },

    #[error("artifact has a {kind} header of {size} bytes; at most {limit} are taken")]
    ExtensionHeaderTooLarge {
        kind: &'static str,
        size: u64,
        limit: u64,
    },

    #[error("artifact has a pax size of {pax} bytes for an entry whose header says {header}")]
    PaxSizeMismatch { pax: u64, header: u64 },

    #[error(
        "not enough free space on the filesystem of {}: the install needs {need} bytes, {free} are free",
        .path.display()
    )]
    NotEnoughSpace { path: PathBuf, need: u64, free: u64 },

    #[error("artifact has more than {limit} entries")]
    TooManyEntries { limit: usize },

    #[error("artifact unpacks to more than {limit} bytes (this host's local cap)")]
    TooLarge { limit: u64 },

    #[error("artifact entry {entry:?} appears more than once")]
    DuplicateEntry { entry: String },

    #[error("{} is a directory on this host but the artifact has a file or symlink there", .path.display())]
    HostDirectoryWhereFile { path: PathBuf },

    #[error("{} is not a directory on this host but the artifact needs a directory there", .path.display())]
    HostFileWhereDirectory { path: PathBuf },

    #[error("{} is a symlink on this host; the install refuses to write through it", .path.display())]
    HostSymlink { path: PathBuf },

    #[error("{} is not under any path this host's local policy allows", .path.display())]
    OutsideAllowed { path: PathBuf },

    #[error(
        "allowed path {} resolves through {}, inside allowed path {}, which a patch could change; allow the real location instead",
        .allowed.display(), .link.display(), .other.display()
    )]
    AnchorThroughAllowedTree {
        allowed: PathBuf,
        link: PathBuf,
        other: PathBuf,
    },

    #[error("artifact entry {entry:?} would make allowed path {} a {kind}; only a directory may be there", .path.display())]
    NotADirectoryAtAllowedPath {
        entry: String,
        path: PathBuf,
        kind: &'static str,
    },

    #[error("artifact entry {entry:?} is a symlink to {target:?}, which leads out of allowed path {}", .allowed.display())]
    SymlinkLeavesAllowed {
        entry: String,
        target: String,
        allowed: PathBuf,
    },

    #[error("{} is a device, socket or fifo on this host; the install refuses to replace it", .path.display())]
    HostSpecialFile { path: PathBuf },

    #[error("a previous install left its plan at {}; roll it back before installing again", .path.display())]
    PlanExists { path: PathBuf },

    #[error("install plan {} is unreadable: {reason}", .path.display())]
    BadPlan { path: PathBuf, reason: String },

    #[error("artifact {} changed while it was being installed (entry {entry:?})", .artifact.display())]
    ArtifactChanged { artifact: PathBuf, entry: String },

    #[error("backup {} does not match the digest recorded in the plan", .path.display())]
    BackupCorrupt { path: PathBuf },

    #[error("cannot roll back {}: {reason}", .path.display())]
    RollbackConflict { path: PathBuf, reason: String },

    #[error("cannot start {}: {source}", .program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("lost track of {}: {source}", .program.display())]
    Wait {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} did not finish within {}s; its process group was killed",
        .program.display(),
        .timeout.as_secs_f64()
    )]
    Timeout {
        program: PathBuf,
        timeout: Duration,
        /// The last output the program wrote before it was killed.
        tail: String,
    },

    #[error("health check has no command")]
    EmptyHealthCheck,

    #[error(
        "health check failed {attempts} time(s), last {}: {}",
        describe_code(*.last_code),
        last_line(.tail)
    )]
    HealthCheckFailed {
        attempts: u32,
        last_code: Option<i32>,
        tail: String,
    },
}

impl InstallError {
    /// Whether the same step may go through later: the host may change (space
    /// freed, a path put right); the artifact, the plan and the backups will not.
    pub fn may_pass_later(&self) -> bool {
        matches!(
            self,
            Self::Io { .. }
                | Self::HostSymlink { .. }
                | Self::HostFileWhereDirectory { .. }
                | Self::HostDirectoryWhereFile { .. }
                | Self::HostSpecialFile { .. }
                | Self::RollbackConflict { .. }
                | Self::NotEnoughSpace { .. }
        )
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

fn describe_code(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit code {c}"),
        None => "killed (signal or timeout)".to_owned(),
    }
}

/// The last non-blank line of the output: the line a person reads first in a report.
fn last_line(tail: &str) -> &str {
    tail.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}
