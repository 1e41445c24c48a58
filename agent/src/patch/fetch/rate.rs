//! The minimum-rate judge: bytes received over a sliding window, kept as a few
//! (time, running total) samples.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::FetchLimits;

/// Bytes received over a sliding window.
pub(super) struct RateWindow {
    window: Duration,
    /// Bytes a window must hold; 0 disables the floor.
    floor: u64,
    started: Instant,
    total: u64,
    pub(super) samples: VecDeque<(Instant, u64)>,
    /// When the newest sample's bucket opened; samples within a bucket merge.
    bucket_opened: Instant,
}

impl RateWindow {
    pub(super) fn new(limits: &FetchLimits, now: Instant) -> Self {
        let floor = u128::from(limits.min_rate) * limits.rate_window.as_millis() / 1000;
        Self {
            window: limits.rate_window,
            floor: u64::try_from(floor).unwrap_or(u64::MAX),
            started: now,
            total: 0,
            samples: VecDeque::from([(now, 0)]),
            bucket_opened: now,
        }
    }

    /// The latest a chunk may arrive, read from `now`; `None` without a floor.
    pub(super) fn read_by(&self, now: Instant) -> Option<Instant> {
        (self.floor > 0).then(|| now + self.window)
    }

    pub(super) fn record(&mut self, now: Instant, bytes: u64) {
        self.total += bytes;
        // The first sample stays put; later ones within an eighth of a window merge,
        // which bounds the samples to about nine per window.
        let merge = self.samples.len() > 1 && now < self.bucket_opened + self.window / 8;
        match self.samples.back_mut() {
            Some(back) if merge => *back = (now, self.total),
            _ => {
                self.samples.push_back((now, self.total));
                self.bucket_opened = now;
            }
        }
    }

    /// `Err(bytes in the last window)` when a whole window has passed and it holds
    /// fewer bytes than the floor.
    pub(super) fn check(&mut self, now: Instant) -> Result<(), u64> {
        if self.floor == 0 || now < self.started + self.window {
            return Ok(());
        }
        let boundary = now - self.window;
        while self.samples.len() >= 2 && self.samples[1].0 <= boundary {
            self.samples.pop_front();
        }
        let base = self.samples.front().map_or(0, |s| s.1);
        let in_window = self.total - base;
        if in_window < self.floor {
            Err(in_window)
        } else {
            Ok(())
        }
    }

    pub(super) fn rate(&self, bytes: u64) -> u64 {
        let ms = self.window.as_millis().max(1);
        u64::try_from(u128::from(bytes) * 1000 / ms).unwrap_or(u64::MAX)
    }
}

/// The ceiling: spaces chunks out so a download takes at most `rate` bytes/s,
/// with up to a second's worth in a burst (a virtual schedule, as in GCRA: each
/// chunk moves the time the next may start by its length over the rate).
pub(super) struct Throttle {
    rate: u64,
    /// When the bytes received so far would have been allowed to finish.
    next: Instant,
}

/// Burst a throttled download may take at once, as time at the rate.
const BURST: Duration = Duration::from_secs(1);

impl Throttle {
    /// `rate` bytes per second; 0 is no limit.
    pub(super) fn new(rate: u64, now: Instant) -> Self {
        Self { rate, next: now }
    }

    /// Counts `bytes` received at `now`; the time to wait until before reading
    /// more, when it is later than `now`.
    pub(super) fn after(&mut self, now: Instant, bytes: u64) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        let cost = Duration::from_nanos(
            u64::try_from(u128::from(bytes) * 1_000_000_000 / u128::from(self.rate))
                .unwrap_or(u64::MAX),
        );
        // Time not used (a stall, a slow disk) is not saved up: the burst is
        // the only allowance ahead of the schedule.
        self.next = self.next.max(now) + cost;
        let wait_until = self.next.checked_sub(BURST).unwrap_or(self.next);
        (wait_until > now).then_some(wait_until)
    }
}
