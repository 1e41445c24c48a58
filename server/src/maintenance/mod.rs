//! Care of a fleet's data: backups (of a running server too, through its
//! control socket), restores into a new data dir, and moving a sled fleet
//! into etcd. Each checks what it wrote: record counts and digests, artifact
//! digests.

pub mod archive;
pub mod control;
pub mod records;

use std::io::BufReader;
use std::path::Path;

use anyhow::Context;

use crate::config::StoreConfig;
use crate::server::open_store;
use records::Summary;

/// A temp file in `dir` for a records file on its way.
fn records_temp(dir: &Path, what: &str) -> std::path::PathBuf {
    dir.join(format!("{what}-records-{}.partial", std::process::id()))
}

/// Backs up the fleet of `data_dir` to `out`: its records as of one revision,
/// its TLS files and its artifacts. A sled server running on the data dir is
/// asked for its records through its control socket (it keeps running); a
/// stopped one is read directly; on etcd the records are read from etcd,
/// beside the running servers.
pub async fn backup(
    data_dir: &Path,
    store: &StoreConfig,
    out: &Path,
) -> anyhow::Result<archive::BackupInfo> {
    anyhow::ensure!(
        crate::ca::TlsPaths::in_dir(data_dir).ca_key.exists(),
        "{} has no CA: it is not a flotilla-server data dir",
        data_dir.display()
    );
    let tmp = records_temp(data_dir, "backup");
    let result = async {
        let live = match store {
            StoreConfig::Sled => control::fetch_records(data_dir, &tmp).await?,
            StoreConfig::Etcd { .. } => None,
        };
        let (revision, summary) = match live {
            Some(r) => r,
            None => {
                let db = open_store(data_dir, store, None).await.map_err(|e| {
                    match e.downcast_ref::<crate::store::StoreError>() {
                        Some(crate::store::StoreError::InUse(_)) => anyhow::anyhow!(
                            "a server runs on {} but its control socket does not answer",
                            data_dir.display()
                        ),
                        _ => e,
                    }
                })?;
                records::dump_to_file(db.raw().as_ref(), &tmp).await?
            }
        };
        // What arrived is what the store said it sent.
        let read = records::summarize_file(BufReader::new(std::fs::File::open(&tmp)?))?;
        anyhow::ensure!(
            read == summary,
            "the records file does not match what the store reported ({} records, sha256 {})",
            summary.count,
            summary.sha256
        );
        archive::write(out, data_dir, &tmp, revision, summary)
    }
    .await;
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Restores the backup `from` into the new data dir `data_dir`, its records
/// into `store` (sled in the data dir, or an empty etcd prefix), and checks
/// the records loaded are the backup's.
pub async fn restore(
    from: &Path,
    data_dir: &Path,
    store: &StoreConfig,
) -> anyhow::Result<(archive::BackupInfo, Summary)> {
    crate::data_dir::owner_only_from_now();
    let unpacked = archive::unpack(from, data_dir)?;
    let (entries, read) =
        records::read(BufReader::new(std::fs::File::open(&unpacked.records_file)?))?;
    anyhow::ensure!(
        read == unpacked.info.records,
        "the backup's records ({} records, sha256 {}) do not match its backup.json: the file is damaged",
        read.count,
        read.sha256
    );
    let db = open_store(data_dir, store, Some("restore")).await?;
    let loaded = records::load(db.raw().as_ref(), entries).await?;
    std::fs::remove_file(&unpacked.records_file)?;
    crate::data_dir::restrict(data_dir)?;
    Ok((unpacked.info, loaded))
}

/// Copies the records of the stopped sled fleet in `data_dir` into the empty
/// etcd prefix `to`, held meanwhile so no server starts on it, and checks
/// them there. The data dir keeps the TLS files and artifacts the servers
/// on etcd use.
pub async fn migrate(data_dir: &Path, to: &StoreConfig) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        matches!(to, StoreConfig::Etcd { .. }),
        "migrate moves a sled fleet into etcd: give the etcd endpoints"
    );
    anyhow::ensure!(
        data_dir.join("db").exists(),
        "{} has no sled store (db/)",
        data_dir.display()
    );
    let source = open_store(data_dir, &StoreConfig::Sled, None)
        .await
        .with_context(|| {
            format!(
                "cannot open the sled store in {} (stop its server first)",
                data_dir.display()
            )
        })?;
    let (_, entries) = source.raw().snapshot("").await?;
    drop(source);
    let target = open_store(data_dir, to, Some("migrate")).await?;
    records::load(target.raw().as_ref(), entries).await
}

#[cfg(test)]
mod tests;
