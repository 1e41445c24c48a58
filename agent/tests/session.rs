//! The agent library against an in-process fake of the server's AgentService: join
//! with CA pinning, the session (Hello, heartbeats, pushed desired state, role hook),
//! certificate renewal, failover, and revocation. The real server is tested end to
//! end elsewhere; this pins down the agent's side of the protocol.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::{dead_url, desired, eventually, hook_script, join_opts, start, status};
use flotilla_agent::{JoinError, Role, RunError, RunOptions};
use flotilla_proto::pb;
use flotilla_proto::token::JoinToken;
use tokio::sync::oneshot;
use tonic::Status as GrpcStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_pins_the_ca_then_the_session_follows_the_server_until_revoked() {
    let (fake, url) = start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // A token naming another CA: refused after the handshake, before any secret.
    let wrong = JoinToken {
        ca_fingerprint: "ab".repeat(32),
        ..fake.token.clone()
    };
    let err = flotilla_agent::join(join_opts(vec![url.clone()], &wrong, &state))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not the one the join token names"),
        "{err}"
    );
    assert_eq!(fake.enrolls.load(SeqCst), 0);

    // The first server is down: the join fails over to the second.
    let servers = vec![dead_url(), url.clone()];
    let joined = flotilla_agent::join(join_opts(servers.clone(), &fake.token, &state))
        .await
        .unwrap();
    assert_eq!(
        (joined.node_id.as_str(), joined.group.as_str()),
        ("node-1", "depots")
    );
    assert_eq!(joined.role, Role::Active);
    let st = status(&state).unwrap();
    assert!(!st.connected);
    assert_eq!(st.servers, servers);
    assert!(!st.cert_serial.is_empty());

    let again = flotilla_agent::join(join_opts(vec![url.clone()], &fake.token, &state)).await;
    assert!(
        matches!(again, Err(JoinError::AlreadyJoined { .. })),
        "{again:?}"
    );
    assert_eq!(fake.enrolls.load(SeqCst), 1);

    let (hook, log) = hook_script(dir.path());
    let opts = RunOptions {
        role_hook: Some(hook),
        max_backoff: Duration::from_millis(300),
        ..RunOptions::new(&state)
    };
    let (_stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(flotilla_agent::run(opts, async move {
        let _ = stopped.await;
    }));

    eventually(10, "session open", || fake.sessions.load(SeqCst) == 1).await;
    eventually(5, "connected in status.json", || {
        status(&state).is_some_and(|s| s.connected)
    })
    .await;
    assert_eq!(fake.hellos.lock().unwrap()[0].last_revision, 0);

    fake.push.send(desired(3, pb::Role::Standby)).unwrap();
    eventually(10, "hook ran", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l == "node-1 active>standby 1\n")
    })
    .await;
    let st = status(&state).unwrap();
    assert_eq!(
        (st.revision, st.role, st.desired_count),
        (3, Role::Standby, 1)
    );

    // With the pushed 100 ms interval, heartbeats flow.
    let before = fake.heartbeats.load(SeqCst);
    eventually(5, "heartbeats", || {
        fake.heartbeats.load(SeqCst) >= before + 3
    })
    .await;

    // An older revision is ignored. The session handles messages in order,
    // so once the newer one after it shows, the older one was seen, and it
    // changed nothing: no role change, no hook run.
    fake.push.send(desired(2, pb::Role::Active)).unwrap();
    fake.push.send(desired(4, pb::Role::Standby)).unwrap();
    eventually(10, "revision 4 held", || {
        status(&state).is_some_and(|s| s.revision == 4)
    })
    .await;
    assert_eq!(status(&state).unwrap().role, Role::Standby);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "node-1 active>standby 1\n",
        "the older revision was acted on"
    );

    // The server drops the session: the agent reconnects and says what it holds.
    fake.push
        .send(Err(GrpcStatus::unavailable("restarting")))
        .unwrap();
    eventually(10, "second session", || fake.sessions.load(SeqCst) == 2).await;
    assert_eq!(fake.hellos.lock().unwrap()[1].last_revision, 4);

    // Revoked: the session ends with PermissionDenied; the other server (down)
    // is tried too, then the agent stops.
    fake.revoked.store(true, SeqCst);
    fake.push
        .send(Err(GrpcStatus::permission_denied("node node-1 is revoked")))
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops when revoked")
        .unwrap();
    assert!(matches!(&result, Err(RunError::Rejected(_))), "{result:?}");
    assert!(result.unwrap_err().to_string().contains("revoked"));
    assert!(!status(&state).unwrap().connected);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_renewed_at_two_thirds_of_its_life() {
    // 6 s certificates (plus the second of back-dating): renewal about 4 s in.
    let (fake, url) = start(Duration::from_secs(6)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    flotilla_agent::join(join_opts(vec![url], &fake.token, &state))
        .await
        .unwrap();
    let first = status(&state).unwrap();

    let (stop, stopped) = oneshot::channel::<()>();
    let started = std::time::Instant::now();
    let agent = tokio::spawn(flotilla_agent::run(RunOptions::new(&state), async move {
        let _ = stopped.await;
    }));
    eventually(15, "renewed", || {
        status(&state).is_some_and(|s| s.renewals == 1)
    })
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2),
        "renewed too early: {elapsed:?}"
    );
    let renewed = status(&state).unwrap();
    assert_ne!(renewed.cert_serial, first.cert_serial);
    assert!(renewed.cert_not_after >= first.cert_not_after);
    // The agent reconnected with the new certificate at once.
    eventually(5, "session with the new certificate", || {
        fake.sessions.load(SeqCst) >= 2
    })
    .await;
    assert_eq!(fake.renewals.load(SeqCst), 1);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();
    assert!(!status(&state).unwrap().connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_fails_over_to_a_live_server() {
    let (fake, url) = start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    flotilla_agent::join(join_opts(vec![url.clone()], &fake.token, &state))
        .await
        .unwrap();
    let opts = RunOptions {
        servers: vec![dead_url(), dead_url(), url.clone()],
        max_backoff: Duration::from_millis(200),
        ..RunOptions::new(&state)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(flotilla_agent::run(opts, async move {
        let _ = stopped.await;
    }));
    eventually(10, "session via the third URL", || {
        fake.sessions.load(SeqCst) == 1
    })
    .await;
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_server_refuses_in_the_handshake_is_retried_not_fatal() {
    let (fake, url) = start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    flotilla_agent::join(join_opts(vec![url], &fake.token, &state))
        .await
        .unwrap();
    // Swap in a certificate from a CA the server does not know, as if the server's
    // CA had been replaced since the node joined.
    {
        let store = flotilla_agent::Store::open(&state).unwrap();
        let mut identity = store.identity().unwrap().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        identity.cert_pem = params.self_signed(&key).unwrap().pem();
        identity.key_pem = key.serialize_pem();
        store.save_identity(&identity).unwrap();
    }
    // A TLS alert is not authenticated (a plaintext one can come from
    // anyone on the path before the server proves itself): named in each
    // failed try, and retried, never a reason to stop.
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = failures.clone();
    let opts = RunOptions {
        max_backoff: Duration::from_millis(200),
        observer: Some(flotilla_agent::embed::Observer::new(move |e| {
            if let flotilla_agent::embed::SessionEvent::Failed { reason } = e {
                seen.lock().unwrap().push(reason.to_string());
            }
        })),
        ..RunOptions::new(&state)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(flotilla_agent::run(opts, async move {
        let _ = stopped.await;
    }));
    // Under TLS 1.3 the refusal comes after the client's side of the
    // handshake; when the server's reset beats its alert, the try looks like
    // a network failure: some tries name the alert, all are retried.
    eventually(20, "retries, one naming the alert", || {
        let f = failures.lock().unwrap();
        f.len() >= 3
            && f.iter()
                .any(|r| r.contains("rejected the node certificate"))
    })
    .await;
    assert!(!agent.is_finished(), "the agent stopped on an alert");
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert_eq!(fake.sessions.load(SeqCst), 0);
}
