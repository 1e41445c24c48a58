//! Signed patches end to end: publish, push, verify, download, apply, health
//! check, commit, report — with real processes, real TLS and real files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_e2e::patch::{self, FleetOptions, Key};
use flotilla_e2e::{Agent, Server, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A server trusting `keys` (k of them), and `n` agents pinning `pinned` (k of
/// them), allowing scripts (and so health checks) when `scripts`.
fn fleet(
    dir: &Path,
    n: usize,
    keys: &[&Key],
    threshold: u32,
    pinned: &[&Key],
    pin_threshold: u32,
    scripts: bool,
) -> (Server, Vec<Agent>) {
    patch::fleet(
        dir,
        FleetOptions {
            agents: n,
            server_keys: keys,
            server_threshold: threshold,
            pinned,
            pin_threshold,
            run_args: if scripts { &["--allow-scripts"] } else { &[] },
            ..FleetOptions::default()
        },
    )
}

#[test]
fn published_patch_commits_on_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (server, agents) = fleet(dir.path(), 3, &[&k], 1, &[&k], 1, true);
    let artifact = dir.path().join("payload.tar");
    patch::tar(
        &artifact,
        &[
            ("bin/tool", b"#!/bin/sh\necho v2\n", 0o755),
            ("etc/app.conf", b"level=2\n", 0o640),
        ],
    );
    let spec = patch::files_spec(
        dir.path(),
        "demo-2.0.0",
        "2.0.0",
        &artifact,
        "[health_check]\ncommand = [\"/bin/sh\", \"-c\", \"test -x \\\"$FLOTILLA_ROOT/opt/demo/bin/tool\\\"\"]\nretries = 2\ninterval_secs = 1\n[targets]\ngroups = [\"store\"]\nlabels = { site = \"berlin\" }\n",
    );
    let manifest = patch::build(&server, &spec, &dir.path().join("bundle"));
    patch::sign(&server, &manifest, &k);
    let started = Instant::now();
    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(ok, "publish failed: {err}");
    assert!(out.contains("to 3 node(s)"), "{out}");
    let outcomes = patch::wait_outcomes(&server, "demo-2.0.0", 3);
    let took = started.elapsed();
    eprintln!("publish -> all 3 agents committed: {took:?}");
    assert!(
        outcomes.iter().all(|(_, p, _)| p == "committed"),
        "{outcomes:?}"
    );
    for a in &agents {
        let tool = a.root().join("opt/demo/bin/tool");
        assert_eq!(std::fs::read(&tool).unwrap(), b"#!/bin/sh\necho v2\n");
        assert_eq!(
            std::fs::metadata(&tool).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let conf = a.root().join("opt/demo/etc/app.conf");
        assert_eq!(std::fs::read(&conf).unwrap(), b"level=2\n");
        assert_eq!(
            std::fs::metadata(&conf).unwrap().permissions().mode() & 0o7777,
            0o640
        );
    }
    // The node's patch level is on the server.
    for n in server.nodes() {
        assert_eq!(n["installed"]["demo"], "2.0.0", "{n}");
    }
    // Status says so too, and the audit log has the publish.
    let st = patch::status(&server, "demo-2.0.0");
    assert_eq!(st["counts"]["committed"], 3);
    let audit = server.cli_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "patch.publish")
    );

    // Patches for another group or another architecture reach no node here.
    for (id, targets) in [
        ("for-other-group", "[targets]\ngroups = [\"other\"]\n"),
        ("for-other-arch", "[targets]\narch = [\"riscv64\"]\n"),
    ] {
        let spec = patch::files_spec(dir.path(), id, "3.0.0", &artifact, targets);
        let manifest = patch::build(&server, &spec, &dir.path().join(id));
        patch::sign(&server, &manifest, &k);
        let (ok, out, err) = patch::publish(&server, &manifest);
        assert!(ok, "{err}");
        assert!(out.contains("to 0 node(s)"), "{out}");
    }
    // A targeted patch published after them: once every node has its
    // outcome, each has been sent the state that came after the two above.
    let spec = patch::files_spec(dir.path(), "demo-2.0.1", "2.0.1", &artifact, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("demo-2.0.1"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    patch::wait_outcomes(&server, "demo-2.0.1", 3);
    for id in ["for-other-group", "for-other-arch"] {
        assert!(patch::phases(&server, id).is_empty(), "{id} reached a node");
    }
    for n in server.nodes() {
        assert_eq!(n["installed"]["demo"], "2.0.1", "{n}");
    }
}

/// A server that ignores targets (as a compromised one could, here by
/// test-only fault injection): each agent's own target check refuses the
/// patch, and nothing on the hosts changes.
#[test]
fn a_patch_offered_outside_its_targets_is_refused_by_each_agent() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let (mut server, agents) = fleet(dir.path(), 3, &[&k], 1, &[&k], 1, false);
    let artifact = dir.path().join("payload.tar");
    patch::tar(&artifact, &[("bin/tool", b"v3\n", 0o755)]);
    let before: Vec<_> = agents.iter().map(|a| patch::snapshot(&a.root())).collect();
    server.stop();
    server
        .env
        .push(("FLOTILLA_FAULT_IGNORE_TARGETS".into(), "1".into()));
    server.start();
    // All back first: the first refusal pauses the rollout (its default
    // failure threshold), so a node released later would wait.
    wait_until("the agents back", Duration::from_secs(30), || {
        (server.group("store")["online"] == 3).then_some(())
    });
    let spec = patch::files_spec(
        dir.path(),
        "for-riscv",
        "3.0.0",
        &artifact,
        "[targets]\narch = [\"riscv64\"]\n",
    );
    let manifest = patch::build(&server, &spec, &dir.path().join("for-riscv"));
    patch::sign(&server, &manifest, &k);
    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(ok && out.contains("to 3 node(s)"), "{out}{err}");
    for (node, phase, error) in patch::wait_outcomes(&server, "for-riscv", 3) {
        assert_eq!(phase, "rejected", "{node}: {error}");
        assert!(
            error.contains("does not target this node"),
            "{node}: {error}"
        );
    }
    let after: Vec<_> = agents.iter().map(|a| patch::snapshot(&a.root())).collect();
    assert_eq!(before, after);
}

/// Builds, signs (with each of `signers`) and publishes a files patch of `tar`.
fn release(
    server: &Server,
    dir: &Path,
    id: &str,
    version: &str,
    tar: &Path,
    extra: &str,
    signers: &[&Key],
) -> std::path::PathBuf {
    let spec = patch::files_spec(dir, id, version, tar, extra);
    let manifest = patch::build(server, &spec, &dir.join(id));
    for k in signers {
        patch::sign(server, &manifest, k);
    }
    let (ok, _, err) = patch::publish(server, &manifest);
    assert!(ok, "publish of {id} failed: {err}");
    manifest
}

/// The server's stored copy of a manifest's first artifact.
fn held_artifact(server: &Server, manifest: &Path) -> std::path::PathBuf {
    let m: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let sha = m["artifacts"][0]["sha256"].as_str().unwrap();
    server.data_dir.join("artifacts").join(sha)
}

fn outcome(server: &Server, id: &str) -> (String, String) {
    let p = patch::wait_outcomes(server, id, 1);
    (p[0].1.clone(), p[0].2.clone())
}

#[test]
fn signature_and_version_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2, attacker) = (
        patch::key(dir.path(), "k1"),
        patch::key(dir.path(), "k2"),
        patch::key(dir.path(), "attacker"),
    );
    // The server would take any one of three keys; the host pinned two and wants both.
    let (mut server, mut agents) = fleet(
        dir.path(),
        1,
        &[&k1, &k2, &attacker],
        1,
        &[&k1, &k2],
        2,
        false,
    );
    let root = agents[0].root();
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"x\n", 0o644)]);
    let before = patch::snapshot(&root);

    release(
        &server,
        dir.path(),
        "by-attacker",
        "1.0.0",
        &tar,
        "",
        &[&attacker],
    );
    let (phase, error) = outcome(&server, "by-attacker");
    assert_eq!(phase, "rejected");
    assert!(
        error.contains("no signature is from a trusted key"),
        "{error}"
    );

    release(&server, dir.path(), "one-signer", "1.0.0", &tar, "", &[&k1]);
    let (phase, error) = outcome(&server, "one-signer");
    assert_eq!(phase, "rejected");
    assert!(
        error.contains("signed by 1 distinct trusted key(s); the trust policy needs 2"),
        "{error}"
    );

    // The same key twice still counts once.
    let spec = patch::files_spec(dir.path(), "same-key-twice", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("same-key-twice"));
    patch::sign(&server, &manifest, &k1);
    let first = std::fs::read_dir(manifest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".minisig"))
        .unwrap();
    std::fs::copy(
        &first,
        manifest.with_file_name("manifest.json.copy.minisig"),
    )
    .unwrap();
    patch::sign(&server, &manifest, &k1);
    assert!(patch::publish(&server, &manifest).0);
    let (phase, error) = outcome(&server, "same-key-twice");
    assert_eq!(phase, "rejected");
    assert!(error.contains("signed by 1 distinct"), "{error}");
    assert_eq!(
        patch::snapshot(&root),
        before,
        "refused patches left the host untouched"
    );

    // A good 2.0.0, then 1.0.0 without the signed downgrade flag.
    release(&server, dir.path(), "v2", "2.0.0", &tar, "", &[&k1, &k2]);
    assert_eq!(outcome(&server, "v2").0, "committed");
    let after_v2 = patch::snapshot(&root);
    release(&server, dir.path(), "v1", "1.0.0", &tar, "", &[&k1, &k2]);
    let (phase, error) = outcome(&server, "v1");
    assert_eq!(phase, "superseded", "{error}");
    assert!(error.contains("2.0.0"), "{error}");
    assert_eq!(patch::snapshot(&root), after_v2);

    // Someone with the server's database edits a published manifest: the
    // signatures no longer match the bytes, and the host refuses it.
    agents[0].kill9();
    release(
        &server,
        dir.path(),
        "edited",
        "3.0.0",
        &tar,
        "",
        &[&k1, &k2],
    );
    server.stop();
    patch::tamper_stored_manifest(&server, "edited", |m| m.replace("/opt/demo", "/opt/evil"));
    server.start();
    agents[0].start(&[server.url()]);
    let (phase, error) = outcome(&server, "edited");
    assert_eq!(phase, "rejected");
    assert!(
        error.contains("is from a trusted key but over other bytes"),
        "{error}"
    );
    assert!(!root.join("opt/evil").exists());
    assert_eq!(patch::snapshot(&root), after_v2);
}

