//! CPU time a migration costs on each side, for the summary, `--json`
//! and benchmarks: what a migration takes from the guests that share the
//! host.
//!
//! A [`CpuMeter`] is started when a migration starts (the source's connect,
//! the destination's accepted offer) and read when it ends (after the
//! source's audit; at the destination's commit). It counts the whole
//! process (`getrusage(RUSAGE_SELF)`: every thread, compression workers,
//! TLS and the kernel's work for the process, page faults included) and
//! subtracts what the guest's own threads used meanwhile (the synthetic
//! guest's worker: [`GuestControl::cpu_time`](crate::guest::GuestControl::cpu_time)),
//! so the figure is Ferry's own work. Filling the synthetic guest before
//! the migration and checking its pages after it lie outside the window.
//! A destination daemon running several migrations at once counts all of
//! them in each one's figure (they share the process).

use std::time::Duration;

use ferry_ffi::cpu::{process_times, CpuTimes};
use serde::Serialize;

/// CPU seconds one side spent on a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuUse {
    /// The process's user time over the migration, seconds.
    pub user_s: f64,
    /// The process's system time over the migration, seconds.
    pub system_s: f64,
    /// The guest's own threads (the synthetic guest's worker), seconds:
    /// part of the process's time, not Ferry's.
    pub guest_s: f64,
    /// Ferry's own work: user + system - guest, seconds.
    pub ferry_s: f64,
    /// `ferry_s` per GiB of page bytes moved (0 when none moved).
    pub ferry_s_per_gib: f64,
    /// Of `ferry_s`, seconds the source's audit after the commit took (its
    /// worker threads' CPU time; 0 on the destination): a second pass over
    /// all of memory after the guest's pause, not part of the transfer.
    pub audit_s: f64,
    /// Of `ferry_s`, seconds the destination spent populating fresh guest
    /// memory where pages were about to land (`MADV_POPULATE_WRITE`: page
    /// allocation and zeroing by the kernel; 0 on the source): what a
    /// destination whose memory is already backed does not pay.
    pub first_touch_s: f64,
}

/// Measures [`CpuUse`] from a start point.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    process: Option<CpuTimes>,
    guest: Duration,
}

impl CpuMeter {
    /// Starts measuring now; `guest` is the guest threads' CPU time so far.
    pub fn start(guest: Duration) -> Self {
        CpuMeter {
            process: process_times().ok(),
            guest,
        }
    }

    /// What the process used since [`CpuMeter::start`], less the guest's
    /// threads (`guest`: their CPU time now), per GiB of `bytes` moved.
    /// All zero when the process's times cannot be read.
    pub fn finish(&self, guest: Duration, bytes: u64) -> CpuUse {
        let (Some(start), Ok(now)) = (self.process, process_times()) else {
            return CpuUse::default();
        };
        let used = now.since(&start);
        let guest_s = guest.saturating_sub(self.guest).as_secs_f64();
        let ferry_s = (used.total().as_secs_f64() - guest_s).max(0.0);
        let gib = bytes as f64 / f64::from(1u32 << 30);
        CpuUse {
            user_s: used.user.as_secs_f64(),
            system_s: used.system.as_secs_f64(),
            guest_s,
            ferry_s,
            ferry_s_per_gib: if bytes > 0 { ferry_s / gib } else { 0.0 },
            audit_s: 0.0,
            first_touch_s: 0.0,
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s ({:.2} s/GiB; user {:.2} s, system {:.2} s",
            self.ferry_s, self.ferry_s_per_gib, self.user_s, self.system_s
        )?;
        if self.audit_s > 0.0 {
            write!(f, "; of it the audit {:.2} s", self.audit_s)?;
        }
        if self.first_touch_s > 0.0 {
            write!(
                f,
                "; of it populating fresh memory {:.2} s",
                self.first_touch_s
            )?;
        }
        if self.guest_s > 0.0 {
            write!(f, "; the guest's {:.2} s excluded", self.guest_s)?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_in_the_window_is_counted_and_the_guest_s_is_not() {
        let m = CpuMeter::start(Duration::from_secs(1));
        let t0 = ferry_ffi::cpu::thread_times().unwrap();
        let mut x = 0u64;
        while ferry_ffi::cpu::thread_times().unwrap().since(&t0).total() < Duration::from_millis(40)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let all = m.finish(Duration::from_secs(1), 1 << 30);
        assert!(all.user_s + all.system_s >= 0.04, "{all:?}");
        assert_eq!(all.guest_s, 0.0);
        assert!((all.ferry_s - (all.user_s + all.system_s)).abs() < 1e-9);
        assert!((all.ferry_s_per_gib - all.ferry_s).abs() < 1e-9);
        // 10 ms of it was the guest's: excluded.
        let less = m.finish(Duration::from_millis(1010), 2 << 30);
        assert!((less.guest_s - 0.01).abs() < 1e-9, "{less:?}");
        assert!(less.ferry_s <= less.user_s + less.system_s - 0.0099);
        assert!((less.ferry_s_per_gib - less.ferry_s / 2.0).abs() < 1e-9);
        assert_eq!(m.finish(Duration::ZERO, 0).ferry_s_per_gib, 0.0);
    }
}
