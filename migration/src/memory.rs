//! Guest memory on both sides: `vm-memory`'s `GuestMemoryMmap`.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    MmapRegion,
};

use crate::error::{MigrationError, Result};
use ferry_transport::{MemoryLayout, PAGE_SIZE};

/// Source guest memory: writes through `vm-memory` mark an [`AtomicBitmap`],
/// which is what rust-vmm VMMs use for device writes during migration.
pub type SourceMemory = GuestMemoryMmap<AtomicBitmap>;
/// Destination guest memory.
pub type DestMemory = GuestMemoryMmap<()>;

/// Where the x86 PCI hole starts: guests above 3 GiB get a second region at 4 GiB.
const LOW_MEM_END: u64 = 3 << 30;
const HIGH_MEM_START: u64 = 4 << 30;

/// The layout of a guest of `size` bytes as a VMM would lay it out on x86:
/// one region up to 3 GiB, and the rest from 4 GiB.
pub fn default_layout(size: u64) -> Result<MemoryLayout> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MigrationError::Config(format!(
            "guest memory size {size} must be a non-zero multiple of 4 KiB"
        )));
    }
    let mut regions = vec![ferry_transport::layout::RegionDesc {
        gpa: 0,
        size: size.min(LOW_MEM_END),
    }];
    if size > LOW_MEM_END {
        regions.push(ferry_transport::layout::RegionDesc {
            gpa: HIGH_MEM_START,
            size: size - LOW_MEM_END,
        });
    }
    Ok(MemoryLayout {
        page_size: PAGE_SIZE,
        regions,
    })
}

fn ranges(layout: &MemoryLayout) -> Result<Vec<(GuestAddress, usize)>> {
    layout
        .regions
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|s| (GuestAddress(r.gpa), s))
                .map_err(|_| {
                    MigrationError::Config(format!("region size {} does not fit this host", r.size))
                })
        })
        .collect()
}

fn map<B: vm_memory::bitmap::NewBitmap>(layout: &MemoryLayout) -> Result<GuestMemoryMmap<B>> {
    GuestMemoryMmap::<B>::from_ranges(&ranges(layout)?).map_err(|e| {
        MigrationError::Memory(format!(
            "cannot map {} bytes of guest memory: {e}",
            layout.total_bytes()
        ))
    })
}

/// Maps source guest memory with a dirty bitmap.
pub fn source_memory(layout: &MemoryLayout) -> Result<SourceMemory> {
    map(layout)
}

/// Maps destination guest memory. Nothing is touched up front: a page
/// costs memory only when data lands in it (zero pages never travel, and
/// destination memory starts zeroed), and the page faults happen as pages
/// land, overlapping the transfer, in proportion to the data rather than
/// the guest's size. (Earlier versions backed it with transparent huge
/// pages and pre-faulted all of it on a thread: a mostly-zero guest then
/// cost its whole size here, and on a 2-core host the pre-faulting thread
/// competed with the receivers: a 2 GiB guest of data moved at 2.1-2.7
/// Gbit/s with it and 2.6-6.1 without, alternating runs on a loaded host.)
pub fn dest_memory(layout: &MemoryLayout) -> Result<DestMemory> {
    map(layout)
}

/// How the destination's guest memory is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous 4 KiB pages, each allocated and zeroed by the kernel where
    /// a page first lands (the default; [`dest_memory`]).
    #[default]
    Anonymous,
    /// 2 MiB pages from the kernel's hugetlb pool (`vm.nr_hugepages`), as
    /// VMMs back guests for speed (QEMU `-mem-path /dev/hugepages`, Cloud
    /// Hypervisor `hugepages=on`): one page-table entry per 2 MiB, no
    /// compaction, and pool pages that stay with the pool (and backed) when
    /// a guest's memory is unmapped. The whole guest is reserved from the
    /// pool when it is mapped, so a pool too small is refused then, never
    /// found out as pages land ([`dest_memory_backed`]).
    HugeTlb,
}

/// Huge page size of [`Backing::HugeTlb`].
pub const HUGE_PAGE: u64 = 2 << 20;

