//! A TCP socket query and a thread setting that std and tokio do not expose.
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
