//! `flotilla-fuzz`: a fuzz harness that runs on stable Rust. Each target
//! starts from valid seeds (a signed manifest, tar and tar.zst archives),
//! mutates them (bit flips, byte changes, inserts, cuts, splices) with a seeded
//! generator, and feeds them to the code that reads untrusted input: the
//! manifest parser and signature verifier, and the `files` installer. A target
//! fails on a panic, or when the installer changes anything outside its
//! destination; the input that did it is written to a file to replay. Runs
//! for a bounded time, so CI can afford it on every change.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use flotilla_agent::install::{LocalPolicy, install_files, rollback_files};
use flotilla_proto::manifest::{Compression, Manifest, TrustPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    /// Manifest bytes and signatures through parse and k-of-n verification.
    Manifest,
    /// Archives through the `files` installer (and its rollback).
    Archive,
}

#[derive(Debug, Parser)]
#[command(name = "flotilla-fuzz")]
struct Cli {
    /// What to fuzz.
    #[arg(value_enum)]
    target: Target,
    /// How long to run.
    #[arg(long, default_value = "20s", value_parser = seconds)]
    time: Duration,
    /// Seed of the mutation generator (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where a failing input is written.
    #[arg(long, default_value = "target/fuzz-failures")]
    failures: PathBuf,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let n: u64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?}: give seconds, like 20s"))?;
    Ok(Duration::from_secs(n))
}

/// One random change to `bytes`, kept below `max` bytes.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>, other: &[u8], max: usize) {
    let len = bytes.len();
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            bytes[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            bytes[i] = [0, 0xff, b'/', b'.', b'"', b'\\', b'0', b'9', rng.random()]
                [rng.random_range(0..9)];
        }
        2 => {
            let i = rng.random_range(0..=len);
            let n = rng.random_range(1..64);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            bytes.splice(i..i, junk);
        }
        3 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(512));
            bytes.drain(i..i + n);
        }
        4 if len > 0 => bytes.truncate(rng.random_range(0..len)),
        5 if !other.is_empty() => {
            // A piece of another seed, at a random place.
            let a = rng.random_range(0..other.len());
            let b = rng.random_range(a..=other.len().min(a + 1024));
            let i = rng.random_range(0..=len);
            bytes.splice(i..i, other[a..b].iter().copied());
        }
        _ if len >= 512 => {
            // Tar headers sit on 512-byte blocks: hit one of their fields.
            let block = rng.random_range(0..len / 512) * 512;
            let field = [0usize, 100, 124, 136, 148, 156, 157, 257, 345][rng.random_range(0..9)];
            if block + field < len {
                bytes[block + field] = rng.random();
            }
        }
        _ => bytes.push(rng.random()),
    }
    bytes.truncate(max);
}

/// A signed manifest and its signature, the manifest seed.
fn manifest_seed() -> anyhow::Result<(Vec<u8>, String, String)> {
    let kp = minisign::KeyPair::generate_unencrypted_keypair()?;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let fmt = &time::format_description::well_known::Rfc3339;
    let manifest = format!(
        r#"{{
  "schema": 1,
  "id": "app-1.2.0",
  "component": "app",
  "version": "1.2.0",
  "severity": "critical",
  "issued_at": "{}",
  "expires_at": "{}",
  "targets": {{ "groups": ["store"], "labels": {{ "site": "b" }} }},
  "artifacts": [{{ "name": "app.tar", "sha256": "{}", "size": 10 }}],
  "install": {{ "type": "files", "artifact": "app.tar", "destination": "/opt/app" }},
  "health_check": {{ "command": ["/usr/bin/true"], "retries": 2 }},
  "rollback": {{ "type": "restore" }}
}}"#,
        now.format(fmt)?,
        (now + time::Duration::days(30)).format(fmt)?,
        "0".repeat(64),
    );
    let sig = minisign::sign(Some(&kp.pk), &kp.sk, manifest.as_bytes(), None, None)?;
    Ok((
        manifest.into_bytes(),
        sig.into_string(),
        kp.pk.to_box()?.into_string(),
    ))
}

/// Inputs tried, and how many of them the code under test took.
struct Runs {
    tried: u64,
    taken: u64,
}

fn fuzz_manifest(rng: &mut StdRng, deadline: Instant, out: &Path) -> anyhow::Result<Runs> {
    let (seed, sig, pk) = manifest_seed()?;
    let policy = TrustPolicy::new(&[pk], 1)?;
    // The seed verifies; everything else is only required not to panic, and
    // to never verify unless it is the signed bytes.
    policy
        .verify(&seed, std::slice::from_ref(&sig))
        .context("the seed does not verify")?;
    let mut runs = Runs { tried: 0, taken: 0 };
    while Instant::now() < deadline {
        let mut bytes = seed.clone();
        let mut s = sig.clone().into_bytes();
        for _ in 0..rng.random_range(1..6) {
            mutate(rng, &mut bytes, s.as_slice(), 64 * 1024);
        }
        if rng.random_bool(0.3) {
            mutate(rng, &mut s, &seed, 4096);
        }
        let s = String::from_utf8_lossy(&s).into_owned();
        let input = [bytes.as_slice(), b"\n--signature--\n", s.as_bytes()].concat();
        let verdict = std::panic::catch_unwind(|| {
            let parsed = Manifest::parse(&bytes).is_ok();
            (
                parsed,
                policy.verify(&bytes, std::slice::from_ref(&s)).is_ok(),
            )
        });
        match verdict {
            Err(_) => return Err(keep(out, "manifest-panic", &input)),
            Ok((_, true)) if bytes != seed => return Err(keep(out, "manifest-forged", &input)),
            Ok((parsed, _)) => runs.taken += u64::from(parsed),
        }
        runs.tried += 1;
    }
    Ok(runs)
}

