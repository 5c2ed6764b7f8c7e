//! `--bandwidth-limit`: one token bucket shared by every data channel of a
//! migration, so the cap holds for the migration as a whole whatever the
//! number of channels. Wire bytes (headers, run tables, compressed or raw
//! payload) are what is counted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How early a write may start before its bytes are due: slack for timer
/// granularity, small enough that the rate holds even over a few chunks.
const SLACK: Duration = Duration::from_millis(20);

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
    /// writing them: until they are due at the cap, the bytes booked before
    /// them included (less [`SLACK`]). Idle time earns no credit, so no burst
    /// ever exceeds the cap. Pure bookkeeping, so it is tested without
    /// sleeping.
    pub fn book(&self, bytes: u64, now: Instant) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = match *next {
            Some(n) if n > now => n,
            _ => now,
        };
        let done = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next = Some(done);
        done.checked_sub(SLACK)
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// How long the bytes booked so far take to drain at the cap: while
    /// it exceeds a sender's idle margin, the cap (not the socket) is what
    /// the link waits for, and a compression pipeline has time to compress.
    pub fn backlog(&self, now: Instant) -> Duration {
        self.next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::ZERO, |n| n.saturating_duration_since(now))
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

    fn close(d: Duration, secs: f64) -> bool {
        (d.as_secs_f64() - secs).abs() < 1e-3
    }

    #[test]
    fn bookings_are_due_at_the_rate_and_idle_time_earns_nothing() {
        let l = RateLimiter::new(1_000_000);
        let t0 = Instant::now();
        // 100 kB at 1 MB/s: due after 100 ms, written 20 ms early.
        let w = l.book(100_000, t0);
        assert!(close(w, 0.080), "{w:?}");
        // The next ones queue behind it.
        let w = l.book(100_000, t0);
        assert!(close(w, 0.180), "{w:?}");
        let w = l.book(100_000, t0);
        assert!(close(w, 0.280), "{w:?}");
        // 10 s idle later: no 10 s of credit, the same pace.
        let later = t0 + Duration::from_secs(10);
        let w = l.book(1_000_000, later);
        assert!(close(w, 0.980), "{w:?}");
        let b = l.backlog(later);
        assert!(close(b, 1.0), "{b:?}");
        assert_eq!(l.backlog(later + Duration::from_secs(2)), Duration::ZERO);
    }

    #[test]
    fn sustained_rate_is_the_cap() {
        // 1000 chunks of 4 MiB against 40 MB/s: the last is written when
        // all of them are due, less the slack.
        let l = RateLimiter::new(40_000_000);
        let t0 = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..1000 {
            last = l.book(4 << 20, t0);
        }
        let ideal = 1000.0 * (4 << 20) as f64 / 40e6;
        assert!(close(last, ideal - 0.020), "{last:?} vs {ideal}");
    }
}
