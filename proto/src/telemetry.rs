//! One logging setup for every Flotilla binary: `FLOTILLA_LOG` picks the filter
//! (tracing-subscriber's env-filter syntax, default `info`), `FLOTILLA_LOG_FORMAT`
//! picks `plain` (default) or `json`. Logs go to stderr so stdout stays for output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// A logging setting that cannot be used: said at start, not ignored.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("FLOTILLA_LOG_FORMAT={0} is not a log format: use plain or json")]
    Format(String),
    #[error("FLOTILLA_LOG={value} is not a log filter: {reason}")]
    Filter { value: String, reason: String },
}

/// Installs the global subscriber. `default_filter` applies when `FLOTILLA_LOG` is unset.
pub fn init(default_filter: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("FLOTILLA_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter {
                reason: e.to_string(),
                value,
            })?
        }
        _ => EnvFilter::new(default_filter),
    };
    let json = match std::env::var("FLOTILLA_LOG_FORMAT") {
        Ok(v) if v.eq_ignore_ascii_case("json") => true,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("plain") => false,
        Ok(v) => return Err(TelemetryError::Format(v)),
        Err(_) => false,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

/// [`init`] for a binary's `main`: an unusable setting ends the process
/// with a message and status 2, before anything else runs.
pub fn init_or_exit(default_filter: &str) {
    if let Err(e) = init(default_filter) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
