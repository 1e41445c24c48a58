//! Keeps the docs honest: every command line the README and the docs show
//! names commands and flags the binaries have, and the code keeps the
//! invariants ARCHITECTURE.md states where a test can read them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_e2e::bin;

const BINS: &[&str] = &["flotilla", "flotilla-agent", "flotilla-server"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Markdown files whose command lines are checked.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    docs
}

/// Command lines: lines of code blocks and inline code spans that start with
/// one of the binaries (after an optional `sudo` or `$`).
fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut continued = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            // Lines ending in `\` go on on the next one.
            let l = line.trim();
            if let Some(head) = l.strip_suffix('\\') {
                continued.push_str(head);
                continued.push(' ');
                continue;
            }
            let whole = format!("{continued}{l}");
            continued.clear();
            out.push(whole);
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    out.into_iter()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("$ ").unwrap_or(l);
            let l = l.strip_prefix("sudo ").unwrap_or(l);
            let mut words = l.split_whitespace();
            let first = words.next()?;
            // A command word or a flag next, not a diagram's arrows.
            let second = words.next()?;
            let command = second.chars().all(|c| c.is_ascii_lowercase() || c == '-');
            (BINS.contains(&first) && command).then(|| l.to_string())
        })
        .collect()
}

fn help(words: &[&str]) -> String {
    let out = Command::new(bin(words[0]))
        .args(&words[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{} --help` fails: {}",
        words.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands a help text lists under "Commands:".
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// Checks one command line; returns what is wrong with it.
fn check(line: &str) -> Option<String> {
    // Stop at shell plumbing and comments.
    let line = line
        .split(['|', '#', '>', ';', '&'])
        .next()
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut path = vec![words[0]];
    let mut rest = words[1..].iter().peekable();
    // `flotilla --json audit`: the global output flag comes first.
    while rest.peek().is_some_and(|w| **w == "--json") {
        rest.next();
    }
    let mut leaf_help = help(&path);
    for w in rest.by_ref() {
        let subs = subcommands(&leaf_help);
        // A flag ends the commands (`flotilla audit --limit 5`: `audit`
        // takes flags, or a subcommand).
        if subs.is_empty() || w.starts_with('-') {
            break;
        }
        if !subs.contains(*w) {
            return Some(format!(
                "`{line}`: `{} {w}` is not a command (there are: {subs:?})",
                path.join(" ")
            ));
        }
        path.push(w);
        leaf_help = help(&path);
    }
    for w in words.iter().filter(|w| w.starts_with("--")) {
        let flag = w.split(['=', '[', ']']).next().unwrap();
        if flag != "--" && flag != "--json" && !leaf_help.contains(flag) {
            return Some(format!("`{line}`: `{}` has no flag {flag}", path.join(" ")));
        }
    }
    None
}

#[test]
fn every_command_line_in_the_docs_exists() {
    let mut wrong = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for line in command_lines(&text) {
            checked += 1;
            if let Some(w) = check(&line) {
                wrong.push(format!(
                    "{}: {w}",
                    doc.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(checked > 50, "only {checked} command lines found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Options and arguments in a help text that have no words of their own
/// (nothing, or only clap's `[env: …]` / `[default: …]`).
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    let mut in_list = false;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("Options:") || line.starts_with("Arguments:") {
            in_list = true;
            continue;
        }
        if !line.starts_with(' ') {
            in_list = false;
            continue;
        }
        let item = line.trim_start();
        let clap_note = ["[env:", "[default:", "[possible values:", "[aliases:"]
            .iter()
            .any(|n| item.starts_with(n));
        let is_item = item.starts_with('-') || item.starts_with('<') || item.starts_with('[');
        if !in_list || clap_note || !is_item {
            continue;
        }
        // "  --flag <V>   Help" on one line, or the help on the next lines
        // (clap's long layout, indented further).
        let text = match item.split_once("  ") {
            Some((_, rest)) if !rest.trim().is_empty() => rest.trim().to_string(),
            _ => lines
                .get(i + 1)
                .filter(|next| next.starts_with("          "))
                .map_or(String::new(), |n| n.trim().to_string()),
        };
        if text.is_empty() || text.starts_with('[') {
            out.push(item.split("  ").next().unwrap_or(item).to_string());
        }
    }
    out
}

/// Every command path of `bin`, the binary first.
fn commands(path: Vec<String>, out: &mut Vec<Vec<String>>) {
    let words: Vec<&str> = path.iter().map(String::as_str).collect();
    let subs = subcommands(&help(&words));
    out.push(path.clone());
    for s in subs {
        let mut p = path.clone();
        p.push(s);
        commands(p, out);
    }
}

#[test]
fn every_option_and_argument_says_what_it_is() {
    let mut all = Vec::new();
    for b in BINS {
        commands(vec![b.to_string()], &mut all);
    }
    assert!(all.len() > 40, "only {} commands", all.len());
    let mut missing = Vec::new();
    for path in &all {
        let words: Vec<&str> = path.iter().map(String::as_str).collect();
        for item in undocumented(&help(&words)) {
            missing.push(format!("{}: {item}", path.join(" ")));
        }
    }
    assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
}

#[test]
fn the_checker_catches_what_does_not_exist() {
    assert_eq!(
        undocumented("Options:\n      --group <GROUP>              \n  -h, --help  Print help\n"),
        ["--group <GROUP>"]
    );
    assert_eq!(
        undocumented(
            "Options:\n      --dir <DIR>\n          [env: X=]\n      --ok\n          Fine\n"
        ),
        ["--dir <DIR>"]
    );
    assert!(check("flotilla group set store-eu --desired 3").is_none());
    assert!(check("flotilla group sett store-eu").is_some());
    assert!(check("flotilla group set store-eu --wanted 3").is_some());
    assert!(check("flotilla-agent run --allow-scripts").is_none());
    assert!(check("flotilla-agent run --allow-shells").is_some());
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// ARCHITECTURE.md's invariant: on the server, protobuf types appear only at
/// the gRPC edge (the services, the gRPC clients, the wiring).
#[test]
fn protobuf_stays_at_the_grpc_edge() {
    let src = repo().join("server/src");
    // The dashboard (web/) calls the admin service in-process, as a client.
    let edge = ["grpc/", "cli/", "web/", "artifacts/peers.rs", "server.rs"];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut inside: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).unwrap();
            let uses_pb = text.contains("pb::") || text.contains("flotilla_proto::{pb");
            (uses_pb && !edge.iter().any(|e| rel.starts_with(e))).then_some(rel)
        })
        .collect();
    inside.sort();
    assert!(
        inside.is_empty(),
        "protobuf types used away from the gRPC edge: {inside:?}"
    );
    assert!(files.len() > 50, "the server's sources were not found");
}

/// Every `flotilla_…` metric name in `text`, histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("flotilla_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_monitoring_examples_use_metrics_the_programs_export() {
    let exported = std::fs::read_to_string(repo().join("server/src/metrics.rs")).unwrap()
        + &std::fs::read_to_string(repo().join("agent/src/textfile.rs")).unwrap();
    let dir = repo().join("packaging/monitoring");
    let alerts = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let guide = std::fs::read_to_string(repo().join("docs/operator-guide.md")).unwrap();
    let section = guide
        .split_once("### Metrics")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .expect("the guide's Metrics section");
    let used: BTreeSet<String> = [alerts.as_str(), dashboard.as_str(), section]
        .iter()
        .flat_map(|t| metric_names(t))
        .collect();
    assert!(used.len() > 10, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(&format!("\"{m}\"")))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
}
