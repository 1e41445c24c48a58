//! Tests of `run_program` (output tail, exit codes, environment, timeouts that kill
//! the whole process group) and `health_check` (retries, failure report).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_proto::manifest::HealthCheck;

use super::script::TAIL_BYTES;
use super::{InstallError, health_check, run_program};

const SH: &str = "/bin/sh";

fn sh(script: &str) -> Vec<String> {
    vec!["-c".to_owned(), script.to_owned()]
}

#[tokio::test]
async fn output_tail_and_exit_code_are_captured() {
    let out = run_program(
        Path::new(SH),
        &sh("i=0; while [ $i -lt 2000 ]; do i=$((i+1)); echo line$i; done; echo oops >&2; exit 3"),
        &[],
        Duration::from_secs(20),
    )
    .await
    .expect("run");
    assert!(!out.success);
    assert_eq!(out.code, Some(3));
    assert!(
        out.tail.len() <= TAIL_BYTES,
        "{} bytes kept",
        out.tail.len()
    );
    assert!(out.tail.contains("line2000\n"), "{}", out.tail);
    assert!(
        out.tail.contains("oops"),
        "stderr is captured too: {}",
        out.tail
    );
    assert!(!out.tail.contains("line1\n"), "only the tail is kept");

    let ok = run_program(
        Path::new(SH),
        &sh("echo fine"),
        &[],
        Duration::from_secs(20),
    )
    .await
    .expect("run");
    assert!(ok.success);
    assert_eq!(ok.code, Some(0));
    assert_eq!(ok.tail, "fine\n");
}

#[tokio::test]
async fn only_the_given_environment_and_a_clean_path_are_passed() {
    let env = [("FLOTILLA_PATCH".to_owned(), "p-1".to_owned())];
    let out = run_program(
        Path::new(SH),
        &sh("echo \"patch=$FLOTILLA_PATCH path=$PATH home=${HOME:-unset}\"; cat"),
        &env,
        Duration::from_secs(20),
    )
    .await
    .expect("run");
    assert!(out.success, "stdin is empty, so cat ends: {}", out.tail);
    assert_eq!(
        out.tail,
        "patch=p-1 path=/usr/sbin:/usr/bin:/sbin:/bin home=unset\n"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("bg.pid");
    let script = format!("sleep 30 & echo $! > '{}'; sleep 30", pidfile.display());
    let started = Instant::now();
    let err = run_program(Path::new(SH), &sh(&script), &[], Duration::from_millis(300))
        .await
        .expect_err("must time out");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, InstallError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains(SH) && err.to_string().contains("0.3s"),
        "{err}"
    );

    // The background child was killed too (gone, or a zombie awaiting its reaper).
    crate::install::tests_util::wait_dead(&pidfile, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_missing_program_is_an_error_naming_it() {
    let err = run_program(
        Path::new("/nonexistent/flotilla-probe"),
        &[],
        &[],
        Duration::from_secs(5),
    )
    .await
    .expect_err("no such program");
    assert!(matches!(err, InstallError::Spawn { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/flotilla-probe"),
        "{err}"
    );
}

fn check(command: Vec<String>, timeout_secs: u64, retries: u32) -> HealthCheck {
    HealthCheck {
        command,
        timeout_secs,
        retries,
        interval_secs: 0,
    }
}

fn with_sh(args: &[&str]) -> Vec<String> {
    std::iter::once(SH)
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn health_check_succeeds_on_a_later_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("marker");
    let script =
        "if [ -e \"$1\" ]; then echo healthy; exit 0; fi; touch \"$1\"; echo starting; exit 1";
    let marker_arg = marker.display().to_string();
    let hc = check(with_sh(&["-c", script, "check", &marker_arg]), 10, 3);
    let tail = health_check(&hc, &[]).await.expect("second attempt passes");
    assert_eq!(tail, "healthy\n");
    assert!(marker.exists());
}

#[tokio::test]
async fn health_check_fails_after_its_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let count = dir.path().join("count");
    let count_arg = count.display().to_string();
    let script = "echo x >> \"$1\"; echo 'db unreachable'; exit 4";
    let hc = check(with_sh(&["-c", script, "check", &count_arg]), 10, 3);
    let err = health_check(&hc, &[]).await.expect_err("never healthy");
    match &err {
        InstallError::HealthCheckFailed {
            attempts,
            last_code,
            ..
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(*last_code, Some(4));
        }
        other => panic!("unexpected error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("failed 3 time"), "{text}");
    assert!(
        text.contains("exit code 4") && text.contains("db unreachable"),
        "{text}"
    );
    assert_eq!(
        fs::read_to_string(&count).expect("count").lines().count(),
        3
    );
}

#[tokio::test]
async fn health_check_timeouts_count_as_failed_attempts() {
    let hc = check(with_sh(&["-c", "echo waiting; sleep 30"]), 1, 2);
    let started = Instant::now();
    let err = health_check(&hc, &[]).await.expect_err("times out");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        matches!(
            err,
            InstallError::HealthCheckFailed {
                attempts: 2,
                last_code: None,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
}

#[tokio::test]
async fn an_empty_health_check_is_an_error() {
    let err = health_check(&check(Vec::new(), 1, 1), &[])
        .await
        .expect_err("empty");
    assert!(matches!(err, InstallError::EmptyHealthCheck), "{err}");
}
