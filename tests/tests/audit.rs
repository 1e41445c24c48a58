//! Evidence for auditors, against a real server: the audit log is hash
//! chained (`audit verify` passes, then names the one entry edited in the
//! stopped server's store), refused operator attempts are in it, it exports
//! as JSON lines that verify away from the server, and the compliance report
//! is written as a dated evidence file that stock minisign verifies.

use std::process::{Command, Stdio};

use flotilla_e2e::{Server, patch};

fn viewer(server: &Server, dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("viewer.cred");
    server.cli(&[
        "credential",
        "create",
        "--name",
        "auditor",
        "--role",
        "viewer",
        "--out",
        file.to_str().unwrap(),
    ]);
    file
}

#[test]
fn the_audit_log_is_chained_exported_and_an_edited_entry_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    server.cli(&["group", "create", "store-eu"]);
    server.cli(&["group", "set", "store-eu", "--desired", "3"]);
    let auditor = viewer(&server, dir.path());
    // A refused attempt: a viewer may not create tokens.
    let refused = server.cli_as(
        &auditor,
        &["token", "create", "--group", "store-eu", "--max-uses", "1"],
    );
    assert!(!refused.status.success());
    // A bad credential.
    let bad = dir.path().join("bad.cred");
    let text = std::fs::read_to_string(&auditor).unwrap();
    let wrong: String = text
        .lines()
        .map(|l| match l.strip_prefix("credential = \"") {
            // The same credential id, a wrong secret.
            Some(v) => format!("credential = \"{}.{}\"\n", &v[..10], "A".repeat(43)),
            None => format!("{l}\n"),
        })
        .collect();
    assert_ne!(wrong, text);
    std::fs::write(&bad, wrong).unwrap();
    assert!(!server.cli_as(&bad, &["whoami"]).status.success());

    let audit = server.cli_json(&["audit"]);
    let entries = audit.as_array().unwrap();
    let refusals: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .collect();
    assert!(!refusals.is_empty(), "{audit}");
    assert!(
        refusals[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("role"),
        "{audit}"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["sha256"].as_str().unwrap().len() == 64)
    );

    // Intact; the viewer may check it.
    let out = server.cli_as(&auditor, &["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("intact"), "{text}");
    let ok = server.cli_json(&["audit", "verify"]);
    let newest = format!(
        "{}:{}",
        ok["newest"]["seq"],
        ok["newest"]["sha256"].as_str().unwrap()
    );

    // Exported as JSON lines, checked away from the server.
    let export = dir.path().join("audit.jsonl");
    server.cli(&[
        "audit",
        "export",
        "--since",
        "1h",
        "--out",
        export.to_str().unwrap(),
    ]);
    let lines = std::fs::read_to_string(&export).unwrap();
    assert_eq!(
        lines.lines().count() as u64,
        ok["entries"].as_u64().unwrap()
    );
    let offline = Command::new(flotilla_e2e::bin("flotilla"))
        .args(["audit", "verify", "--anchor", &newest, "--file"])
        .arg(&export)
        .output()
        .unwrap();
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );

    // One entry edited in the stopped server's store: named.
    server.stop();
    {
        let db = sled::open(server.data_dir.join("db")).unwrap();
        let key = format!("audit/{:020}", 2);
        let mut rec: serde_json::Value =
            serde_json::from_slice(&db.get(&key).unwrap().unwrap()).unwrap();
        rec["actor"] = "someone-else".into();
        db.insert(&key, serde_json::to_vec(&rec).unwrap()).unwrap();
        db.flush().unwrap();
    }
    server.start();
    let out = server.cli_as(&server.credential(), &["audit", "verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("broken at entry 2"), "{err}");
    // The export still checks: it was taken before the edit.
    let offline = Command::new(flotilla_e2e::bin("flotilla"))
        .args(["audit", "verify", "--file"])
        .arg(&export)
        .output()
        .unwrap();
    assert!(offline.status.success());
    // An edited export line is named too.
    let target: Vec<&str> = lines.lines().collect();
    let at = target
        .iter()
        .position(|l| l.contains("\"group.set\""))
        .expect("group.set exported");
    let seq: serde_json::Value = serde_json::from_str(target[at]).unwrap();
    let edited: String = target
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let l = if i == at {
                l.replace("store-eu", "store-us")
            } else {
                l.to_string()
            };
            l + "\n"
        })
        .collect();
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, edited).unwrap();
    let offline = Command::new(flotilla_e2e::bin("flotilla"))
        .args(["audit", "verify", "--file"])
        .arg(&tampered)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&offline.stderr);
    assert!(!offline.status.success());
    assert!(
        err.contains(&format!("broken at entry {}", seq["seq"])),
        "{err}"
    );
}

#[test]
fn a_signed_compliance_evidence_file_verifies_with_stock_minisign() {
    let dir = tempfile::tempdir().unwrap();
    let k = patch::key(dir.path(), "evidence");
    let (server, _agents) = patch::signed_fleet(dir.path(), &k, 1);
    let evidence = dir.path().join("compliance.json");
    let out = server.cli(&[
        "report",
        "compliance",
        "--format",
        "json",
        "--sign",
        k.secret.to_str().unwrap(),
        "--out",
        evidence.to_str().unwrap(),
    ]);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&evidence).unwrap()).unwrap();
    assert_eq!(doc["kind"], "flotilla.compliance-evidence.v1");
    assert_eq!(doc["audit_log"]["intact"], true, "{doc}");
    assert!(
        doc["generated_at"].as_str().unwrap().starts_with("20"),
        "{doc}"
    );
    assert_eq!(doc["report"]["nodes"].as_array().unwrap().len(), 1, "{doc}");
    let sig = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|f| f.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("compliance.json.")
        })
        .unwrap_or_else(|| panic!("no signature written: {out}"));
    let verify = |file: &std::path::Path| {
        Command::new("minisign")
            .args(["-V", "-q", "-p"])
            .arg(&k.public)
            .arg("-m")
            .arg(file)
            .arg("-x")
            .arg(&sig)
            .stdin(Stdio::null())
            .output()
            .expect("minisign is installed by the test command")
    };
    let ok = verify(&evidence);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // One changed byte and it does not.
    let changed = dir.path().join("changed.json");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&evidence)
            .unwrap()
            .replace("\"intact\": true", "\"intact\": false"),
    )
    .unwrap();
    assert!(!verify(&changed).status.success());
}
