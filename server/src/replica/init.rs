//! Making a new replica of an existing fleet: its data dir gets the fleet's
//! CA (from a bundle the operator carries over from a running replica, never
//! through the store) and a server certificate of its own for its own names;
//! its store is the fleet's. And the check every server makes at start that
//! its CA is the fleet's: the CA certificate (public) is kept in the store.

use std::path::Path;

use anyhow::Context;

use crate::ca::{CertAuthority, TlsPaths};
use crate::config::StoreConfig;
use crate::model::keys;
use crate::store::Db;

/// The key of the fleet's CA certificate (public; the key never goes there).
pub const FLEET_CA: &str = "fleet/ca.pem";

/// Records `ca_pem` as the fleet's CA if the store has none yet, and refuses
/// a CA that is not the one recorded (a data dir of another fleet, or the
/// wrong etcd prefix).
pub async fn claim_fleet_ca(db: &Db, ca_pem: &str) -> anyhow::Result<()> {
    let store = db.raw();
    if store
        .compare_and_swap(FLEET_CA, None, Some(ca_pem.as_bytes().to_vec()))
        .await?
    {
        return Ok(());
    }
    let recorded = store.get(FLEET_CA).await?.unwrap_or_default();
    if recorded == ca_pem.as_bytes() {
        return Ok(());
    }
    let theirs = flotilla_proto::tls::pem_fingerprint(&String::from_utf8_lossy(&recorded))
        .unwrap_or_else(|_| "unreadable".into());
    let ours = flotilla_proto::tls::pem_fingerprint(ca_pem).unwrap_or_default();
    anyhow::bail!(
        "this data dir's CA (sha256 {ours}) is not the fleet's (sha256 {theirs}): the store \
         belongs to another fleet (the wrong data dir, or the wrong --etcd-prefix?)"
    )
}

/// Writes the CA bundle of the fleet whose data dir is `data_dir` to `out`
/// (owner-only; an existing file is kept unless `force`).
pub fn export_ca(data_dir: &Path, out: &Path, force: bool) -> anyhow::Result<String> {
    let paths = TlsPaths::in_dir(data_dir);
    let bundle = CertAuthority::export_bundle(&paths)
        .with_context(|| format!("{} has no CA", data_dir.display()))?;
    anyhow::ensure!(
        force || !out.exists(),
        "{} exists; not replacing it (--force to)",
        out.display()
    );
    flotilla_proto::durable::write_atomic(out, bundle.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(CertAuthority::load(&paths)?.fingerprint().to_string())
}

/// Creates the data dir of a new replica of the fleet in `store`: the CA of
/// `bundle_file`, a server certificate for `names`, nothing else (the
/// fleet's records are already in its store). Returns the CA fingerprint.
pub async fn init_replica(
    data_dir: &Path,
    names: &[String],
    bundle_file: &Path,
    store: &StoreConfig,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        matches!(store, StoreConfig::Etcd { .. }),
        "a replica shares its fleet's store: give --store etcd and the fleet's etcd settings"
    );
    let bundle = std::fs::read_to_string(bundle_file)
        .with_context(|| format!("cannot read the CA bundle {}", bundle_file.display()))?;
    crate::data_dir::owner_only_from_now();
    crate::data_dir::create(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let paths = TlsPaths::in_dir(data_dir);
    let ca = CertAuthority::import(&paths, &bundle)?;
    let db = crate::server::open_store(data_dir, store, None).await?;
    let fleet_exists = !db.raw().scan_prefix(keys::CREDENTIALS).await?.is_empty();
    if !fleet_exists {
        let _ = std::fs::remove_dir_all(data_dir);
        anyhow::bail!(
            "the store holds no fleet yet: initialise the first server with a plain `init`"
        );
    }
    if let Err(e) = claim_fleet_ca(&db, ca.cert_pem()).await {
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(e);
    }
    ca.write_server_cert(&paths, names)?;
    let audit = crate::audit::AuditLog::open(db.clone()).await?;
    audit
        .record(
            "server",
            crate::audit::Action::ReplicaInit,
            &names.join(","),
            serde_json::json!({ "ca_fingerprint": ca.fingerprint(), "names": names }),
        )
        .await?;
    crate::data_dir::restrict(data_dir)?;
    Ok(ca.fingerprint().to_string())
}
