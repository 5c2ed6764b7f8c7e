//! Guest memory access without Rust references to memory someone else
//! may be writing.
//!
//! Guest memory is shared with a running guest (or, in Ferry's synthetic
//! guest, with a worker thread) that may write to it at any moment, and on
//! the destination with the kernel (`readv`) and the NIC (RDMA WRITE) of
//! other data channels. A Rust `&[u8]` promises that nobody writes while it
//! lives, and `&mut [u8]` that nobody else reads or writes: a data race on
//! either is undefined behaviour whatever is checked afterwards. `vm-memory`
//! therefore hands out [`VolatileSlice`]s, and this module is the only place
//! that turns them into something else. The rules:
//!
//! * **Source memory is only ever copied.** [`copy_out`] copies guest
//!   memory into a private buffer with one opaque copy (`rep movsb` in
//!   inline assembly on x86-64, volatile word reads elsewhere), which the
//!   compiler cannot reason about and the hardware performs as ordinary
//!   loads: a racing guest write gives some mix of old and new bytes in the
//!   copy, never undefined behaviour. Zero tests, page hashes, compression
//!   and encryption all work on that copy. [`read_pieces`] does the same for
//!   a long range through a small reusable buffer.
//! * **The kernel reads and writes guest memory directly** ([`writev_volatile`],
//!   [`Claim::readv`]): the zero-copy TCP path. The kernel's copies are not
//!   Rust accesses.
//! * **Destination memory is written and read through a [`Claim`].** Before
//!   any byte of a chunk lands, the receiver claims every page range the
//!   chunk names ([`claim`]). Claims are exclusive process-wide: while one
//!   is alive an overlapping claim is refused ([`Busy`]), so no other
//!   landing (another data channel, a replayed frame) writes those pages.
//!   Destination memory has no running guest before commit, so inside a
//!   claim the holder is the only writer and may take `&mut [u8]` views
//!   (decompression and TLS decrypting straight into guest memory) and
//!   `&[u8]` views (hashing what landed). Memory a NIC may write at any time
//!   (registered for RDMA remote write) is hashed through [`copy_out`]
//!   instead.
//!
//! A claim is not a lock on memory the guest runs on: never claim source
//! memory (nothing in Ferry does; the source only copies).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Largest number of buffers passed to one `writev`/`readv` call
/// (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// Copies `len` bytes from `src` to `dst` with one copy the compiler cannot
/// see into.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and
/// the ranges must not overlap. `src` may be written concurrently by others
/// (a guest): the copy then holds some mix of old and new bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn opaque_copy(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies rcx
    // bytes from [rsi] to [rdi] forwards (the direction flag is clear on
    // entry to inline assembly, as the Rust ABI requires) and touches no
    // other memory, no stack and no flags. The assembly block is opaque:
    // the compiler makes no assumption about the bytes it reads, so a
    // concurrent writer of `src` is a hardware-level race with a defined
    // (if unspecified) outcome, not a Rust data race.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn opaque_copy(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { volatile_copy(dst, src, len) }
}

