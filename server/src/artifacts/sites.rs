//! The per-site cap on downloads at once (`--max-site-downloads`): a store's
//! servers share one thin uplink, so only so many of them download from this
//! server at a time; the others are told to try again, which their agents do
//! with backoff (a failure that may pass).

use crate::slots::{KeyedSlot, KeyedSlots};

/// Downloads in flight per site (`group/site`).
pub struct SiteSlots {
    max: usize,
    slots: KeyedSlots,
}

/// One download's place in its site's count; given back when dropped (the
/// stream ended, however).
pub type SiteSlot = KeyedSlot;

impl Default for SiteSlots {
    fn default() -> Self {
        Self::new(0)
    }
}

impl SiteSlots {
    /// At most `max` downloads at once per site (0: no cap).
    pub fn new(max: u32) -> Self {
        let max = max as usize;
        Self {
            max,
            slots: KeyedSlots::new(if max == 0 { usize::MAX } else { max }),
        }
    }

    /// A slot for one more download at `site`, or None when its downloads are
    /// at the cap (and the cap is on).
    pub fn take(&self, site: &str) -> Option<SiteSlot> {
        self.slots.take(site)
    }

    /// Downloads in flight at `site` now.
    pub fn in_flight(&self, site: &str) -> usize {
        self.slots.held(site)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_holds_at_most_its_cap_and_slots_come_back() {
        let slots = SiteSlots::new(2);
        let a = slots.take("store/berlin").unwrap();
        let _b = slots.take("store/berlin").unwrap();
        assert!(slots.take("store/berlin").is_none(), "the third waits");
        let _other = slots
            .take("store/paris")
            .expect("another site is not held back");
        assert_eq!(slots.in_flight("store/berlin"), 2);
        drop(a);
        assert_eq!(slots.in_flight("store/berlin"), 1);
        assert!(slots.take("store/berlin").is_some());
        let free = SiteSlots::new(0);
        let held: Vec<_> = (0..100).map(|_| free.take("x").unwrap()).collect();
        assert_eq!(free.in_flight("x"), 100);
        drop(held);
        assert_eq!(free.in_flight("x"), 0);
    }
}