/// The 2 MiB hugetlb pool: (pages in it, free, reserved by mappings that
/// have not faulted them yet), from sysfs; `None` where the kernel has no
/// such pool.
pub fn hugetlb_pool() -> Option<(u64, u64, u64)> {
    let dir = std::path::Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    Some((
        read("nr_hugepages")?,
        read("free_hugepages")?,
        read("resv_hugepages")?,
    ))
}

/// What the pool can still give a new mapping, in pages, and a sentence
/// saying how it stands (for error messages).
fn hugetlb_pool_state() -> (u64, String) {
    match hugetlb_pool() {
        Some((total, free, resv)) => (
            free.saturating_sub(resv),
            format!(
                "the pool has {} of its {total} pages free and not reserved (vm.nr_hugepages = {total})",
                free.saturating_sub(resv)
            ),
        ),
        None => (0, "this kernel has no 2 MiB hugetlb pool".into()),
    }
}

/// Maps destination guest memory for `layout`, backed as `backing` says.
/// With [`Backing::HugeTlb`] every region must be a whole number of 2 MiB
/// pages, and the whole guest is reserved from the pool now: when the pool
/// cannot hold it the error names how many pages it needs, how many the
/// pool has, and the sysctl that reserves more.
pub fn dest_memory_backed(layout: &MemoryLayout, backing: Backing) -> Result<DestMemory> {
    match backing {
        Backing::Anonymous => dest_memory(layout),
        Backing::HugeTlb => map_hugetlb(layout),
    }
}

fn map_hugetlb(layout: &MemoryLayout) -> Result<DestMemory> {
    use vm_memory::mmap::MmapRegionBuilder;
    let total = layout.total_bytes();
    let pages = total.div_ceil(HUGE_PAGE);
    if let Some(r) = layout
        .regions
        .iter()
        .find(|r| !r.size.is_multiple_of(HUGE_PAGE) || !r.gpa.is_multiple_of(HUGE_PAGE))
    {
        return Err(MigrationError::Memory(format!(
            "guest memory region of {} bytes at {:#x} is not made of whole 2 MiB huge pages: \
             it cannot be backed from the hugetlb pool (listen without --hugepages)",
            r.size, r.gpa
        )));
    }
    let mut regions = Vec::with_capacity(layout.regions.len());
    for (gpa, size) in ranges(layout)? {
        // Without MAP_NORESERVE: the kernel reserves the pages from the
        // pool at mmap, so a pool too small fails here and a page landing
        // later never finds the pool empty (SIGBUS).
        let mapping = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            )
            .with_hugetlbfs(true)
            .build()
            .map_err(|e| {
                let (available, pool) = hugetlb_pool_state();
                MigrationError::Memory(format!(
                    "cannot map {} from the 2 MiB hugetlb pool ({e}): the guest needs {pages} \
                     huge pages and {pool}{}",
                    crate::units::human(total),
                    if available < pages {
                        format!("; reserve more with `sysctl vm.nr_hugepages=N` (at least {} more pages)", pages - available)
                    } else {
                        String::new()
                    }
                ))
            })?;
        let region = vm_memory::GuestRegionMmap::new(mapping, gpa).ok_or_else(|| {
            MigrationError::Config(format!(
                "guest region at {:#x} overflows the address space",
                gpa.0
            ))
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| {
        MigrationError::Memory(format!("cannot map {total} bytes of guest memory: {e}"))
    })
}

/// Destination guest memory that was mapped and backed before any
/// migration arrived: the synthetic destination guest's counterpart of a
/// VMM whose guest memory is preallocated when the VM is created (QEMU
/// `-mem-prealloc`, Cloud Hypervisor `prefault=on`, a hugetlbfs-backed
/// guest), which a migration then finds already backed
/// (`ferry listen --prealloc-guest`).
#[derive(Debug)]
pub struct Preallocated {
    /// The layout it was mapped for (a migration of another layout cannot
    /// use it).
    pub layout: MemoryLayout,
    /// The memory, every page populated.
    pub mem: DestMemory,
    /// CPU time populating it took (the guest's work, not a migration's).
    pub cpu: std::time::Duration,
    /// Wall time populating it took.
    pub wall: std::time::Duration,
}

/// Maps destination guest memory for `layout` and populates all of it now
/// (`MADV_POPULATE_WRITE`, Linux 5.14+): what a VMM that preallocates its
/// guest's memory has done before a migration begins. Fails when the
/// kernel cannot populate it (too old, or not enough memory), or, with
/// [`Backing::HugeTlb`], when the pool cannot hold it.
pub fn preallocated_dest_memory(layout: &MemoryLayout, backing: Backing) -> Result<Preallocated> {
    let started = std::time::Instant::now();
    let before = ferry_ffi::cpu::thread_times().ok();
    let mem = dest_memory_backed(layout, backing)?;
    for r in &layout.regions {
        let size = usize::try_from(r.size).map_err(|_| {
            MigrationError::Config(format!("region size {} does not fit this host", r.size))
        })?;
        let slice = mem
            .get_slice(GuestAddress(r.gpa), size)
            .map_err(|e| MigrationError::Memory(format!("region at {:#x}: {e}", r.gpa)))?;
        ferry_ffi::vio::advise(&slice, ferry_ffi::vio::Advice::PopulateWrite).map_err(|e| {
            MigrationError::Memory(format!(
                "cannot populate {} bytes of guest memory at {:#x} (MADV_POPULATE_WRITE, Linux 5.14+): {e}",
                r.size, r.gpa
            ))
        })?;
    }
    let cpu = match (before, ferry_ffi::cpu::thread_times()) {
        (Some(b), Ok(a)) => a.since(&b).total(),
        _ => std::time::Duration::ZERO,
    };
    Ok(Preallocated {
        layout: layout.clone(),
        mem,
        cpu,
        wall: started.elapsed(),
    })
}

/// What this process holds in memory: its peak resident set, the part of
/// it that is guest memory, and the rest (Ferry's own: buffers, ledgers,
/// bitmaps, threads, the binary).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemoryUse {
    /// Peak resident set of the process (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Guest memory resident now (only pages that were written cost memory).
    pub guest_resident_bytes: u64,
    /// The peak minus the guest memory: an upper bound of Ferry's own part
    /// at the peak (guest memory only grows during a migration).
    pub own_bytes: u64,
    /// `own_bytes` as a percentage of the guest's size.
    pub own_percent_of_guest: f64,
}