/// Archive seeds: files, directories, symlinks inside and out, long names.
fn archive_seeds() -> anyhow::Result<Vec<(Vec<u8>, Compression)>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add =
        |path: &str, kind: tar::EntryType, data: &[u8], link: &str| -> anyhow::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if !link.is_empty() {
                h.set_link_name(link)?;
            }
            b.append_data(&mut h, path, data)?;
            Ok(())
        };
    add("bin/", tar::EntryType::Directory, b"", "")?;
    add(
        "bin/tool",
        tar::EntryType::Regular,
        b"#!/bin/sh\necho hi\n",
        "",
    )?;
    add("etc/app.conf", tar::EntryType::Regular, b"level=1\n", "")?;
    add("lib/current", tar::EntryType::Symlink, b"", "../bin")?;
    add(
        &format!("{}/deep", "d".repeat(150)),
        tar::EntryType::Regular,
        b"x",
        "",
    )?;
    let plain = b.into_inner()?;
    let zst = zstd::encode_all(plain.as_slice(), 3)?;
    Ok(vec![(plain, Compression::None), (zst, Compression::Zstd)])
}

/// Every file under `root` with its bytes (symlinks by target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap_or_default();
                out.insert(rel, target.into_os_string().into_encoded_bytes());
            } else if meta.is_dir() {
                out.insert(rel, Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

fn fuzz_archive(rng: &mut StdRng, deadline: Instant, out: &Path) -> anyhow::Result<Runs> {
    let seeds = archive_seeds()?;
    let scratch = tempfile::tempdir()?;
    let root = scratch.path().join("root");
    let dest = root.join("opt/app");
    let work = scratch.path().join("work");
    let art = scratch.path().join("artifact");
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0\n")?;
    std::fs::create_dir_all(&dest)?;
    let policy = LocalPolicy {
        allowed_paths: vec![root.join("opt/app")],
        allow_scripts: false,
        allow_health_checks: true,
        max_artifact_bytes: 8 << 20,
    };
    let outside = |root: &Path| {
        snapshot(root)
            .into_iter()
            .filter(|(p, _)| !root.join(p).starts_with(&dest))
            .collect::<BTreeMap<_, _>>()
    };
    let before = outside(&root);
    let mut runs = Runs { tried: 0, taken: 0 };
    while Instant::now() < deadline {
        let (seed, compression) = &seeds[rng.random_range(0..seeds.len())];
        let other = &seeds[rng.random_range(0..seeds.len())].0;
        let mut bytes = seed.clone();
        for _ in 0..rng.random_range(1..8) {
            mutate(rng, &mut bytes, other, 256 * 1024);
        }
        std::fs::write(&art, &bytes)?;
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let ran = std::panic::catch_unwind(|| {
            let result = install_files(&art, *compression, &dest, &policy, &work);
            // Whatever happened, undo it: the next run starts clean.
            let undone = rollback_files(&work);
            (result.is_ok(), undone.is_ok())
        });
        let name = match compression {
            Compression::None => "archive",
            Compression::Zstd => "archive-zst",
        };
        match ran {
            Err(_) => return Err(keep(out, &format!("{name}-panic"), &bytes)),
            Ok((_, false)) => return Err(keep(out, &format!("{name}-rollback"), &bytes)),
            Ok((installed, true)) => runs.taken += u64::from(installed),
        }
        if outside(&root) != before {
            return Err(keep(out, &format!("{name}-escaped"), &bytes));
        }
        runs.tried += 1;
    }
    Ok(runs)
}

/// Writes a failing input where it can be replayed, and says so.
fn keep(dir: &Path, what: &str, input: &[u8]) -> anyhow::Error {
    let path = dir.join(format!("{what}-{}", std::process::id()));
    let saved = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::File::create(&path))
        .and_then(|mut f| f.write_all(input));
    match saved {
        Ok(()) => anyhow::anyhow!("{what}: input kept in {}", path.display()),
        Err(e) => anyhow::anyhow!("{what}: the input could not be kept ({e})"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    // Panics are expected to be caught and reported with their input, not
    // printed as they happen.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + cli.time;
    let started = Instant::now();
    let runs = match cli.target {
        Target::Manifest => fuzz_manifest(&mut rng, deadline, &cli.failures),
        Target::Archive => fuzz_archive(&mut rng, deadline, &cli.failures),
    };
    match runs {
        Ok(r) => {
            flotilla_proto::outln!(
                "flotilla-fuzz {:?}: {} inputs ({} taken, the rest refused) in {:.1}s, seed {seed}: no failure",
                cli.target,
                r.tried,
                r.taken,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => bail!("{:?} failed (seed {seed}): {e}", cli.target),
    }
}
