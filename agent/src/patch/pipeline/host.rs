//! What changes the host: the install plan (files or a script), its undo, and
//! the scripts they run, with the patch's environment. The no-op executor (the
//! fleet simulator) skips all of it.

use super::*;

impl Pipeline {
    pub(super) fn env(&self, m: &Manifest, phase: &str) -> Vec<(String, String)> {
        vec![
            ("FLOTILLA_PATCH_ID".into(), m.id.clone()),
            ("FLOTILLA_COMPONENT".into(), m.component.clone()),
            ("FLOTILLA_VERSION".into(), m.version.clone()),
            ("FLOTILLA_PHASE".into(), phase.into()),
            (
                "FLOTILLA_ROOT".into(),
                self.cfg.root.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// A runnable copy of a script artifact (downloads are not executable).
    fn script_copy(&self, m: &Manifest, artifact: &str) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt;
        let a = m
            .artifact(artifact)
            .ok_or_else(|| format!("no artifact {artifact}"))?;
        let src = self.artifact_dir().join(&a.sha256);
        let dir = self.patch_dir(&m.id);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let dest = dir.join(format!("{artifact}.run"));
        std::fs::copy(&src, &dest).map_err(|e| format!("cannot stage {artifact}: {e}"))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        Ok(dest)
    }

    pub(super) async fn run_script(
        &self,
        m: &Manifest,
        artifact: &str,
        args: &[String],
        timeout_secs: u64,
        phase: &str,
    ) -> Result<String, Stop> {
        let program = self
            .script_copy(m, artifact)
            .map_err(|e| Stop::new(Phase::Failed, e))?;
        let out = install::run_program_recorded(
            &program,
            args,
            &self.env(m, phase),
            Duration::from_secs(timeout_secs),
            &self.patch_dir(&m.id).join(format!("{phase}.pgid")),
        )
        .await
        .map_err(|e| Stop::new(Phase::Failed, e.to_string()))?;
        if out.success {
            Ok(out.tail)
        } else {
            Err(Stop {
                tail: out.tail,
                ..Stop::new(
                    Phase::Failed,
                    format!(
                        "{phase} script {artifact} exited with {}",
                        out.code
                            .map_or("a signal".to_string(), |c| format!("code {c}"))
                    ),
                )
            })
        }
    }

    /// Applies the install plan. Its journal step is already recorded.
    pub(super) async fn apply(&self, m: &Manifest) -> Result<String, Stop> {
        if self.cfg.executor.skips_host() {
            return Ok("no-op executor: nothing installed".into());
        }
        match &m.install {
            Install::Files {
                artifact,
                destination,
                compression,
            } => {
                let a = m
                    .artifact(artifact)
                    .ok_or_else(|| Stop::new(Phase::Failed, format!("no artifact {artifact}")))?;
                let src = self.artifact_dir().join(&a.sha256);
                let dest = under_root(&self.cfg.root, destination);
                let policy = self.host_policy();
                let work = self.patch_dir(&m.id);
                let compression = *compression;
                let result = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&work)?;
                    install::install_files(&src, compression, &dest, &policy, &work)
                        .map_err(std::io::Error::other)
                })
                .await
                .map_err(|e| Stop::new(Phase::Failed, e.to_string()))?;
                result
                    .map(|r| format!("{} file(s) written", r.written.len()))
                    .map_err(|e| Stop::new(Phase::Failed, e.to_string()))
            }
            Install::Script {
                artifact,
                timeout_secs,
                args,
            } => {
                self.run_script(m, artifact, args, *timeout_secs, "install")
                    .await
            }
        }
    }

    /// Undoes the install: files from their backup, a script install with its
    /// rollback script (one still running from before a crash of the agent is
    /// stopped first). Both are safe to repeat. Ok carries the rollback script's
    /// output tail; Err when the host could not be restored.
    pub(super) async fn undo(&self, m: &Manifest) -> Result<String, Stop> {
        if self.cfg.executor.skips_host() {
            return Ok(String::new());
        }
        match (&m.install, &m.rollback) {
            (Install::Files { .. }, _) => {
                let work = self.patch_dir(&m.id);
                tokio::task::spawn_blocking(move || install::rollback_files(&work))
                    .await
                    .map_err(|e| Stop::new(Phase::Failed, e.to_string()))?
                    .map(|()| String::new())
                    .map_err(|e| Stop {
                        retry: e.may_pass_later(),
                        ..Stop::new(Phase::Failed, e.to_string())
                    })
            }
            (
                Install::Script { .. },
                Some(Rollback::Script {
                    artifact,
                    timeout_secs,
                }),
            ) => {
                let dir = self.patch_dir(&m.id);
                install::kill_recorded(
                    &dir.join("rollback.pgid"),
                    &format!("FLOTILLA_PATCH_ID={}", m.id),
                    &dir.join(format!("{artifact}.run")),
                );
                self.run_script(m, artifact, &[], *timeout_secs, "rollback")
                    .await
            }
            (Install::Script { .. }, _) => Err(Stop::new(
                Phase::Failed,
                "the manifest has no rollback script for its install script",
            )),
        }
    }
}
