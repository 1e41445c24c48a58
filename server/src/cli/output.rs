//! Printing results: a table for people, JSON for scripts.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `rows` as a table with `headers`, or `json` as JSON.
    pub fn table(&self, headers: &[&str], rows: Vec<Vec<String>>, json: Value) {
        if self.json {
            flotilla_proto::outln!("{}", serde_json::to_string_pretty(&json).expect("json"));
            return;
        }
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header(headers.to_vec());
        for r in rows {
            t.add_row(r);
        }
        flotilla_proto::outln!("{t}");
    }

    /// Prints one object: `human` lines, or `json`.
    pub fn object(&self, human: &str, json: Value) {
        if self.json {
            flotilla_proto::outln!("{}", serde_json::to_string_pretty(&json).expect("json"));
        } else {
            flotilla_proto::outln!("{human}");
        }
    }
}

/// A Unix time as RFC 3339 (UTC), or "-" for 0.
pub fn time(secs: i64) -> String {
    if secs == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}
