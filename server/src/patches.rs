//! Patches on the server: publishing (verify against the trust policy, check the
//! delta index against the manifest, check the artifacts and deltas are held,
//! store, push), and what nodes report about each patch.

use std::collections::BTreeMap;

use flotilla_proto::delta::DeltaIndex;
use flotilla_proto::manifest::Manifest;
use flotilla_proto::phase::Phase;

use crate::app::App;
use crate::error::{Error, Result};
use crate::fleet::PatchInfo;
use crate::model::{NodePatchRecord, PatchRecord, keys};

/// A file a publish needs held: an artifact of the manifest, or a delta its
/// index lists.
struct Needed<'a> {
    /// "artifact" or "delta", for messages.
    what: &'static str,
    name: &'a str,
    sha256: &'a str,
    size: u64,
    /// Which document gives the size, for messages.
    source: &'static str,
}

/// The manifest's artifacts, then the index's deltas.
fn needed<'a>(m: &'a Manifest, index: Option<&'a DeltaIndex>) -> Vec<Needed<'a>> {
    let artifacts = m.artifacts.iter().map(|a| Needed {
        what: "artifact",
        name: &a.name,
        sha256: &a.sha256,
        size: a.size,
        source: "the manifest",
    });
    let deltas = index.into_iter().flat_map(|i| &i.deltas).map(|d| Needed {
        what: "delta",
        name: &d.name,
        sha256: &d.sha256,
        size: d.size,
        source: "the delta index",
    });
    artifacts.chain(deltas).collect()
}

/// Makes sure every artifact of `m`, and every delta of its index, is held
/// here (uploaded here, or fetched from the replica it was uploaded to) and
/// by as many replicas as the publish needs (`--artifact-copies`; by default
/// 2 once there are 2).
async fn hold_artifacts(app: &App, m: &Manifest, index: Option<&DeltaIndex>) -> Result<()> {
    let needed = needed(m, index);
    for a in &needed {
        match app.artifacts.complete_size(a.sha256) {
            Some(size) if size != a.size => {
                return Err(Error::FailedPrecondition(format!(
                    "{} {} ({}) is held with {size} bytes, {} says {}",
                    a.what, a.name, a.sha256, a.source, a.size
                )));
            }
            // Named again: an unnamed file's retention starts over.
            Some(_) => app.artifacts.touch(a.sha256),
            None => app
                .peers
                .fetch(&app.artifacts, a.sha256, a.size)
                .await
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "{} {} ({}) has not been uploaded: {e}",
                        a.what, a.name, a.sha256
                    ))
                })?,
        }
    }
    let replicas = app.peers.replicas().await?;
    let want = app
        .cfg
        .artifact_copies
        .map_or(replicas.min(2), |c| c as usize);
    if want <= 1 {
        return Ok(());
    }
    for a in &needed {
        let (others, failures) = app.peers.replicate(a.sha256, a.size, want - 1).await;
        if others + 1 < want {
            return Err(Error::FailedPrecondition(format!(
                "{} {} ({}) is held by {} replica(s) of {replicas}, and a publish needs {want} (--artifact-copies){}",
                a.what,
                a.name,
                a.sha256,
                others + 1,
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(": {}", failures.join("; "))
                }
            )));
        }
    }
    Ok(())
}

/// Verifies and stores a manifest (with its delta index, `deltas`, when not
/// empty), then pushes it to the nodes it targets. The signature is checked
/// once here, for the whole fleet; each agent checks again. The index is not
/// signed: it is checked against the manifest here so a bad one is refused
/// early, and the agents trust nothing in it.
pub async fn publish(
    app: &App,
    manifest: Vec<u8>,
    signatures: Vec<String>,
    deltas: Vec<u8>,
    publisher: &str,
    rollout: crate::fleet::RolloutRequest,
) -> Result<(PatchRecord, Manifest)> {
    let trust = crate::trust::current(&app.db).await?.ok_or_else(|| {
        Error::FailedPrecondition(
            "no trust policy: an admin must first set the patch-signing keys (flotilla trust set)"
                .into(),
        )
    })?;
    let parsed = trust
        .policy()?
        .verify(&manifest, &signatures)
        .map_err(|e| Error::InvalidArgument(format!("manifest refused: {e}")))?;
    flotilla_proto::manifest::check_time(&parsed, time::OffsetDateTime::now_utc())
        .map_err(|e| Error::InvalidArgument(format!("manifest refused: {e}")))?;
    let index = if deltas.is_empty() {
        None
    } else {
        let index = DeltaIndex::parse(&deltas)
            .and_then(|i| i.validate_against(&parsed, &manifest).map(|()| i))
            .map_err(|e| Error::InvalidArgument(format!("delta index refused: {e}")))?;
        Some(index)
    };
    // No collection removes a file between finding it held and storing the
    // patch that names it.
    let _collecting = app.artifacts.collecting.read().await;
    hold_artifacts(app, &parsed, index.as_ref()).await?;
    let text = String::from_utf8(manifest)
        .map_err(|_| Error::InvalidArgument("manifest is not UTF-8".into()))?;
    let deltas = String::from_utf8(deltas)
        .map_err(|_| Error::InvalidArgument("delta index is not UTF-8".into()))?;
    let record = app
        .fleet
        .add_patch(text, signatures, deltas, publisher, parsed.clone(), rollout)
        .await?;
    Ok((record, parsed))
}

