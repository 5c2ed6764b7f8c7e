//! TCP socket settings and queries, a thread setting and a process limit
//! that std and tokio do not expose.
//!
//! * [`set_keepalive`] and [`set_user_timeout`]: a peer that vanishes
//!   (host down, cable cut, no FIN or RST ever) is noticed by the kernel
//!   and the socket fails, instead of holding its descriptor forever.
//! * [`raise_nofile_limit`]: the daemon takes the descriptors it is allowed
//!   (soft limit up to the hard one) at start.
//!
//! The compression option uses the send-queue depth to tell whether the link
//! is about to go idle: while the kernel still holds enough unacknowledged
//! bytes, the sender can wait for a compressed chunk; when the queue runs low
//! it sends the next chunk raw instead, so the network never waits on a core.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Bytes in the socket's send queue: written by the application but not yet
/// acknowledged by the peer (sent or not). Linux `SIOCOUTQ`.
pub fn send_queue_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ on Linux) writes one c_int through the
    // pointer, which points to `n`, alive for the call; `fd` is a valid open
    // descriptor for the borrow's lifetime. On a non-TCP descriptor the
    // kernel returns an error, which we report.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is one c_int read from `value`, alive for
    // the call, with its exact size passed; `fd` is an open descriptor for
    // the borrow's lifetime. A wrong level/name or a non-socket fd is an
    // error return, which we report.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast::<libc::c_void>(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn secs(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// TCP keepalive on a socket: the first probe after `idle` without
/// traffic, then one every `interval`, the connection failing after
/// `probes` unanswered ones (each at least 1 s).
pub fn set_keepalive(
    fd: BorrowedFd<'_>,
    idle: std::time::Duration,
    interval: std::time::Duration,
    probes: u32,
) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle))?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(interval))?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        i32::try_from(probes.max(1)).unwrap_or(i32::MAX),
    )
}

/// `TCP_USER_TIMEOUT`: the connection fails when data it sent stays
/// unacknowledged (or keepalive probes unanswered) for `timeout`.
pub fn set_user_timeout(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// Reads a TCP socket option (tests and diagnostics).
pub fn get_tcp_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one c_int) to `v` and
    // the length to `len`, both alive for the call; `fd` is open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut i32).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` to the pointer, which points to
    // `lim`, alive for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// The soft `RLIMIT_NOFILE` of this process: how many descriptors it may
/// have open.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(nofile()?.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` of this process to its hard limit;
/// returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` from the pointer, which
        // points to `want`, alive for the call; raising the soft limit up
        // to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } < 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Lowers the scheduling priority of the calling thread (Linux: `nice` is
/// per thread) to `nice` (0..=19). Compression workers run niced so that,
/// on a machine with few cores, the threads that move bytes on the socket
/// win the CPU and compression only uses what is left.
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative thread id"))?;
    // SAFETY: setpriority only changes the scheduling weight of thread `who`,
    // which is the calling thread; it touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice.clamp(0, 19)) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn send_queue_counts_unacknowledged_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        assert_eq!(send_queue_bytes(a.as_fd()).unwrap(), 0);
        a.write_all(&[5u8; 1000]).unwrap();
        // Loopback acknowledges on arrival in the peer's receive queue, so
        // the count drops to zero quickly; it is never above what we wrote.
        assert!(send_queue_bytes(a.as_fd()).unwrap() <= 1000);
        let mut buf = [0u8; 1000];
        b.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 5));
        // A non-socket descriptor is an error, not a crash.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(send_queue_bytes(f.as_fd()).is_err());
    }

    #[test]
    fn keepalive_and_user_timeout_are_set() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_keepalive(
            a.as_fd(),
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(5),
            3,
        )
        .unwrap();
        set_user_timeout(a.as_fd(), std::time::Duration::from_secs(30)).unwrap();
        let get = |level, name| get_tcp_option(a.as_fd(), level, name).unwrap();
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 10);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 5);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 30_000);
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(set_user_timeout(f.as_fd(), std::time::Duration::from_secs(1)).is_err());
    }

    #[test]
    fn the_nofile_limit_is_raised_to_the_hard_one() {
        let n = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_nofile_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(n, lim.rlim_cur);
        assert_eq!(nofile_limit().unwrap(), n);
    }

    #[test]
    fn a_thread_can_lower_its_own_priority() {
        std::thread::spawn(|| {
            set_current_thread_nice(5).unwrap();
            // SAFETY: getpriority reads no memory of ours; errno is reset
            // first because -1 is a valid return value.
            let p = unsafe {
                *libc::__errno_location() = 0;
                libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
            };
            assert!(p >= 5, "nice is {p}");
        })
        .join()
        .unwrap();
    }
}
