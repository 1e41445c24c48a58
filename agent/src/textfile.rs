//! The agent's metrics as a node-exporter textfile (`--metrics-textfile
//! PATH`): whether it holds a session, when its certificate expires, the
//! newest patch's phase and when it got there, and when the server last
//! acknowledged a report. Timestamps rather than ages, so the file is
//! rewritten only when something changes (atomically: a scrape never sees
//! half of it).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// What the file says.
#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    connected: bool,
    cert_not_after: i64,
    /// (patch id, phase, unix seconds it reached it).
    patch: Option<(String, &'static str, i64)>,
    last_report: Option<i64>,
}

/// The textfile, rewritten on every change.
#[derive(Debug)]
pub struct Textfile {
    path: PathBuf,
    now: Mutex<Snapshot>,
}

impl Textfile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            now: Mutex::new(Snapshot::default()),
        }
    }

    /// The session opened or closed, or the certificate was renewed.
    pub fn session(&self, connected: bool, cert_not_after: i64) {
        self.change(|s| {
            s.connected = connected;
            s.cert_not_after = cert_not_after;
        });
    }

    /// Patch `id` reached `phase` now.
    pub fn patch(&self, id: &str, phase: &'static str) {
        let now = crate::cert::unix_now();
        self.change(|s| s.patch = Some((id.to_string(), phase, now)));
    }

    /// The server acknowledged a report now.
    pub fn reported(&self) {
        let now = crate::cert::unix_now();
        self.change(|s| s.last_report = Some(now));
    }

    fn change(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        let before = now.clone();
        f(&mut now);
        if *now == before {
            return;
        }
        let text = render(&now);
        // Written under the lock, so the newest snapshot is the last written.
        if let Err(e) = flotilla_proto::durable::write_atomic(&self.path, text.as_bytes(), 0o644) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the metrics textfile");
        }
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, lines: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "flotilla_agent_connected",
        "Whether the agent holds a session with a server.",
        &[(String::new(), f64::from(u8::from(s.connected)))],
    );
    metric(
        "flotilla_agent_certificate_expiry_timestamp_seconds",
        "When the node certificate expires (unix time).",
        &[(String::new(), s.cert_not_after as f64)],
    );
    if let Some((id, phase, at)) = &s.patch {
        let labels = format!("{{patch=\"{}\",phase=\"{phase}\"}}", label(id));
        metric(
            "flotilla_agent_patch_phase",
            "The newest patch step: 1 for the phase it reached.",
            &[(labels.clone(), 1.0)],
        );
        metric(
            "flotilla_agent_patch_phase_timestamp_seconds",
            "When the newest patch reached its phase (unix time).",
            &[(labels, *at as f64)],
        );
    }
    if let Some(at) = s.last_report {
        metric(
            "flotilla_agent_last_report_timestamp_seconds",
            "When the server last acknowledged a report (unix time).",
            &[(String::new(), at as f64)],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_says_what_changed_and_escapes_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla.prom");
        let t = Textfile::new(path.clone());
        t.session(true, 1_900_000_000);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("flotilla_agent_connected 1\n"), "{text}");
        assert!(text.contains("flotilla_agent_certificate_expiry_timestamp_seconds 1900000000\n"));
        assert!(!text.contains("patch_phase"), "no patch yet");
        t.patch("app\"1", "committed");
        t.reported();
        t.session(false, 1_900_000_000);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("flotilla_agent_connected 0\n"), "{text}");
        assert!(
            text.contains("flotilla_agent_patch_phase{patch=\"app\\\"1\",phase=\"committed\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("flotilla_agent_last_report_timestamp_seconds "));
    }
}
