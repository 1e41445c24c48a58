//! The compliance report as a dated evidence document for auditors: the
//! report itself, when and from which server it was taken, by whom, and the
//! audit log's state at that moment (checked intact, and its newest entry),
//! so the evidence and the log can be held against each other later. The
//! CLI signs the document with a minisign key (`report compliance --sign`).

use serde_json::json;

use super::Report;
use crate::audit::chain::{Broken, Intact};

/// What the document says it is; a reader checks it before anything else.
pub const KIND: &str = "flotilla.compliance-evidence.v1";

/// The evidence document, as pretty JSON.
pub fn document(
    report: &Report,
    server: &str,
    generated_by: &str,
    group: Option<&str>,
    audit: &Result<Intact, Broken>,
) -> String {
    let generated_at = time::OffsetDateTime::from_unix_timestamp(report.generated_at_ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let audit = match audit {
        Ok(ok) => json!({
            "intact": true,
            "entries": ok.entries,
            "newest": ok.newest.as_ref().map(|n| json!({"seq": n.seq, "sha256": n.sha256})),
        }),
        Err(broken) => json!({
            "intact": false,
            "broken": {"seq": broken.seq, "reason": broken.reason},
        }),
    };
    let doc = json!({
        "kind": KIND,
        "generated_at": generated_at,
        "server": server,
        "generated_by": generated_by,
        "group": group,
        "audit_log": audit,
        "report": report,
    });
    serde_json::to_string_pretty(&doc).expect("evidence serialises") + "\n"
}
