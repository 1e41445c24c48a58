//! The demo patch `flotilla dev` rolls out: a signing key, the fleet's trust
//! policy, a small `files` patch built, signed and published through the same
//! code as `flotilla patch`, then followed until every agent has committed it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use flotilla_proto::pb;

use super::connect::{Admin, Target, status_error};
use super::output::Output;

/// The signing key's public half, for agents to pin at join.
pub fn public_key(dir: &Path) -> PathBuf {
    dir.join("release.pub")
}

/// Makes the release key (once; unencrypted: it is a throwaway dev key) and sets
/// the fleet's trust policy to it.
pub async fn prepare(dir: &Path, admin: &mut Admin) -> anyhow::Result<()> {
    let secret = dir.join("release.key");
    if !secret.exists() {
        let kp = minisign::KeyPair::generate_unencrypted_keypair()
            .map_err(|e| anyhow::anyhow!("cannot generate the dev signing key: {e}"))?;
        crate::ca::write_atomic(&secret, kp.sk.to_box(None)?.into_string().as_bytes(), true)?;
        crate::ca::write_atomic(
            &public_key(dir),
            kp.pk.to_box()?.into_string().as_bytes(),
            false,
        )?;
    }
    let pk = std::fs::read_to_string(public_key(dir))?;
    admin
        .set_trust(pb::TrustPolicy {
            public_keys: vec![pk],
            threshold: 1,
            ..Default::default()
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

fn payload(path: &Path, version: &str) -> anyhow::Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    let files: [(&str, String, u32); 2] = [
        ("VERSION", format!("{version}\n"), 0o644),
        (
            "bin/hello",
            format!("#!/bin/sh\necho \"hello from flotilla demo {version}\"\n"),
            0o755,
        ),
    ];
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_bytes())?;
    }
    b.finish()?;
    Ok(())
}

/// Builds, signs and publishes the demo patch, then prints its progress until
/// every one of `agents` committed it.
pub async fn roll_out(dir: &Path, target: &Target, group: &str, agents: u32) -> anyhow::Result<()> {
    let out = Output {
        json: false,
        wide: false,
    };
    let work = dir.join("demo");
    std::fs::create_dir_all(&work)?;
    let stamp = crate::model::now_secs();
    let id = format!("flotilla-demo-{stamp}");
    let version = "1.0.0";
    payload(&work.join("payload.tar"), version)?;
    let spec = work.join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            r#"id = "{id}"
component = "flotilla-demo"
version = "{version}"
severity = "low"
expires_in = "1d"
[targets]
groups = ["{group}"]
[[artifacts]]
name = "payload.tar"
path = "payload.tar"
[install]
type = "files"
artifact = "payload.tar"
destination = "/opt/flotilla-demo"
[health_check]
command = ["/bin/sh", "-c", "test -x \"$FLOTILLA_ROOT/opt/flotilla-demo/bin/hello\""]
retries = 3
interval_secs = 1
[rollback]
type = "restore"
"#
        ),
    )?;
    let bundle = work.join(&id);
    // The demo signs its own bundle again each run.
    super::patch::build(&spec, Some(bundle.clone()), true, None, out)?;
    let manifest = bundle.join("manifest.json");
    super::patch::sign(&manifest, &dir.join("release.key"), None, out)?;
    // A canary first, then everyone: the rollout a real fleet would use.
    let how = super::patch::Publish {
        rollout: Some(pb::RolloutPolicy {
            waves: vec!["1".into(), "100%".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let published = Instant::now();
    super::patch::publish(target, &manifest, Vec::new(), how, out).await?;
    let (mut admin, _) = target.admin().await?;
    let mut last = String::new();
    loop {
        let st = admin
            .patch_status(pb::PatchStatusRequest { id: id.clone() })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut counts: Vec<_> = st.counts.iter().collect();
        counts.sort();
        let line = counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        if line != last {
            flotilla_proto::outln!("  {id}: {line}");
            last = line.clone();
        }
        let committed = st.counts.get("committed").copied().unwrap_or(0);
        if committed >= agents {
            flotilla_proto::outln!(
                "  every agent committed the demo patch {:.2?} after publish",
                published.elapsed()
            );
            return Ok(());
        }
        if let Some(bad) = st.nodes.iter().find(|n| {
            flotilla_proto::phase::Phase::parse(&n.phase)
                .is_some_and(flotilla_proto::phase::Phase::is_failure)
        }) {
            bail!(
                "the demo patch {} on {}: {}",
                bad.phase,
                bad.node_id,
                bad.error
            );
        }
        if published.elapsed() > Duration::from_secs(60) {
            bail!("the demo patch did not reach every agent within 60s ({line})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
