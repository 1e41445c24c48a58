//! Artifacts across replicas. Artifacts are content-addressed, so any replica
//! that holds one can give it to another: a replica that lacks an artifact
//! fetches it from the replicas registered in the store (resuming and checked
//! against its digest exactly like an upload), and a publish asks other
//! replicas to hold each artifact before it is acknowledged. Calls between
//! replicas carry a client certificate the fleet's CA issued to the calling
//! replica; nothing unchecked is ever stored or served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::pb;
use flotilla_proto::pb::replica_service_client::ReplicaServiceClient;

use super::ArtifactStore;
use crate::ca::CertAuthority;
use crate::error::{Error, Result};
use crate::store::Db;

/// A peer that sends nothing for this long is dropped for that artifact.
const IDLE: Duration = Duration::from_secs(30);
/// How long a peer may take to hold an artifact a publish asked it to.
const HOLD_DEADLINE: Duration = Duration::from_secs(600);
/// How long this replica's client certificate is valid; a new one is made
/// when two thirds of that have passed.
const IDENTITY_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// This replica's side of the artifact exchange.
pub struct Peers {
    db: Db,
    /// This replica's id (it never fetches from itself).
    me: String,
    ca: CertAuthority,
    /// Client certificate and key, and when they were made.
    identity: Mutex<Option<(Instant, String, String)>>,
    /// One fetch per artifact at a time: later askers wait for it.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Peers {
    pub fn new(db: Db, me: String, ca: CertAuthority) -> Self {
        Self {
            db,
            me,
            ca,
            identity: Mutex::new(None),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn identity(&self) -> Result<(String, String)> {
        let mut id = self.identity.lock().expect("identity");
        if let Some((made, cert, key)) = id.as_ref()
            && made.elapsed() < IDENTITY_LIFETIME * 2 / 3
        {
            return Ok((cert.clone(), key.clone()));
        }
        let (cert, key) = self
            .ca
            .issue_replica_cert(&self.me, IDENTITY_LIFETIME)
            .map_err(|e| Error::Internal(e.to_string()))?;
        *id = Some((Instant::now(), cert.clone(), key.clone()));
        Ok((cert, key))
    }

    /// The other replicas' addresses.
    async fn others(&self) -> Result<Vec<String>> {
        Ok(crate::replica::list(&self.db)
            .await?
            .into_iter()
            .filter(|(r, _)| r.id != self.me && !r.url.is_empty())
            .map(|(r, _)| r.url)
            .collect())
    }

    /// How many replicas are registered now, this one included.
    pub async fn replicas(&self) -> Result<usize> {
        Ok(self.others().await?.len() + 1)
    }

    async fn client(&self, url: &str) -> Result<ReplicaServiceClient<tonic::transport::Channel>> {
        let (cert, key) = self.identity()?;
        let endpoint = flotilla_proto::tls::endpoint(url, self.ca.cert_pem(), Some((&cert, &key)))
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("cannot reach replica {url}: {e}")))?;
        Ok(ReplicaServiceClient::new(channel)
            .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES))
    }

    /// Makes `store` hold the artifact, fetched from the first other replica
    /// that gives every byte of it. Errors name each replica tried and why.
    pub async fn fetch(&self, store: &ArtifactStore, sha256: &str, size: u64) -> Result<()> {
        let lock = self
            .inflight
            .lock()
            .expect("inflight")
            .entry(sha256.to_string())
            .or_default()
            .clone();
        let result = async {
            let _one = lock.lock().await;
            if store.held(sha256, size)?.complete {
                return Ok(());
            }
            let others = self.others().await?;
            if others.is_empty() {
                return Err(Error::NotFound(format!(
                    "no artifact with sha256 {sha256} (and no other replica to fetch it from)"
                )));
            }
            let mut failures = Vec::new();
            for url in others {
                match self.fetch_from(store, &url, sha256, size).await {
                    Ok(()) => {
                        tracing::info!(%sha256, from = %url, "artifact fetched from a replica");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(%sha256, from = %url, error = %e, "artifact fetch from a replica failed");
                        failures.push(format!("{url}: {e}"));
                    }
                }
            }
            Err(Error::Unavailable(format!(
                "artifact {sha256} is not on this replica and no other gave it ({})",
                failures.join("; ")
            )))
        }
        .await;
        // The last one out forgets the lock.
        let mut inflight = self.inflight.lock().expect("inflight");
        if Arc::strong_count(&lock) == 2 {
            inflight.remove(sha256);
        }
        result
    }

    async fn fetch_from(
        &self,
        store: &ArtifactStore,
        url: &str,
        sha256: &str,
        size: u64,
    ) -> Result<()> {
        let mut client = self.client(url).await?;
        let mut at = store.held(sha256, size)?.received;
        let request = pb::FetchArtifactRequest {
            sha256: sha256.to_string(),
            offset: at,
        };
        let idle = |what: &str| Error::Unavailable(format!("{what} sent nothing for {IDLE:?}"));
        let received = async {
            let mut stream = tokio::time::timeout(IDLE, client.fetch_artifact(request))
                .await
                .map_err(|_| idle("the replica"))?
                .map_err(|s| Error::Unavailable(s.message().to_string()))?
                .into_inner();
            loop {
                let chunk = tokio::time::timeout(IDLE, stream.message())
                    .await
                    .map_err(|_| idle("the replica"))?
                    .map_err(|s| Error::Unavailable(s.message().to_string()))?;
                let Some(chunk) = chunk else {
                    return Ok::<_, Error>(());
                };
                if chunk.offset != at {
                    return Err(Error::Unavailable(format!(
                        "the replica sent bytes at {}, not {at}",
                        chunk.offset
                    )));
                }
                store.append(sha256, size, at, &chunk.data)?;
                at += chunk.data.len() as u64;
            }
        }
        .await;
        // Whatever arrived is kept (fsynced) for the next try; a complete
        // artifact is checked against its digest before it is used.
        let held = store.settle(sha256, size)?;
        received?;
        if held.complete {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "the replica ended after {} of {size} bytes",
                held.received
            )))
        }
    }

    /// Asks other replicas to hold the artifact until `want` of them do;
    /// returns how many do, and why the others did not.
    pub async fn replicate(&self, sha256: &str, size: u64, want: usize) -> (usize, Vec<String>) {
        let mut others = match self.others().await {
            Ok(o) => o,
            Err(e) => return (0, vec![e.to_string()]),
        };
        let (mut held, mut failures) = (0, Vec::new());
        while held < want && !others.is_empty() {
            let round: Vec<String> = others.drain(..(want - held).min(others.len())).collect();
            let asks = round.iter().map(|url| async move {
                let ask = async {
                    let mut client = self.client(url).await?;
                    client
                        .hold_artifact(pb::HoldArtifactRequest {
                            sha256: sha256.to_string(),
                            size,
                        })
                        .await
                        .map_err(|s| Error::Unavailable(s.message().to_string()))?;
                    Ok::<_, Error>(())
                };
                let result = tokio::time::timeout(HOLD_DEADLINE, ask)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Unavailable(format!(
                            "did not hold it within {HOLD_DEADLINE:?}"
                        )))
                    });
                (url, result)
            });
            for (url, result) in futures::future::join_all(asks).await {
                match result {
                    Ok(()) => held += 1,
                    Err(e) => failures.push(format!("{url}: {e}")),
                }
            }
        }
        (held, failures)
    }
}