#[test]
fn server_refuses_what_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = patch::key(dir.path(), "k1");
    let other = patch::key(dir.path(), "other");
    let mut server = Server::init(dir.path());
    server.start();
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"x\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "p1", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("p1"));
    patch::sign(&server, &manifest, &other);
    let (ok, _, err) = patch::publish(&server, &manifest);
    assert!(!ok);
    assert!(err.contains("no trust policy"), "{err}");
    server.cli(&["trust", "set", "--key", k1.public.to_str().unwrap()]);
    let (ok, _, err) = patch::publish(&server, &manifest);
    assert!(!ok);
    assert!(err.contains("no signature is from a trusted key"), "{err}");
    // Edited after signing.
    patch::sign(&server, &manifest, &k1);
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("1.0.0", "1.0.1")).unwrap();
    let (ok, _, err) = patch::publish(&server, &manifest);
    assert!(!ok);
    assert!(err.contains("manifest refused"), "{err}");
    // Already expired.
    let spec = patch::files_spec(dir.path(), "old", "1.0.0", &tar, "");
    let s = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("expires_in = \"30d\"", "expires_in = \"1s\"");
    std::fs::write(&spec, s).unwrap();
    let manifest = patch::build(&server, &spec, &dir.path().join("old"));
    patch::sign(&server, &manifest, &k1);
    let built = Instant::now();
    wait_until("the manifest to expire", T, || {
        (built.elapsed() > Duration::from_millis(1100)).then_some(())
    });
    let (ok, _, err) = patch::publish(&server, &manifest);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");
    assert_eq!(
        server
            .cli_json(&["patch", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn failing_health_check_restores_exactly_the_previous_files() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "k");
    let (server, agents) = fleet(dir.path(), 1, &[&k], 1, &[&k], 1, true);
    let root = agents[0].root();
    // What the host runs today: version 1.
    let v1 = dir.path().join("v1.tar");
    patch::tar(
        &v1,
        &[
            ("bin/tool", b"v1\n", 0o755),
            ("etc/keep.conf", b"keep\n", 0o600),
        ],
    );
    release(&server, dir.path(), "demo-1", "1.0.0", &v1, "", &[&k]);
    assert_eq!(outcome(&server, "demo-1").0, "committed");
    let before = patch::snapshot(&root);

    // Version 2 changes a file, adds files and a directory, and fails its check.
    let v2 = dir.path().join("v2.tar");
    patch::tar(
        &v2,
        &[
            ("bin/tool", b"v2\n", 0o700),
            ("bin/new", b"new\n", 0o755),
            ("share/doc/README", b"docs\n", 0o644),
        ],
    );
    let check = "[health_check]\ncommand = [\"/bin/sh\", \"-c\", \"echo service did not come up; exit 3\"]\nretries = 2\ninterval_secs = 1\n[rollback]\ntype = \"restore\"\n";
    release(&server, dir.path(), "demo-2", "2.0.0", &v2, check, &[&k]);
    let (phase, error) = outcome(&server, "demo-2");
    assert_eq!(phase, "rolled_back");
    assert!(error.contains("health check failed 2 time(s)"), "{error}");
    let st = patch::status(&server, "demo-2");
    assert!(
        st["nodes"][0]["log_tail"]
            .as_str()
            .unwrap()
            .contains("service did not come up"),
        "{st}"
    );
    assert_eq!(
        patch::snapshot(&root),
        before,
        "the host is exactly as before version 2"
    );
    // The node still runs version 1.
    assert_eq!(server.nodes()[0]["installed"]["demo"], "1.0.0");
}

#[test]
fn malicious_archives_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "k");
    let (server, agents) = fleet(dir.path(), 1, &[&k], 1, &[&k], 1, false);
    let root = agents[0].root();
    std::fs::create_dir_all(root.join("opt/demo")).unwrap();
    std::fs::write(root.join("opt/demo/existing"), b"untouched\n").unwrap();
    let before = patch::snapshot(&root);
    use tar::EntryType::{Regular, Symlink};
    // (patch id, tar entries, destination override, expected error fragment)
    type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], &'a str);
    let cases: &[(&str, &[Entry], &str, &str)] = &[
        (
            "dotdot",
            &[
                ("ok.txt", Regular, b"fine", ""),
                ("../escape.txt", Regular, b"evil", ""),
            ],
            "",
            "..",
        ),
        (
            "absolute",
            &[("/etc/evil.conf", Regular, b"evil", "")],
            "",
            "absolute",
        ),
        (
            "symlink-out",
            &[
                ("link", Symlink, b"", "../../../etc"),
                ("ok.txt", Regular, b"x", ""),
            ],
            "",
            "symlink",
        ),
        (
            "outside-allowed",
            &[("x.txt", Regular, b"x", "")],
            "srv",
            "outside this host's allowed paths",
        ),
    ];
    for (id, entries, dest, want) in cases {
        let t = dir.path().join(format!("{id}.tar"));
        patch::raw_tar(&t, entries);
        let spec = patch::files_spec(dir.path(), id, "1.0.0", &t, "");
        if !dest.is_empty() {
            let s = std::fs::read_to_string(&spec)
                .unwrap()
                .replace("/opt/demo", "/srv/demo");
            std::fs::write(&spec, s).unwrap();
        }
        let manifest = patch::build(&server, &spec, &dir.path().join(id));
        patch::sign(&server, &manifest, &k);
        assert!(patch::publish(&server, &manifest).0);
        let (phase, error) = outcome(&server, id);
        // Refused while checking the archive (nothing touched, the empty
        // rollback run anyway) or by the host's policy before any download.
        assert!(
            matches!(phase.as_str(), "rolled_back" | "failed" | "rejected"),
            "{id}: {phase}"
        );
        assert!(error.to_lowercase().contains(want), "{id}: {error}");
        assert_eq!(patch::snapshot(&root), before, "{id} changed the host");
    }
    assert!(!root.join("opt/escape.txt").exists());
    assert!(!dir.path().join("escape.txt").exists());

    // A script patch on a host whose policy allows no scripts.
    let script = dir.path().join("install.sh");
    std::fs::write(&script, "#!/bin/sh\ntouch \"$FLOTILLA_ROOT/opt/ran\"\n").unwrap();
    let spec = dir.path().join("script.toml");
    std::fs::write(
        &spec,
        format!(
            "id = \"script\"\ncomponent = \"tool\"\nversion = \"1.0.0\"\nseverity = \"low\"\nexpires_in = \"1d\"\n[[artifacts]]\nname = \"install.sh\"\npath = \"{}\"\n[install]\ntype = \"script\"\nartifact = \"install.sh\"\n",
            script.display()
        ),
    )
    .unwrap();
    let manifest = patch::build(&server, &spec, &dir.path().join("script"));
    patch::sign(&server, &manifest, &k);
    assert!(patch::publish(&server, &manifest).0);
    let (phase, error) = outcome(&server, "script");
    assert_eq!(phase, "rejected");
    assert!(error.contains("does not allow patch scripts"), "{error}");
    assert!(!root.join("opt/ran").exists());
    assert_eq!(patch::snapshot(&root), before);

    // Health checks run by default, as a program run directly; through a
    // shell they are a script.
    let tar = dir.path().join("checked.tar");
    patch::tar(&tar, &[("checked.txt", b"ok\n", 0o644)]);
    for (id, version, command, want) in [
        (
            "via-shell",
            "1.0.0",
            r#"["/bin/sh", "-c", "true"]"#,
            "rejected",
        ),
        ("direct", "1.0.1", r#"["/bin/true"]"#, "committed"),
    ] {
        let extra = format!("[health_check]\ncommand = {command}\n");
        let spec = patch::component_spec(dir.path(), id, "checked", version, &tar, &extra);
        let manifest = patch::build(&server, &spec, &dir.path().join(id));
        patch::sign(&server, &manifest, &k);
        assert!(patch::publish(&server, &manifest).0);
        let (phase, error) = outcome(&server, id);
        assert_eq!(phase, want, "{id}: {error}");
        if want == "rejected" {
            assert!(error.contains("a shell or interpreter"), "{error}");
            assert_eq!(patch::snapshot(&root), before);
        }
    }
}