/// The portable form of the opaque copy: volatile reads, a word at a time
/// where the source is aligned.
///
/// # Safety
/// As [`opaque_copy`].
unsafe fn volatile_copy(dst: *mut u8, src: *const u8, len: usize) {
    let mut i = 0usize;
    // Head bytes up to 8-byte alignment of the source.
    let head = (src as usize).wrapping_neg() & 7;
    while i < len.min(head) {
        // SAFETY: i < len: inside both ranges (caller's guarantee).
        unsafe { dst.add(i).write(src.add(i).read_volatile()) };
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: i + 8 <= len keeps the read and the write inside both
        // ranges; src + i is 8-byte aligned (after the head); the write may
        // be unaligned and says so.
        unsafe {
            let w = src.add(i).cast::<u64>().read_volatile();
            dst.add(i).cast::<u64>().write_unaligned(w);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        unsafe { dst.add(i).write(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// How [`copy_out_with`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// The default: `rep movsb` on x86-64 (fast-string microcode, near
    /// `memcpy` speed), volatile reads elsewhere.
    Opaque,
    /// Volatile word reads on every architecture (for comparison).
    Volatile,
}

/// Copies the start of `src` (guest memory, possibly being written) into
/// `dst`: `min(src.len(), dst.len())` bytes, returned. See the module
/// documentation: this is how Ferry reads source guest memory.
pub fn copy_out<B: BitmapSlice>(src: &VolatileSlice<'_, B>, dst: &mut [u8]) -> usize {
    copy_out_with(CopyMethod::Opaque, src, dst)
}

/// [`copy_out`] with an explicit method (benchmarks compare them).
pub fn copy_out_with<B: BitmapSlice>(
    method: CopyMethod,
    src: &VolatileSlice<'_, B>,
    dst: &mut [u8],
) -> usize {
    let n = src.len().min(dst.len());
    if n == 0 {
        return 0;
    }
    let guard = src.ptr_guard();
    // SAFETY: `guard` keeps the mapping behind `src` alive (vm-memory's
    // PtrGuard contract) and `n <= src.len()` bytes from `guard.as_ptr()`
    // lie inside it; `dst` is a private buffer of at least `n` bytes, which
    // cannot overlap guest memory (a `&mut [u8]` to it exists). Concurrent
    // writers of the source are what the opaque copy is for.
    unsafe {
        match method {
            CopyMethod::Opaque => opaque_copy(dst.as_mut_ptr(), guard.as_ptr(), n),
            CopyMethod::Volatile => volatile_copy(dst.as_mut_ptr(), guard.as_ptr(), n),
        }
    }
    n
}

/// Reads `slice` through `buf` (grown to `piece` bytes if shorter): copies
/// one piece at a time with [`copy_out`] and calls `f(offset, bytes)` on it,
/// stopping at the first error. The copy is the only access to guest memory.
pub fn read_pieces<B: BitmapSlice, E>(
    slice: &VolatileSlice<'_, B>,
    buf: &mut Vec<u8>,
    piece: usize,
    mut f: impl FnMut(usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let piece = piece.max(1);
    if buf.len() < piece {
        buf.resize(piece, 0);
    }
    let mut off = 0usize;
    while off < slice.len() {
        let n = piece.min(slice.len() - off);
        let Ok(part) = slice.subslice(off, n) else {
            break;
        };
        copy_out(&part, &mut buf[..n]);
        f(off, &buf[..n])?;
        off += n;
    }
    Ok(())
}

/// A claim was refused because it overlaps one that is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// Host address of the first refused range.
    pub addr: usize,
    /// Its length.
    pub len: usize,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes of guest memory at host address {:#x} are being landed by another chunk",
            self.len, self.addr
        )
    }
}

impl std::error::Error for Busy {}

/// A range was used through a claim that does not cover it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotClaimed {
    /// Host address of the range.
    pub addr: usize,
    /// Its length.
    pub len: usize,
}

impl std::fmt::Display for NotClaimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes of guest memory at host address {:#x} are outside the landing claim",
            self.len, self.addr
        )
    }
}

impl std::error::Error for NotClaimed {}

/// Host address ranges `start -> end` under a live [`Claim`], process-wide.
static CLAIMS: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn claims() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
    CLAIMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive right to land bytes in some ranges of guest memory, until
/// dropped (also on unwind or when its task is cancelled). See the module
/// documentation.
#[derive(Debug)]
pub struct Claim {
    /// Sorted, non-overlapping `(start, end)` host address ranges.
    ranges: Vec<(usize, usize)>,
}

/// Claims every range of `slices` (guest memory no guest runs on: the
/// destination's) for landing. Ranges of one claim may touch but not
/// overlap each other.
///
/// # Errors
/// [`Busy`] when a range overlaps a live claim (or another range of the
/// same call): nothing is claimed.
pub fn claim<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> Result<Claim, Busy> {
    let mut ranges: Vec<(usize, usize)> = slices
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let start = s.ptr_guard().as_ptr() as usize;
            (start, start + s.len())
        })
        .collect();
    ranges.sort_unstable();
    let busy = |&(s, e): &(usize, usize)| Busy {
        addr: s,
        len: e - s,
    };
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(busy(&w[1]));
    }
    let mut all = claims();
    for r in &ranges {
        // The live claim starting last before this range's end overlaps it
        // if it ends after this range's start.
        if all.range(..r.1).next_back().is_some_and(|(_, &e)| e > r.0) {
            return Err(busy(r));
        }
    }
    for &(s, e) in &ranges {
        all.insert(s, e);
    }
    Ok(Claim { ranges })
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut all = claims();
        for (s, _) in &self.ranges {
            all.remove(s);
        }
    }
}

impl Claim {
    fn check<B: BitmapSlice>(&self, s: &VolatileSlice<'_, B>) -> Result<(), NotClaimed> {
        let start = s.ptr_guard().as_ptr() as usize;
        let end = start + s.len();
        let i = self.ranges.partition_point(|r| r.0 <= start);
        let inside = s.is_empty()
            || i.checked_sub(1)
                .is_some_and(|i| self.ranges[i].0 <= start && end <= self.ranges[i].1);
        if inside {
            Ok(())
        } else {
            Err(NotClaimed {
                addr: start,
                len: s.len(),
            })
        }
    }

