//! Enrollment: a join token and a CSR become a node record and a client
//! certificate. The token is checked first, the CSR parsed next, and only then is
//! a use counted, so a bad request costs the token nothing.

use std::collections::BTreeMap;

use flotilla_proto::limits;
use flotilla_proto::token::random_string;

use crate::app::App;
use crate::error::{Error, Result};
use crate::model::{Facts, NodeRecord, NodeStatus, Role, now_secs};

/// A join request, validated.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Where the request came from, for the failed-join limits.
    pub source: Option<std::net::IpAddr>,
    pub token_id: String,
    pub token_secret: String,
    pub csr_der: Vec<u8>,
    pub facts: Facts,
    pub labels: BTreeMap<String, String>,
}

/// What a join produced.
#[derive(Debug, Clone)]
pub struct Joined {
    pub node: NodeRecord,
    pub certificate_pem: String,
    pub rejoined: bool,
    /// The trust policy the token pins (hex SHA-256; "" when none).
    pub trust_sha256: String,
}

/// Counts a join refused for its token (unknown, or the wrong secret), and
/// audits and logs it at a bounded rate: the first failure of a source, then
/// one entry per source and interval with the count.
async fn failed_join(
    app: &App,
    source: Option<std::net::IpAddr>,
    token_id: &str,
    known: Option<&str>,
    why: &Error,
) {
    let Some(report) = app.join_guard.failed(source, known) else {
        return;
    };
    // The id and the error quote what the peer sent: bounded before they are kept.
    let token = limits::clip(token_id, 64);
    let error = limits::clip(&why.to_string(), 256);
    tracing::warn!(source = %report.source, token = %token, failures = report.count, "failed join: {error}");
    let detail = serde_json::json!({
        "failures": report.count,
        "error": error,
    });
    if let Err(e) = app
        .audit
        .record(
            &format!("source:{}", report.source),
            crate::audit::Action::JoinFailed,
            &token,
            detail,
        )
        .await
    {
        tracing::error!("cannot audit a failed join: {e}");
    }
}

/// Checks the facts an agent sends.
pub fn check_facts(f: &Facts) -> Result<()> {
    for (what, v) in [
        ("hostname", &f.hostname),
        ("os", &f.os),
        ("arch", &f.arch),
        ("agent version", &f.agent_version),
    ] {
        limits::check_text(what, v, limits::MAX_FACT_LEN)?;
    }
    if f.machine_id.is_empty() {
        return Err(Error::InvalidArgument("machine id is empty".into()));
    }
    limits::check_text("machine id", &f.machine_id, limits::MAX_FACT_LEN)?;
    Ok(())
}

pub async fn join(app: &App, req: JoinRequest) -> Result<Joined> {
    app.join_guard.admit(req.source, &req.token_id)?;
    check_facts(&req.facts)?;
    limits::check_labels(req.labels.iter())?;
    if req.csr_der.is_empty() || req.csr_der.len() > limits::MAX_CSR_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the CSR must be 1 to {} bytes of DER",
            limits::MAX_CSR_BYTES
        )));
    }
    // Refuse early, before any work, with the token's own reason.
    let rec = crate::tokens::get(&app.db, &req.token_id).await?;
    if let Err(e) = crate::tokens::check(rec.as_ref(), &req.token_id, &req.token_secret, now_secs())
    {
        if matches!(e, Error::Unauthenticated(_)) {
            // Only a token that exists is tracked by id: made-up ids would
            // only fill the table.
            let known = rec.is_some().then_some(req.token_id.as_str());
            failed_join(app, req.source, &req.token_id, known, &e).await;
        }
        return Err(e);
    }

    let existing = app.fleet.node_by_machine(&req.facts.machine_id).await?;
    let existing =
        existing.filter(|n| !matches!(n.status, NodeStatus::Revoked | NodeStatus::Rejected));
    let node_id = existing
        .as_ref()
        .map_or_else(|| format!("node-{}", random_string(12)), |n| n.id.clone());
    let cert = app
        .ca
        .issue_node_cert(&req.csr_der, &node_id, app.cfg.node_cert_lifetime)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;

    let token = crate::tokens::consume(&app.db, &req.token_id, &req.token_secret).await?;
    let mut labels = req.labels.clone();
    // Labels the token stamps win over what the agent asks for.
    labels.extend(token.labels.clone());
    let rejoined = existing.is_some();
    let node = match existing {
        Some(mut n) => {
            n.group = token.group.clone();
            n.facts = req.facts.clone();
            n.labels = labels;
            n.token_id = token.id.clone();
            n.cert_serial = cert.serial_hex.clone();
            n.prev_cert_serial = String::new();
            n.cert_not_after = cert.not_after;
            // A rejoin is a new trust decision: a token that needs approval puts
            // the node back to pending, and the old certificate stops working.
            if token.requires_approval {
                n.status = NodeStatus::Pending;
            }
            n
        }
        None => NodeRecord {
            id: node_id.clone(),
            group: token.group.clone(),
            status: if token.requires_approval {
                NodeStatus::Pending
            } else {
                NodeStatus::Accepted
            },
            role: Role::Standby,
            facts: req.facts.clone(),
            labels,
            joined_at: now_secs(),
            token_id: token.id.clone(),
            cert_serial: cert.serial_hex.clone(),
            prev_cert_serial: String::new(),
            cert_not_after: cert.not_after,
            revision: 1,
            last_seen: 0,
            installed: Default::default(),
        },
    };
    let node = app.fleet.save_node(node).await?;
    app.audit
        .record(
            &format!("token:{}", token.id),
            if rejoined {
                crate::audit::Action::NodeRejoin
            } else {
                crate::audit::Action::NodeJoin
            },
            &node.id,
            serde_json::json!({
                "group": node.group,
                "hostname": node.facts.hostname,
                "status": node.status.as_str(),
                "certificate_serial": node.cert_serial,
            }),
        )
        .await?;
    tracing::info!(node = %node.id, group = %node.group, rejoined, "node joined");
    Ok(Joined {
        node,
        certificate_pem: cert.pem,
        rejoined,
        trust_sha256: token.trust_sha256,
    })
}
