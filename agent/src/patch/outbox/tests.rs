//! Outbox tests: durable queueing, the sender's retries, and superseding.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

fn temp_outbox() -> (sled::Db, Outbox) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let outbox = Outbox::open(db.open_tree("outbox").unwrap()).unwrap();
    (db, outbox)
}

type Answer = Result<(), tonic::Status>;

/// A fake server for [`run_sender`]: every report sent to it comes out of the
/// returned channel, and `answer` says what the call returns.
fn fake_server(
    mut answer: impl FnMut(&Report) -> Answer + Send + 'static,
) -> (
    impl FnMut(Report) -> std::future::Ready<Answer> + Send + 'static,
    tokio::sync::mpsc::UnboundedReceiver<Report>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let send = move |report: Report| {
        let result = answer(&report);
        let _ = tx.send(report);
        std::future::ready(result)
    };
    (send, rx)
}

/// A running sender and what stops it.
type Running = (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
);

/// Runs the sender on `outbox` until [`stop`].
fn start(
    outbox: &Outbox,
    send: impl FnMut(Report) -> std::future::Ready<Answer> + Send + 'static,
) -> Running {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(run_sender(outbox.clone(), send, async move {
        let _ = stop_rx.await;
    }));
    (sender, stop_tx)
}

async fn stop(running: Running) {
    let (sender, stop_tx) = running;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("the sender stops on shutdown")
        .unwrap();
}

/// The next report sent, within 5 s.
async fn next(sent: &mut tokio::sync::mpsc::UnboundedReceiver<Report>) -> Report {
    tokio::time::timeout(Duration::from_secs(5), sent.recv())
        .await
        .expect("a report is sent")
        .expect("the fake server is still there")
}

/// Waits (5 s at most) until nothing is queued.
async fn drained(outbox: &Outbox) {
    for _ in 0..500 {
        if outbox.pending().unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still queued: {:?}", outbox.pending().unwrap());
}

/// Queues Received, Downloaded and Committed (with an error and a log tail)
/// of manifest "a", then Received of "b"; returns them in that order.
fn queue_two_manifests(outbox: &Outbox) -> Vec<Report> {
    let reports = vec![
        Report::new("a", Phase::Received, "", ""),
        Report::new("a", Phase::Downloaded, "", ""),
        Report::new("a", Phase::Committed, "cannot be rolled back: x", "tail"),
        Report::new("b", Phase::Received, "", ""),
    ];
    for r in &reports {
        outbox.push(r.clone()).unwrap();
    }
    reports
}

#[test]
fn reports_are_kept_in_order_across_restarts_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let first = Report::new("m1", Phase::Received, "", "");
    let second = Report::new("m1", Phase::Verified, "", "");
    {
        let store = crate::state::Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(store.tree("outbox").unwrap()).unwrap();
        outbox.push(first.clone()).unwrap();
        outbox.push(second.clone()).unwrap();
        let seqs: Vec<u64> = outbox.pending().unwrap().iter().map(|p| p.0).collect();
        assert_eq!(seqs, [1, 2]);
        outbox.ack(1).unwrap();
    }
    let store = crate::state::Store::open(dir.path()).unwrap();
    let outbox = Outbox::open(store.tree("outbox").unwrap()).unwrap();
    assert_eq!(outbox.pending().unwrap(), vec![(2, second.clone())]);
    let third = Report::new("m1", Phase::Downloaded, "", "");
    outbox.push(third.clone()).unwrap();
    // Sequence numbers go on after the last one kept, never back.
    assert_eq!(outbox.pending().unwrap(), vec![(2, second), (3, third)]);
    assert_ne!(first.report_id, report_id());
    assert_eq!(first.report_id.len(), 32);
}

#[test]
fn oversized_texts_are_cut_to_the_protocol_limit() {
    let (_db, outbox) = temp_outbox();
    let long = "é".repeat(limits::MAX_REPORT_TEXT); // two bytes each
    let mut report = Report::new("m", Phase::Failed, &long, "");
    report.log_tail = format!("start{}end", "x".repeat(limits::MAX_REPORT_TEXT));
    outbox.push(report).unwrap();
    let (_, queued) = outbox.pending().unwrap().remove(0);
    assert!(queued.error.len() <= limits::MAX_REPORT_TEXT);
    assert!(queued.error.len() >= limits::MAX_REPORT_TEXT - 1);
    assert_eq!(queued.log_tail.len(), limits::MAX_REPORT_TEXT);
    assert!(queued.log_tail.ends_with("end"));
    assert_eq!(queued.to_proto().phase, pb::PatchPhase::Failed as i32);
}