/// Measures [`MemoryUse`] for guest memory `mem` from `/proc/self` (zeros
/// where the kernel does not say).
pub fn memory_use<M: GuestMemoryBackend>(mem: &M) -> MemoryUse {
    let kib = |v: &str| v.split_whitespace().next()?.parse::<u64>().ok();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(kib)
            .unwrap_or(0)
            * 1024
    };
    // Huge pages from the hugetlb pool (`Backing::HugeTlb`) are not in the
    // resident set the kernel reports: add them (they are guest memory, and
    // only grow during a migration, so now is their peak).
    let peak = field("VmHWM:") + field("HugetlbPages:");
    // Host ranges of the guest's regions (the pointer's address only).
    let ranges: Vec<(usize, usize)> = mem
        .iter()
        .filter_map(|r| {
            let base = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
            Some((base, base + r.len() as usize))
        })
        .collect();
    let guest = resident_by_pagemap(&ranges).unwrap_or_else(|| resident_by_smaps(&ranges));
    let own = peak.saturating_sub(guest);
    MemoryUse {
        peak_rss_bytes: peak,
        guest_resident_bytes: guest,
        own_bytes: own,
        own_percent_of_guest: own as f64 * 100.0
            / mem.iter().map(|r| r.len()).sum::<u64>().max(1) as f64,
    }
}

/// Host pages: what `/proc/self/pagemap` has one entry for.
const HOST_PAGE: usize = 4096;
/// A pagemap entry's bits: the page is present in memory, and mapped by
/// this process alone (a private page that was written; not the shared zero
/// page that reading untouched memory maps, which costs nothing).
const PM_PRESENT: u64 = 1 << 63;
const PM_EXCLUSIVE: u64 = 1 << 56;

