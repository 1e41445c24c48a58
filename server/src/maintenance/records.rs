//! The fleet's records as a file: one JSON line per key (`{"k": key, "v":
//! hex of the value}`), in key order, with a count and a digest that say the
//! same thing of a store and of a file. What backups hold and migrations move.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Condition, Entries, Op, Revision, Store, StoreError};

/// One line of a records file.
#[derive(Serialize, Deserialize)]
struct Line {
    k: String,
    v: String,
}

/// The longest line a records file may have: far above any record the
/// server writes (the largest, a patch's manifest, is capped well below).
const MAX_LINE: usize = 16 << 20;

/// How many keys one load transaction writes (etcd's default limit is 128).
const LOAD_BATCH: usize = 64;

/// What a set of records is: how many, and a SHA-256 over every key and
/// value in key order (each length-prefixed).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub sha256: String,
}

/// Builds a [`Summary`] from entries in key order.
#[derive(Default)]
pub struct Tally {
    count: u64,
    hash: Sha256,
}

impl Tally {
    pub fn add(&mut self, key: &str, value: &[u8]) {
        self.count += 1;
        self.hash.update((key.len() as u64).to_be_bytes());
        self.hash.update(key.as_bytes());
        self.hash.update((value.len() as u64).to_be_bytes());
        self.hash.update(value);
    }

    pub fn finish(self) -> Summary {
        Summary {
            count: self.count,
            sha256: hex::encode(self.hash.finalize()),
        }
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("cannot write the records file: {e}"))
}

/// Writes every record of `store` (leased keys left out: they end with their
/// holder) to `out`, as of one revision.
pub async fn dump(
    store: &dyn Store,
    out: &mut (dyn Write + Send),
) -> Result<(Revision, Summary), StoreError> {
    let mut tally = Tally::default();
    let revision = store
        .visit_snapshot("", &mut |key, value, leased| {
            if leased {
                return Ok(());
            }
            tally.add(key, value);
            let line = Line {
                k: key.to_string(),
                v: hex::encode(value),
            };
            serde_json::to_writer(&mut *out, &line).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)
        })
        .await?;
    out.flush().map_err(io)?;
    Ok((revision, tally.finish()))
}

/// Reads a records file: every entry, checked to be in strictly increasing
/// key order (as written), with its summary.
pub fn read(r: impl BufRead) -> anyhow::Result<(Entries, Summary)> {
    let mut entries: Entries = Vec::new();
    let summary = visit(r, |k, v| entries.push((k, v)))?;
    Ok((entries, summary))
}

/// Reads a records file through, keeping nothing: its summary (what a file
/// just transferred is checked against).
pub fn summarize_file(r: impl BufRead) -> anyhow::Result<Summary> {
    visit(r, |_, _| {})
}

/// Hands each entry of a records file to `f`, checking every line and the
/// key order; returns the summary.
fn visit(r: impl BufRead, mut f: impl FnMut(String, Vec<u8>)) -> anyhow::Result<Summary> {
    use anyhow::Context;
    let mut tally = Tally::default();
    let mut last: Option<String> = None;
    let mut r = r.take(u64::MAX);
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        r.set_limit(MAX_LINE as u64 + 1);
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        anyhow::ensure!(
            buf.len() <= MAX_LINE,
            "records line {n} is longer than {MAX_LINE} bytes"
        );
        let line: Line = serde_json::from_slice(&buf)
            .with_context(|| format!("records line {n} is malformed"))?;
        let value = hex::decode(&line.v)
            .with_context(|| format!("records line {n}: the value is not hex"))?;
        if let Some(last) = &last {
            anyhow::ensure!(
                *last < line.k,
                "records line {n}: key {:?} is out of order",
                line.k
            );
        }
        tally.add(&line.k, &value);
        last = Some(line.k.clone());
        f(line.k, value);
    }
    Ok(tally.finish())
}

/// [`dump`] into a new file at `path`, made durable.
pub async fn dump_to_file(store: &dyn Store, path: &Path) -> anyhow::Result<(Revision, Summary)> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let dumped = dump(store, &mut out).await?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(dumped)
}

/// What `store` holds now (leased keys left out).
pub async fn summarize(store: &dyn Store) -> Result<Summary, StoreError> {
    let mut tally = Tally::default();
    store
        .visit_snapshot("", &mut |key, value, leased| {
            if !leased {
                tally.add(key, value);
            }
            Ok(())
        })
        .await?;
    Ok(tally.finish())
}

/// Writes `entries` into an empty `store`, then checks that it holds exactly
/// them. A store that already holds records is refused (nothing is
/// overwritten); every key is written only if still absent.
pub async fn load(store: &dyn Store, entries: Entries) -> anyhow::Result<Summary> {
    let before = summarize(store).await?;
    anyhow::ensure!(
        before.count == 0,
        "the target store already holds {} records: load into an empty one (another etcd prefix, or a new data dir)",
        before.count
    );
    let mut tally = Tally::default();
    let mut batch: Entries = Vec::with_capacity(LOAD_BATCH);
    let mut entries = entries.into_iter().peekable();
    while let Some((k, v)) = entries.next() {
        tally.add(&k, &v);
        batch.push((k, v));
        if batch.len() == LOAD_BATCH || entries.peek().is_none() {
            let when = batch
                .iter()
                .map(|(k, _)| Condition::Absent(k.clone()))
                .collect();
            let then = batch.drain(..).map(|(k, v)| Op::put(k, v)).collect();
            if store.txn(when, then).await?.is_none() {
                anyhow::bail!(
                    "a key appeared in the target store while loading: something else writes to it"
                );
            }
        }
    }
    let expected = tally.finish();
    let after = summarize(store).await?;
    anyhow::ensure!(
        after == expected,
        "after loading, the store holds {} records (sha256 {}) where {} (sha256 {}) were written",
        after.count,
        after.sha256,
        expected.count,
        expected.sha256
    );
    Ok(after)
}
