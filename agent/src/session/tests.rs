//! Tests of the session logic that need no server: desired-state ordering and
//! persistence, hook queueing, and start-up checks.

use std::os::unix::fs::PermissionsExt;

use super::*;

/// A self-signed certificate for `key`, valid from a second ago for `lifetime_secs`, PEM.
fn test_cert(key: &rcgen::KeyPair, lifetime_secs: i64) -> String {
    let mut params = rcgen::CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(1);
    params.not_after = now + time::Duration::seconds(lifetime_secs);
    params.self_signed(key).unwrap().pem()
}

fn joined_store(dir: &std::path::Path, role: Role) -> (Store, Identity) {
    let key = rcgen::KeyPair::generate().unwrap();
    let identity = Identity {
        node_id: "n-7".into(),
        group: "depots".into(),
        key_pem: key.serialize_pem(),
        cert_pem: test_cert(&key, 3600),
        ca_pem: String::new(),
        servers: vec!["https://127.0.0.1:1".into()],
        token_id: "abcdefghij".into(),
        machine_id: "m".into(),
        renewals: 0,
        trusted_keys: Vec::new(),
        trust_threshold: 0,
        trust_version: 0,
    };
    let store = Store::open(dir).unwrap();
    store
        .save_joined(&identity, &Desired::initial(role))
        .unwrap();
    (store, identity)
}

fn agent(dir: &std::path::Path) -> (Agent, mpsc::UnboundedReceiver<RoleChange>) {
    let (store, node) = joined_store(dir, Role::Active);
    let (hooks, rx) = mpsc::unbounded_channel();
    let cert = cert::cert_info(&node.cert_pem).unwrap();
    let servers = node.servers.clone();
    let agent = Agent {
        store,
        node,
        cert,
        held: Desired::initial(Role::Active),
        servers,
        connected: true,
        hooks,
        offers: tokio::sync::watch::channel(Default::default()).0,
        observer: None,
        shared: None,
        source_address: None,
        facts_changed: false,
        session_fresh: false,
        site: None,
        sent_cache: Default::default(),
        textfile: None,
    };
    (agent, rx)
}

fn desired(revision: u64, role: pb::Role) -> pb::DesiredState {
    pb::DesiredState {
        revision,
        node_id: "n-7".into(),
        group: "depots".into(),
        desired_count: 2,
        unmanaged: false,
        role: role as i32,
        heartbeat_interval_ms: 2000,
        ..Default::default()
    }
}

#[test]
fn a_newer_desired_state_is_persisted_then_the_hook_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut hooks) = agent(dir.path());
    agent.on_desired(&desired(5, pb::Role::Standby)).unwrap();

    let stored = agent.store.desired().unwrap().unwrap();
    assert_eq!(stored.revision, 5);
    assert_eq!(stored.role, Role::Standby);
    assert_eq!(stored.heartbeat_interval_ms, 2000);
    let change = hooks.try_recv().unwrap();
    assert_eq!(change.role, Role::Standby);
    assert_eq!(change.previous_role, Some(Role::Active));
    assert_eq!(change.desired_count, 2);
    let status = Status::read(dir.path()).unwrap();
    assert_eq!(
        (status.revision, status.role, status.connected),
        (5, Role::Standby, true)
    );
}

#[test]
fn older_and_equal_revisions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut hooks) = agent(dir.path());
    agent.on_desired(&desired(5, pb::Role::Standby)).unwrap();
    let _ = hooks.try_recv();

    // Older: ignored, even though it names another role.
    agent.on_desired(&desired(4, pb::Role::Active)).unwrap();
    // Equal: a no-op.
    agent.on_desired(&desired(5, pb::Role::Active)).unwrap();
    assert_eq!(agent.held.revision, 5);
    assert_eq!(agent.held.role, Role::Standby);
    assert_eq!(agent.store.desired().unwrap().unwrap().role, Role::Standby);
    assert!(hooks.try_recv().is_err(), "no hook for ignored states");
}

#[test]
fn a_sessions_first_desired_state_is_taken_whatever_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut hooks) = agent(dir.path());
    // A server pushed the highest revision there is.
    agent
        .on_desired(&desired(u64::MAX, pb::Role::Standby))
        .unwrap();
    assert_eq!(agent.held.revision, u64::MAX);
    let _ = hooks.try_recv();
    // Within that session, lower ones are stale.
    agent.on_desired(&desired(3, pb::Role::Active)).unwrap();
    assert_eq!(agent.held.role, Role::Standby);
    // The next session's first is the server's view now; then order again.
    agent.session_fresh = true;
    agent.on_desired(&desired(3, pb::Role::Active)).unwrap();
    assert_eq!((agent.held.revision, agent.held.role), (3, Role::Active));
    assert_eq!(agent.store.desired().unwrap().unwrap().revision, 3);
    assert!(hooks.try_recv().is_ok(), "the role change runs the hook");
    agent.on_desired(&desired(2, pb::Role::Standby)).unwrap();
    assert_eq!((agent.held.revision, agent.held.role), (3, Role::Active));
}

