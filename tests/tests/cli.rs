//! What an operator meets at the CLI: typos refused instead of acted on, files
//! not overwritten, errors that say what is wrong once, and commands that end
//! the way scripts expect (non-zero when something went away, quiet on a
//! closed pipe).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_e2e::patch::{self, cli};
use flotilla_e2e::{Server, bin, wait_until, wait_until_or_none};

const T: Duration = Duration::from_secs(30);

fn fails_with(server: &Server, args: &[&str], needle: &str) -> String {
    let (ok, _, err) = cli(server, args);
    assert!(!ok, "flotilla {args:?} should fail");
    assert!(err.contains(needle), "flotilla {args:?}: {err}");
    err
}

fn group_names(server: &Server) -> Vec<String> {
    server
        .cli_json(&["group", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn groups_are_made_on_purpose_and_unknown_ones_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["group", "create", "store-eu", "--desired", "3"]);
    // A typo is refused with the name that was meant, and nothing is made.
    let err = fails_with(
        &server,
        &["group", "set", "store-ue", "--desired", "5"],
        "unknown group store-ue (did you mean store-eu?)",
    );
    assert!(err.contains("NotFound"), "{err}");
    assert_eq!(group_names(&server), ["store-eu"]);
    fails_with(&server, &["group", "create", "store-eu"], "already exists");
    // Every read of an unknown group says so the same way.
    for args in [
        &["nodes", "list", "--group", "nosuch"][..],
        &["report", "compliance", "--group", "nosuch"],
        &["group", "config", "nosuch"],
        &["group", "config", "nosuch", "--sla", "critical=3"],
        &["group", "watch", "nosuch"],
    ] {
        fails_with(&server, args, "unknown group nosuch (NotFound)");
    }
    assert_eq!(group_names(&server), ["store-eu"]);

    // --create makes it; a token for a new group makes one too.
    server.cli(&["group", "set", "depot", "--desired", "2", "--create"]);
    let token = server.cli_json(&["token", "create", "--group", "kiosk"]);
    assert_eq!(group_names(&server), ["depot", "kiosk", "store-eu"]);

    // Deleting: refused while a token could still add a node.
    let id = token["info"]["id"].as_str().unwrap();
    fails_with(
        &server,
        &["group", "delete", "kiosk"],
        "join token(s) that are not revoked",
    );
    server.cli(&["token", "revoke", id]);
    server.cli(&["group", "delete", "kiosk"]);
    server.cli(&["group", "delete", "depot"]);
    assert_eq!(group_names(&server), ["store-eu"]);
    fails_with(
        &server,
        &["group", "delete", "depot"],
        "unknown group depot",
    );
    // Gone after a restart too, and a name can be used again.
    server.stop();
    server.start();
    assert_eq!(group_names(&server), ["store-eu"]);
    server.cli(&["group", "create", "depot"]);
    let audit = server.cli_json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in ["group.create", "group.delete"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
}

/// `group watch` as a provisioning tool runs it, its stderr kept.
fn watch(server: &Server, dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin("flotilla"))
        .args(["group", "watch", "store-eu"])
        .args(extra)
        .env("FLOTILLA_SERVER", server.url())
        .env("FLOTILLA_CREDENTIAL", server.credential())
        .stdout(std::fs::File::create(dir.join("watch.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("watch.err")).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn group_watch_says_when_the_server_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["group", "create", "store-eu", "--desired", "2"]);
    let lines = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("watch.out"))
            .unwrap_or_default()
            .lines()
            .count()
    };

    let plain = tempfile::tempdir().unwrap();
    let mut child = watch(&server, plain.path(), &[]);
    wait_until("the watch to print the group", T, || {
        (lines(plain.path()) == 1).then_some(())
    });
    server.stop();
    let status = wait_until("the watch to end", T, || child.try_wait().unwrap());
    assert!(!status.success(), "{status:?}");
    let err = std::fs::read_to_string(plain.path().join("watch.err")).unwrap();
    assert!(err.starts_with("error: "), "{err}");

    // --follow: waits for the server and carries on.
    server.start();
    let follow = tempfile::tempdir().unwrap();
    let mut child = watch(&server, follow.path(), &["--follow"]);
    wait_until("the watch to print the group", T, || {
        (lines(follow.path()) == 1).then_some(())
    });
    server.stop();
    wait_until("the watch to say it lost the server", T, || {
        std::fs::read_to_string(follow.path().join("watch.err"))
            .unwrap()
            .contains("reconnecting")
            .then_some(())
    });
    assert!(child.try_wait().unwrap().is_none(), "--follow exited");
    server.start();
    server.cli(&["group", "set", "store-eu", "--desired", "4"]);
    wait_until("the watch to print after the restart", T, || {
        std::fs::read_to_string(follow.path().join("watch.out"))
            .unwrap()
            .contains("desired=4")
            .then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn credential_files_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let file = dir.path().join("ops.credential");
    let file_arg = file.to_str().unwrap();
    let create = [
        "credential",
        "create",
        "--name",
        "ops",
        "--role",
        "operator",
    ];
    server.cli(&[&create[..], &["--out", file_arg]].concat());
    let before = std::fs::read(&file).unwrap();
    let count = |s: &Server| {
        s.cli_json(&["credential", "list"])
            .as_array()
            .unwrap()
            .len()
    };
    let credentials = count(&server);
    let create2 = ["credential", "create", "--name", "ops2", "--role", "viewer"];
    fails_with(
        &server,
        &[&create2[..], &["--out", file_arg]].concat(),
        "already exists; refusing to overwrite a credential file",
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    // Refused before the server made a credential whose secret would be lost.
    assert_eq!(count(&server), credentials);
    server.cli(&[&create2[..], &["--out", file_arg, "--force"]].concat());
    assert_ne!(std::fs::read(&file).unwrap(), before);
    let out = server.cli_as(&file, &["whoami"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ops2"));
}

#[test]
fn signing_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "release");
    let mut server = Server::init(dir.path());
    server.start();
    // Keys the wrong way round.
    fails_with(
        &server,
        &["trust", "set", "--key", k.secret.to_str().unwrap()],
        "is a secret key",
    );
    server.cli(&["trust", "set", "--key", k.public.to_str().unwrap()]);
    let tar = dir.path().join("p.tar");
    patch::tar(&tar, &[("VERSION", b"1\n", 0o644)]);
    let spec = patch::files_spec(dir.path(), "p1", "1.0.0", &tar, "");
    let bundle = dir.path().join("p1");
    let manifest = patch::build(&server, &spec, &bundle);
    let m = manifest.to_str().unwrap();
    fails_with(
        &server,
        &["patch", "sign", m, "--key", k.public.to_str().unwrap()],
        "is a public key",
    );
    patch::sign(&server, &manifest, &k);
    // Rebuilding over a signed bundle is refused, and with --force it takes
    // the stale signatures away.
    let build = ["patch", "build", spec.to_str().unwrap(), "--out-dir"];
    let b = bundle.to_str().unwrap();
    fails_with(&server, &[&build[..], &[b]].concat(), "is already signed");
    let (ok, _, err) = cli(&server, &[&build[..], &[b, "--force"]].concat());
    assert!(ok && err.contains("removed 1 signature(s)"), "{err}");
    let sigs = std::fs::read_dir(&bundle)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".minisig")
        })
        .count();
    assert_eq!(sigs, 0);
    fails_with(&server, &["patch", "publish", m], "no signatures found");
    // A signature kept from before the rebuild is named as such.
    patch::sign(&server, &manifest, &k);
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("1.0.0", "1.0.1")).unwrap();
    let err = fails_with(&server, &["patch", "publish", m], "over other bytes");
    assert!(err.contains("was the manifest rebuilt"), "{err}");
    assert!(err.contains(".minisig"), "names the file: {err}");
}

#[test]
fn errors_say_what_is_wrong_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    // A second server on the same data dir.
    let out = Command::new(bin("flotilla-server"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another flotilla-server is running on this data dir"),
        "{err}"
    );
    assert!(
        !err.contains("Caused by") && !err.contains("backtrace"),
        "{err}"
    );
    // Settings that cannot be used are said, not ignored.
    let out = Command::new(bin("flotilla"))
        .args(["whoami"])
        .env("FLOTILLA_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FLOTILLA_LOG_FORMAT=xml is not a log format"),
        "{err}"
    );
    // Limits in the units people use.
    let err = fails_with(
        &server,
        &["token", "create", "--group", "g", "--ttl", "400d"],
        "token lifetime 400d is longer than the limit of 366d",
    );
    assert!(!err.contains("34560000"), "{err}");
    // Tables fit the width they are given, without box drawing.
    for i in 0..5 {
        server.cli(&["group", "create", &format!("group-with-a-long-name-{i}")]);
    }
    let out = Command::new(bin("flotilla"))
        .args(["audit"])
        .env("FLOTILLA_SERVER", server.url())
        .env("FLOTILLA_CREDENTIAL", server.credential())
        .env("COLUMNS", "70")
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.lines().count() > 5, "{table}");
    for line in table.lines() {
        assert!(line.chars().count() <= 70, "{} wide: {line}", line.len());
        assert!(!line.contains(['│', '─', '┌']), "{line}");
    }
    // Nothing listening: said once, with what to check.
    let url = server.url();
    server.stop();
    let out = Command::new(bin("flotilla"))
        .args(["group", "list"])
        .env("FLOTILLA_SERVER", &url)
        .env("FLOTILLA_CREDENTIAL", server.credential())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("tcp connect error").count(), 1, "{err}");
    assert!(err.contains("is the server running"), "{err}");
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    for _ in 0..5 {
        let mut child = Command::new(bin("flotilla"))
            .args(["audit"])
            .env("FLOTILLA_SERVER", server.url())
            .env("FLOTILLA_CREDENTIAL", server.credential())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the CLI prints: its table meets a closed pipe.
        drop(child.stdout.take());
        let status = wait_until_or_none(T, || child.try_wait().unwrap()).expect("cli ends");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!err.contains("panicked"), "{err}");
        assert_ne!(status.code(), Some(101), "{err}");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_itself() {
    for (shell, marker) in [
        ("bash", "_flotilla()"),
        ("zsh", "#compdef flotilla"),
        ("fish", "complete -c flotilla"),
    ] {
        let out = Command::new(bin("flotilla"))
            .args(["completion", shell])
            .output()
            .unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        assert!(script.contains(marker), "{shell}: {script:.200}");
        assert!(script.contains("rollout"), "{shell} completes commands");
    }
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let out = Command::new(bin("flotilla"))
        .arg("man")
        .arg("--out-dir")
        .arg(&pages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "flotilla.1",
        "flotilla-patch.1",
        "flotilla-patch-build.1",
        "flotilla-rollout-abort.1",
    ] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap_or_default();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text:.200}"
        );
    }
    let build = std::fs::read_to_string(pages.join("flotilla-patch-build.1")).unwrap();
    assert!(
        build.contains("delta"),
        "options are documented: {build:.400}"
    );
}