    /// Calls `f` with a read-only view of `slice`, which must lie inside the
    /// claim. Nobody else lands in it while the claim lives, and this claim's
    /// own writes ([`Claim::with_bytes_mut`], [`Claim::readv`]) need `&mut
    /// self`, so the bytes cannot change under the view.
    ///
    /// # Errors
    /// [`NotClaimed`] if `slice` is not inside the claim.
    pub fn with_bytes<B: BitmapSlice, R>(
        &self,
        slice: &VolatileSlice<'_, B>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, NotClaimed> {
        self.check(slice)?;
        if slice.is_empty() {
            return Ok(f(&[]));
        }
        let guard = slice.ptr_guard();
        // SAFETY: `guard` keeps the mapping alive and `slice.len()` bytes
        // from its pointer lie inside it (VolatileSlice's guarantee); the
        // memory is initialised. The range is inside this claim, so no
        // other landing writes it (claims are exclusive process-wide), and
        // this claim's writers need `&mut self`, which the `&self` borrow
        // for the call excludes. Destination memory has no running guest;
        // memory a NIC may write is not read this way (module docs).
        let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
        Ok(f(bytes))
    }

    /// Calls `f` with a writable view of `slice`, which must lie inside the
    /// claim (a decoder or a TLS session writes straight into guest memory).
    /// The slice's dirty bitmap is marked afterwards.
    ///
    /// # Errors
    /// [`NotClaimed`] if `slice` is not inside the claim.
    pub fn with_bytes_mut<B: BitmapSlice, R>(
        &mut self,
        slice: &VolatileSlice<'_, B>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, NotClaimed> {
        self.check(slice)?;
        if slice.is_empty() {
            return Ok(f(&mut []));
        }
        let guard = slice.ptr_guard_mut();
        // SAFETY: as in `with_bytes`; the range is writable guest memory and
        // every byte pattern is a valid `u8`. `&mut self` makes this the only
        // view through this claim for the call, and no other claim covers
        // the range, so the reference is unique while it lives; `f` cannot
        // keep it beyond the call.
        let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
        let r = f(bytes);
        slice.bitmap().mark_dirty(0, slice.len());
        Ok(r)
    }

