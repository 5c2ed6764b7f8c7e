//! CPU time used by this process and by the calling thread, for the
//! accounting in migration summaries (CPU seconds per GiB on each side).

use std::io;
use std::time::Duration;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time spent running this process's own code.
    pub user: Duration,
    /// Time the kernel spent on its behalf (system calls, page faults).
    pub system: Duration,
}

impl CpuTimes {
    /// User plus system.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// `self - earlier`, saturating at zero.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

fn rusage(who: libc::c_int) -> io::Result<CpuTimes> {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage the call fills in; `who` is
    // one of the RUSAGE_* constants.
    let r = unsafe { libc::getrusage(who, &mut ru) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CpuTimes {
        user: timeval(ru.ru_utime),
        system: timeval(ru.ru_stime),
    })
}

/// CPU time of the whole process so far, every thread included
/// (`getrusage(RUSAGE_SELF)`).
pub fn process_times() -> io::Result<CpuTimes> {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of the calling thread so far (`getrusage(RUSAGE_THREAD)`).
pub fn thread_times() -> io::Result<CpuTimes> {
    rusage(libc::RUSAGE_THREAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_work_shows_in_thread_and_process_time() {
        let p0 = process_times().unwrap();
        let t0 = thread_times().unwrap();
        // Spin until this thread has used 30 ms of CPU (getrusage counts
        // in ticks or better): the thread's clock must move, and the
        // process's must have moved at least as much.
        let mut x = 0u64;
        let mut t1 = CpuTimes::default();
        while t1.total() < Duration::from_millis(30) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            t1 = thread_times().unwrap().since(&t0);
        }
        let p1 = process_times().unwrap().since(&p0);
        assert!(p1.total() >= t1.total(), "{p1:?} < {t1:?}");
    }
}
