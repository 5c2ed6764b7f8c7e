//! Volatile vectored I/O between file descriptors and guest memory.
//!
//! Guest memory is shared with a running guest (or, in Ferry's synthetic
//! guest, with a worker thread) that may write to it at any moment. Rust's
//! `&[u8]` promises that nobody writes while the reference lives, which guest
//! memory cannot promise; `vm-memory` therefore hands out [`VolatileSlice`]s.
//! The functions here pass those slices to the kernel (`writev`, `readv`)
//! without a staging copy, and give short-lived read-only views for
//! computations whose result is *checked later* (CRC, zero-page detection,
//! digest).
//!
//! # What a concurrent guest write means here
//! A guest write racing with [`with_bytes`] can make a checksum or a zero
//! test describe bytes that are no longer in memory. Ferry tolerates this by
//! design: the dirty log records the write, so the page is sent again in a
//! later round, and a checksum that no longer matches on the destination is
//! answered with a resend request rather than accepted. The final copy is
//! made with the guest paused, where no such race exists, and the whole
//! memory digest is compared before commit.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Largest number of buffers passed to one `writev`/`readv` call
/// (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// Calls `f` with a read-only byte view of `slice`.
///
/// The view lives only for the call. See the module documentation for what a
/// concurrent guest write means for the bytes seen.
pub fn with_bytes<B: BitmapSlice, R>(
    slice: &VolatileSlice<'_, B>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let guard = slice.ptr_guard();
    if slice.is_empty() {
        return f(&[]);
    }
    // SAFETY: `guard` keeps the mapping behind `slice` alive (vm-memory's
    // PtrGuard contract) and `slice.len()` bytes from `guard.as_ptr()` lie
    // inside it, as VolatileSlice guarantees. The memory is initialised
    // (mmap'ed anonymous or file memory). Concurrent writers may exist (the
    // guest); we only read through the view for checks whose result is
    // verified again later, which the module docs explain.
    let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
    f(bytes)
}

/// A writable view was refused because it overlaps one that is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewBusy {
    /// Host address of the refused view.
    pub addr: usize,
    /// Its length.
    pub len: usize,
}

impl std::fmt::Display for ViewBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes of guest memory at host address {:#x} are already being written through another view",
            self.len, self.addr
        )
    }
}

impl std::error::Error for ViewBusy {}

/// Host address ranges `[start, end)` with a live [`with_bytes_mut`] view.
static MUT_VIEWS: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// Removes a range from [`MUT_VIEWS`] when the view ends, also on unwind.
struct MutViewGuard((usize, usize));

impl Drop for MutViewGuard {
    fn drop(&mut self) {
        let mut v = MUT_VIEWS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = v.iter().position(|r| *r == self.0) {
            v.swap_remove(i);
        }
    }
}

/// Calls `f` with a writable byte view of `slice`, so that a decoder (the
/// compression option's decompressor) writes its output straight into guest
/// memory without a staging buffer. The slice's dirty bitmap is marked for the
/// whole slice afterwards, as [`readv_volatile`] does for what it lands.
///
/// Views handed out here never overlap: while one is alive (on any thread),
/// a call for an overlapping range returns [`ViewBusy`] without calling `f`.
///
/// Meant for destination memory, which no guest runs on before commit; see
/// the module documentation for what a concurrent writer through another
/// path (a running guest, `readv`) would mean: unspecified bytes, never a
/// fault, and the chunk's checksum is checked over what landed.
///
/// # Errors
/// [`ViewBusy`] if an overlapping view is alive.
pub fn with_bytes_mut<B: BitmapSlice, R>(
    slice: &VolatileSlice<'_, B>,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R, ViewBusy> {
    let guard = slice.ptr_guard_mut();
    if slice.is_empty() {
        return Ok(f(&mut []));
    }
    let start = guard.as_ptr() as usize;
    let range = (start, start + slice.len());
    {
        let mut v = MUT_VIEWS.lock().unwrap_or_else(|e| e.into_inner());
        if v.iter().any(|&(s, e)| s < range.1 && range.0 < e) {
            return Err(ViewBusy {
                addr: start,
                len: slice.len(),
            });
        }
        v.push(range);
    }
    let _registered = MutViewGuard(range);
    // SAFETY: `guard` keeps the mapping behind `slice` alive (vm-memory's
    // PtrGuardMut contract) and `slice.len()` bytes from `guard.as_ptr()` lie
    // inside it, as VolatileSlice guarantees; the mapping is writable (a
    // VolatileSlice of guest memory) and initialised, and every byte pattern
    // is a valid `u8`. No other view from this function overlaps the range
    // while this one lives: `MUT_VIEWS` refuses overlapping ranges until
    // `_registered` is dropped, which happens after `f` returns or unwinds,
    // and `f` cannot keep the reference beyond the call. Writers outside Rust
    // references (a guest, `readv` by the kernel) are the case the module
    // documentation covers: they can only make the bytes unspecified.
    let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
    let r = f(bytes);
    slice.bitmap().mark_dirty(0, slice.len());
    Ok(r)
}

