//! Hooks for a program that runs many agents in one process (the fleet
//! simulator): an observer told when each session opens, ends or fails to open
//! and when the server pushes a desired state, and a slot through which an agent's reports and downloads ride on its session's
//! connection instead of opening their own.
//!
//! Both are off unless [`crate::RunOptions`] sets them. `flotilla-agent run`
//! sets the shared connection; only the simulator sets an observer.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::transport::Channel;

/// What happened to an agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent<'a> {
    /// A session opened: the server took the Hello.
    Opened,
    /// An open session ended (the agent will reconnect, unless the server refused
    /// the node).
    Ended { reason: &'a str },
    /// An attempt to open a session failed before it opened.
    Failed { reason: &'a str },
    /// The server pushed a desired state (before the agent acts on it).
    Desired {
        revision: u64,
        manifests: &'a [flotilla_proto::pb::SignedManifest],
    },
}

/// Called on every [`SessionEvent`] of one agent, on the session's task: it must
/// return quickly.
#[derive(Clone)]
pub struct Observer(Arc<dyn Fn(SessionEvent<'_>) + Send + Sync>);

impl Observer {
    pub fn new(f: impl Fn(SessionEvent<'_>) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn notify(&self, event: SessionEvent<'_>) {
        (self.0)(event)
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

/// The connection of an agent's open session, for its reports and downloads.
///
/// Without it an agent holds up to three TLS connections to the server: the
/// session, a report channel kept open once used, and one per download. A
/// simulator of thousands of agents would run out of file descriptors (and
/// measure handshakes, not the server), so it shares the session's. Empty while
/// no session is open: the agent then opens its own, as without the slot.
#[derive(Clone, Default)]
pub struct SharedChannel(Arc<Mutex<Option<Channel>>>);

impl SharedChannel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The open session's channel, if a session is open.
    pub fn get(&self) -> Option<Channel> {
        // Only a cache of a handle: a poisoned lock still holds a usable one.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, channel: Option<Channel>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = channel;
    }
}

impl fmt::Debug for SharedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedChannel")
            .field("open", &self.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_observer_sees_each_event() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer = Observer::new(move |e| log.lock().unwrap().push(format!("{e:?}")));
        observer.notify(SessionEvent::Opened);
        observer.notify(SessionEvent::Ended { reason: "gone" });
        observer
            .clone()
            .notify(SessionEvent::Failed { reason: "refused" });
        observer.notify(SessionEvent::Desired {
            revision: 3,
            manifests: &[],
        });
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "Opened",
                "Ended { reason: \"gone\" }",
                "Failed { reason: \"refused\" }",
                "Desired { revision: 3, manifests: [] }"
            ]
        );
    }

    #[tokio::test]
    async fn the_shared_channel_is_empty_until_set_and_after_clearing() {
        let slot = SharedChannel::new();
        assert!(slot.get().is_none());
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        slot.clone().set(Some(channel));
        assert!(slot.get().is_some());
        assert!(format!("{slot:?}").contains("open: true"));
        slot.set(None);
        assert!(slot.get().is_none());
    }
}
