//! The checks a received patch passes before anything is fetched: signatures
//! against the keys this host pinned, expiry (against the time the update
//! started, or now for one taken up again), target, version, and this host's
//! own policy. Each refusal is typed,
//! so its words come from where the check is.

use std::path::{Path, PathBuf};

use flotilla_proto::manifest::{self, Install, Manifest, ManifestError, NodeTarget, Rollback};

use super::{Pipeline, Stop};
use crate::patch::journal::{Entry, Phase};

/// Why a received patch is refused (Rejected), before the host is touched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The manifest itself: signatures, threshold, expiry, target, version.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the agent has no identity")]
    NoIdentity,
    #[error("no patch-signing keys are pinned on this host (join with --trusted-key)")]
    NoTrustedKeys,
    #[error("the signed manifest's id is {signed:?}, but it was offered as {offered:?}")]
    IdMismatch { signed: String, offered: String },
    #[error("{0} (seconds since 1970) is not a time to judge the manifest's validity at")]
    BadTime(i64),
    #[error("cannot read the agent's state: {0}")]
    State(String),
    #[error("artifact {name} is {size} bytes; this host's cap is {cap}")]
    ArtifactTooLarge { name: String, size: u64, cap: u64 },
    #[error(
        "this host's policy does not allow patch scripts (install or rollback scripts: --allow-scripts)"
    )]
    ScriptsNotAllowed,
    #[error("{0}")]
    HealthCheck(String),
    #[error("destination {destination} is outside this host's allowed paths {allowed:?}")]
    OutsideAllowedPaths {
        destination: String,
        allowed: Vec<PathBuf>,
    },
}

impl Pipeline {
    /// Every check of the trust model, the manifest's validity judged at `at`
    /// (unix seconds). Refused: Rejected, or Superseded when a newer version of
    /// the component is installed (an older patch overtaken on its way here is
    /// no attack and no failure, but it is not applied either).
    pub(super) fn verify(
        &self,
        entry: &Entry,
        target: Option<&NodeTarget>,
        at: i64,
    ) -> Result<Manifest, Stop> {
        let refused = |e: Refusal| match e {
            Refusal::Manifest(ManifestError::Downgrade {
                component,
                installed,
                offered,
            }) if semver::Version::parse(&installed).is_ok() => Stop::new(
                Phase::Superseded,
                format!(
                    "superseded: {component} {installed} is installed, newer than {offered} \
                     (going back needs allow_downgrade in the signed manifest)"
                ),
            ),
            e => Stop::new(Phase::Rejected, e.to_string()),
        };
        // Refused before its signatures checked out: bytes nobody the host
        // trusts vouched for (see `Journal::note_untrusted`).
        let m = self
            .verify_signatures(entry)
            .map_err(|e| Stop::untrusted(e.to_string()))?;
        self.checks(m, target, at).map_err(refused)
    }

    fn checks(
        &self,
        m: Manifest,
        target: Option<&NodeTarget>,
        at: i64,
    ) -> Result<Manifest, Refusal> {
        let at = time::OffsetDateTime::from_unix_timestamp(at).map_err(|_| Refusal::BadTime(at))?;
        manifest::check_time(&m, at)?;
        if let Some(target) = target {
            manifest::check_target(&m, target)?;
        }
        let installed = self
            .journal
            .installed_versions()
            .map_err(|e| Refusal::State(e.to_string()))?;
        manifest::check_version(&m, installed.get(&m.component).map(String::as_str))?;
        self.check_local_policy(&m)?;
        Ok(m)
    }

    /// The entry's manifest, its signatures checked against the trust policy this
    /// host pins now, and its id against the entry's.
    pub(super) fn verify_signatures(&self, entry: &Entry) -> Result<Manifest, Refusal> {
        let identity = self
            .store
            .identity()
            .map_err(|e| Refusal::State(e.to_string()))?
            .ok_or(Refusal::NoIdentity)?;
        if identity.trusted_keys.is_empty() {
            return Err(Refusal::NoTrustedKeys);
        }
        let policy =
            manifest::TrustPolicy::new(&identity.trusted_keys, identity.trust_threshold as usize)?;
        let m = policy.verify(&entry.manifest, &entry.signatures)?;
        if m.id != entry.manifest_id {
            return Err(Refusal::IdMismatch {
                signed: m.id,
                offered: entry.manifest_id.clone(),
            });
        }
        Ok(m)
    }

    /// The host's own rules: install paths, scripts, health checks, size cap.
    fn check_local_policy(&self, m: &Manifest) -> Result<(), Refusal> {
        let policy = &self.cfg.policy;
        if let Some(a) = m
            .artifacts
            .iter()
            .find(|a| a.size > policy.max_artifact_bytes)
        {
            return Err(Refusal::ArtifactTooLarge {
                name: a.name.clone(),
                size: a.size,
                cap: policy.max_artifact_bytes,
            });
        }
        let scripts = matches!(m.install, Install::Script { .. })
            || matches!(m.rollback, Some(Rollback::Script { .. }));
        if scripts && !policy.allow_scripts {
            return Err(Refusal::ScriptsNotAllowed);
        }
        if let Some(check) = &m.health_check
            && let Some(why) = policy.refuses_health_check(&check.command)
        {
            return Err(Refusal::HealthCheck(why));
        }
        if let Install::Files { destination, .. } = &m.install
            && !policy.overlaps(Path::new(destination))
        {
            return Err(Refusal::OutsideAllowedPaths {
                destination: destination.clone(),
                allowed: policy.allowed_paths.clone(),
            });
        }
        Ok(())
    }
}
