//! The optional agent configuration file (TOML), and how its values combine with
//! flags and environment variables: flags > environment > file > defaults.
//!
//! The command line (clap) already resolves flags over environment variables; this
//! module fills in what neither gave from the file, then from the defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// State directory when nothing else names one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/flotilla-agent";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid label {0:?}: expected key=value")]
    Label(String),
    #[error("invalid duration {value:?}: {reason} (examples: 30s, 2m, 500ms)")]
    Duration { value: String, reason: String },
    #[error("max backoff must be longer than zero")]
    ZeroBackoff,
}

/// The file's content. Unknown keys are refused, so a typo does not silently fall
/// back to a default.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where the agent keeps its state.
    pub state_dir: Option<PathBuf>,
    /// Server URLs, tried in order.
    pub servers: Option<Vec<String>>,
    /// Program to run on role changes.
    pub role_hook: Option<PathBuf>,
    /// Cap on the reconnect backoff, like "30s".
    #[serde(default, with = "humantime_serde")]
    pub max_backoff: Option<Duration>,
    /// Labels asked for at join.
    pub labels: Option<BTreeMap<String, String>>,
    /// Where the host's filesystem starts for patches (default "/").
    pub root: Option<PathBuf>,
    /// Local address to connect to the server from (default: the system's choice).
    pub source_address: Option<std::net::IpAddr>,
    /// Directories `files` patches may write under (default /opt, /usr/local).
    pub allowed_paths: Option<Vec<PathBuf>>,
    /// Whether patch scripts (install or rollback), and health checks through
    /// a shell or interpreter, may run (default false).
    pub allow_scripts: Option<bool>,
    /// Whether health checks may run, as programs run directly (default true).
    pub allow_health_checks: Option<bool>,
    /// Largest artifact this host accepts, in bytes (default 1 GiB).
    pub max_artifact_bytes: Option<u64>,
    /// Longest a download may take, like "30m".
    #[serde(default, with = "humantime_serde")]
    pub download_deadline: Option<Duration>,
    /// Slowest a download may go, in bytes per second, judged over 10 s.
    pub min_download_rate: Option<u64>,
    /// Fastest a download may go, in bytes per second (default: no limit).
    pub max_download_rate: Option<u64>,
    /// Serve this site's other agents, chosen before agents that only
    /// listen (default false; listens on `site_listen`).
    pub serve_site: Option<bool>,
    /// Listen for this site's other agents here, so the server may choose
    /// this agent to serve them (default: not at all, or 0.0.0.0:7444 with
    /// `serve_site`).
    pub site_listen: Option<std::net::SocketAddr>,
    /// The URL the site's peers reach this agent at (default: derived from
    /// the listen address, or the address towards the servers).
    pub site_advertise: Option<String>,
    /// Most bytes the site cache holds (default 4 GiB).
    pub site_cache_bytes: Option<u64>,
    /// A node-exporter textfile to keep the agent's metrics in (default: none).
    pub metrics_textfile: Option<PathBuf>,
    /// Committed versions per component whose backups stay (default 2).
    pub keep_backups: Option<usize>,
    /// Most bytes the download directory holds (default 8 GiB).
    pub max_download_bytes: Option<u64>,
}

impl FileConfig {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The file at `path` if one is given, else an empty configuration.
    pub fn load_optional(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), Self::load)
    }

    /// State directory: `flag` (flag or environment), else the file's, else the default.
    pub fn state_dir(&self, flag: Option<PathBuf>) -> PathBuf {
        flag.or_else(|| self.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// Server URLs: the flags' if any were given, else the file's (possibly none).
    pub fn servers(&self, flags: Vec<String>) -> Vec<String> {
        if flags.is_empty() {
            self.servers.clone().unwrap_or_default()
        } else {
            flags
        }
    }

    /// Role hook program: flag, else file, else none.
    pub fn role_hook(&self, flag: Option<PathBuf>) -> Option<PathBuf> {
        flag.or_else(|| self.role_hook.clone())
    }

    /// Backoff cap: flag, else file, else `default`. Zero is refused: it would make a
    /// disconnected agent hammer its servers.
    pub fn max_backoff(
        &self,
        flag: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let cap = flag.or(self.max_backoff).unwrap_or(default);
        if cap.is_zero() {
            Err(ConfigError::ZeroBackoff)
        } else {
            Ok(cap)
        }
    }

    /// Labels: the file's, with the flags' overriding key by key.
    pub fn labels(&self, flags: Vec<(String, String)>) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone().unwrap_or_default();
        labels.extend(flags);
        labels
    }
}

/// Parses a `key=value` label flag.
pub fn parse_label(s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(ConfigError::Label(s.to_string())),
    }
}

/// Parses a human duration such as "30s" or "2m 30s".
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| ConfigError::Duration {
        value: s.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = FileConfig::parse(
            r#"
            state_dir = "/srv/agent"
            servers = ["https://a:7443", "https://b:7443"]
            role_hook = "/usr/local/bin/on-role"
            max_backoff = "1m 30s"
            source_address = "10.0.0.7"
            [labels]
            zone = "eu-1"
            "#,
        )
        .unwrap();
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/srv/agent")));
        assert_eq!(c.servers.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.max_backoff, Some(Duration::from_secs(90)));
        assert_eq!(c.source_address, Some([10, 0, 0, 7].into()));
        assert_eq!(
            c.labels
                .as_ref()
                .and_then(|l| l.get("zone"))
                .map(String::as_str),
            Some("eu-1")
        );
    }

    /// Every key the packaged example shows (commented out) is one the agent
    /// reads, with a value it accepts.
    #[test]
    fn the_packaged_example_parses_with_every_key_set() {
        let example = include_str!("../../packaging/config/agent.toml");
        let set = flotilla_proto::config_example::with_every_key_set(example);
        let c = FileConfig::parse(&set).unwrap_or_else(|e| panic!("{e}\n{set}"));
        assert!(c.keep_backups.is_some() && c.max_download_bytes.is_some());
        assert!(c.metrics_textfile.is_some() && c.labels.is_some());
    }

    #[test]
    fn refuses_unknown_keys() {
        let e = FileConfig::parse("statedir = \"/x\"").unwrap_err();
        assert!(e.contains("statedir"), "{e}");
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file = FileConfig::parse(
            "state_dir = \"/file\"\nservers = [\"https://f:1\"]\nmax_backoff = \"5s\"\n\
             [labels]\na = \"file\"\nb = \"file\"",
        )
        .unwrap();
        assert_eq!(file.state_dir(Some("/flag".into())), PathBuf::from("/flag"));
        assert_eq!(file.state_dir(None), PathBuf::from("/file"));
        assert_eq!(
            FileConfig::default().state_dir(None),
            PathBuf::from(DEFAULT_STATE_DIR)
        );
        assert_eq!(file.servers(vec!["https://x:1".into()]), ["https://x:1"]);
        assert_eq!(file.servers(vec![]), ["https://f:1"]);
        let d = Duration::from_secs(30);
        assert_eq!(file.max_backoff(None, d).unwrap(), Duration::from_secs(5));
        assert_eq!(
            file.max_backoff(Some(Duration::from_secs(2)), d).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(FileConfig::default().max_backoff(None, d).unwrap(), d);
        assert!(file.max_backoff(Some(Duration::ZERO), d).is_err());
        let labels = file.labels(vec![("b".into(), "flag".into())]);
        assert_eq!(labels["a"], "file");
        assert_eq!(labels["b"], "flag");
    }

    #[test]
    fn labels_and_durations_parse() {
        assert_eq!(parse_label("k=v=w").unwrap(), ("k".into(), "v=w".into()));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
    }
}
