//! Places for the dashboard's live streams: so many at once across every
//! browser, and fewer for one signed-in session, so one operator's tabs (or
//! a script holding a session) cannot take every place.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::slots::{KeyedSlot, KeyedSlots};

/// Live streams open at once across every browser.
pub const MAX_STREAMS: usize = 64;
/// Live streams one session may hold open at once.
pub const MAX_PER_SESSION: usize = 8;

/// The places, shared by every page handler.
pub struct Streams {
    all: Arc<Semaphore>,
    by_session: KeyedSlots,
}

/// One stream's place: given back when dropped.
pub struct Slot {
    _all: OwnedSemaphorePermit,
    _session: KeyedSlot,
}

impl Streams {
    pub fn new() -> Self {
        Self {
            all: Arc::new(Semaphore::new(MAX_STREAMS)),
            by_session: KeyedSlots::new(MAX_PER_SESSION),
        }
    }

    /// A place for a stream of `session`, or why there is none.
    pub fn take(&self, session: &str) -> Result<Slot, &'static str> {
        let mine = self
            .by_session
            .take(session)
            .ok_or("too many live pages open in this session: close some")?;
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many live pages open: reload later")?;
        Ok(Slot {
            _all: all,
            _session: mine,
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_takes_its_share_and_gives_it_back() {
        let streams = Streams::new();
        let mine: Vec<Slot> = (0..MAX_PER_SESSION)
            .map(|_| streams.take("a").unwrap())
            .collect();
        assert!(streams.take("a").err().unwrap().contains("this session"));
        // Others still get places, up to the whole.
        let others: Vec<Slot> = (0..MAX_STREAMS - MAX_PER_SESSION)
            .map(|i| streams.take(&format!("s{}", i / MAX_PER_SESSION)).unwrap())
            .collect();
        assert!(streams.take("late").err().unwrap().contains("reload later"));
        drop(mine);
        assert!(streams.take("a").is_ok());
        drop(others);
        assert!(streams.by_session.keys() <= 1);
    }
}
