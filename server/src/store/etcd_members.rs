//! The etcd members a store talks to: one client per member, the one that
//! answered last preferred, and a request that cannot reach its member (the
//! connection refused, or the member without a leader) tried on the next, as
//! etcd's own clients do. A write that reached a member is never sent twice:
//! only one that certainly did not leave is tried again. A read (or a lease
//! renewal) is tried again on any "unavailable" (an election under way) for
//! a few seconds.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

pub struct Members {
    clients: Vec<Client>,
    preferred: AtomicUsize,
}

/// How long a read goes on trying while etcd elects a leader.
const READ_RETRY_FOR: Duration = Duration::from_secs(5);

/// Whether `e` says the cluster cannot answer just now (an election).
fn unavailable(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// Whether `e` says the request never reached a member that could serve it.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect error") || s.message().contains("no leader"))
        }
        _ => false,
    }
}

impl Members {
    /// One client per endpoint; none connects before its first request.
    pub async fn connect(
        endpoints: &[String],
        opts: ConnectOptions,
    ) -> Result<Self, etcd_client::Error> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            clients.push(Client::connect([e], Some(opts.clone())).await?);
        }
        if clients.is_empty() {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoints".into()));
        }
        Ok(Self {
            clients,
            preferred: AtomicUsize::new(0),
        })
    }

    /// [`Members::call`] for a request that may be sent again whatever
    /// became of it (a read, a lease renewal): also tried again, on the
    /// next member after a short pause, while the cluster is unavailable.
    pub async fn read<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let until = Instant::now() + READ_RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.call(&op).await {
                Err(e) if unavailable(&e) && Instant::now() + pause < until => {
                    let at = self.preferred.load(Ordering::Relaxed);
                    let _ = self.preferred.compare_exchange(
                        at,
                        (at + 1) % self.clients.len(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Runs `op` with the preferred member's client; while it cannot reach
    /// its member, with the next one's, each member once.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let mut tries = 0;
        loop {
            let at = self.preferred.load(Ordering::Relaxed) % n;
            match op(self.clients[at].clone()).await {
                Err(e) if unreachable(&e) && tries + 1 < n => {
                    tries += 1;
                    let next = (at + 1) % n;
                    if self
                        .preferred
                        .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        tracing::warn!(error = %e, "an etcd member cannot be reached; trying the next");
                    }
                }
                other => return other,
            }
        }
    }
}
