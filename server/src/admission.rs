//! Admission control: how fast the server takes new connections. Every
//! connection costs a TLS handshake (the server's most expensive step per
//! agent), so after a restart thousands of agents arriving together are let in
//! at a steady rate instead of all at once; the rest wait in the kernel's
//! accept queue and are taken in turn (the agents' backoff with jitter spreads
//! them too).

use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Most connections let in back to back before the rate applies.
const BURST_SECS: f64 = 0.25;

/// A token bucket: `rate` connections per second, bursts of a quarter second's worth.
#[derive(Debug)]
pub struct Admission {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Admission {
    /// `per_sec` 0 means no limit.
    pub fn new(per_sec: u32) -> Self {
        let rate = f64::from(per_sec);
        let burst = (rate * BURST_SECS).max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// How long the next connection must wait (zero: now), taking its token.
    pub fn delay(&mut self, now: Instant) -> Duration {
        if self.rate == 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`).
/// Admission makes them wait there during a reconnect storm: tokio's default of
/// 1024 overflowed at 3,000–6,000 arrivals a second and reset connections.
const LISTEN_BACKLOG: u32 = 8192;

/// Listens on `addr` with a queue sized for a fleet arriving at once.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted server must get its address back while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The listener's connections, at most `per_sec` a second (0: no limit), each
/// taken or refused by the connection limits.
pub fn incoming(
    listener: TcpListener,
    per_sec: u32,
    limits: std::sync::Arc<crate::connections::Registry>,
) -> impl Stream<Item = std::io::Result<crate::connections::LimitedStream>> {
    futures::stream::unfold(
        (listener, Admission::new(per_sec), limits, None::<Instant>),
        |(listener, mut admission, limits, mut logged)| async move {
            loop {
                let wait = admission.delay(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let conn = match listener.accept().await {
                    Ok((stream, _)) => {
                        // Small gRPC frames (heartbeats, pushes) must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        match limits.admit(stream) {
                            Some(s) => Ok(s),
                            // Refused: closed as it is dropped; take the next.
                            None => continue,
                        }
                    }
                    // Out of descriptors, or a connection gone before it was
                    // taken: an error here would end the server's accept
                    // loop, so it is logged (at most every ten seconds) and
                    // the next one is taken after a pause.
                    Err(e) => {
                        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!("cannot accept a connection: {e}");
                            logged = Some(Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                return Some((conn, (listener, admission, limits, logged)));
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut a = Admission::new(100);
        // 25 tokens of burst: the first 25 go at once.
        for _ in 0..25 {
            assert_eq!(a.delay(t0), Duration::ZERO);
        }
        // Then one every 10 ms: the next waits 10 ms, the one after 20 ms.
        assert_eq!(a.delay(t0), Duration::from_millis(10));
        let d = a.delay(t0);
        assert!((d.as_secs_f64() - 0.020).abs() < 1e-9, "{d:?}");
        // A quiet second refills the burst, not more.
        let later = t0 + Duration::from_secs(5);
        for _ in 0..25 {
            assert_eq!(a.delay(later), Duration::ZERO);
        }
        assert!(a.delay(later) > Duration::ZERO);
    }

    #[test]
    fn zero_means_no_limit() {
        let t0 = Instant::now();
        let mut a = Admission::new(0);
        for _ in 0..10_000 {
            assert_eq!(a.delay(t0), Duration::ZERO);
        }
    }

    #[tokio::test]
    async fn incoming_lets_connections_in() {
        use futures::StreamExt;
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = crate::connections::Registry::new(crate::connections::Limits {
            max_connections: 16,
            max_per_source: 0,
            max_pending_per_source: 16,
            max_pending: 16,
            pending_timeout: Duration::from_secs(30),
        });
        let mut conns = Box::pin(incoming(listener, 1000, limits));
        let clients: Vec<_> = (0..3)
            .map(|_| tokio::spawn(TcpStream::connect(addr)))
            .collect();
        for _ in 0..3 {
            let c = tokio::time::timeout(Duration::from_secs(5), conns.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(c.tcp().nodelay().unwrap());
        }
        for c in clients {
            c.await.unwrap().unwrap();
        }
    }
}
