//! One logging setup for every Flotilla binary: `FLOTILLA_LOG` picks the filter
//! (tracing-subscriber's env-filter syntax, default `info`), `FLOTILLA_LOG_FORMAT`
//! picks `plain` (default) or `json`. Logs go to stderr so stdout stays for output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_filter` applies when `FLOTILLA_LOG` is unset.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("FLOTILLA_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
