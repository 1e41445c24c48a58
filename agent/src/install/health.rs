//! The post-install health check: the manifest's command, retried a few times
//! before the patch is judged bad and rolled back.

use std::path::Path;
use std::time::Duration;

use flotilla_proto::manifest::HealthCheck;

use super::InstallError;
use super::script::run_program;

/// Runs the check up to `retries` times, `interval_secs` apart, each under
/// `timeout_secs`. Ok with the output tail of the first attempt that exits 0; a
/// timed-out attempt counts as a failed one. A program that cannot be started at
/// all fails at once: waiting will not make it appear.
pub async fn health_check(
    check: &HealthCheck,
    env: &[(String, String)],
) -> Result<String, InstallError> {
    let Some((program, args)) = check.command.split_first() else {
        return Err(InstallError::EmptyHealthCheck);
    };
    let program = Path::new(program);
    let attempts = check.retries.max(1);
    let timeout = Duration::from_secs(check.timeout_secs);
    let mut last_code = None;
    let mut tail = String::new();
    for attempt in 1..=attempts {
        match run_program(program, args, env, timeout).await {
            Ok(out) if out.success => return Ok(out.tail),
            Ok(out) => {
                last_code = out.code;
                tail = out.tail;
            }
            Err(InstallError::Timeout {
                tail: out, timeout, ..
            }) => {
                last_code = None;
                tail = format!("{out}\n(timed out after {}s)", timeout.as_secs_f64());
            }
            Err(e) => return Err(e),
        }
        tracing::info!(attempt, attempts, code = ?last_code, "health check failed");
        if attempt < attempts {
            tokio::time::sleep(Duration::from_secs(check.interval_secs)).await;
        }
    }
    Err(InstallError::HealthCheckFailed {
        attempts,
        last_code,
        tail,
    })
}
