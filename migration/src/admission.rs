//! Before authentication: what a daemon does so that strangers cannot stop
//! it (`ferry listen`'s migration port and its `--metrics` port).
//!
//! * [`accept_retry`]: an accept that fails is never fatal. Out of
//!   descriptors or kernel memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`), the loop waits (10 ms, doubling to 1 s, reset by the next
//!   success) so that it does not spin while nothing can be accepted;
//!   a connection that died in the backlog (`ECONNABORTED`, `EPROTO`, ...)
//!   is skipped at once.
//! * [`Unauthenticated`]: a cap on connections that have not authenticated
//!   yet, overall and per source address. A connection over either is
//!   closed as soon as it is accepted, before anything is read. Each
//!   admitted one holds a [`Slot`] until it authenticates (or ends); the
//!   daemon bounds the whole pre-authentication phase (TLS, hello and
//!   proof) with one deadline (`--handshake-timeout`), so a slot is held
//!   for that long at most.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default of `--max-unauthenticated`.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;
/// Default of `--max-unauthenticated-per-source`.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 8;
/// Default of `--handshake-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait after an accept failed for want of resources.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between accept attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What to do after `accept` failed with `e`: how long to wait before the
/// next attempt (zero: at once), given the previous wait `backoff`
/// (updated; zero after a success). True in the second field when the
/// failure is worth a warning (resources ran out), false for a connection
/// that died before it was accepted.
pub fn accept_retry(e: &std::io::Error, backoff: &mut Duration) -> (Duration, bool) {
    let starved = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if starved {
        *backoff = (*backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        (*backoff, true)
    } else {
        (Duration::ZERO, false)
    }
}

/// The cap on unauthenticated connections actually used: the configured
/// one, but never above a quarter of the descriptors the process may open
/// (the rest stay for authenticated migrations, their data channels and
/// the daemon itself).
pub fn effective_cap(configured: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => configured.min(usize::try_from(n / 4).unwrap_or(usize::MAX).max(1)),
        None => configured,
    }
    .max(1)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// As many unauthenticated connections as `--max-unauthenticated`.
    Total(usize),
    /// As many from this address as `--max-unauthenticated-per-source`.
    PerSource(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(
                f,
                "{n} connections are already authenticating (--max-unauthenticated)"
            ),
            Refusal::PerSource(n) => write!(
                f,
                "{n} connections from this address are already authenticating (--max-unauthenticated-per-source)"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Counts connections that have not authenticated yet.
#[derive(Debug, Clone)]
pub struct Unauthenticated {
    total: usize,
    per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted, not yet authenticated connection; released on drop.
#[derive(Debug)]
pub struct Slot {
    from: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.from);
            }
        }
    }
}

impl Unauthenticated {
    /// At most `total` connections authenticating at once, and at most
    /// `per_source` from one address.
    pub fn new(total: usize, per_source: usize) -> Self {
        Unauthenticated {
            total: total.max(1),
            per_source: per_source.max(1),
            counts: Arc::default(),
        }
    }

    /// The overall cap.
    pub fn total_cap(&self) -> usize {
        self.total
    }

    /// Admits a connection from `from`, or says which cap it hit.
    pub fn admit(&self, from: IpAddr) -> Result<Slot, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.total {
            return Err(Refusal::Total(self.total));
        }
        let n = c.by_source.entry(from).or_insert(0);
        if *n >= self.per_source {
            return Err(Refusal::PerSource(self.per_source));
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            from,
            counts: self.counts.clone(),
        })
    }

    /// Connections authenticating now.
    pub fn in_progress(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// Logs refusals without flooding the log: the first, then one line per
/// `every` (with how many were refused since).
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    last: Option<std::time::Instant>,
    since: u64,
}

impl RefusalLog {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        RefusalLog {
            every,
            last: None,
            since: 0,
        }
    }

    /// Counts one refusal; `Some(n)` when a line is due (n refusals since
    /// the last line, this one included).
    pub fn note(&mut self, now: std::time::Instant) -> Option<u64> {
        self.since += 1;
        match self.last {
            Some(t) if now.duration_since(t) < self.every => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_overall_and_per_source_and_slots_come_back() {
        let u = Unauthenticated::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = u.admit(a).unwrap();
        let a2 = u.admit(a).unwrap();
        assert_eq!(u.admit(a).unwrap_err(), Refusal::PerSource(2));
        let b1 = u.admit(b).unwrap();
        assert_eq!(u.admit(b).unwrap_err(), Refusal::Total(3));
        assert_eq!(u.in_progress(), 3);
        drop(a1);
        let _a3 = u.admit(a).unwrap();
        drop((a2, b1));
        assert_eq!(u.in_progress(), 1);
        assert!(Refusal::Total(3)
            .to_string()
            .contains("--max-unauthenticated"));
    }

    #[test]
    fn resource_errors_back_off_and_dead_connections_do_not() {
        let mut b = Duration::ZERO;
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(accept_retry(&emfile, &mut b), (BACKOFF_MIN, true));
        assert_eq!(accept_retry(&emfile, &mut b).0, BACKOFF_MIN * 2);
        for _ in 0..20 {
            accept_retry(&std::io::Error::from_raw_os_error(libc::ENFILE), &mut b);
        }
        assert_eq!(b, BACKOFF_MAX);
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(accept_retry(&aborted, &mut b), (Duration::ZERO, false));
    }

    #[test]
    fn the_cap_leaves_most_descriptors_to_migrations() {
        assert_eq!(effective_cap(64, Some(128)), 32);
        assert_eq!(effective_cap(64, Some(1 << 20)), 64);
        assert_eq!(effective_cap(64, None), 64);
        assert_eq!(effective_cap(64, Some(2)), 1);
    }

    #[test]
    fn refusals_are_logged_once_per_interval() {
        let mut l = RefusalLog::new(Duration::from_secs(10));
        let t = std::time::Instant::now();
        assert_eq!(l.note(t), Some(1));
        assert_eq!(l.note(t + Duration::from_secs(1)), None);
        assert_eq!(l.note(t + Duration::from_secs(2)), None);
        assert_eq!(l.note(t + Duration::from_secs(11)), Some(3));
    }
}
