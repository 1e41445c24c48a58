//! Prometheus metrics: the recorder, the fleet's gauges taken fresh at each
//! scrape, and `GET /metrics` over plain HTTP on a port of its own
//! (`--metrics-listen`, off by default). Counters and histograms are
//! recorded where things happen (reports, publishes, artifact bytes,
//! connections refused or closed by the limits, failed joins and operator
//! calls); they are no-ops while no recorder is installed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::gauge;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// Scrapes answered at once; more wait.
const MAX_SCRAPES: usize = 8;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one scrape's connection may last in all, reading the answer
/// included: a peer that never reads keeps no slot for longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The process's recorder, once installed.
static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the process's recorder (once) and returns its handle.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("flotilla_sessions", "agent sessions this server holds");
    describe_gauge!("flotilla_nodes", "nodes by group, status, role and online");
    describe_gauge!(
        "flotilla_group_desired",
        "a group's desired count (managed groups)"
    );
    describe_gauge!(
        "flotilla_group_deficit",
        "healthy active nodes a group lacks"
    );
    describe_gauge!(
        "flotilla_group_surplus",
        "healthy nodes a group has beyond its desired count"
    );
    describe_gauge!("flotilla_rollouts", "rollouts by state");
    describe_gauge!(
        "flotilla_rollout_nodes",
        "a rollout's nodes: targeted, released, committed, failed"
    );
    describe_gauge!(
        "flotilla_certificate_expiry_timestamp_seconds",
        "when the server's certificate and the CA expire"
    );
    describe_counter!("flotilla_reports_total", "agent reports recorded, by phase");
    describe_counter!(
        "flotilla_artifact_bytes_sent_total",
        "artifact bytes this server sent"
    );
    describe_counter!(
        "flotilla_connections_refused_total",
        "connections refused by the admission limits, by reason"
    );
    describe_counter!(
        "flotilla_join_failures_total",
        "joins refused for their secret (unknown token, wrong secret, a node key's proof that failed)"
    );
    describe_counter!(
        "flotilla_join_refused_total",
        "joins answered \"too many failed joins\" (the source's or the token's allowance used up)"
    );
    describe_counter!(
        "flotilla_auth_failures_total",
        "operator calls refused for their credential or role"
    );
    describe_histogram!(
        "flotilla_publish_seconds",
        "time to publish a patch (checks, store, push)"
    );
    describe_histogram!(
        "flotilla_push_seconds",
        "from a change to a node's desired state to its leaving for the node"
    );
    describe_histogram!(
        "flotilla_store_seconds",
        "time of each store operation, by op"
    );
    describe_counter!(
        "flotilla_store_errors_total",
        "store operations that failed, by op"
    );
    describe_counter!(
        "flotilla_webhook_deliveries_total",
        "webhook POSTs, by outcome"
    );
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("cannot accept a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let (handle, app) = (handle.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let (handle, app) = (handle.clone(), app.clone());
                async move { Ok::<_, Infallible>(answer(&req, &handle, &app).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!("metrics connection: {e}"),
                Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_TIMEOUT:?}"),
                Ok(Ok(())) => {}
            }
        });
    }
}

async fn answer<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    app: &App,
) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            refresh(app).await;
            (StatusCode::OK, handle.render())
        }
        (&hyper::Method::GET, _) => (StatusCode::NOT_FOUND, "only /metrics here\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into()),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Sets the gauges from the fleet as it is now.
async fn refresh(app: &App) {
    gauge!("flotilla_sessions").set(app.fleet.held().count() as f64);
    let mut nodes: BTreeMap<(String, &'static str, &'static str, bool), u32> = BTreeMap::new();
    if let Ok(all) = app.fleet.nodes(None).await {
        for (n, online, _) in &all {
            let role = match n.role {
                crate::model::Role::Active => "active",
                crate::model::Role::Standby => "standby",
            };
            *nodes
                .entry((n.group.clone(), n.status.as_str(), role, *online))
                .or_default() += 1;
        }
    }
    for ((group, status, role, online), count) in nodes {
        gauge!("flotilla_nodes", "group" => group, "status" => status, "role" => role,
            "online" => if online { "true" } else { "false" })
        .set(f64::from(count));
    }
    for g in app.fleet.group_statuses(None).await.unwrap_or_default() {
        let desired = g.desired.map_or(0.0, f64::from);
        gauge!("flotilla_group_desired", "group" => g.name.clone()).set(desired);
        gauge!("flotilla_group_deficit", "group" => g.name.clone()).set(f64::from(g.deficit));
        let surplus = g.desired.map_or(0, |d| g.healthy_active.saturating_sub(d));
        gauge!("flotilla_group_surplus", "group" => g.name.clone()).set(f64::from(surplus));
    }
    let mut states: BTreeMap<String, u32> = ["running", "paused", "aborted", "completed"]
        .into_iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for r in app.fleet.rollout_infos().await {
        *states.entry(r.state.as_str().to_string()).or_default() += 1;
        let sum = |f: fn(&crate::fleet::RolloutGroup) -> u32| r.groups.iter().map(f).sum::<u32>();
        for (what, n) in [
            ("targeted", sum(|g| g.targeted)),
            ("released", sum(|g| g.released)),
            ("committed", sum(|g| g.committed)),
            ("failed", sum(|g| g.failed)),
        ] {
            gauge!("flotilla_rollout_nodes", "patch" => r.patch_id.clone(), "nodes" => what)
                .set(f64::from(n));
        }
    }
    for (state, n) in states {
        gauge!("flotilla_rollouts", "state" => state).set(f64::from(n));
    }
    let paths = crate::ca::TlsPaths::in_dir(&app.cfg.data_dir);
    for (which, pem) in [
        ("ca", Some(app.ca.cert_pem().to_string())),
        ("server", std::fs::read_to_string(&paths.server_cert).ok()),
    ] {
        let facts = pem
            .and_then(|pem| flotilla_proto::tls::first_pem_der(&pem).ok())
            .and_then(|der| crate::tls::cert_facts(&der).ok());
        if let Some(f) = facts {
            gauge!("flotilla_certificate_expiry_timestamp_seconds", "certificate" => which)
                .set(f.not_after as f64);
        }
    }
}