fn iovecs<B: BitmapSlice>(
    head: &[u8],
    bufs: &[VolatileSlice<'_, B>],
    skip: usize,
) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(bufs.len() + 1);
    let mut skip = skip;
    let mut push = |ptr: *mut u8, len: usize| {
        if skip >= len {
            skip -= len;
            return;
        }
        // SAFETY: `skip < len`, so the offset stays inside the buffer.
        let p = unsafe { ptr.add(skip) };
        out.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: len - skip,
        });
        skip = 0;
    };
    push(head.as_ptr() as *mut u8, head.len());
    for b in bufs {
        push(b.ptr_guard().as_ptr() as *mut u8, b.len());
    }
    out.truncate(MAX_IOVECS);
    out
}

/// Writes `head` followed by `bufs`, skipping the first `skip` bytes of that
/// sequence, with one `writev` call. Returns how many bytes the kernel took.
///
/// Pass the running total of bytes written as `skip` to resume after a short
/// write. Returns `ErrorKind::WouldBlock` on a non-blocking socket that is full.
pub fn writev_volatile<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    head: &[u8],
    bufs: &[VolatileSlice<'_, B>],
    skip: usize,
) -> io::Result<usize> {
    // The guards keep the mappings alive across the system call.
    let _guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
    let iov = iovecs(head, bufs, skip);
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: every iovec points into `head` or into a guest mapping kept
    // alive by `_guards`, with a length inside that buffer; the kernel only
    // reads from them. `iov.len()` is at most IOV_MAX.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads into `bufs` (guest memory), skipping the first `skip` bytes of their
/// concatenation, with one `readv` call. Returns the number of bytes read;
/// `Ok(0)` means end of stream. Dirty bits of the destination bitmap are
/// marked for the bytes written.
pub fn readv_volatile<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    skip: usize,
) -> io::Result<usize> {
    let _guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let iov = iovecs(&[], bufs, skip);
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: every iovec points into a guest mapping kept alive by `_guards`
    // with a length inside it; guest memory is writable (VolatileSlice from a
    // writable mapping) and any byte pattern is a valid value for it.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // Mark what landed as dirty in the destination's bitmap (if it has one).
    let mut left = n;
    let mut skip = skip;
    for b in bufs {
        if left == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let take = (b.len() - skip).min(left);
        b.bitmap().mark_dirty(skip, take);
        left -= take;
        skip = 0;
    }
    Ok(n)
}

/// A memory-management hint for a range of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_HUGEPAGE`: back the range with transparent huge pages. Landing
    /// pages in fresh 4 KiB-backed memory is limited by page-fault cost
    /// (about 2.5 GB/s per core here); huge pages remove most of it.
    HugePages,
    /// `MADV_POPULATE_WRITE` (Linux 5.14+): fault the range in, writable, now,
    /// so that pages landing later do not pay for faults and zeroing.
    PopulateWrite,
}

