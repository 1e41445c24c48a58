//! Webhooks: each gets the events it asked for, in order, as JSON POSTs
//! signed with HMAC-SHA256 over a timestamp and the body. Delivery runs on the
//! leading replica from a cursor kept in the store (`webhook-state/<id>`), so
//! a restart or a new leader goes on where delivery stood: at least once,
//! with ids a receiver de-duplicates by. A receiver that is down is retried
//! with backoff; an event older than the webhook's maximum age is dropped
//! instead, with an audit entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::{Event, http};
use crate::app::App;
use crate::error::{Error, Result};
use crate::model::now_ms;

const PREFIX: &str = "webhooks/";
const STATE_PREFIX: &str = "webhook-state/";
/// Most webhooks a fleet has.
pub const MAX_WEBHOOKS: usize = 64;
/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two tries of one event.
const RETRY_CAP: Duration = Duration::from_secs(300);
/// The header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "flotilla-signature";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    /// Event kinds it gets.
    pub events: Vec<String>,
    /// The HMAC key (the receiver holds it too).
    pub secret: String,
    /// PEM of the CA the receiver's certificate is checked against (empty:
    /// the host's CA bundle).
    #[serde(default)]
    pub ca_pem: String,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// Where delivery to one webhook stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WebhookState {
    /// Every event up to this id was delivered, skipped (not asked for) or
    /// dropped.
    pub delivered: u64,
    /// Failed tries of the next event.
    pub failures: u32,
    pub last_error: String,
    pub last_attempt_ms: i64,
    /// Events dropped for age.
    pub dropped: u64,
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

fn state_key(id: &str) -> String {
    format!("{STATE_PREFIX}{id}")
}

/// The signature header's value for `body` at `t` (Unix seconds).
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The JSON a receiver gets for `e`.
pub fn body(e: &Event) -> Vec<u8> {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    serde_json::to_vec(&serde_json::json!({
        "id": e.id,
        "kind": e.kind,
        "at": at,
        "at_unix_ms": e.at_ms,
        "subject": e.subject,
        "data": e.data,
    }))
    .expect("event serialises")
}

/// Adds a webhook; it gets events from the next one on.
pub async fn add(
    app: &App,
    url: &str,
    events: &[String],
    secret: &str,
    ca_pem: &str,
    by: &str,
) -> Result<WebhookRecord> {
    http::Target::parse(url).map_err(Error::InvalidArgument)?;
    let events = super::parse_kinds(events)?;
    if events.is_empty() {
        return Err(Error::InvalidArgument(
            "name the events the webhook gets (--events deficit,surplus,...)".into(),
        ));
    }
    if secret.len() < 16 {
        return Err(Error::InvalidArgument(
            "the webhook's secret must be at least 16 bytes".into(),
        ));
    }
    if secret.len() > 1024 || ca_pem.len() > 64 * 1024 || url.len() > 2048 {
        return Err(Error::InvalidArgument(
            "secret (1 KiB), CA (64 KiB) or URL (2 KiB) too long".into(),
        ));
    }
    if list(app).await?.len() >= MAX_WEBHOOKS {
        return Err(Error::ResourceExhausted(format!(
            "a fleet has at most {MAX_WEBHOOKS} webhooks"
        )));
    }
    let id = format!("wh-{}", &hex::encode(rand::random::<[u8; 5]>()));
    let rec = WebhookRecord {
        id: id.clone(),
        url: url.to_string(),
        events,
        secret: secret.to_string(),
        ca_pem: ca_pem.to_string(),
        created_at_ms: now_ms(),
        created_by: by.to_string(),
    };
    let state = WebhookState {
        delivered: app.events.newest().await?,
        ..Default::default()
    };
    // The cursor first: a webhook is never seen without one.
    app.db.put(&state_key(&id), &state).await?;
    if !app.db.create(&key(&id), &rec).await? {
        return Err(Error::Internal("webhook id taken; try again".into()));
    }
    Ok(rec)
}

pub async fn list(app: &App) -> Result<Vec<WebhookRecord>> {
    Ok(app.db.list(PREFIX).await?)
}

pub async fn state(app: &App, id: &str) -> Result<WebhookState> {
    Ok(app.db.get(&state_key(id)).await?.unwrap_or_default())
}

pub async fn remove(app: &App, id: &str) -> Result<WebhookRecord> {
    let rec: WebhookRecord = app
        .db
        .get(&key(id))
        .await?
        .ok_or_else(|| Error::NotFound(format!("no webhook {id}")))?;
    app.db.raw().delete(&key(id)).await?;
    app.db.raw().delete(&state_key(id)).await?;
    Ok(rec)
}

