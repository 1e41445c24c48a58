//! The running server's control socket, `<data-dir>/control.sock`: local
//! maintenance that needs the live process, which holds the store. Reaching
//! it takes access to the data dir (owner-only, like the CA key beside it),
//! which is its authentication. One request per connection, one line:
//!
//! - `records`: the server dumps its records as of one revision (a
//!   consistent backup while it runs) and answers
//!   `ok <revision> <count> <sha256> <bytes>\n` then the records file, or
//!   `error <text>\n`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::records::{self, Summary};
use crate::store::{Revision, Store};

pub const SOCKET: &str = "control.sock";
/// The longest request line.
const MAX_REQUEST: u64 = 64;
/// A client that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Serves the control socket until `shutdown`. A socket left by a server that
/// stopped without a word is replaced (the store's lock already says no
/// other server runs on this data dir).
pub fn serve(
    data_dir: &Path,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(data_dir);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let dir = data_dir.to_path_buf();
    // One request at a time: a dump holds the store's write lock.
    let one = Arc::new(tokio::sync::Mutex::new(()));
    Ok(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = listener.accept() => c,
            };
            let Ok((conn, _)) = conn else { continue };
            let (store, dir, one) = (store.clone(), dir.clone(), one.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(conn, &*store, &dir, &one).await {
                    tracing::warn!(error = %e, "control socket request failed");
                }
            });
        }
        let _ = std::fs::remove_file(socket_path(&dir));
    }))
}

async fn answer(
    conn: UnixStream,
    store: &dyn Store,
    dir: &Path,
    one: &tokio::sync::Mutex<()>,
) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .context("no request in time")??;
    match line.trim_end() {
        "records" => {
            let _one = one.lock().await;
            let tmp = dir.join(format!("control-records-{}.partial", std::process::id()));
            let dumped = dump_to(store, &tmp).await;
            let result = match dumped {
                Ok((revision, summary, bytes)) => {
                    let head = format!(
                        "ok {revision} {} {} {bytes}\n",
                        summary.count, summary.sha256
                    );
                    w.write_all(head.as_bytes()).await?;
                    let mut f = tokio::fs::File::open(&tmp).await?;
                    tokio::io::copy(&mut f, &mut w).await?;
                    w.shutdown().await?;
                    Ok(())
                }
                Err(e) => {
                    let text = e.to_string().replace('\n', " ");
                    w.write_all(format!("error {text}\n").as_bytes()).await?;
                    Err(e)
                }
            };
            let _ = std::fs::remove_file(&tmp);
            result
        }
        other => {
            let other: String = other.chars().take(32).collect();
            w.write_all(format!("error unknown request {other:?}\n").as_bytes())
                .await?;
            Ok(())
        }
    }
}

async fn dump_to(store: &dyn Store, path: &Path) -> anyhow::Result<(Revision, Summary, u64)> {
    let (revision, summary) = records::dump_to_file(store, path).await?;
    Ok((revision, summary, std::fs::metadata(path)?.len()))
}

/// Asks the server running on `data_dir` for its records, written to `out`.
/// None when no server answers there (no socket, or nobody listening).
pub async fn fetch_records(
    data_dir: &Path,
    out: &Path,
) -> anyhow::Result<Option<(Revision, Summary)>> {
    let path = socket_path(data_dir);
    let conn = match UnixStream::connect(&path).await {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach {}", path.display())),
    };
    let (r, mut w) = conn.into_split();
    w.write_all(b"records\n").await?;
    let mut r = BufReader::new(r);
    let mut head = String::new();
    (&mut r).take(1024).read_line(&mut head).await?;
    let head = head.trim_end();
    if let Some(e) = head.strip_prefix("error ") {
        anyhow::bail!("the running server could not dump its records: {e}");
    }
    let parts: Vec<&str> = head.split(' ').collect();
    let [ok, revision, count, sha256, bytes] = parts[..] else {
        anyhow::bail!("the control socket answered {head:?}");
    };
    anyhow::ensure!(ok == "ok", "the control socket answered {head:?}");
    let (revision, count, bytes): (Revision, u64, u64) =
        (revision.parse()?, count.parse()?, bytes.parse()?);
    let mut f = tokio::fs::File::create(out).await?;
    let copied = tokio::io::copy(&mut r.take(bytes), &mut f).await?;
    anyhow::ensure!(
        copied == bytes,
        "the server's records ended after {copied} of {bytes} bytes"
    );
    f.sync_all().await?;
    Ok(Some((
        revision,
        Summary {
            count,
            sha256: sha256.to_string(),
        },
    )))
}