/// Resident bytes of the host address ranges `ranges`, counted page by
/// page from the kernel's page tables (`PAGEMAP_SCAN`, else
/// `/proc/self/pagemap`): exactly the guest's pages, whatever
/// mappings the kernel merged them with (a neighbouring allocation, or
/// another guest's memory in the same process). `None` when the kernel
/// does not say (no pagemap).
fn resident_by_pagemap(ranges: &[(usize, usize)]) -> Option<u64> {
    // The kernel's page-table scan where there is one (Linux 6.7+), for a
    // fifth of the CPU of reading an entry per page, on both sides of every
    // migration. It counts pages present and not the shared zero page; the
    // entries below, pages present and mapped only here: the same pages of
    // guest memory, but for pages shared with another process (after a
    // fork, or merged by KSM), which it counts and they do not.
    let scanned: Option<Vec<u64>> = ranges
        .iter()
        .map(|&(s, e)| ferry_ffi::pagemap::backed_bytes(s, e).ok().flatten())
        .collect();
    if let Some(bytes) = scanned {
        return Some(bytes.iter().sum());
    }
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    // 8192 entries a read: 32 MiB of guest memory.
    let mut buf = vec![0u8; 8 * 8192];
    let mut pages = 0u64;
    for &(start, end) in ranges {
        let (first, last) = (start / HOST_PAGE, end.div_ceil(HOST_PAGE));
        let mut page = first;
        while page < last {
            let n = (last - page).min(buf.len() / 8);
            let bytes = &mut buf[..n * 8];
            pagemap.read_exact_at(bytes, (page * 8) as u64).ok()?;
            pages += bytes
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                .filter(|e| e & PM_PRESENT != 0 && e & PM_EXCLUSIVE != 0)
                .count() as u64;
            page += n;
        }
    }
    Some(pages * HOST_PAGE as u64)
}

/// Resident bytes of `ranges` from `/proc/self/smaps`, where pagemap is not
/// available: an upper bound, since the kernel may merge a guest mapping
/// with a neighbouring one, whose resident pages then count up to the
/// overlap.
fn resident_by_smaps(ranges: &[(usize, usize)]) -> u64 {
    let kib = |v: &str| v.split_whitespace().next()?.parse::<u64>().ok();
    let mut guest = 0u64;
    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") {
        let mut overlap = 0u64;
        for l in smaps.lines() {
            let head = l.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    overlap = ranges
                        .iter()
                        .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)) as u64)
                        .sum();
                    continue;
                }
            }
            if overlap > 0 {
                if let Some(v) = l.strip_prefix("Rss:").and_then(kib) {
                    guest += (v * 1024).min(overlap);
                }
            }
        }
    }
    guest
}

/// The dirty bitmap of a source region.
pub(crate) fn region_bitmap(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    MmapRegion::bitmap(r)
}

