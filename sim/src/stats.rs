//! Latency summaries (nearest-rank percentiles over a sorted vector) and rates
//! over event times. A sorted vector is exact and, for at most a few hundred
//! thousand samples, as cheap as a histogram.

use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min_ms: i64,
    pub p50_ms: i64,
    pub p95_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

impl Summary {
    /// The summary of `samples` (any order); `None` when there are none.
    pub fn of(samples: &[i64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Some(Self {
            count: sorted.len(),
            min_ms: *sorted.first()?,
            p50_ms: percentile(&sorted, 50.0)?,
            p95_ms: percentile(&sorted, 95.0)?,
            p99_ms: percentile(&sorted, 99.0)?,
            max_ms: *sorted.last()?,
        })
    }

    /// One line for people: `n=… p50 … p95 … p99 … max …`.
    pub fn line(&self) -> String {
        format!(
            "n={} p50 {} p95 {} p99 {} max {}",
            self.count,
            ms(self.p50_ms),
            ms(self.p95_ms),
            ms(self.p99_ms),
            ms(self.max_ms)
        )
    }
}

/// Milliseconds as people read them: `850 ms`, `12.40 s`.
pub fn ms(v: i64) -> String {
    if v.abs() < 10_000 {
        format!("{v} ms")
    } else {
        format!("{:.2} s", v as f64 / 1000.0)
    }
}

/// Nearest-rank percentile of an ascending slice: the smallest sample with at
/// least `p` % of the samples at or below it. `None` for an empty slice.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The most events in any window of `window_ms` that starts at an event (a
/// sliding window, so a burst split by a fixed bucket edge still counts whole).
pub fn peak_in_window(times_ms: &[i64], window_ms: i64) -> usize {
    let mut sorted = times_ms.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// Events per second over `[first, last]` of `times_ms`; `None` with fewer than
/// two events or no time between them.
pub fn rate_per_s(times_ms: &[i64]) -> Option<f64> {
    let first = times_ms.iter().min()?;
    let last = times_ms.iter().max()?;
    (last > first && times_ms.len() > 1)
        .then(|| times_ms.len() as f64 * 1000.0 / (last - first) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten samples: p95 and p99 are the largest.
        let ten: Vec<i64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 95.0), Some(10));
        assert_eq!(percentile(&ten, 50.0), Some(5));
    }

    #[test]
    fn summaries_sort_their_input() {
        let s = Summary::of(&[30, 10, 20]).unwrap();
        assert_eq!(
            s,
            Summary {
                count: 3,
                min_ms: 10,
                p50_ms: 20,
                p95_ms: 30,
                p99_ms: 30,
                max_ms: 30
            }
        );
        assert!(Summary::of(&[]).is_none());
        assert_eq!(s.line(), "n=3 p50 20 ms p95 30 ms p99 30 ms max 30 ms");
        assert_eq!(ms(12_345), "12.35 s");
    }

    #[test]
    fn the_peak_window_slides() {
        // Five events within one second straddling a bucket edge at 1000.
        assert_eq!(peak_in_window(&[900, 950, 1000, 1050, 1100, 3000], 1000), 5);
        assert_eq!(peak_in_window(&[0, 1000, 2000], 1000), 1);
        assert_eq!(peak_in_window(&[], 1000), 0);
    }

    #[test]
    fn rates_need_a_span() {
        assert_eq!(rate_per_s(&[0, 500, 1000]), Some(3.0));
        assert_eq!(rate_per_s(&[5]), None);
        assert_eq!(rate_per_s(&[5, 5]), None);
    }
}
