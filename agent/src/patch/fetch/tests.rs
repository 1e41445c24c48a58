//! Fetcher tests against real tonic streams from in-process fake servers.

use std::time::{Duration, Instant};

use flotilla_proto::manifest::Artifact;

use super::rate::RateWindow;
use super::test_server::{Fake, Knobs, serve, source};
use super::*;
use flotilla_proto::transfer::Transfer;

const SIZE: usize = 10_000;

fn data() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

fn artifact(data: &[u8]) -> Artifact {
    Artifact {
        name: "app.tar".into(),
        sha256: flotilla_proto::sha256_hex(data),
        size: data.len() as u64,
    }
}

fn knobs() -> Knobs {
    Knobs {
        data: data(),
        ..Knobs::default()
    }
}

fn quick() -> FetchLimits {
    FetchLimits {
        deadline: Duration::from_secs(20),
        min_rate: 1024,
        rate_window: Duration::from_secs(5),
        max_attempts: 3,
        ..FetchLimits::default()
    }
}

/// `fetch` from the fake servers `fakes`, counting into a transfer of its own.
async fn fetch_new(
    fakes: &[&std::sync::Arc<Fake>],
    a: &Artifact,
    dir: &Path,
    cap: u64,
    limits: &FetchLimits,
) -> Result<PathBuf, FetchError> {
    fetch(
        &source(fakes),
        a,
        dir,
        cap,
        limits,
        &mut Transfer::default(),
    )
    .await
}

fn part_of(dir: &Path, a: &Artifact) -> PathBuf {
    dir.join(format!("{}.part", a.sha256))
}

#[tokio::test]
async fn downloads_a_whole_artifact() {
    let fake = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let path = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(path, dir.path().join(&a.sha256));
    assert_eq!(std::fs::read(&path).unwrap(), data());
    assert!(!part_of(dir.path(), &a).exists());
    assert_eq!(fake.requests(), [0]);

    // Already there: checked, not fetched again.
    let again = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(again, path);
    assert_eq!(fake.requests(), [0]);
}