#[test]
fn tables_fit_the_terminal_unless_wide() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["group", "create", "store-eu-with-a-rather-long-name"]);
    let widest = |extra: &[&str]| {
        let out = Command::new(bin("flotilla"))
            .args(extra)
            .arg("audit")
            .env("FLOTILLA_SERVER", server.url())
            .env("FLOTILLA_CREDENTIAL", server.credential())
            .env("COLUMNS", "60")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.chars().count())
            .max()
            .unwrap()
    };
    assert!(widest(&[]) <= 60, "wrapped to $COLUMNS");
    assert!(widest(&["--wide"]) > 60, "--wide does not wrap");
}

/// `patch build` shows its hashing on a terminal (a large artifact takes a
/// while), and nothing of it in a pipe.
#[test]
fn patch_build_shows_its_hashing_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tar = d.join("app.tar");
    patch::tar(&tar, &[("big.bin", &patch::noise(24 << 20, 3), 0o644)]);
    let spec = patch::files_spec(d, "big", "1.0.0", &tar, "");
    let build = format!(
        "{} patch build {} --out-dir {}",
        bin("flotilla").display(),
        spec.display(),
        d.join("out").display()
    );
    // `script` gives the CLI a terminal.
    let on_tty = Command::new("script")
        .args(["-qec", &build, "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    assert!(on_tty.status.success());
    assert!(
        String::from_utf8_lossy(&on_tty.stdout).contains("hashing payload.tar"),
        "{}",
        String::from_utf8_lossy(&on_tty.stdout)
    );
    let piped = Command::new("sh")
        .args(["-c", &format!("{build} --force")])
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("hashing"));
}