    /// Reads from `fd` into `bufs` (inside the claim), skipping the first
    /// `skip` bytes of their concatenation, with one `readv`: the kernel
    /// copies straight into guest memory. Returns the number of bytes read;
    /// `Ok(0)` means end of stream. Dirty bits are marked for what landed.
    ///
    /// # Errors
    /// The system call's error; `InvalidInput` (wrapping [`NotClaimed`]) if
    /// a buffer is outside the claim.
    pub fn readv<B: BitmapSlice>(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[VolatileSlice<'_, B>],
        skip: usize,
    ) -> io::Result<usize> {
        for b in bufs {
            self.check(b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        }
        readv_volatile(fd, bufs, skip)
    }
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
/// marked for the bytes written. Landing goes through [`Claim::readv`].
fn readv_volatile<B: BitmapSlice>(
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

/// The part of `[start, start + len)` from its first page boundary on, as
/// `(aligned start, end)`; none when no page boundary is inside.
fn page_aligned(start: usize, len: usize) -> Option<(usize, usize)> {
    let page = 4096usize;
    let aligned = (start + page - 1) & !(page - 1);
    let end = start + len;
    (aligned < end).then_some((aligned, end))
}

/// Gives the kernel `advice` for the page-aligned part of `slice`. Neither
/// hint changes the memory's contents.
pub fn advise<B: BitmapSlice>(slice: &VolatileSlice<'_, B>, advice: Advice) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let Some((aligned, end)) = page_aligned(guard.as_ptr() as usize, slice.len()) else {
        return Ok(());
    };
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

/// Populates, as [`Advice::PopulateWrite`] does, only the pages of the
/// page-aligned part of `slice` that have no page in this process yet
/// (`mincore`), one call per stretch of them. Memory that is already backed
/// (a VMM that preallocates guest memory, a page landing a second time)
/// then costs one scan of its page tables per call, where
/// `MADV_POPULATE_WRITE` walks the fault path for every page even when it
/// is present: on this 2-core VM 0.09-0.12 CPU-s per GiB already present,
/// against under 0.001 for the scan (docs/performance.md). A page mapped
/// to the shared zero page counts as present (its first write faults, as
/// without this call). `present` is scratch space (one byte per page).
/// Returns how many pages were asked for.
pub fn populate_missing<B: BitmapSlice>(
    slice: &VolatileSlice<'_, B>,
    present: &mut Vec<u8>,
) -> io::Result<usize> {
    let guard = slice.ptr_guard();
    let Some((aligned, end)) = page_aligned(guard.as_ptr() as usize, slice.len()) else {
        return Ok(0);
    };
    let page = 4096usize;
    let pages = (end - aligned).div_ceil(page);
    present.clear();
    present.resize(pages, 0);
    // SAFETY: mincore only reads this process's page tables for the range,
    // which lies inside the mapping kept alive by `guard`, and writes one
    // byte per page of it into `present`, which holds exactly `pages` bytes.
    let r = unsafe {
        libc::mincore(
            aligned as *mut libc::c_void,
            end - aligned,
            present.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut asked = 0;
    let mut i = 0;
    while i < pages {
        if present[i] & 1 != 0 {
            i += 1;
            continue;
        }
        let j = (i..pages).find(|&j| present[j] & 1 != 0).unwrap_or(pages);
        let from = aligned + i * page;
        let to = (aligned + j * page).min(end);
        // SAFETY: as in `advise`: the range lies inside the mapping kept
        // alive by `guard`, and MADV_POPULATE_WRITE only faults pages in
        // without changing what they read as.
        let r = unsafe {
            libc::madvise(
                from as *mut libc::c_void,
                to - from,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        asked += j - i;
        i = j;
    }
    Ok(asked)
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
    fn populate_missing_asks_only_for_pages_not_backed_yet() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        // Pages 3 and 10..13 written: backed. Nothing else is.
        m.write_slice(&[1u8; 4096], GuestAddress(3 * 4096)).unwrap();
        m.write_slice(&[2u8; 3 * 4096], GuestAddress(10 * 4096))
            .unwrap();
        let mut present = Vec::new();
        let s = m.get_slice(GuestAddress(0), 16 * 4096).unwrap();
        assert_eq!(populate_missing(&s, &mut present).unwrap(), 16 - 4);
        // Now all of it is backed: nothing to ask for, contents unchanged.
        assert_eq!(populate_missing(&s, &mut present).unwrap(), 0);
        let mut back = vec![0u8; 16 * 4096];
        m.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back[3 * 4096..4 * 4096].iter().all(|&b| b == 1));
        assert!(back[10 * 4096..13 * 4096].iter().all(|&b| b == 2));
        assert!(back[..3 * 4096].iter().all(|&b| b == 0));
        assert!(back[13 * 4096..].iter().all(|&b| b == 0));
        // The rest of the mapping was left alone.
        let rest = m.get_slice(GuestAddress(16 * 4096), 48 * 4096).unwrap();
        assert_eq!(populate_missing(&rest, &mut present).unwrap(), 48);
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

    fn bytes(s: &VolatileSlice<'_, ()>) -> Vec<u8> {
        let mut v = vec![0u8; s.len()];
        assert_eq!(copy_out(s, &mut v), s.len());
        v
    }

    #[test]
    fn readv_lands_in_claimed_guest_memory_and_refuses_unclaimed_buffers() {
        let m = mem();
        let s1 = m.get_slice(GuestAddress(4096), 100).unwrap();
        let s2 = m.get_slice(GuestAddress(20000), 50).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..150u8).collect();
        a.write_all(&data).unwrap();
        let mut c = claim(&[s1, s2]).unwrap();
        let mut got = 0;
        while got < 150 {
            got += c.readv(b.as_fd(), &[s1, s2], got).unwrap();
        }
        assert_eq!(bytes(&s1), &data[..100]);
        assert_eq!(c.with_bytes(&s2, <[u8]>::to_vec).unwrap(), &data[100..]);
        let outside = m.get_slice(GuestAddress(40000), 10).unwrap();
        let e = c.readv(b.as_fd(), &[outside], 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("outside the landing claim"), "{e}");
        drop(a);
        assert_eq!(c.readv(b.as_fd(), &[s1], 0).unwrap(), 0, "EOF reads 0");
    }

    #[test]
    fn claims_are_exclusive_until_dropped_and_views_stay_inside_them() {
        let m = mem();
        let s = m.get_slice(GuestAddress(4096), 8192).unwrap();
        let inner = m.get_slice(GuestAddress(8192), 100).unwrap();
        let touching = m.get_slice(GuestAddress(12288), 4096).unwrap();
        let apart = m.get_slice(GuestAddress(32768), 100).unwrap();
        let mut c = claim(&[s]).unwrap();
        // Overlapping claims are refused (whole or in part), touching and
        // distant ones are fine.
        let busy = claim(&[apart, inner]).unwrap_err();
        assert_eq!(busy.len, 100);
        assert!(busy.to_string().contains("being landed by another chunk"));
        assert!(claim(&[apart]).is_ok(), "a refused claim took nothing");
        let t = claim(&[touching]).unwrap();
        // One call's own ranges may not overlap either.
        assert!(claim(&[apart, apart]).is_err());
        c.with_bytes_mut(&s, |b| b.fill(0xab)).unwrap();
        assert!(c
            .with_bytes(&inner, |b| b.iter().all(|&x| x == 0xab))
            .unwrap());
        let e = c.with_bytes(&apart, |_| ()).unwrap_err();
        assert!(e.to_string().contains("outside the landing claim"), "{e}");
        assert!(c.with_bytes_mut(&touching, |_| ()).is_err());
        drop(c);
        drop(t);
        // Released: the range can be claimed again.
        let mut c = claim(&[inner]).unwrap();
        c.with_bytes_mut(&inner, |x| x.fill(2)).unwrap();
        drop(c);
        assert!(bytes(&inner).iter().all(|&b| b == 2));
        let mut back = [0u8; 8192];
        m.read_slice(&mut back, GuestAddress(4096)).unwrap();
        assert_eq!(back.iter().filter(|&&x| x == 0xab).count(), 8192 - 100);
    }

    #[test]
    fn claims_are_exclusive_across_threads() {
        let m = std::sync::Arc::new(mem());
        let s = m.get_slice(GuestAddress(0), 16384).unwrap();
        let held = claim(&[s]).unwrap();
        let m2 = m.clone();
        let refused = std::thread::spawn(move || {
            let part = m2.get_slice(GuestAddress(12288), 4096).unwrap();
            claim(&[part]).is_err()
        })
        .join()
        .unwrap();
        assert!(refused);
        drop(held);
    }

    #[test]
    fn copies_see_guest_bytes_with_either_method_at_any_alignment() {
        let m = mem();
        let pattern: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_slice(&pattern, GuestAddress(3)).unwrap();
        for method in [CopyMethod::Opaque, CopyMethod::Volatile] {
            for (off, len) in [(3usize, 9000usize), (4, 13), (11, 4096), (3, 1), (8, 0)] {
                let s = m.get_slice(GuestAddress(off as u64), len).unwrap();
                let mut out = vec![0u8; len + 5];
                assert_eq!(copy_out_with(method, &s, &mut out), len);
                assert_eq!(
                    &out[..len],
                    &pattern[off - 3..off - 3 + len],
                    "{method:?} {off}+{len}"
                );
                assert!(out[len..].iter().all(|&b| b == 0), "nothing past the slice");
            }
        }
        // A short destination takes what fits.
        let s = m.get_slice(GuestAddress(3), 100).unwrap();
        let mut small = [0u8; 10];
        assert_eq!(copy_out(&s, &mut small), 10);
        assert_eq!(&small, &pattern[..10]);
        // read_pieces walks the whole slice in order through the buffer.
        let s = m.get_slice(GuestAddress(3), 9000).unwrap();
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        read_pieces::<_, ()>(&s, &mut buf, 4096, |off, b| {
            assert_eq!(off, seen.len());
            seen.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, pattern);
        assert_eq!(buf.len(), 4096);
    }

    #[test]
    fn a_copy_racing_a_writer_is_some_mix_of_whole_writes() {
        // A writer flips a page between two fills while copies run: every
        // copied byte is one of the two fills, and nothing misbehaves.
        let m = std::sync::Arc::new(mem());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m2, stop2) = (m.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut fill = 0u8;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                fill ^= 0xff;
                m2.write_slice(&[fill; 4096], GuestAddress(0)).unwrap();
            }
        });
        let s = m.get_slice(GuestAddress(0), 4096).unwrap();
        let mut out = vec![0u8; 4096];
        for _ in 0..2000 {
            copy_out(&s, &mut out);
            assert!(out.iter().all(|&b| b == 0 || b == 0xff));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn advice_keeps_contents() {
        let m = mem();
        m.write_slice(&[5u8; 10], GuestAddress(4096)).unwrap();
        let s = m.get_slice(GuestAddress(0), 64 * 1024).unwrap();
        // Kernels without THP return EINVAL; either way no panic and no change.
        let _ = advise(&s, Advice::HugePages);
        advise(&s, Advice::PopulateWrite).unwrap();
        let x = bytes(&s);
        assert!(x[4096..4106].iter().all(|&b| b == 5));
        assert_eq!(x.iter().filter(|&&b| b != 0).count(), 10);
    }
}
