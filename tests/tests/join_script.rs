//! `packaging/join.sh`, the provisioning script, against a real server and the
//! real agent, with a fake `systemctl` on PATH that records what it was asked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_e2e::{Server, bin};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/join.sh")
}

/// A directory with an executable `systemctl` that appends its arguments to
/// `systemctl.log` and says every unit is active.
fn fake_systemctl(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = dir.join("fake-bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let log = dir.join("systemctl.log");
    let path = bin_dir.join("systemctl");
    std::fs::write(
        &path,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\nexit 0\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin_dir
}

struct Host {
    state: PathBuf,
    config: PathBuf,
    systemd: PathBuf,
    fake_bin: PathBuf,
    machine: String,
}

impl Host {
    fn new(dir: &Path, name: &str, systemd: bool) -> Self {
        let state = dir.join(format!("{name}-state"));
        let systemd_dir = dir.join(format!("{name}-run-systemd"));
        if systemd {
            std::fs::create_dir_all(&systemd_dir).unwrap();
        }
        // An agent config with nothing in it: every default.
        let config = dir.join(format!("{name}-agent.toml"));
        std::fs::write(&config, "").unwrap();
        Self {
            state,
            config,
            systemd: systemd_dir,
            fake_bin: fake_systemctl(dir),
            machine: format!("machine-{name}"),
        }
    }

    fn run(&self, args: &[&str], token: Option<&str>) -> Output {
        let path = format!(
            "{}:{}",
            self.fake_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("sh");
        c.arg(script())
            .args(args)
            .env("PATH", path)
            .env("FLOTILLA_AGENT_BIN", bin("flotilla-agent"))
            .env("FLOTILLA_AGENT_CONFIG", &self.config)
            .env("FLOTILLA_AGENT_STATE_DIR", &self.state)
            .env("FLOTILLA_AGENT_MACHINE_ID", &self.machine)
            .env("FLOTILLA_SYSTEMD_RUNTIME_DIR", &self.systemd)
            .env_remove("FLOTILLA_TOKEN");
        if let Some(t) = token {
            c.env("FLOTILLA_TOKEN", t);
        }
        c.output().unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn node_count(server: &Server) -> usize {
    server.nodes().len()
}

#[test]
fn join_script_joins_starts_and_says_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let url = server.url();
    let token = server.token("store", 3, &[]);
    let secret = token.split('.').nth(2).unwrap().to_string();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();

    // A systemd host: joins, then enables and starts the unit.
    let host = Host::new(dir.path(), "a", true);
    let out = host.run(
        &[
            "--server",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--label",
            "site=store-0421",
        ],
        None,
    );
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("done: flotilla-agent.service is running"),
        "{said}"
    );
    assert!(
        !said.contains(&secret),
        "the token's secret was printed: {said}"
    );
    let calls = std::fs::read_to_string(dir.path().join("systemctl.log")).unwrap();
    assert!(
        calls.contains("enable --now flotilla-agent.service"),
        "{calls}"
    );
    assert!(
        calls.contains("is-active --quiet flotilla-agent.service"),
        "{calls}"
    );
    let nodes = server.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["labels"]["site"], "store-0421", "{}", nodes[0]);

    // Again: already joined, no second node, no token use.
    let out = host.run(&["--server", &url], Some(&token));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already joined; not joining again"));
    assert_eq!(node_count(&server), 1);

    // A host without systemd: refused before joining, with what to do.
    let plain = Host::new(dir.path(), "b", false);
    let out = plain.run(&["--server", &url], Some(&token));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("systemd is not running on this host"),
        "{said}"
    );
    assert!(said.contains("--no-start"), "{said}");
    assert_eq!(node_count(&server), 1, "joined although it could not start");
    // With --no-start it joins and leaves starting to the host; --machine-id
    // is the machine id it states.
    let out = plain.run(
        &[
            "--server",
            &url,
            "--no-start",
            "--machine-id",
            "image-copy-7",
        ],
        Some(&token),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not starting flotilla-agent.service (--no-start)"));
    assert_eq!(node_count(&server), 2);
    assert!(
        server
            .nodes()
            .iter()
            .any(|n| n["facts"]["machine_id"] == "image-copy-7"),
        "{:?}",
        server.nodes()
    );

    // Input it refuses before any network use.
    let fresh = Host::new(dir.path(), "c", true);
    let out = fresh.run(&["--server", &url], Some("not-a-token"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("does not look like flt1."),
        "{}",
        text(&out)
    );
    let out = fresh.run(&["--server", "http://plain:80"], Some(&token));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("must start with https://"),
        "{}",
        text(&out)
    );
    let out = fresh.run(&["--bogus"], Some(&token));
    assert_eq!(out.status.code(), Some(2));
    let out = fresh.run(&["--server", &url], None);
    assert!(text(&out).contains("no join token"), "{}", text(&out));
    assert_eq!(node_count(&server), 2);
}
