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
    /// A host joining again with its state: proof of its node's key.
    pub proof: Option<crate::key_proof::KeyProof>,
}

/// Which node a join gives the host.
enum Placement {
    /// The node the host proved it holds the key of, or the node of its
    /// machine id that no other host holds.
    Existing(Box<NodeRecord>),
    /// A new node, bound to the machine id (`bind`), or beside a node another
    /// host holds under the same machine id (a clone).
    New {
        bind: bool,
        clone_of: Option<String>,
    },
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
/// audits and logs it at a bounded rate (see `guess_guard`). Returns the
/// answer: the failure's own, or "too many failed joins" once the token's
/// allowance is used up.
async fn failed_join(
    app: &App,
    source: Option<std::net::IpAddr>,
    token_id: &str,
    known: Option<&str>,
    why: Error,
) -> Error {
    // Only a refusal of the secret or proof is a guess: a store that does
    // not answer, or a malformed request, is no failure of the caller's.
    if !why.is_refusal() {
        return why;
    }
    let failure = app.join_guard.failed(source, known);
    if let Some(report) = failure.report {
        // The id and the error quote what the peer sent: bounded before they are kept.
        let token = limits::clip(token_id, 64);
        let error = limits::clip(&why.to_string(), 256);
        report
            .tell(
                &app.audit,
                crate::audit::Action::JoinFailed,
                "failed join",
                &token,
                "error",
                &error,
            )
            .await;
    }
    failure.slowed.unwrap_or(why)
}

/// Renews the certificate of a node whose certificate expired while its host
/// was away, on proof of the node's key (no token). Returns the new
/// certificate.
pub async fn reenroll(
    app: &App,
    source: Option<std::net::IpAddr>,
    csr_der: &[u8],
    proof: &crate::key_proof::KeyProof,
) -> Result<crate::ca::IssuedCert> {
    // Guessing at proofs is slowed, and audited, like guessing at join tokens.
    app.join_guard.admit(source)?;
    let node = match proven_node(app, proof).await {
        Ok(n) => n,
        Err(e) => return Err(failed_join(app, source, &proof.node_id, None, e).await),
    };
    let now = now_secs();
    // The proof first: every proof that fails is counted, whatever the
    // certificate's state, and only the key's holder learns that state.
    if let Err(e) = crate::key_proof::verify(
        &node,
        flotilla_proto::key_proof::REENROLL,
        csr_der,
        proof,
        now,
    ) {
        return Err(failed_join(app, source, &proof.node_id, None, e).await);
    }
    let expired_for = now - node.cert_not_after;
    if expired_for < 0 {
        return Err(Error::FailedPrecondition(format!(
            "node {}'s certificate is still valid: it renews over its session",
            node.id
        )));
    }
    let window = app.cfg.reenroll_within;
    if expired_for as u64 > window.as_secs() {
        return Err(Error::PermissionDenied(format!(
            "node {}'s certificate expired {} ago, longer than a node may renew with its key alone \
             ({}, --reenroll-within): join it again with a token, keeping its node and history: \
             flotilla-agent join --again --token …",
            node.id,
            crate::compliance::duration(expired_for),
            humantime::format_duration(window)
        )));
    }
    if csr_der.is_empty() || csr_der.len() > limits::MAX_CSR_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the CSR must be 1 to {} bytes of DER",
            limits::MAX_CSR_BYTES
        )));
    }
    let cert = app
        .ca
        .issue_node_cert(csr_der, &node.id, app.cfg.node_cert_lifetime)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    app.fleet.set_certificate(&node.id, &cert).await?;
    app.audit
        .record(
            &format!("node:{}", node.id),
            crate::audit::Action::NodeReenroll,
            &node.id,
            serde_json::json!({ "certificate_serial": cert.serial_hex, "expired_for_secs": expired_for }),
        )
        .await?;
    tracing::info!(node = %node.id, expired_for_secs = expired_for, "expired certificate renewed by proof of the node's key");
    Ok(cert)
}

/// The node a proof names, if it may still prove itself: known, neither
/// revoked nor rejected (its key is checked by the caller).
async fn proven_node(app: &App, proof: &crate::key_proof::KeyProof) -> Result<NodeRecord> {
    app.fleet
        .node(&proof.node_id)
        .await
        .map(|(n, _, _)| n)
        .filter(|n| !matches!(n.status, NodeStatus::Revoked | NodeStatus::Rejected))
        .ok_or_else(|| {
            Error::PermissionDenied(format!(
                "node {} is not known, or was revoked or rejected: join as a new node (remove the state directory)",
                limits::clip(&proof.node_id, 64)
            ))
        })
}

