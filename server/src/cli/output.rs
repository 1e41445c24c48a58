//! Printing results: a table for people, JSON for scripts.

use comfy_table::{ContentArrangement, Table, presets::NOTHING};
use serde_json::Value;

#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    /// Tables as wide as their content, never wrapped.
    pub wide: bool,
}

impl Output {
    /// Prints `rows` as a table with `headers`, or `json` as JSON.
    pub fn table(&self, headers: &[&str], rows: Vec<Vec<String>>, json: Value) {
        if self.json {
            flotilla_proto::outln!("{}", serde_json::to_string_pretty(&json).expect("json"));
            return;
        }
        let mut t = Table::new();
        // Borderless, as the docs show; long cells wrap to fit the terminal
        // (its width, or $COLUMNS when set; a pipe without $COLUMNS is not
        // wrapped), unless --wide.
        t.load_preset(NOTHING);
        if self.wide {
            t.set_content_arrangement(ContentArrangement::Disabled);
        } else {
            t.set_content_arrangement(ContentArrangement::Dynamic);
            if let Some(w) = std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.parse::<u16>().ok())
            {
                t.set_width(w);
            }
        }
        t.set_header(headers.to_vec());
        for r in rows {
            t.add_row(r);
        }
        for c in t.column_iter_mut() {
            c.set_padding((0, 2));
        }
        for line in t.lines() {
            flotilla_proto::outln!("{}", line.trim_end());
        }
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

/// An audit entry's detail (JSON) for people: `key=value` pairs, long values
/// shortened (`--json` has them whole).
pub fn detail(json: &str) -> String {
    const LONG: usize = 24;
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(json) else {
        return json.to_string();
    };
    map.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if v.chars().count() > LONG {
                let head: String = v.chars().take(LONG - 1).collect();
                format!("{k}={head}…")
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Unix time as RFC 3339 (UTC), or "-" for 0.
pub fn time(secs: i64) -> String {
    if secs == 0 {
        return "-".into();
    }
    flotilla_proto::when::unix_secs(secs)
}
