//! Helpers for patch tests: signing keys, artifacts, specs, and the build → sign →
//! publish path through the real `flotilla` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use crate::{Agent, Server, bin, wait_until};

/// A minisign key pair made by `flotilla key generate --unencrypted`.
pub struct Key {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// A started server that trusts one new key, "release" (threshold 1).
pub fn trusting_server(dir: &Path) -> (Server, Key) {
    let key = key(dir, "release");
    let mut server = Server::init(dir);
    server.start();
    server.cli(&[
        "trust",
        "set",
        "--threshold",
        "1",
        "--key",
        key.public.to_str().expect("a UTF-8 path"),
    ]);
    (server, key)
}

pub fn key(dir: &Path, name: &str) -> Key {
    let prefix = dir.join(name);
    let out = Command::new(bin("flotilla"))
        .args(["key", "generate", "--unencrypted", "--out"])
        .arg(&prefix)
        .output()
        .expect("run flotilla key generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Key {
        secret: prefix.with_extension("key"),
        public: prefix.with_extension("pub"),
    }
}

/// A tar of `files` (path, content, mode).
pub fn tar(path: &Path, files: &[(&str, &[u8], u32)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).expect("create tar"));
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.finish().expect("finish tar");
}

/// Deterministic bytes that do not compress (xorshift): a delta of them is
/// small only because of its base, and a download of them takes its size.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed * 2 + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes a spec for a `files` patch of `artifact` into /opt/demo (component `demo`).
pub fn files_spec(dir: &Path, id: &str, version: &str, artifact: &Path, extra: &str) -> PathBuf {
    component_spec(dir, id, "demo", version, artifact, extra)
}

/// Writes a spec for a `files` patch of `component` installing `artifact` into
/// /opt/<component>; `extra` goes at the end (in the `[install]` table).
pub fn component_spec(
    dir: &Path,
    id: &str,
    component: &str,
    version: &str,
    artifact: &Path,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"id = "{id}"
component = "{component}"
version = "{version}"
severity = "critical"
expires_in = "30d"
[[artifacts]]
name = "payload.tar"
path = "{}"
[install]
type = "files"
artifact = "payload.tar"
destination = "/opt/{component}"
{extra}
"#,
            artifact.display()
        ),
    )
    .expect("write spec");
    path
}

/// Runs `flotilla` with `args` against `server`; returns (success, stdout, stderr).
pub fn cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = server.cli_as(&server.credential(), args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `patch build` into `dir/<id>/`, returning the manifest path.
pub fn build(server: &Server, spec: &Path, out_dir: &Path) -> PathBuf {
    let (ok, _, err) = cli(
        server,
        &[
            "patch",
            "build",
            spec.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(ok, "patch build failed: {err}");
    out_dir.join("manifest.json")
}

pub fn sign(server: &Server, manifest: &Path, key: &Key) {
    let (ok, _, err) = cli(
        server,
        &[
            "patch",
            "sign",
            manifest.to_str().unwrap(),
            "--key",
            key.secret.to_str().unwrap(),
        ],
    );
    assert!(ok, "patch sign failed: {err}");
}

pub fn publish(server: &Server, manifest: &Path) -> (bool, String, String) {
    cli(server, &["patch", "publish", manifest.to_str().unwrap()])
}

/// Per-node phases of a patch from `flotilla patch status --json`.
pub fn status(server: &Server, id: &str) -> serde_json::Value {
    server.cli_json(&["patch", "status", id])
}

/// A tar whose entries are written byte for byte, so a test can make the
/// malicious ones a real attacker would: `../`, absolute paths, symlinks out.
pub fn raw_tar(path: &Path, entries: &[(&str, tar::EntryType, &[u8], &str)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).expect("create tar"));
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).expect("append raw entry");
    }
    b.finish().expect("finish tar");
}

/// Replaces a stored patch's manifest bytes in a stopped server's database,
/// keeping its signatures: what an attacker holding the database could do.
pub fn tamper_stored_manifest(server: &Server, id: &str, edit: impl Fn(&str) -> String) {
    let db = sled::open(server.data_dir.join("db")).expect("open the server's store");
    let key = format!("patches/{id}");
    let raw = db.get(&key).expect("read").expect("patch stored");
    let mut rec: serde_json::Value = serde_json::from_slice(&raw).expect("json");
    let before = rec["manifest"].as_str().expect("manifest").to_string();
    let after = edit(&before);
    assert_ne!(before, after, "the edit must change the manifest");
    rec["manifest"] = serde_json::Value::String(after);
    db.insert(&key, serde_json::to_vec(&rec).unwrap())
        .expect("write");
    db.flush().expect("flush");
}

/// What [`fleet`] starts.
#[derive(Default)]
pub struct FleetOptions<'a> {
    /// How many agents.
    pub agents: usize,
    /// Keys the server trusts, and how many must sign.
    pub server_keys: &'a [&'a Key],
    pub server_threshold: u32,
    /// Keys each agent pins at join, and how many must sign.
    pub pinned: &'a [&'a Key],
    pub pin_threshold: u32,
    /// Extra `flotilla-agent run` arguments (e.g. `--allow-scripts`).
    pub run_args: &'a [&'a str],
    /// Extra environment for the server (test-only fault injection).
    pub server_env: &'a [(&'a str, String)],
    /// Site labels handed out in turn (agent i gets `site=sites[i % len]`);
    /// empty: every agent is at site berlin.
    pub sites: &'a [&'a str],
    /// The first this many agents serve their sites (`--serve-site`, on a
    /// loopback port of their own), and start first.
    pub serving: usize,
    /// Extra `flotilla-server run` arguments (e.g. `--web-listen`).
    pub server_args: &'a [&'a str],
}