/// Which node a join gives the host (see [`Placement`]).
async fn place(app: &App, req: &JoinRequest, clones_new_node: bool) -> Result<Placement> {
    if let Some(proof) = &req.proof {
        let node = proven_node(app, proof).await?;
        crate::key_proof::verify(
            &node,
            flotilla_proto::key_proof::REJOIN,
            &req.csr_der,
            proof,
            now_secs(),
        )?;
        return Ok(Placement::Existing(Box::new(node)));
    }
    let Some(existing) = app
        .fleet
        .node_by_machine(&req.facts.machine_id)
        .await?
        .filter(|n| !matches!(n.status, NodeStatus::Revoked | NodeStatus::Rejected))
    else {
        return Ok(Placement::New {
            bind: true,
            clone_of: None,
        });
    };
    let online = app
        .fleet
        .node(&existing.id)
        .await
        .is_some_and(|(_, o, _)| o);
    // Joined moments ago: two hosts of one image booting together.
    let window = app.cfg.clone_window.as_secs() as i64;
    let fresh = existing.enrolled_at > 0 && now_secs() - existing.enrolled_at < window;
    if online && !clones_new_node {
        let refusal = Error::FailedPrecondition(format!(
            "node {} with machine id {} is online with another key: is this host a copy of it? \
             Give it its own machine id (join --machine-id), or use a token made with \
             --new-node-for-clones",
            existing.id, existing.facts.machine_id
        ));
        // Audited within the guard's budget, against the source: a peer that
        // asks again and again cannot grow the audit log as it likes.
        let failure = app.join_guard.failed(req.source, None);
        if let Some(report) = failure.report {
            report
                .tell(
                    &app.audit,
                    crate::audit::Action::NodeClone,
                    "refused clone join",
                    &existing.id,
                    "outcome",
                    "refused",
                )
                .await;
        }
        return Err(failure.slowed.unwrap_or(refusal));
    }
    if online || fresh {
        return Ok(Placement::New {
            bind: false,
            clone_of: Some(existing.id),
        });
    }
    // Offline and settled: the same host back from a fresh state directory
    // (its old key is gone with it).
    Ok(Placement::Existing(Box::new(existing)))
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
    if !f.site_url.is_empty() {
        limits::check_text("site URL", &f.site_url, limits::MAX_FACT_LEN)?;
        flotilla_proto::tls::host_port(&f.site_url)
            .map_err(|e| Error::InvalidArgument(format!("site URL: {e}")))?;
    }
    Ok(())
}

pub async fn join(app: &App, req: JoinRequest) -> Result<Joined> {
    // Only the source's own failures refuse it unheard; the token's allowance
    // answers wrong secrets only, after the check (see `guess_guard`).
    app.join_guard.admit(req.source)?;
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
            return Err(failed_join(app, req.source, &req.token_id, known, e).await);
        }
        return Err(e);
    }

    let placement = match place(app, &req, rec.as_ref().is_some_and(|t| t.clones_new_node)).await {
        Ok(p) => p,
        // A proof of a node's key that fails is guessing at it, as a wrong
        // secret is (the token's own allowance is not charged: its secret
        // was right).
        Err(e) if req.proof.is_some() => {
            return Err(failed_join(app, req.source, &req.token_id, None, e).await);
        }
        Err(e) => return Err(e),
    };
    let node_id = match &placement {
        Placement::Existing(n) => n.id.clone(),
        Placement::New { .. } => format!("node-{}", random_string(12)),
    };
    let cert = app
        .ca
        .issue_node_cert(&req.csr_der, &node_id, app.cfg.node_cert_lifetime)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;

    let token = crate::tokens::consume(&app.db, &req.token_id, &req.token_secret).await?;
    let mut labels = req.labels.clone();
    // Labels the token stamps win over what the agent asks for.
    labels.extend(token.labels.clone());
    let rejoined = matches!(placement, Placement::Existing(_));
    let (bind, clone_of) = match &placement {
        Placement::Existing(_) => (true, None),
        Placement::New { bind, clone_of } => (*bind, clone_of.clone()),
    };
    let node = match placement {
        Placement::Existing(n) => {
            let mut n = *n;
            n.group = token.group.clone();
            n.facts = req.facts.clone();
            n.labels = labels;
            n.token_id = token.id.clone();
            n.cert_serial = cert.serial_hex.clone();
            n.prev_cert_serial = String::new();
            n.cert_not_after = cert.not_after;
            n.public_key = cert.public_key_hex.clone();
            n.enrolled_at = now_secs();
            // A rejoin is a new trust decision: a token that needs approval puts
            // the node back to pending, and the old certificate stops working.
            if token.requires_approval {
                n.status = NodeStatus::Pending;
            }
            n
        }
        Placement::New { .. } => NodeRecord {
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
            public_key: cert.public_key_hex.clone(),
            enrolled_at: now_secs(),
            revision: 1,
            last_seen: 0,
            installed: Default::default(),
        },
    };
    let node = app.fleet.save_node(node, bind).await?;
    if let Some(other) = &clone_of {
        tracing::warn!(node = %node.id, %other, machine_id = %node.facts.machine_id, "a host joined with the machine id of a node another host holds: a new node");
        app.audit
            .record(
                &format!("token:{}", token.id),
                crate::audit::Action::NodeClone,
                &node.id,
                serde_json::json!({ "machine_id": node.facts.machine_id, "held_by": other, "outcome": "new node" }),
            )
            .await?;
    }
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
    app.events
        .append(
            crate::events::Kind::NodeJoined,
            &node.id,
            serde_json::json!({
                "node": node.id, "group": node.group, "hostname": node.facts.hostname,
                "status": node.status.as_str(), "rejoined": rejoined,
                "labels": node.labels,
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