#[test]
fn a_desired_state_whose_group_is_no_group_name_is_ignored_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut hooks) = agent(dir.path());
    for group in ["a\0b".to_string(), "x\ny".to_string(), "g".repeat(4 << 20)] {
        let mut msg = desired(7, pb::Role::Standby);
        msg.group = group;
        agent.on_desired(&msg).unwrap();
        assert_eq!(agent.held.revision, 0);
        assert_eq!(agent.node.group, "depots");
        assert!(hooks.try_recv().is_err());
    }
}

#[test]
fn same_role_runs_no_hook_and_bad_messages_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, mut hooks) = agent(dir.path());
    agent.on_desired(&desired(2, pb::Role::Active)).unwrap();
    assert_eq!(agent.held.revision, 2);
    assert!(hooks.try_recv().is_err());

    let mut other = desired(3, pb::Role::Standby);
    other.node_id = "n-8".into();
    agent.on_desired(&other).unwrap();
    agent
        .on_desired(&desired(3, pb::Role::Unspecified))
        .unwrap();
    assert_eq!(agent.held.revision, 2);
    assert_eq!(agent.store.desired().unwrap().unwrap().revision, 2);
}

#[test]
fn a_group_move_is_persisted_with_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _hooks) = agent(dir.path());
    let mut moved = desired(3, pb::Role::Active);
    moved.group = "stores".into();
    agent.on_desired(&moved).unwrap();
    assert_eq!(agent.store.identity().unwrap().unwrap().group, "stores");
    assert_eq!(Status::read(dir.path()).unwrap().group, "stores");
}

#[tokio::test]
async fn run_refuses_a_state_dir_that_never_joined() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(RunOptions::new(dir.path()), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, RunError::NotJoined { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("not joined: run `flotilla-agent join` first")
    );
}

#[tokio::test]
async fn a_role_change_whose_hook_never_ran_is_hooked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (store, _) = joined_store(&state, Role::Active);
    // The agent stopped after persisting a demotion, before its hook ran.
    store
        .save_desired(&Desired {
            revision: 9,
            ..Desired::initial(Role::Standby)
        })
        .unwrap();
    drop(store);

    let out = dir.path().join("hook-env");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$FLOTILLA_PREVIOUS_ROLE>$FLOTILLA_ROLE\" > '{}.tmp'\nmv '{0}.tmp' '{0}'\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    let opts = RunOptions {
        role_hook: Some(hook),
        max_backoff: Duration::from_millis(200),
        ..RunOptions::new(&state)
    };
    // Nothing listens on the stored server: the agent keeps reconnecting while the
    // hook runs beside it; stop once the worker has recorded the hooked role
    // (the test holds the store the agent runs on), with a deadline.
    let store = Store::open(&state).unwrap();
    let watched = store.clone();
    let shutdown = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while watched.hooked_role().unwrap() != Some(Role::Standby)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    run_with(store.clone(), opts, shutdown).await.unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "active>standby\n");
    assert_eq!(store.hooked_role().unwrap(), Some(Role::Standby));
    let status = Status::read(&state).unwrap();
    assert!(!status.connected);
    assert_eq!(status.revision, 9);
}

#[test]
fn the_run_future_can_move_between_threads() {
    fn assert_send<T: Send>(_: &T) {}
    let fut = run(
        RunOptions::new("/nonexistent"),
        std::future::pending::<()>(),
    );
    assert_send(&fut);
}

#[test]
fn heartbeat_interval_has_a_floor() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        assert_eq!(heartbeat_timer(0).period(), MIN_HEARTBEAT);
        assert_eq!(heartbeat_timer(15_000).period(), Duration::from_secs(15));
    });
}

#[tokio::test]
async fn the_observer_and_the_shared_channel_follow_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, _rx) = agent(dir.path());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let observer = Observer::new(move |e| log.lock().unwrap().push(format!("{e:?}")));
    let ended = Outcome::Ended {
        up_for: Duration::from_secs(1),
        reason: "gone".into(),
    };
    observe(&observer, true, &ended);
    observe(&observer, false, &Outcome::Failed("refused".into()));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "Ended { reason: \"gone\" }",
            "Failed { reason: \"refused\" }"
        ]
    );

    // A pushed desired state is observed before it is acted on.
    agent.observer = Some(observer);
    agent.on_desired(&desired(5, pb::Role::Standby)).unwrap();
    assert!(
        seen.lock().unwrap()[2].starts_with("Desired { revision: 5"),
        "{:?}",
        seen.lock().unwrap()
    );

    // The session's channel is shared only while the session is open.
    let shared = SharedChannel::new();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    shared.set(Some(channel));
    agent.shared = Some(shared.clone());
    agent.set_connected(false);
    assert!(shared.get().is_none());
}
