//! Interoperability with the stock `minisign` tool (Debian's `minisign` 0.11):
//! its keys and signatures work end to end, Flotilla's signatures verify with it,
//! and its legacy (non-prehashed) signatures are refused by the server.
//!
//! These tests need `minisign` on PATH; `scripts/test` installs it when missing.
//! They fail (never skip) without it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use flotilla_e2e::patch::{self, FleetOptions, Key};
use flotilla_e2e::{Agent, Server, bin};
use serde_json::Value;

/// Runs the stock `minisign` with `args` (stdin closed, so it can never wait on a
/// password prompt). Panics, naming the fix, if it is not installed.
fn minisign(args: &[&str]) -> Output {
    match Command::new("minisign")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the stock `minisign` tool is not installed; scripts/test installs it \
             (apt-get install minisign)"
        ),
        Err(e) => panic!("cannot run minisign: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `minisign` and panics unless it exits 0.
fn minisign_ok(args: &[&str]) -> Output {
    let out = minisign(args);
    assert!(
        out.status.success(),
        "minisign {args:?} failed: {}",
        text(&out)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A key pair made by stock `minisign -G -W` (no password).
fn stock_key(dir: &Path, name: &str) -> Key {
    let version = minisign(&["-v"]);
    eprintln!(
        "using {}",
        String::from_utf8_lossy(&version.stdout).trim_end()
    );
    let key = Key {
        secret: dir.join(format!("{name}.key")),
        public: dir.join(format!("{name}.pub")),
    };
    minisign_ok(&["-G", "-W", "-p", s(&key.public), "-s", s(&key.secret)]);
    let pub_text = std::fs::read_to_string(&key.public).expect("minisign wrote the .pub");
    assert!(
        pub_text.starts_with("untrusted comment: minisign public key"),
        "{pub_text}"
    );
    assert!(key.secret.exists(), "minisign wrote the secret key");
    key
}

/// Runs the `flotilla` CLI with no server: the local commands (build, sign).
fn flotilla_local(args: &[&str]) -> Output {
    Command::new(bin("flotilla"))
        .args(args)
        .env_remove("FLOTILLA_SERVER")
        .env_remove("FLOTILLA_CREDENTIAL")
        .stdin(Stdio::null())
        .output()
        .expect("run flotilla")
}

/// The `.minisig` files beside `manifest`.
fn signatures_beside(manifest: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(manifest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".minisig"))
        .collect();
    v.sort();
    v
}

/// A server trusting `key` and `n` running agents pinning it. The patch has a
/// health check, which is a command: the hosts must allow scripts.
fn fleet(dir: &Path, n: usize, key: &Key) -> (Server, Vec<Agent>) {
    patch::fleet(
        dir,
        FleetOptions {
            agents: n,
            server_keys: &[key],
            pinned: &[key],
            run_args: &["--allow-scripts"],
            ..FleetOptions::default()
        },
    )
}

fn published(server: &Server) -> Vec<Value> {
    server
        .cli_json(&["patch", "list"])
        .as_array()
        .expect("array")
        .clone()
}

#[test]
fn stock_minisign_key_and_signature_commit_a_patch() {
    let dir = tempfile::tempdir().unwrap();
    let k = stock_key(dir.path(), "stock");
    let (server, agents) = fleet(dir.path(), 1, &k);
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

    // Signed by stock minisign alone: it writes manifest.json.minisig, which
    // `flotilla patch publish` picks up by default.
    minisign_ok(&["-S", "-s", s(&k.secret), "-m", s(&manifest)]);
    let sig = manifest.with_file_name("manifest.json.minisig");
    assert_eq!(signatures_beside(&manifest), vec![sig.clone()]);
    let sig_text = std::fs::read_to_string(&sig).unwrap();
    assert!(
        sig_text.contains("file:manifest.json\thashed"),
        "a prehashed signature from stock minisign: {sig_text}"
    );

    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(ok, "publish failed: {err}");
    assert!(
        out.contains("published demo-2.0.0 (demo 2.0.0, critical) to 1 node(s)"),
        "{out}"
    );
    let list = published(&server);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["signatures"], 1, "{list:?}");

    let outcomes = patch::wait_outcomes(&server, "demo-2.0.0", 1);
    assert_eq!(
        outcomes
            .iter()
            .map(|(_, p, e)| (p.as_str(), e.as_str()))
            .collect::<Vec<_>>(),
        vec![("committed", "")],
        "{outcomes:?}"
    );
    let root = agents[0].root();
    let tool = root.join("opt/demo/bin/tool");
    assert_eq!(std::fs::read(&tool).unwrap(), b"#!/bin/sh\necho v2\n");
    assert_eq!(
        std::fs::metadata(&tool).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::read(root.join("opt/demo/etc/app.conf")).unwrap(),
        b"level=2\n"
    );
    let nodes = server.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["installed"]["demo"], "2.0.0", "{}", nodes[0]);
    assert_eq!(
        patch::status(&server, "demo-2.0.0")["counts"]["committed"],
        1
    );
}