/// Records a node's report in its patch state, once the fleet agrees the node
/// may report that phase on that patch (see `Fleet::check_report`): one
/// write, no per-report record (a fleet sends several reports per node and
/// patch). Returns false for a re-send of the last report (its first answer
/// was lost), a report older than the one stored, or one that repeats a
/// final phase; none changes anything. A move out of a final phase that the
/// agent's own journal could not make (see [`may_reach`]) is refused,
/// unless the stored phase is from before the node last enrolled (a host
/// back with a fresh state directory starts its patches over).
pub async fn record_report(
    app: &App,
    node_id: &str,
    rec: crate::model::ReportRecord,
) -> Result<bool> {
    let enrolled_at = app
        .fleet
        .check_report(node_id, &rec.manifest_id, rec.phase)
        .await?;
    let phase = rec.phase;
    let name = phase.as_str().to_string();
    let at = rec.at_ms;
    let mut new = false;
    // Whether this report is the move into its failure phase (the first
    // report of it): only that one is an event and a log line.
    let mut failed_now = false;
    // One fsync for the report and what it changes in the fleet (installed
    // versions), taken at the end, after the fleet's lock is let go.
    let stored = app
        .db
        .update_unsynced(
            &keys::patch_state(&rec.manifest_id, node_id),
            |cur: Option<NodePatchRecord>| {
                new = false;
                failed_now = false;
                // The server's own record of the enrollment, not the node's
                // clock, says whether the record is of an earlier one.
                let was = cur
                    .as_ref()
                    .map(|c| (Phase::parse(&c.phase), c.enrolled_at != enrolled_at));
                let next = match cur {
                    Some(c) if c.last_report_id == rec.report_id => {
                        return Ok::<_, Error>(crate::store::Update::Keep);
                    }
                    // Reports arrive in order, but a late re-send must not undo a newer one.
                    Some(c) if c.updated_at_ms > at => {
                        return Ok(crate::store::Update::Keep);
                    }
                    Some(c) => {
                        if let Some((Some(from), false)) = was
                            && from.is_final()
                        {
                            // The same final phase again says nothing new
                            // (and must not append an event each time).
                            if from == phase {
                                return Ok(crate::store::Update::Keep);
                            }
                            if !may_reach(from, phase) {
                                return Err(Error::FailedPrecondition(format!(
                                    "patch {} is {from} on node {node_id}, which is final: \
                                     it cannot become {phase}",
                                    rec.manifest_id
                                )));
                            }
                        }
                        NodePatchRecord {
                            phase: name.clone(),
                            updated_at_ms: at,
                            error: rec.error.clone(),
                            log_tail: rec.log_tail.clone(),
                            last_report_id: rec.report_id.clone(),
                            transfer: rec.transfer.clone().or(c.transfer),
                            enrolled_at,
                            ..c
                        }
                    }
                    None => NodePatchRecord {
                        node_id: node_id.to_string(),
                        phase: name.clone(),
                        first_at_ms: at,
                        updated_at_ms: at,
                        error: rec.error.clone(),
                        log_tail: rec.log_tail.clone(),
                        last_report_id: rec.report_id.clone(),
                        transfer: rec.transfer.clone(),
                        enrolled_at,
                    },
                };
                new = true;
                failed_now = is_failure(phase)
                    && !matches!(was, Some((Some(from), false)) if is_failure(from));
                Ok(crate::store::Update::Put(next))
            },
        )
        .await??;
    // The stored record is the newest report, which a late re-send never undoes.
    if let Some(s) = stored {
        app.fleet
            .note_phase(
                node_id,
                &rec.manifest_id,
                Phase::parse(&s.phase).unwrap_or(phase),
                &s.error,
                s.updated_at_ms,
            )
            .await?;
    }
    // A failure's event before the sync: the event's write is durable, and
    // takes the report's with it, so a crash before either is a report sent
    // again as new (its event then written), never an event lost.
    if failed_now {
        app.events
            .append(
                crate::events::Kind::PatchFailed,
                &rec.manifest_id,
                serde_json::json!({
                    "patch": rec.manifest_id, "node": node_id, "phase": name,
                    "error": rec.error,
                }),
            )
            .await?;
    }
    // Also when this is a re-send: an earlier try's write may not have reached
    // the disk (its sync failed, so it was never acknowledged).
    app.db.sync().await?;
    if new && phase.is_final() {
        tracing::info!(node = node_id, patch = %rec.manifest_id, phase = %name, error = %rec.error, "patch outcome");
    }
    Ok(new)
}

