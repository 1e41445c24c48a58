//! Offers no trusted key signed (forged, or signed by another key), as a
//! compromised or impersonated server can send them without end: each is
//! rejected and reported, the journal and the outbox stay bounded, and a
//! signed patch still goes through.

use super::*;
use crate::patch::journal::MAX_UNTRUSTED;

/// Manifest ids the journal holds (entries, not its indexes).
fn journal_ids(p: &Pipeline) -> Vec<String> {
    p.journal
        .all()
        .unwrap()
        .into_iter()
        .map(|e| e.manifest_id)
        .collect()
}

#[tokio::test]
async fn offers_nobody_trusted_signed_keep_the_journal_and_the_outbox_bounded() {
    let (_tmp, dir) = host();
    let publisher = Publisher::new();
    let stranger = Publisher::new();
    let p = pipeline_with(&dir, Some(publisher.public_key()), host_policy(false));
    // A valid manifest signed by a key the host does not pin, offered under
    // ids of its own: a forged one and one with its signature cut off.
    let foreign = files_patch(&stranger, &p, "foreign", "1.0.0", V1);
    let forged = |i: usize| {
        let mut m = foreign.clone();
        m.id = format!("forged-{i:04}");
        if i.is_multiple_of(2) {
            m.signatures.clear();
        }
        m
    };
    let total = MAX_UNTRUSTED + 60;
    for batch in (0..total).collect::<Vec<_>>().chunks(50) {
        let ms: Vec<_> = batch.iter().map(|&i| forged(i)).collect();
        p.take(offer(&ms.iter().collect::<Vec<_>>(), &[])).await;
    }
    // The newest are remembered as rejected, without their bytes; the
    // oldest are let go with their reports.
    let ids = journal_ids(&p);
    assert_eq!(ids.len(), MAX_UNTRUSTED, "journal entries");
    assert!(!ids.contains(&"forged-0000".to_string()));
    let last = format!("forged-{:04}", total - 1);
    let kept = p.journal.get(&last).unwrap().expect("the newest refusal");
    assert_eq!(kept.phase, Phase::Rejected);
    assert!(kept.manifest.is_empty() && kept.signatures.is_empty());
    let error = kept.error.unwrap();
    assert!(error.contains("signature"), "{error}");
    assert_eq!(reports(&p, "forged-0000"), vec![]);
    let told = reports(&p, &last);
    assert_eq!(
        told.last().map(|(ph, _)| *ph),
        Some(Phase::Rejected),
        "{told:?}"
    );
    let queued = p.outbox.pending().unwrap().len();
    assert!(queued <= 2 * MAX_UNTRUSTED, "{queued} reports queued");

    // One still remembered and offered again is not looked at again.
    ack_all(&p);
    p.take(offer(&[&forged(total - 1)], &[])).await;
    assert!(p.outbox.pending().unwrap().is_empty());

    // A patch the host's key signed goes through as ever.
    let good = files_patch(&publisher, &p, "good", "1.0.0", V1);
    p.take(offer(&[&good], &[])).await;
    assert_eq!(phase(&p, "good"), Some(Phase::Committed));
    assert_eq!(journal_ids(&p).len(), MAX_UNTRUSTED + 1);
}

/// What the tracing macros write while the returned guard lives (this
/// thread only: the tests' runtime is single-threaded).
fn capture_log() -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    #[derive(Clone)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf(Default::default());
    let out = buf.0.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || buf.clone())
        .finish();
    (out, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn untrusted_offers_make_one_log_line_a_minute_however_many() {
    let (_tmp, dir) = host();
    let stranger = Publisher::new();
    let p = pipeline_with(
        &dir,
        Some(Publisher::new().public_key()),
        host_policy(false),
    );
    let foreign = files_patch(&stranger, &p, "foreign", "1.0.0", V1);
    let (log, _guard) = capture_log();
    for i in 0..200 {
        let mut m = foreign.clone();
        m.id = format!("forged-{i:04}");
        p.take(offer(&[&m], &[])).await;
    }
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let lines = text.lines().count();
    assert_eq!(lines, 1, "{text}");
    assert!(text.contains("signatures do not check out"), "{text}");
    assert_eq!(phase(&p, "forged-0199"), Some(Phase::Rejected));
}