/// How often the event log is pruned (a scan of it).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Delivers to every webhook while this replica leads, until `shutdown`; one
/// worker per webhook, so a slow receiver holds up only its own events.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut workers: HashMap<String, (WebhookRecord, CancellationToken)> = HashMap::new();
    let mut pruned = tokio::time::Instant::now();
    loop {
        let wanted = if app.fleet.is_leading() {
            list(&app).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the webhooks");
                workers.values().map(|(r, _)| r.clone()).collect()
            })
        } else {
            Vec::new()
        };
        workers.retain(|id, (rec, stop)| {
            let keep = wanted.iter().any(|w| &w.id == id && w == rec);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for rec in wanted {
            if !workers.contains_key(&rec.id) {
                let stop = shutdown.child_token();
                tokio::spawn(deliver(app.clone(), rec.clone(), stop.clone()));
                workers.insert(rec.id.clone(), (rec, stop));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            prune(&app, workers.is_empty()).await;
        }
    }
}

/// Removes events every webhook is past, once older than the maximum age.
async fn prune(app: &App, none: bool) {
    if !app.fleet.is_leading() {
        return;
    }
    let upto = if none {
        u64::MAX
    } else {
        let mut min = u64::MAX;
        for w in list(app).await.unwrap_or_default() {
            min = min.min(state(app, &w.id).await.map_or(0, |s| s.delivered));
        }
        min
    };
    let before = now_ms() - app.cfg.webhook_max_age.as_millis() as i64;
    if let Err(e) = app.events.prune(upto, before).await {
        tracing::warn!(error = %e, "cannot prune the event log");
    }
}

/// One webhook's deliveries, in order, until `stop`.
async fn deliver(app: Arc<App>, rec: WebhookRecord, stop: CancellationToken) {
    let Ok(target) = http::Target::parse(&rec.url) else {
        return;
    };
    let mut st = match state(&app, &rec.id).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(webhook = %rec.id, error = %e, "cannot read the webhook's cursor");
            return;
        }
    };
    loop {
        if stop.is_cancelled() {
            return;
        }
        let appended = app.events.appended.notified();
        let events = match app.events.after(st.delivered, 100).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(webhook = %rec.id, error = %e, "cannot read the event log");
                Vec::new()
            }
        };
        if events.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = appended => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        for e in events {
            if !rec.events.iter().any(|k| k == &e.kind) {
                st.delivered = e.id;
                continue;
            }
            if !deliver_one(&app, &rec, &target, &e, &mut st, &stop).await {
                return;
            }
        }
        // Skipped events move the cursor too (delivered ones already saved it).
        let _ = save(&app, &rec.id, &st).await;
    }
}

async fn save(app: &App, id: &str, st: &WebhookState) -> Result<()> {
    // A webhook removed meanwhile keeps no cursor.
    if app.db.get::<WebhookRecord>(&key(id)).await?.is_none() {
        return Ok(());
    }
    app.db.put(&state_key(id), st).await?;
    Ok(())
}

/// Delivers `e` (or drops it for age); false when `stop` came first.
async fn deliver_one(
    app: &App,
    rec: &WebhookRecord,
    target: &http::Target,
    e: &Event,
    st: &mut WebhookState,
    stop: &CancellationToken,
) -> bool {
    let body = body(e);
    let max_age = app.cfg.webhook_max_age;
    loop {
        let age = Duration::from_millis((now_ms() - e.at_ms).max(0) as u64);
        if age > max_age {
            tracing::warn!(webhook = %rec.id, event = e.id, kind = %e.kind, "event dropped: older than the webhook's maximum age");
            if let Err(err) = app
                .audit
                .record(
                    "server",
                    crate::audit::Action::WebhookDropped,
                    &rec.id,
                    serde_json::json!({
                        "url": rec.url, "event": e.id, "kind": e.kind,
                        "age_secs": age.as_secs(), "tries": st.failures,
                        "last_error": st.last_error,
                    }),
                )
                .await
            {
                tracing::error!("cannot audit a dropped event: {err}");
                // Not dropped unaudited: tried again on the next pass.
                return true;
            }
            st.delivered = e.id;
            st.dropped += 1;
            st.failures = 0;
            let _ = save(app, &rec.id, st).await;
            return true;
        }
        let t = now_ms() / 1000;
        let headers = [
            (SIGNATURE_HEADER, signature(&rec.secret, t, &body)),
            ("flotilla-event-id", e.id.to_string()),
            ("flotilla-event-kind", e.kind.clone()),
        ];
        st.last_attempt_ms = now_ms();
        match http::post(target, &rec.ca_pem, &headers, body.clone(), POST_TIMEOUT).await {
            Ok(_) => {
                st.delivered = e.id;
                st.failures = 0;
                st.last_error.clear();
                if let Err(err) = save(app, &rec.id, st).await {
                    tracing::warn!(webhook = %rec.id, error = %err, "cannot save the webhook's cursor; the event may be sent again");
                }
                metrics::counter!("flotilla_webhook_deliveries_total", "outcome" => "delivered")
                    .increment(1);
                return true;
            }
            Err(why) => {
                st.failures = st.failures.saturating_add(1);
                st.last_error = why;
                let _ = save(app, &rec.id, st).await;
                metrics::counter!("flotilla_webhook_deliveries_total", "outcome" => "failed")
                    .increment(1);
                // 1 s, 2 s, 4 s ... up to RETRY_CAP.
                let delay = Duration::from_secs(1)
                    .saturating_mul(1 << st.failures.saturating_sub(1).min(16))
                    .min(RETRY_CAP);
                if st.failures == 1 || st.failures.is_power_of_two() {
                    tracing::warn!(webhook = %rec.id, event = e.id, tries = st.failures, error = %st.last_error, "webhook delivery failed; trying again in {}s", delay.as_secs().max(1));
                }
                tokio::select! {
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
