//! Handing the next item to a streaming answer's reader, with a deadline: a
//! reader that stops reading (while its connection still answers pings)
//! ends its stream and gives back what the stream holds.

use std::time::Duration;

use tokio::sync::mpsc;

/// How a hand-off ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Queued for the reader.
    Taken,
    /// The reader is gone (the stream was dropped or reset).
    ReaderGone,
    /// The reader took nothing within the deadline.
    Stalled,
}

/// Queues `item` for `tx`'s reader, waiting at most `within` for room.
pub async fn hand<T>(tx: &mpsc::Sender<T>, item: T, within: Duration) -> Handed {
    match tokio::time::timeout(within, tx.send(item)).await {
        Ok(Ok(())) => Handed::Taken,
        Ok(Err(_)) => Handed::ReaderGone,
        Err(_) => Handed::Stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_that_stops_reading_is_told_apart_from_one_gone() {
        let (tx, mut rx) = mpsc::channel(1);
        let within = Duration::from_millis(50);
        assert_eq!(hand(&tx, 1, within).await, Handed::Taken);
        assert_eq!(hand(&tx, 2, within).await, Handed::Stalled);
        assert_eq!(rx.recv().await, Some(1));
        drop(rx);
        assert_eq!(hand(&tx, 3, within).await, Handed::ReaderGone);
    }
}
