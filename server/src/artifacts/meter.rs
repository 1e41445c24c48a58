//! What this server sends of its artifacts: a cap on artifact bytes per second
//! for all downloads together (`--max-artifact-rate`), and the bytes sent per
//! artifact since it started (patch status shows them per patch).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub struct Meter {
    /// None: no cap.
    limiter: Option<DefaultDirectRateLimiter>,
    /// The cap, bytes per second (the most one chunk may take at once).
    rate: u32,
    sent: Mutex<HashMap<String, u64>>,
}

impl Meter {
    /// A meter capping artifact bytes at `rate` per second (0: no cap), with up
    /// to a second's worth in a burst.
    pub fn new(rate: u32) -> Self {
        let limiter = NonZeroU32::new(rate).map(|r| RateLimiter::direct(Quota::per_second(r)));
        Self {
            limiter,
            rate,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// The most bytes a stream should read for its next chunk (`max` unless
    /// the cap is smaller).
    pub fn chunk(&self, max: usize) -> usize {
        match self.limiter {
            Some(_) => max.min(self.rate as usize).max(1),
            None => max,
        }
    }

    /// Waits until `n` more bytes (at most [`Meter::chunk`]) may go, then
    /// counts them as sent of artifact `sha256`.
    pub async fn send(&self, sha256: &str, n: usize) {
        if let (Some(limiter), Some(cells)) = (&self.limiter, NonZeroU32::new(n as u32)) {
            // `n` never exceeds the burst (see `chunk`): the wait always ends.
            let _ = limiter.until_n_ready(cells).await;
        }
        metrics::counter!("flotilla_artifact_bytes_sent_total").increment(n as u64);
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        match sent.get_mut(sha256) {
            Some(total) => *total += n as u64,
            None => {
                sent.insert(sha256.to_string(), n as u64);
            }
        }
    }

    /// Bytes of artifact `sha256` this server sent since it started.
    pub fn sent(&self, sha256: &str) -> u64 {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.get(sha256).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_counted_per_artifact_and_capped_per_second() {
        let m = Meter::new(10_000);
        assert_eq!(m.chunk(64 * 1024), 10_000);
        let started = tokio::time::Instant::now();
        // A second's burst, then 2 s more at the cap.
        for _ in 0..30 {
            m.send("a", 1_000).await;
        }
        m.send("b", 7).await;
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(1_800),
            "30 kB at 10 kB/s took {:?}",
            started.elapsed()
        );
        assert_eq!((m.sent("a"), m.sent("b"), m.sent("c")), (30_000, 7, 0));
        // No cap: whole chunks, no wait.
        let free = Meter::new(0);
        assert_eq!(free.chunk(64 * 1024), 64 * 1024);
    }
}
