//! Reconnect delays: exponential backoff with full jitter.
//!
//! When a server restarts, every agent loses its session at the same moment. Full
//! jitter (a delay drawn uniformly from zero to the current ceiling) spreads their
//! reconnects out, so the server does not face a thundering herd; the ceiling doubles
//! on each failed attempt up to a cap, and falls back to the base once a session has
//! proved healthy by staying up for a while.

use std::time::Duration;

use rand::Rng;

/// Ceiling of the first delay.
pub const BASE: Duration = Duration::from_millis(500);
/// Default cap on the ceiling.
pub const DEFAULT_CAP: Duration = Duration::from_secs(30);
/// A session that stayed up at least this long resets the backoff.
pub const RESET_AFTER: Duration = Duration::from_secs(10);

/// Backoff state of one reconnecting session.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Failed attempts since the last reset.
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, DEFAULT_CAP)
    }
}

impl Backoff {
    /// A backoff whose ceiling starts at `base` and never exceeds `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The largest delay the next call to [`Backoff::next_delay`] may return:
    /// `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // 2^31 times any non-zero base already exceeds every sane cap; saturate
        // rather than overflow.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Failed attempts counted since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, drawn uniformly from `[0, ceiling]`; the
    /// ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with a caller's random source (for tests).
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng.random_range(0..=micros))
    }

    /// Back to the base ceiling.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Records that a session ended after being up for `up_for`: a session that
    /// lasted [`RESET_AFTER`] or more proves the server healthy, so the backoff resets.
    /// Returns whether it did.
    pub fn session_ended(&mut self, up_for: Duration) -> bool {
        if up_for >= RESET_AFTER {
            self.reset();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_from_base_until_the_cap() {
        let mut b = Backoff::new(BASE, Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(1);
        let expected_ms = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
        for ms in expected_ms {
            assert_eq!(b.ceiling(), Duration::from_millis(ms));
            b.next_delay_with(&mut rng);
        }
    }

    #[test]
    fn cap_holds_after_very_many_attempts() {
        let mut b = Backoff::new(BASE, Duration::from_secs(7));
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..200 {
            let d = b.next_delay_with(&mut rng);
            assert!(d <= Duration::from_secs(7), "{d:?} exceeds the cap");
        }
        assert_eq!(b.ceiling(), Duration::from_secs(7));
        assert_eq!(b.attempts(), 200);
    }

    #[test]
    fn a_cap_below_the_base_wins() {
        let b = Backoff::new(BASE, Duration::from_millis(100));
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_bounds_and_actually_varies() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = Vec::new();
        for _ in 0..500 {
            let mut b = Backoff::new(BASE, DEFAULT_CAP);
            // Third attempt: ceiling 2 s.
            b.next_delay_with(&mut rng);
            b.next_delay_with(&mut rng);
            let d = b.next_delay_with(&mut rng);
            assert!(d <= Duration::from_secs(2), "{d:?} above the ceiling");
            seen.push(d);
        }
        let min = seen.iter().min().copied().unwrap_or_default();
        let max = seen.iter().max().copied().unwrap_or_default();
        // Full jitter spreads over the whole range, not just near the ceiling.
        assert!(min < Duration::from_millis(200), "smallest delay {min:?}");
        assert!(max > Duration::from_millis(1800), "largest delay {max:?}");
    }

    #[test]
    fn reset_returns_to_the_base() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(16));
        b.reset();
        assert_eq!(b.ceiling(), BASE);
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn only_a_session_that_stayed_up_resets() {
        let mut b = Backoff::default();
        for _ in 0..4 {
            b.next_delay();
        }
        assert!(!b.session_ended(Duration::from_secs(9)));
        assert_eq!(b.ceiling(), Duration::from_secs(8));
        assert!(b.session_ended(RESET_AFTER));
        assert_eq!(b.ceiling(), BASE);
    }
}