#[tokio::test]
async fn resumes_after_a_cut_from_the_bytes_received() {
    let fake = serve(Knobs {
        cut: Some((3_500, 1)),
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let path = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data());
    assert_eq!(fake.requests(), [0, 3_500]);
}

#[tokio::test]
async fn fails_over_to_the_next_server_where_the_download_stands() {
    let broken = serve(Knobs {
        cut: Some((4_000, usize::MAX)),
        ..knobs()
    })
    .await;
    let good = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let mut transfer = Transfer::default();
    let path = fetch(
        &source(&[&broken, &good]),
        &a,
        dir.path(),
        1 << 20,
        &quick(),
        &mut transfer,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data());
    assert_eq!(broken.requests(), [0]);
    assert_eq!(good.requests(), [4_000]);
    // Both attempts counted, the failed one with its reason; every byte once.
    assert_eq!(transfer.attempts, 2);
    assert_eq!(transfer.failures.len(), 1, "{:?}", transfer.failures);
    assert_eq!(transfer.server_bytes, data().len() as u64);
}

#[tokio::test]
async fn gives_up_after_max_attempts_naming_the_last_failure() {
    let down = serve(Knobs {
        refuse: Some(tonic::Code::Unavailable),
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let err = fetch_new(&[&down], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Server { code: tonic::Code::Unavailable, server, .. } if *server == down.url),
        "{err}"
    );
    assert_eq!(down.requests().len(), 3);
}

#[tokio::test]
async fn a_wrong_digest_deletes_the_download_and_is_not_retried() {
    let fake = serve(Knobs {
        corrupt: Some(5_000),
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let err = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap_err();
    match &err {
        FetchError::DigestMismatch {
            name,
            expected,
            actual,
            from,
        } => {
            assert_eq!(name, "app.tar");
            assert!(from.contains("127.0.0.1"), "names the server: {from}");
            assert_eq!(*expected, a.sha256);
            assert_ne!(*actual, a.sha256);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&a.sha256));
    assert_eq!(fake.requests(), [0]);
    assert!(!part_of(dir.path(), &a).exists());
    assert!(!dir.path().join(&a.sha256).exists());
}

#[tokio::test]
async fn more_bytes_than_declared_abort_at_once() {
    let fake = serve(Knobs {
        extra: 10,
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let err = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Oversized { name, size, .. } if name == "app.tar" && *size == SIZE as u64),
        "{err}"
    );
    assert!(err.to_string().contains("10000"), "{err}");
    assert_eq!(fake.requests(), [0]);
    assert!(!part_of(dir.path(), &a).exists());
}

#[tokio::test]
async fn an_artifact_over_the_cap_is_refused_before_any_request() {
    let fake = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let err = fetch_new(&[&fake], &a, dir.path(), 9_999, &quick())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::TooLarge {
                size: 10_000,
                cap: 9_999,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("10000") && msg.contains("9999") && msg.contains("app.tar"));
    assert!(fake.requests().is_empty());

    let bad = Artifact {
        sha256: "../../etc/passwd".into(),
        ..a
    };
    let err = fetch_new(&[&fake], &bad, dir.path(), 1 << 20, &quick())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::BadDigest { .. }), "{err}");
    assert!(fake.requests().is_empty());
}

fn slow_limits() -> FetchLimits {
    FetchLimits {
        deadline: Duration::from_secs(30),
        min_rate: 10_000,
        rate_window: Duration::from_millis(300),
        max_attempts: 2,
        ..FetchLimits::default()
    }
}

#[tokio::test]
async fn a_trickling_server_is_too_slow() {
    let fake = serve(Knobs {
        chunk: 10,
        trickle: Some(Duration::from_millis(50)),
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let started = Instant::now();
    let err = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &slow_limits())
        .await
        .unwrap_err();
    let took = started.elapsed();
    match &err {
        FetchError::TooSlow { rate, min_rate, .. } => {
            assert!(*rate < 10_000, "{err}");
            assert_eq!(*min_rate, 10_000);
        }
        other => panic!("expected too slow, got {other}"),
    }
    assert!(err.to_string().contains("10000 bytes/s"), "{err}");
    // Two attempts of about one window each, a short backoff: far below the deadline.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(fake.requests().len(), 2);
    // The second attempt resumed after what the first one got.
    assert!(fake.requests()[1] > 0);
}

#[tokio::test]
async fn a_silent_server_is_too_slow_too() {
    let fake = serve(Knobs {
        silent: true,
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let started = Instant::now();
    let err = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &slow_limits())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, FetchError::TooSlow { rate: 0, .. }), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(fake.requests(), [0, 0]);
}

#[tokio::test]
async fn the_deadline_bounds_the_whole_download_and_keeps_the_bytes() {
    let fake = serve(Knobs {
        chunk: 10,
        trickle: Some(Duration::from_millis(20)),
        ..knobs()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    let limits = FetchLimits {
        deadline: Duration::from_millis(600),
        min_rate: 50,
        rate_window: Duration::from_millis(300),
        max_attempts: 6,
        ..FetchLimits::default()
    };
    let started = Instant::now();
    let err = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &limits)
        .await
        .unwrap_err();
    let took = started.elapsed();
    let FetchError::DeadlineExceeded { received, size, .. } = err else {
        panic!("expected the deadline, got {err}");
    };
    assert!(received > 0 && received < size, "{received} of {size}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(fake.requests(), [0]);
    let kept = std::fs::metadata(part_of(dir.path(), &a)).unwrap().len();
    assert_eq!(kept, received);
}

#[tokio::test]
async fn resumes_from_a_partial_file_left_before_a_restart() {
    let fake = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    std::fs::write(part_of(dir.path(), &a), &data()[..6_000]).unwrap();
    let path = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data());
    assert_eq!(fake.requests(), [6_000]);
}

#[tokio::test]
async fn a_bad_or_overlong_partial_file_is_started_over() {
    let fake = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    // Longer than the artifact: deleted before any request.
    std::fs::write(part_of(dir.path(), &a), vec![0u8; SIZE + 1]).unwrap();
    fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(fake.requests(), [0]);

    // Garbage on disk (a torn write): resumed, found wrong, downloaded again once.
    std::fs::remove_file(dir.path().join(&a.sha256)).unwrap();
    std::fs::write(part_of(dir.path(), &a), vec![0u8; 6_000]).unwrap();
    let path = fetch_new(&[&fake], &a, dir.path(), 1 << 20, &quick())
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data());
    assert_eq!(fake.requests(), [0, 6_000, 0]);
}

#[test]
fn the_rate_window_judges_only_the_last_window() {
    let limits = FetchLimits {
        min_rate: 1_000,
        rate_window: Duration::from_secs(1),
        ..FetchLimits::default()
    };
    let t0 = tokio::time::Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut w = RateWindow::new(&limits, t0);
    // A burst at the start, then silence.
    w.record(at(10), 50_000);
    assert_eq!(
        w.check(at(900)),
        Ok(()),
        "no judgement before a whole window"
    );
    assert_eq!(w.check(at(1_005)), Ok(()));
    assert_eq!(w.check(at(1_100)), Err(0));
    // Steady 1200 bytes/s in 120-byte chunks passes.
    let mut w = RateWindow::new(&limits, t0);
    for i in 1..=50 {
        w.record(at(i * 100), 120);
        assert_eq!(w.check(at(i * 100)), Ok(()), "at {} ms", i * 100);
    }
    assert!(w.samples.len() <= 12, "{} samples", w.samples.len());
    // No floor, no judgement and no chunk timeout.
    let mut w = RateWindow::new(
        &FetchLimits {
            min_rate: 0,
            ..limits
        },
        t0,
    );
    assert_eq!(w.check(at(60_000)), Ok(()));
    assert!(w.read_by(t0).is_none());
}

#[tokio::test]
async fn file_sha256_matches_the_digest_of_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    // More than one read buffer, so the loop runs more than once.
    let bytes: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let (sha, len) = file_sha256(&path).await.unwrap();
    assert_eq!(sha, flotilla_proto::sha256_hex(&bytes));
    assert_eq!(len, bytes.len() as u64);
    assert!(file_sha256(&dir.path().join("missing")).await.is_err());
}

#[test]
fn the_throttle_keeps_a_download_to_its_rate_after_a_second_of_burst() {
    let t0 = tokio::time::Instant::now();
    let mut t = super::rate::Throttle::new(1_000, t0);
    // A second's worth goes at once.
    assert_eq!(t.after(t0, 1_000), None);
    // Then each 100 bytes waits its tenth of a second.
    let mut last = None;
    for _ in 0..10 {
        last = t.after(t0, 100);
    }
    assert_eq!(last, Some(t0 + Duration::from_secs(1)));
    // Time not used is not saved up past the burst: after a minute of silence,
    // still only a second's worth goes at once.
    let later = t0 + Duration::from_secs(60);
    assert_eq!(t.after(later, 1_000), None);
    assert_eq!(
        t.after(later, 500),
        Some(later + Duration::from_millis(500))
    );
    // No limit, no wait.
    let mut free = super::rate::Throttle::new(0, t0);
    assert_eq!(free.after(t0, u64::MAX / 2), None);
}

#[test]
fn a_rate_limit_stretches_the_deadline_and_lowers_the_floor() {
    let limits = FetchLimits {
        deadline: Duration::from_secs(600),
        min_rate: 50_000,
        max_rate: 10_000,
        ..FetchLimits::default()
    };
    // 100 MB at 10 kB/s needs 10 000 s: the deadline is twice that plus a minute.
    let big = limits.for_size(100_000_000);
    assert_eq!(big.deadline, Duration::from_secs(20_060));
    assert_eq!(big.min_rate, 5_000);
    // A small one keeps the configured deadline.
    assert_eq!(limits.for_size(1_000).deadline, Duration::from_secs(600));
    // No limit: unchanged.
    let free = FetchLimits::default().for_size(100_000_000);
    assert_eq!(free.deadline, FetchLimits::default().deadline);
    assert_eq!(free.min_rate, FetchLimits::default().min_rate);
}

#[tokio::test]
async fn a_rate_limited_download_takes_as_long_as_its_rate_says() {
    let fake = serve(knobs()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = artifact(&data());
    // A second's burst, then the rest at 20 kB/s.
    let rate = 20_000u64;
    let limits = FetchLimits {
        max_rate: rate,
        ..quick()
    };
    let started = Instant::now();
    let mut transfer = Transfer::default();
    fetch(
        &source(&[&fake]),
        &a,
        dir.path(),
        1 << 20,
        &limits,
        &mut transfer,
    )
    .await
    .unwrap();
    let floor =
        Duration::from_millis((a.size.saturating_sub(rate) * 1000 / rate).saturating_sub(100));
    assert!(
        started.elapsed() >= floor,
        "{} bytes at {rate} B/s took {:?}, less than {floor:?}",
        a.size,
        started.elapsed()
    );
    assert_eq!((transfer.attempts, transfer.server_bytes), (1, a.size));
}

#[test]
fn failures_that_may_pass_are_told_from_those_that_will_not() {
    let name = || "a".to_string();
    let server = |code| FetchError::Server {
        name: name(),
        server: "s".into(),
        offset: 0,
        code,
        message: String::new(),
    };
    for transient in [
        server(tonic::Code::Unavailable),
        server(tonic::Code::NotFound),
        server(tonic::Code::ResourceExhausted),
        FetchError::Truncated {
            name: name(),
            server: "s".into(),
            received: 1,
            size: 2,
        },
        FetchError::TooSlow {
            name: name(),
            server: "s".into(),
            rate: 1,
            min_rate: 2,
            window: Duration::from_secs(1),
        },
        FetchError::DeadlineExceeded {
            name: name(),
            deadline: Duration::from_secs(1),
            received: 0,
            size: 1,
        },
        FetchError::Protocol {
            name: name(),
            server: "s".into(),
            expected: 0,
            got: 1,
        },
    ] {
        assert!(transient.is_transient(), "{transient}");
    }
    let full = FetchError::Io {
        name: name(),
        action: "write",
        path: "p".into(),
        source: std::io::Error::from(std::io::ErrorKind::StorageFull),
    };
    assert!(full.is_disk_full());
    for permanent in [
        server(tonic::Code::InvalidArgument),
        FetchError::DigestMismatch {
            name: name(),
            expected: "e".into(),
            actual: "a".into(),
            from: "s".into(),
        },
        FetchError::Oversized {
            name: name(),
            server: "s".into(),
            size: 1,
        },
        FetchError::TooLarge {
            name: name(),
            size: 2,
            cap: 1,
        },
        full,
    ] {
        assert!(!permanent.is_transient(), "{permanent}");
    }
}