#[test]
fn artifacts_that_do_not_match_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "k");
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);
    let token = server.token("store", 1, &[]);
    let mut a = Agent::new(dir.path(), "host").with_root();
    a.run_args
        .extend(["--max-artifact-bytes".into(), "65536".into()]);
    let out = a.join_output(
        &server.url(),
        &token,
        &["--trusted-key", k.public.to_str().unwrap()],
    );
    assert!(out.status.success());
    let root = a.root();
    let before = patch::snapshot(&root);

    // Larger than this host's cap: refused before any download.
    let big = dir.path().join("big.tar");
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    patch::tar(&big, &[("blob", &noise, 0o644)]);
    a.start(&[server.url()]);
    release(&server, dir.path(), "too-big", "1.0.0", &big, "", &[&k]);
    let (phase, error) = outcome(&server, "too-big");
    assert_eq!(phase, "rejected");
    assert!(error.contains("this host's cap is 65536"), "{error}");

    // The server's copy of an artifact is swapped for other bytes of the same
    // size (a tampered disk): the digest check catches it while streaming.
    a.kill9();
    let small = dir.path().join("small.tar");
    patch::tar(&small, &[("VERSION", b"1\n", 0o644)]);
    let manifest = release(
        &server,
        dir.path(),
        "bad-digest",
        "1.0.0",
        &small,
        "",
        &[&k],
    );
    let held = held_artifact(&server, &manifest);
    let mut bytes = std::fs::read(&held).unwrap();
    bytes[600] ^= 0xff;
    std::fs::write(&held, &bytes).unwrap();
    a.start(&[server.url()]);
    let (phase, error) = outcome(&server, "bad-digest");
    assert_eq!(phase, "failed");
    assert!(
        error.contains("sha256") || error.contains("digest"),
        "{error}"
    );

    // More bytes than the manifest declares.
    a.kill9();
    let small2 = dir.path().join("small2.tar");
    patch::tar(&small2, &[("VERSION", b"2\n", 0o644)]);
    let manifest = release(
        &server,
        dir.path(),
        "oversized",
        "1.0.1",
        &small2,
        "",
        &[&k],
    );
    let held = held_artifact(&server, &manifest);
    let mut bytes = std::fs::read(&held).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&held, &bytes).unwrap();
    a.start(&[server.url()]);
    let (phase, error) = outcome(&server, "oversized");
    assert_eq!(phase, "failed");
    assert!(
        error.contains("more") || error.contains("larger") || error.contains("declared"),
        "{error}"
    );
    assert_eq!(patch::snapshot(&root), before, "nothing was installed");
}