#[test]
fn flotilla_signature_verifies_with_stock_minisign() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"2\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "p2", "2.0.0", &tar, "");
    let bundle = dir.path().join("p2");
    let out = flotilla_local(&["patch", "build", s(&spec), "--out-dir", s(&bundle)]);
    assert!(out.status.success(), "patch build: {}", text(&out));
    let manifest = bundle.join("manifest.json");

    let out = flotilla_local(&[
        "patch",
        "sign",
        s(&manifest),
        "--key",
        s(&k.secret),
        "--json",
    ]);
    assert!(out.status.success(), "patch sign: {}", text(&out));
    let signed: Value = serde_json::from_slice(&out.stdout).expect("patch sign --json");
    let key_id = signed["key_id"].as_str().expect("key_id");
    let sig = manifest.with_file_name(format!("manifest.json.{key_id}.minisig"));
    assert_eq!(signed["signature"].as_str(), Some(s(&sig)), "{signed}");
    assert_eq!(signatures_beside(&manifest), vec![sig.clone()]);

    let verify = ["-V", "-p", s(&k.public), "-m", s(&manifest), "-x", s(&sig)];
    let out = minisign(&verify);
    assert!(
        out.status.success(),
        "stock minisign must verify flotilla's signature: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Signature and comment signature verified"),
        "{}",
        text(&out)
    );
    // Prehashed, so it also passes when minisign is told to require that.
    let mut strict = vec!["-H"];
    strict.extend_from_slice(&verify);
    minisign_ok(&strict);

    // One byte of the manifest changed: the version 2.0.0 becomes 3.0.0.
    let original = std::fs::read(&manifest).unwrap();
    let at = original
        .windows(b"\"2.0.0\"".len())
        .position(|w| w == b"\"2.0.0\"")
        .expect("the version in the manifest")
        + 1;
    let mut edited = original.clone();
    edited[at] = b'3';
    assert_eq!(
        original.iter().zip(&edited).filter(|(a, b)| a != b).count(),
        1
    );
    std::fs::write(&manifest, &edited).unwrap();
    let out = minisign(&verify);
    assert!(
        !out.status.success(),
        "stock minisign accepted an edited manifest: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Signature verification failed"),
        "{}",
        text(&out)
    );
}

#[test]
fn legacy_stock_signature_is_refused_at_publish() {
    let dir = tempfile::tempdir().unwrap();
    let k = stock_key(dir.path(), "stock");
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["trust", "set", "--key", s(&k.public)]);
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"1\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "old-style", "1.0.0", &tar, "");
    let manifest = patch::build(&server, &spec, &dir.path().join("old-style"));

    minisign_ok(&["-S", "-l", "-s", s(&k.secret), "-m", s(&manifest)]);
    let sig = manifest.with_file_name("manifest.json.minisig");
    assert_eq!(signatures_beside(&manifest), vec![sig.clone()]);
    // It is a good signature by the trusted key, just the legacy kind: stock
    // minisign accepts it, and refuses it only when told to require prehashing.
    minisign_ok(&["-V", "-p", s(&k.public), "-m", s(&manifest), "-x", s(&sig)]);
    let out = minisign(&[
        "-V",
        "-H",
        "-p",
        s(&k.public),
        "-m",
        s(&manifest),
        "-x",
        s(&sig),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Legacy (non-prehashed) signature"),
        "{}",
        text(&out)
    );

    let (ok, out, err) = patch::publish(&server, &manifest);
    assert!(!ok, "the server took a legacy signature: {out}");
    assert!(err.contains("manifest refused"), "{err}");
    assert!(
        err.contains(
            "signature 0 is a legacy (non-prehashed) minisign signature; sign with a current minisign"
        ),
        "{err}"
    );
    assert!(err.contains("InvalidArgument"), "{err}");
    assert_eq!(published(&server), Vec::<Value>::new());
    let audit = server.cli_json(&["audit"]);
    assert!(
        !audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "patch.publish"),
        "{audit}"
    );
}