/// Whether an agent's journal can take a patch from `from` to `to` in one
/// move or several ([`Phase::may_become`]): the agent reports only the newest
/// of the phases it went through while a report was in flight, so the server
/// sees Committed become RolledBack when the Reverting between was never
/// sent.
fn may_reach(from: Phase, to: Phase) -> bool {
    let mut seen = vec![from];
    let mut next = 0;
    while let Some(&at) = seen.get(next) {
        next += 1;
        for p in Phase::ALL {
            if at.may_become(p) {
                if p == to {
                    return true;
                }
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
    }
    false
}

/// The phases a patch.failed event tells of.
fn is_failure(phase: Phase) -> bool {
    matches!(phase, Phase::Failed | Phase::RolledBack | Phase::Rejected)
}

/// Where a patch stands on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePatchState {
    pub node_id: String,
    pub group: String,
    /// The last phase reported ([`Phase::as_str`]), or, before the node has
    /// the patch, why it waits ("waiting for wave", "waiting (offline)", ...).
    pub phase: String,
    /// Unix ms of the first and the last report (0: none yet).
    pub first_at_ms: i64,
    pub updated_at_ms: i64,
    /// Why, for rolled_back, failed and rejected (or what a wait waits for).
    pub error: String,
    pub log_tail: String,
    /// How the node downloaded the patch (None before it did).
    pub transfer: Option<flotilla_proto::transfer::Transfer>,
}

/// Per-node states of a patch: every targeted node (waiting if silent) and any
/// other node that reported.
pub async fn status(app: &App, id: &str) -> Result<(PatchInfo, Vec<NodePatchState>)> {
    let info = app
        .fleet
        .patch_info(id)
        .await
        .ok_or_else(|| Error::NotFound(format!("no patch with id {id}")))?;
    let mut by_node: BTreeMap<String, NodePatchState> = BTreeMap::new();
    // Nodes that may download ahead, and why their install waits.
    let mut held_back: BTreeMap<String, String> = BTreeMap::new();
    for (node, group, (waiting, detail), released) in app.fleet.targeted_nodes(id).await {
        if !released {
            let why = if detail.is_empty() {
                waiting.clone()
            } else {
                format!("{waiting}: {detail}")
            };
            held_back.insert(node.clone(), why);
        }
        by_node.insert(
            node.clone(),
            NodePatchState {
                node_id: node,
                group,
                phase: waiting,
                error: detail,
                ..Default::default()
            },
        );
    }
    for r in app
        .db
        .list::<NodePatchRecord>(&keys::patch_states(id))
        .await?
    {
        let group = match by_node.get(&r.node_id) {
            Some(s) => s.group.clone(),
            None => app
                .fleet
                .node(&r.node_id)
                .await
                .map(|(n, _, _)| n.group)
                .unwrap_or_default(),
        };
        // Downloaded ahead, its install not released yet: say what it waits for.
        let error = match held_back.get(&r.node_id) {
            Some(why) if r.phase == Phase::Downloaded.as_str() => {
                format!("downloaded ahead; install {why}")
            }
            _ => r.error,
        };
        by_node.insert(
            r.node_id.clone(),
            NodePatchState {
                node_id: r.node_id,
                group,
                phase: r.phase,
                first_at_ms: r.first_at_ms,
                updated_at_ms: r.updated_at_ms,
                error,
                log_tail: r.log_tail,
                transfer: r.transfer,
            },
        );
    }
    Ok((info, by_node.into_values().collect()))
}