// Paused time: the idle stretch below is ten minutes, taken at once.
#[tokio::test(start_paused = true)]
async fn the_sender_retries_until_acknowledged_then_idles_until_a_push() {
    let (_db, outbox) = temp_outbox();
    // Two manifests, so that neither report supersedes the other.
    outbox
        .push(Report::new("m1", Phase::Received, "", ""))
        .unwrap();
    outbox
        .push(Report::new("m2", Phase::Verified, "", ""))
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(run_sender(
        outbox.clone(),
        {
            let calls = calls.clone();
            move |report: Report| {
                let n = calls.fetch_add(1, SeqCst);
                let sent_tx = sent_tx.clone();
                async move {
                    // The very first attempt fails: the same report comes again.
                    if n == 0 {
                        return Err(tonic::Status::unavailable("server restarting"));
                    }
                    let _ = sent_tx.send(report.phase);
                    Ok(())
                }
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    assert_eq!(sent_rx.recv().await, Some(Phase::Received));
    assert_eq!(sent_rx.recv().await, Some(Phase::Verified));
    assert_eq!(calls.load(SeqCst), 3);
    // Idle: nothing is sent while nothing is queued, however long.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(calls.load(SeqCst), 3);
    assert!(outbox.pending().unwrap().is_empty());
    outbox
        .push(Report::new("m", Phase::Downloaded, "", ""))
        .unwrap();
    assert_eq!(sent_rx.recv().await, Some(Phase::Downloaded));
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("the sender stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn shutdown_during_a_failing_send_leaves_the_report_queued() {
    let (_db, outbox) = temp_outbox();
    outbox
        .push(Report::new("m", Phase::Received, "", ""))
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (tried_tx, mut tried) = tokio::sync::mpsc::unbounded_channel::<()>();
    let sender = tokio::spawn(run_sender(
        outbox.clone(),
        move |_report: Report| {
            let _ = tried_tx.send(());
            async { Err(tonic::Status::unavailable("down")) }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Stopped once a send has failed (and while it waits to try again).
    tokio::time::timeout(Duration::from_secs(5), tried.recv())
        .await
        .expect("a send was tried");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("the sender stops on shutdown")
        .unwrap();
    assert_eq!(outbox.pending().unwrap().len(), 1);
}

#[test]
fn a_pass_plans_only_the_newest_report_of_each_manifest() {
    let r = |m: &str, phase| Report::new(m, phase, "", "");
    let queued = vec![
        (1, r("a", Phase::Received)),
        (2, r("b", Phase::Received)),
        (3, r("a", Phase::Verified)),
        (4, r("c", Phase::Failed)),
        (5, r("a", Phase::Downloaded)),
        (6, r("b", Phase::Rejected)),
    ];
    let planned: Vec<(u64, Phase, Vec<u64>)> = plan(queued.clone())
        .into_iter()
        .map(|o| (o.seq, o.report.phase, o.superseded))
        .collect();
    // In queue order of the reports sent; each takes its older ones along.
    assert_eq!(
        planned,
        [
            (4, Phase::Failed, vec![]),
            (5, Phase::Downloaded, vec![1, 3]),
            (6, Phase::Rejected, vec![2]),
        ]
    );
    assert_eq!(plan(queued[3..4].to_vec())[0].report, queued[3].1);
    assert!(plan(Vec::new()).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_sender_sends_only_the_newest_report_of_each_manifest() {
    let (_db, outbox) = temp_outbox();
    let queued = queue_two_manifests(&outbox);
    let (send, mut sent) = fake_server(|_| Ok(()));
    let running = start(&outbox, send);
    // The newest of "a" as queued (same id, error and log tail), then "b".
    assert_eq!(next(&mut sent).await, queued[2]);
    assert_eq!(next(&mut sent).await, queued[3]);
    drained(&outbox).await;
    // The acknowledged ones and those they superseded are gone for good: not
    // sent again, however long (paused time).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(sent.try_recv().is_err(), "nothing else is sent");
    stop(running).await;
}

#[tokio::test]
async fn a_failed_send_of_the_newest_keeps_every_report_queued() {
    let (_db, outbox) = temp_outbox();
    let queued = queue_two_manifests(&outbox);
    let (send, mut sent) = fake_server(|_| Err(tonic::Status::unavailable("down")));
    let running = start(&outbox, send);
    // Tried, then retried, and neither time any report it would supersede.
    assert_eq!(next(&mut sent).await, queued[2]);
    assert_eq!(next(&mut sent).await, queued[2]);
    stop(running).await;
    let pending: Vec<Report> = outbox.pending().unwrap().into_iter().map(|p| p.1).collect();
    assert_eq!(pending, queued);
}

#[tokio::test]
async fn a_report_queued_during_a_send_is_sent_not_superseded() {
    let (_db, outbox) = temp_outbox();
    let received = Report::new("a", Phase::Received, "", "");
    let downloaded = Report::new("a", Phase::Downloaded, "", "");
    let committed = Report::new("a", Phase::Committed, "", "");
    outbox.push(received).unwrap();
    outbox.push(downloaded.clone()).unwrap();
    let (send, mut sent) = fake_server({
        let outbox = outbox.clone();
        let committed = committed.clone();
        move |r| {
            // Committed is reached while Downloaded is on its way.
            if r.phase == Phase::Downloaded {
                outbox.push(committed.clone()).unwrap();
            }
            Ok(())
        }
    });
    let running = start(&outbox, send);
    assert_eq!(next(&mut sent).await, downloaded);
    // The ack of Downloaded took Received along, but not Committed.
    assert_eq!(next(&mut sent).await, committed);
    drained(&outbox).await;
    assert!(sent.try_recv().is_err());
    stop(running).await;
}

#[tokio::test]
async fn a_retry_sends_the_newest_report_queued_meanwhile() {
    let (_db, outbox) = temp_outbox();
    let downloaded = Report::new("a", Phase::Downloaded, "", "");
    let failed = Report::new("a", Phase::Failed, "disk full", "");
    outbox.push(downloaded.clone()).unwrap();
    let (send, mut sent) = fake_server({
        let outbox = outbox.clone();
        let failed = failed.clone();
        move |r| {
            if r.phase == Phase::Downloaded {
                outbox.push(failed.clone()).unwrap();
                return Err(tonic::Status::unavailable("down"));
            }
            Ok(())
        }
    });
    let running = start(&outbox, send);
    assert_eq!(next(&mut sent).await, downloaded);
    // Not Downloaded again: Failed supersedes it, and its ack removes both.
    assert_eq!(next(&mut sent).await, failed);
    drained(&outbox).await;
    assert!(sent.try_recv().is_err());
    stop(running).await;
}

#[tokio::test]
async fn superseded_reports_are_not_sent_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        let store = crate::state::Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(store.tree("outbox").unwrap()).unwrap();
        (store, outbox)
    };
    let queued = {
        let (_store, outbox) = open();
        let queued = queue_two_manifests(&outbox);
        // The server records the newest of "a", but its answer is lost and
        // the agent stops: as a crash between the ack and the removal.
        let (send, mut sent) = fake_server(|_| Err(tonic::Status::unavailable("cut off")));
        let running = start(&outbox, send);
        assert_eq!(next(&mut sent).await, queued[2]);
        stop(running).await;
        queued
    };
    {
        let (_store, outbox) = open();
        let (send, mut sent) = fake_server(|_| Ok(()));
        let running = start(&outbox, send);
        // The same report again (same id: the server ignores it), never the
        // older ones of "a".
        assert_eq!(next(&mut sent).await, queued[2]);
        assert_eq!(next(&mut sent).await, queued[3]);
        drained(&outbox).await;
        assert!(sent.try_recv().is_err());
        stop(running).await;
    }
    let (_store, outbox) = open();
    assert!(outbox.pending().unwrap().is_empty());
}

#[tokio::test]
async fn a_report_the_server_refuses_for_good_is_dropped_and_the_rest_go_on() {
    for code in [
        tonic::Code::InvalidArgument,
        tonic::Code::NotFound,
        tonic::Code::FailedPrecondition,
    ] {
        let (_db, outbox) = temp_outbox();
        outbox
            .push(Report::new("unknown", Phase::Committed, "", ""))
            .unwrap();
        outbox
            .push(Report::new("offered", Phase::Received, "", ""))
            .unwrap();
        let (send, mut sent) = fake_server(move |r| {
            if r.manifest_id == "unknown" {
                Err(tonic::Status::new(code, "no patch with id unknown"))
            } else {
                Ok(())
            }
        });
        let running = start(&outbox, send);
        assert_eq!(next(&mut sent).await.manifest_id, "unknown");
        assert_eq!(next(&mut sent).await.manifest_id, "offered");
        drained(&outbox).await;
        stop(running).await;
    }
}

#[tokio::test]
async fn a_rate_limited_or_not_yet_accepted_report_is_kept_and_sent_again() {
    for code in [
        tonic::Code::ResourceExhausted,
        tonic::Code::PermissionDenied,
        tonic::Code::Unavailable,
    ] {
        let (_db, outbox) = temp_outbox();
        outbox
            .push(Report::new("m", Phase::Committed, "", ""))
            .unwrap();
        let refusals = Arc::new(AtomicUsize::new(0));
        let (send, mut sent) = fake_server({
            let refusals = refusals.clone();
            move |_| {
                if refusals.fetch_add(1, SeqCst) == 0 {
                    Err(tonic::Status::new(code, "later"))
                } else {
                    Ok(())
                }
            }
        });
        let running = start(&outbox, send);
        // Refused once, then sent again after a backoff and taken.
        for _ in 0..2 {
            assert_eq!(next(&mut sent).await.phase, Phase::Committed, "{code:?}");
        }
        drained(&outbox).await;
        assert_eq!(refusals.load(SeqCst), 2);
        stop(running).await;
    }
}
