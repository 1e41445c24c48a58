//! Patches on the agent: the artifact fetcher, rebuilding an artifact from a
//! delta and a base the host holds, the durable patch journal, the outbox that
//! reports every phase to the server until it is acknowledged, and the pipeline
//! that walks each offered manifest through them.

pub mod delta;
pub mod fetch;
pub mod journal;
pub mod outbox;
pub mod pipeline;
pub mod report;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::{StateError, Store};
use pipeline::{Offer, Pipeline, PipelineConfig};

/// The running patch machinery of one agent.
pub struct Patches {
    /// Where the session hands each offer (the newest wins).
    pub offers: watch::Sender<Offer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Patches {
    /// Starts the pipeline (which first resumes anything a crash interrupted) and
    /// the report sender.
    pub fn start(store: Store, cfg: PipelineConfig) -> Result<Self, StateError> {
        let journal = journal::Journal::open(store.tree("journal")?);
        let outbox = outbox::Outbox::open(store.tree("outbox")?)
            .map_err(|e| StateError::Patches(e.to_string()))?;
        let reporter =
            report::Reporter::new(store.clone(), cfg.servers.clone(), cfg.source_address)
                .sharing(cfg.shared.clone());
        let textfile = cfg.textfile.clone();
        let sender = tokio::spawn(outbox::run_sender(
            outbox.clone(),
            move |r| {
                let (reporter, textfile) = (reporter.clone(), textfile.clone());
                async move {
                    let sent = reporter.send(r).await;
                    if let (Ok(()), Some(t)) = (&sent, &textfile) {
                        t.reported();
                    }
                    sent
                }
            },
            std::future::pending::<()>(),
        ));
        let (offers, rx) = watch::channel(Offer::default());
        let pipeline = tokio::spawn(Pipeline::new(store, journal, outbox, cfg).run(rx));
        Ok(Self {
            offers,
            tasks: vec![sender, pipeline],
        })
    }

    /// Stops both tasks. A step cut short is resumed (or rolled back) from the
    /// journal at the next start, as after a crash; queued reports stay queued.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
