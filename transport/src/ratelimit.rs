//! `--bandwidth-limit`: one token bucket shared by every data channel of a
//! migration, so the cap holds for the migration as a whole whatever the
//! number of channels. Wire bytes (headers, run tables, compressed or raw
//! payload) are what is counted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far ahead of the average a burst may run: short enough that the rate
/// holds over any second, long enough that a 4 MiB chunk is not split.
const BURST: Duration = Duration::from_millis(50);

/// A shared byte-rate limiter (virtual-time token bucket).
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    /// When the bytes granted so far will have drained at `rate`.
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            next: Mutex::new(None),
        }
    }

    /// The cap, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Books `bytes` and returns how long the caller must wait before
    /// writing them. Pure bookkeeping, so it is tested without sleeping.
    pub fn book(&self, bytes: u64, now: Instant) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        // Idle time earns at most one burst of credit.
        let start = match *next {
            Some(n) if n + BURST > now => n,
            _ => now.checked_sub(BURST).unwrap_or(now),
        };
        let done = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next = Some(done);
        // Write once the bytes booked before these have drained.
        start.saturating_duration_since(now)
    }

    /// Waits until `bytes` more may go on the wire.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.book(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookings_space_out_at_the_rate_and_idle_time_earns_one_burst() {
        let l = RateLimiter::new(1_000_000);
        let t0 = Instant::now();
        // First chunk: a burst of credit, no wait.
        assert_eq!(l.book(100_000, t0), Duration::ZERO);
        // 100 kB at 1 MB/s = 100 ms; the next may go 50 ms early.
        let w = l.book(100_000, t0);
        assert!((w.as_secs_f64() - 0.050).abs() < 1e-3, "{w:?}");
        // A third booked at once waits for both before it (less the burst).
        let w = l.book(100_000, t0);
        assert!((w.as_secs_f64() - 0.150).abs() < 1e-3, "{w:?}");
        // 10 s idle later: no wait, and no 10 s of credit either.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.book(1_000_000, later), Duration::ZERO);
        let w = l.book(1, later);
        assert!((w.as_secs_f64() - 0.950).abs() < 1e-3, "{w:?}");
    }

    #[test]
    fn sustained_rate_is_the_cap() {
        // 1000 chunks of 4 MiB against 40 MB/s: the last may start no
        // earlier than (total - burst) / rate.
        let l = RateLimiter::new(40_000_000);
        let t0 = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..1000 {
            last = l.book(4 << 20, t0);
        }
        let ideal = 999.0 * (4 << 20) as f64 / 40e6;
        assert!(
            (last.as_secs_f64() - ideal).abs() < 0.1,
            "{last:?} vs {ideal}"
        );
    }
}