/// A server with a trust policy and running agents in group "store" (label
/// site=berlin), each with its own root allowing /opt; returns once all are online.
pub fn fleet(dir: &Path, o: FleetOptions) -> (Server, Vec<Agent>) {
    let mut server = Server::init(dir);
    server.env = o
        .server_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    server
        .extra_args
        .extend(o.server_args.iter().map(|a| a.to_string()));
    server.start();
    let threshold = o.server_threshold.max(1).to_string();
    let mut args = vec!["trust", "set", "--threshold", threshold.as_str()];
    let key_paths: Vec<String> = o
        .server_keys
        .iter()
        .map(|k| k.public.to_string_lossy().into_owned())
        .collect();
    for k in &key_paths {
        args.extend(["--key", k.as_str()]);
    }
    server.cli(&args);
    // Token labels win over the agent's own, so per-agent sites need a bare token.
    let token_labels: &[&str] = if o.sites.is_empty() {
        &["--label", "site=berlin"]
    } else {
        &[]
    };
    let token = server.token("store", o.agents as u32, token_labels);
    let mut join_args: Vec<String> = vec![
        "--trust-threshold".into(),
        o.pin_threshold.max(1).to_string(),
    ];
    for k in o.pinned {
        join_args.extend([
            "--trusted-key".into(),
            k.public.to_string_lossy().into_owned(),
        ]);
    }
    let mut agents = Vec::new();
    for i in 0..o.agents {
        let mut a = Agent::new(dir, &format!("host{i:02}")).with_root();
        a.run_args.extend(o.run_args.iter().map(|s| s.to_string()));
        if i < o.serving {
            a.run_args
                .extend(["--serve-site", "--site-listen", "127.0.0.1:0"].map(String::from));
        }
        let mut args: Vec<&str> = join_args.iter().map(String::as_str).collect();
        let site = (!o.sites.is_empty()).then(|| format!("site={}", o.sites[i % o.sites.len()]));
        if let Some(site) = &site {
            args.extend(["--label", site.as_str()]);
        }
        let out = a.join_output(&server.url(), &token, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        a.start(&[server.url()]);
        agents.push(a);
    }
    let n = o.agents as u64;
    wait_until("every agent online", Duration::from_secs(60), || {
        (server.group("store")["online"] == n).then_some(())
    });
    (server, agents)
}

/// [`fleet`] of `agents` agents, the server and every agent trusting `key` alone.
pub fn signed_fleet(dir: &Path, key: &Key, agents: usize) -> (Server, Vec<Agent>) {
    fleet(
        dir,
        FleetOptions {
            agents,
            server_keys: &[key],
            pinned: &[key],
            ..FleetOptions::default()
        },
    )
}

/// (node id, phase, error) of every node a patch targets or that reported on it.
pub fn phases(server: &Server, id: &str) -> Vec<(String, String, String)> {
    status(server, id)["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (field("node_id"), field("phase"), field("error"))
        })
        .collect()
}

/// Whether a phase is an outcome (nothing follows it).
pub fn is_outcome(phase: &str) -> bool {
    flotilla_proto::phase::Phase::parse(phase).is_some_and(flotilla_proto::phase::Phase::is_final)
}

/// Waits until `n` nodes reached an outcome for patch `id`, and returns them.
pub fn wait_outcomes(server: &Server, id: &str, n: usize) -> Vec<(String, String, String)> {
    wait_until(
        "every node to reach an outcome",
        Duration::from_secs(90),
        || {
            let p = phases(server, id);
            (p.len() == n && p.iter().all(|(_, ph, _)| is_outcome(ph))).then_some(p)
        },
    )
}

/// Every file and directory under `root` with content and mode: what "the host
/// unchanged" means.
pub fn snapshot(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.push((rel, Vec::new(), mode));
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p).unwrap_or_default(), mode));
            }
        }
    }
    out.sort();
    out
}

/// Builds a `files` patch `id` of component demo at `version` (one file,
/// `bin/tool`; `extra` ends its spec, e.g. a `[targets]` table), signs it with
/// each of `signers` and publishes it. Returns whether the server took it,
/// with what the CLI said.
pub fn publish_signed(
    server: &Server,
    dir: &Path,
    id: &str,
    version: &str,
    extra: &str,
    signers: &[&Key],
) -> (bool, String) {
    let tar_path = dir.join(format!("{id}.tar"));
    tar(&tar_path, &[("bin/tool", version.as_bytes(), 0o755)]);
    let spec = files_spec(dir, id, version, &tar_path, extra);
    let manifest = build(server, &spec, &dir.join(id));
    for k in signers {
        sign(server, &manifest, k);
    }
    let (ok, out, err) = publish(server, &manifest);
    (ok, format!("{out}{err}"))
}

/// Builds, signs and publishes a `files` patch `id` (one file, `bin/tool`,
/// holding `version`) and waits until `n` nodes committed it.
pub fn roll_out(server: &Server, dir: &Path, key: &Key, id: &str, version: &str, n: usize) {
    let (ok, out) = publish_signed(server, dir, id, version, "", &[key]);
    assert!(ok, "{out}");
    let outcomes = wait_outcomes(server, id, n);
    assert!(outcomes.iter().all(|o| o.1 == "committed"), "{outcomes:?}");
}