/// True when any page of the region is marked dirty (test helper).
#[cfg(test)]
pub(crate) fn any_dirty(mem: &SourceMemory) -> bool {
    use vm_memory::bitmap::Bitmap;
    mem.iter().any(|r| {
        (0..r.len() as usize)
            .step_by(4096)
            .any(|o| r.bitmap().dirty_at(o))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preallocated_memory_is_backed_and_reads_zero() {
        use vm_memory::Bytes;
        let layout = default_layout(8 << 20).unwrap();
        let p = preallocated_dest_memory(&layout, Backing::Anonymous).unwrap();
        assert_eq!(p.layout, layout);
        // Every page is backed already, and still reads as zero.
        assert_eq!(memory_use(&p.mem).guest_resident_bytes, 8 << 20);
        let s = p.mem.get_slice(GuestAddress(0), 8 << 20).unwrap();
        assert_eq!(
            ferry_ffi::vio::populate_missing(&s, &mut Vec::new()).unwrap(),
            0
        );
        let mut page = vec![1u8; 4096];
        p.mem.read_slice(&mut page, GuestAddress(4 << 20)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        // Fresh destination memory is not.
        let fresh = dest_memory(&layout).unwrap();
        assert_eq!(memory_use(&fresh).guest_resident_bytes, 0);
    }

    /// Tests that change the machine's hugetlb pool run one at a time.
    static POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Grows the 2 MiB pool so that `pages` more are free (root only) and
    /// gives them back when dropped; where that cannot be done, why not.
    struct PoolPages(u64);
    impl PoolPages {
        fn grow(pages: u64) -> Result<PoolPages, String> {
            let (total, free, resv) =
                hugetlb_pool().ok_or("this kernel has no 2 MiB hugetlb pool")?;
            let want = total + pages.saturating_sub(free.saturating_sub(resv));
            std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
                .map_err(|e| format!("cannot write /proc/sys/vm/nr_hugepages: {e}"))?;
            let (now, free, resv) = hugetlb_pool().ok_or("the hugetlb pool went away")?;
            let got = PoolPages(now - total);
            let free = free.saturating_sub(resv);
            if free < pages {
                return Err(format!("the kernel found only {free} free huge pages"));
            }
            Ok(got)
        }
    }

    /// True when this process runs as root (its effective user id, from
    /// /proc/self/status).
    fn as_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                == Some("0")
        })
    }
    impl Drop for PoolPages {
        fn drop(&mut self) {
            if let Some((total, _, _)) = hugetlb_pool() {
                let _ = std::fs::write(
                    "/proc/sys/vm/nr_hugepages",
                    total.saturating_sub(self.0).to_string(),
                );
            }
        }
    }

    #[test]
    fn hugetlb_memory_needs_whole_huge_pages() {
        let layout = MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![ferry_transport::layout::RegionDesc {
                gpa: 0,
                size: 3 << 20,
            }],
        };
        let e = dest_memory_backed(&layout, Backing::HugeTlb).unwrap_err();
        assert!(
            e.to_string().contains("not made of whole 2 MiB huge pages"),
            "{e}"
        );
    }

    #[test]
    fn a_hugetlb_pool_too_small_is_refused_when_mapped_saying_what_it_needs() {
        let _one = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let available = hugetlb_pool().map_or(0, |(_, free, resv)| free.saturating_sub(resv));
        let pages = available + 1;
        let layout = default_layout(pages * HUGE_PAGE).unwrap();
        let e = dest_memory_backed(&layout, Backing::HugeTlb).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, MigrationError::Memory(_)), "{e:?}");
        assert!(
            msg.contains(&format!("the guest needs {pages} huge pages")),
            "{msg}"
        );
        if hugetlb_pool().is_some() {
            assert!(msg.contains("sysctl vm.nr_hugepages"), "{msg}");
            assert!(msg.contains(&format!("{available} of its")), "{msg}");
        }
    }

    #[test]
    fn hugetlb_memory_is_reserved_when_mapped_reads_zero_and_goes_back_to_the_pool() {
        use vm_memory::Bytes;
        let _one = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Needs root (CI runs as root) to grow the pool. As root it must
        // run: a pool that cannot be grown fails the test, saying why.
        // Elsewhere it is skipped, and says so past the output capture.
        let _pool = match PoolPages::grow(4) {
            Ok(p) => p,
            Err(why) if !as_root() => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "\n*** SKIPPED hugetlb_memory_is_reserved_when_mapped_reads_zero_and_goes_back_to_the_pool: not root ({why})\n"
                );
                return;
            }
            Err(why) => panic!("cannot reserve 4 huge pages as root: {why}"),
        };
        let (_, free0, resv0) = hugetlb_pool().unwrap();
        let layout = default_layout(4 * HUGE_PAGE).unwrap();
        let mem = dest_memory_backed(&layout, Backing::HugeTlb).unwrap();
        // Reserved at mmap (a landing page can never find the pool empty),
        // nothing faulted yet.
        let (_, free1, resv1) = hugetlb_pool().unwrap();
        assert_eq!((free1, resv1), (free0, resv0 + 4));
        assert_eq!(memory_use(&mem).guest_resident_bytes, 0);
        // A page landing in the middle of a huge page: the populate the
        // landing path does, then the write; its neighbours read zero.
        let s = mem.get_slice(GuestAddress(HUGE_PAGE + 8192), 4096).unwrap();
        assert_eq!(
            ferry_ffi::vio::populate_missing(&s, &mut Vec::new()).unwrap(),
            1
        );
        mem.write_slice(&[7u8; 4096], GuestAddress(HUGE_PAGE + 8192))
            .unwrap();
        let mut page = vec![1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(HUGE_PAGE + 4096))
            .unwrap();
        assert!(page.iter().all(|&b| b == 0));
        mem.read_slice(&mut page, GuestAddress(HUGE_PAGE + 8192))
            .unwrap();
        assert!(page.iter().all(|&b| b == 7));
        // The whole huge page is backed now, and counted as the guest's.
        let s = mem
            .get_slice(GuestAddress(HUGE_PAGE), HUGE_PAGE as usize)
            .unwrap();
        assert_eq!(
            ferry_ffi::vio::populate_missing(&s, &mut Vec::new()).unwrap(),
            0
        );
        let used = memory_use(&mem);
        assert_eq!(used.guest_resident_bytes, HUGE_PAGE, "{used:?}");
        assert!(used.peak_rss_bytes >= HUGE_PAGE, "{used:?}");
        let (_, free2, _) = hugetlb_pool().unwrap();
        assert_eq!(free2, free0 - 1);
        drop(mem);
        assert_eq!(hugetlb_pool().unwrap().1, free0, "pages back in the pool");
        // A preallocated hugetlb guest is backed whole.
        let p = preallocated_dest_memory(&layout, Backing::HugeTlb).unwrap();
        assert_eq!(memory_use(&p.mem).guest_resident_bytes, 4 * HUGE_PAGE);
    }

    #[test]
    fn only_written_guest_pages_count_as_resident() {
        use vm_memory::Bytes;
        let m = source_memory(&default_layout(64 << 20).unwrap()).unwrap();
        let before = memory_use(&m);
        assert!(before.peak_rss_bytes > 0, "{before:?}");
        assert!(before.guest_resident_bytes < 4 << 20, "{before:?}");
        for p in 0..256u64 {
            m.write_slice(&[1], GuestAddress(p * 4096 * 4)).unwrap();
        }
        let after = memory_use(&m);
        // 256 pages written (1 MiB), one in four of the first 4 MiB.
        assert!(
            after.guest_resident_bytes >= before.guest_resident_bytes + (1 << 20)
                && after.guest_resident_bytes < before.guest_resident_bytes + (8 << 20),
            "{before:?} {after:?}"
        );
        assert!(after.peak_rss_bytes >= after.guest_resident_bytes);
    }

    #[test]
    fn neighbours_and_reads_of_untouched_memory_do_not_count() {
        use vm_memory::Bytes;
        // Mappings made one after the other are often placed side by side,
        // and the kernel may merge them into one: a neighbour's pages (here
        // another guest's, as when both sides run in one process) must not
        // count as this guest's.
        let layout = default_layout(32 << 20).unwrap();
        let before = source_memory(&layout).unwrap();
        let m = source_memory(&layout).unwrap();
        let after = source_memory(&layout).unwrap();
        for n in [&before, &after] {
            for p in 0..(32u64 << 20) / 4096 {
                n.write_slice(&[7], GuestAddress(p * 4096)).unwrap();
            }
        }
        assert!(memory_use(&before).guest_resident_bytes >= 32 << 20);
        assert!(memory_use(&m).guest_resident_bytes < 1 << 20);
        // Reading untouched memory maps the shared zero page: no cost.
        let mut page = [0u8; 4096];
        for p in 0..(32u64 << 20) / 4096 {
            m.read_slice(&mut page, GuestAddress(p * 4096)).unwrap();
        }
        m.write_slice(&[1; 8192], GuestAddress(4096)).unwrap();
        // (A huge page may back the write where the host enables them
        // always.)
        let u = memory_use(&m);
        assert!(
            u.guest_resident_bytes >= 8192 && u.guest_resident_bytes <= 4 << 20,
            "{u:?}"
        );
    }

    #[test]
    fn layouts_split_at_the_pci_hole() {
        let l = default_layout(1 << 30).unwrap();
        assert_eq!(l.regions.len(), 1);
        let l = default_layout(5 << 30).unwrap();
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[1].gpa, 4 << 30);
        assert_eq!(l.total_bytes(), 5 << 30);
        l.validate().unwrap();
        assert!(default_layout(4095).is_err());
    }

    #[test]
    fn vm_memory_writes_mark_the_source_bitmap() {
        use vm_memory::Bytes;
        let m = source_memory(&default_layout(1 << 20).unwrap()).unwrap();
        assert!(!any_dirty(&m));
        m.write_slice(&[1, 2, 3], GuestAddress(8192)).unwrap();
        assert!(region_bitmap(m.iter().next().unwrap()).is_addr_set(8192));
    }
}