/// Gives the kernel `advice` for the page-aligned part of `slice`. Neither
/// hint changes the memory's contents.
pub fn advise<B: BitmapSlice>(slice: &VolatileSlice<'_, B>, advice: Advice) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let page = 4096usize;
    let start = guard.as_ptr() as usize;
    let aligned = (start + page - 1) & !(page - 1);
    let end = start + slice.len();
    if aligned >= end {
        return Ok(());
    }
    let flag = match advice {
        Advice::HugePages => libc::MADV_HUGEPAGE,
        Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
    };
    // SAFETY: the range lies inside the mapping kept alive by `guard`;
    // MADV_HUGEPAGE only changes how the kernel backs the range and
    // MADV_POPULATE_WRITE only faults pages in (contents are preserved: a
    // missing anonymous page reads as zero either way), so no memory visible
    // to Rust changes under anyone.
    let r = unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, flag) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 1024)]).unwrap()
    }

    #[test]
    fn writev_sends_head_then_guest_bytes_and_resumes_after_skip() {
        let m = mem();
        m.write_slice(&[7u8; 4096], GuestAddress(0)).unwrap();
        m.write_slice(&[9u8; 4096], GuestAddress(8192)).unwrap();
        let s1 = m.get_slice(GuestAddress(0), 4096).unwrap();
        let s2 = m.get_slice(GuestAddress(8192), 4096).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = writev_volatile(a.as_fd(), b"HEAD", &[s1, s2], 0).unwrap();
        assert_eq!(n, 4 + 8192);
        // Skip into the second buffer: only its tail is written.
        let n2 = writev_volatile(a.as_fd(), b"HEAD", &[s1, s2], 4 + 4096 + 4000).unwrap();
        assert_eq!(n2, 96);
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..4100].iter().all(|&x| x == 7));
        assert!(got[4100..8196].iter().all(|&x| x == 9));
        assert_eq!(got.len(), 8196 + 96);
    }

    #[test]
    fn readv_lands_in_guest_memory_and_with_bytes_sees_it() {
        let m = mem();
        let s1 = m.get_slice(GuestAddress(4096), 100).unwrap();
        let s2 = m.get_slice(GuestAddress(20000), 50).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..150u8).collect();
        a.write_all(&data).unwrap();
        let mut got = 0;
        while got < 150 {
            got += readv_volatile(b.as_fd(), &[s1, s2], got).unwrap();
        }
        with_bytes(&s1, |x| assert_eq!(x, &data[..100]));
        with_bytes(&s2, |x| assert_eq!(x, &data[100..]));
        drop(a);
        assert_eq!(
            readv_volatile(b.as_fd(), &[s1], 0).unwrap(),
            0,
            "EOF reads 0"
        );
    }

    #[test]
    fn with_bytes_mut_writes_guest_memory_and_refuses_overlapping_views() {
        let m = mem();
        let s = m.get_slice(GuestAddress(4096), 8192).unwrap();
        let inner = m.get_slice(GuestAddress(8192), 100).unwrap();
        let apart = m.get_slice(GuestAddress(32768), 100).unwrap();
        let r = with_bytes_mut(&s, |b| {
            b.fill(0xab);
            // A view of an overlapping range is refused while this one lives;
            // one elsewhere is fine.
            let busy = with_bytes_mut(&inner, |_| ()).unwrap_err();
            assert_eq!(busy.len, 100);
            assert!(busy.to_string().contains("already being written"));
            with_bytes_mut(&apart, |x| x[0] = 1).unwrap();
            b.len()
        })
        .unwrap();
        assert_eq!(r, 8192);
        let mut back = [0u8; 8192];
        m.read_slice(&mut back, GuestAddress(4096)).unwrap();
        assert!(back.iter().all(|&x| x == 0xab));
        // The view ended: the range can be written again.
        with_bytes_mut(&inner, |x| x.fill(2)).unwrap();
        with_bytes(&inner, |x| assert!(x.iter().all(|&b| b == 2)));
    }

    #[test]
    fn advice_keeps_contents() {
        let m = mem();
        m.write_slice(&[5u8; 10], GuestAddress(4096)).unwrap();
        let s = m.get_slice(GuestAddress(0), 64 * 1024).unwrap();
        // Kernels without THP return EINVAL; either way no panic and no change.
        let _ = advise(&s, Advice::HugePages);
        advise(&s, Advice::PopulateWrite).unwrap();
        with_bytes(&s, |x| {
            assert!(x[4096..4106].iter().all(|&b| b == 5));
            assert_eq!(x.iter().filter(|&&b| b != 0).count(), 10);
        });
    }
}
