//! Which pages of this process's memory are backed, from the kernel's
//! page tables (`PAGEMAP_SCAN`, Linux 6.7+), for the memory report.
//!
//! Reading `/proc/self/pagemap` costs an 8-byte entry per page, built and
//! copied out by the kernel: about 0.016 CPU-seconds per GiB of guest
//! memory on this 2-core VM, paid on both sides of every migration for
//! the summary's resident figure. `PAGEMAP_SCAN` walks the same page
//! tables and returns only ranges, for a fifth of that (docs/performance.md).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PAGE: u64 = 4096;
/// `PAGE_IS_PRESENT` and `PAGE_IS_PFNZERO` (linux/fs.h).
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct page_region` (linux/fs.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;

/// Bytes of the pages overlapping host addresses `start..end` of this
/// process that are present in memory and are not the shared zero page
/// (which reading untouched anonymous memory maps, at no cost): what the
/// range costs in memory. `Ok(None)` when the kernel has no `PAGEMAP_SCAN`
/// (before Linux 6.7): read `/proc/self/pagemap` instead. Unmapped parts
/// of the range count as nothing.
pub fn backed_bytes(start: usize, end: usize) -> io::Result<Option<u64>> {
    let (mut at, end) = (
        start as u64 / PAGE * PAGE,
        (end as u64).div_ceil(PAGE) * PAGE,
    );
    if at >= end {
        return Ok(Some(0));
    }
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut regions = vec![PageRegion::default(); 256];
    let mut bytes = 0u64;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            // Present, and not the zero page.
            category_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
            category_inverted: PAGE_IS_PFNZERO,
            return_mask: PAGE_IS_PRESENT,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` with its size set, living
        // across the call; the kernel writes at most `vec_len` regions into
        // `regions` (which has that many) and updates `arg.walk_end`. The
        // scan reads page tables only: no memory of the scanned range is
        // read, written or faulted in.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let n = usize::try_from(n).unwrap_or(0).min(regions.len());
        bytes += regions[..n]
            .iter()
            .map(|r| r.end.saturating_sub(r.start))
            .sum::<u64>();
        if arg.walk_end <= at {
            break; // no progress: never loop
        }
        at = arg.walk_end;
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn counts_written_pages_not_untouched_or_only_read_ones() {
        let len = 64 * PAGE as usize;
        let m: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        let base = m.get_host_address(GuestAddress(0)).unwrap() as usize;
        let Some(untouched) = backed_bytes(base, base + len).unwrap() else {
            return; // a kernel before 6.7: callers fall back to pagemap reads
        };
        assert_eq!(untouched, 0);
        // Reading maps the shared zero page: still no cost.
        let mut page = vec![0u8; PAGE as usize];
        for p in 0..64 {
            let s = m.get_slice(GuestAddress(p * PAGE), PAGE as usize).unwrap();
            crate::vio::copy_out(&s, &mut page);
        }
        assert_eq!(backed_bytes(base, base + len).unwrap(), Some(0));
        // Written pages count, a part page at either end counts whole.
        m.write_slice(&[1], GuestAddress(3 * PAGE + 5)).unwrap();
        m.write_slice(&[1; 8192], GuestAddress(10 * PAGE)).unwrap();
        assert_eq!(backed_bytes(base, base + len).unwrap(), Some(3 * PAGE));
        assert_eq!(
            backed_bytes(base + 3 * 4096 + 1, base + 3 * 4096 + 2).unwrap(),
            Some(PAGE)
        );
        assert_eq!(
            backed_bytes(base + 4 * 4096, base + 10 * 4096).unwrap(),
            Some(0)
        );
        assert_eq!(backed_bytes(base, base).unwrap(), Some(0));
    }
}
