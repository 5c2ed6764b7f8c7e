//! Dirty-page tracking.
//!
//! [`DirtyLog`] is the seam between the engine and whatever knows which pages
//! the guest wrote. The built-in source, [`BitmapDirtyLog`], reads the
//! per-region `vm-memory` [`AtomicBitmap`] that every write through
//! `vm-memory` marks (the synthetic guest writes that way, as do rust-vmm
//! device models). KVM's dirty log has the same shape — one bitmap per memory
//! slot, fetched and cleared by `KVM_GET_DIRTY_LOG` — so a KVM source is
//! another implementation of this trait that ORs both bitmaps.
//!
//! Why a shared atomic bitmap and not userfaultfd write-protect: the synthetic
//! guest is our own thread, so marking a bit after each write is exact and
//! costs one atomic OR per page, while userfaultfd-wp takes a fault and a
//! context switch per first write to each page in each round and needs raw
//! ioctls (more code in ffi/). It is also the mechanism rust-vmm VMMs already use
//! for device writes.
//!
//! Harvesting is fetch-and-clear per 64-bit word, so a write that lands while
//! the engine reads the log is never lost: either its bit is in this harvest
//! or it stays for the next one. A failed send puts its pages back
//! ([`DirtyLog::restore`]).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{region_bitmap, SourceMemory};
use ferry_transport::{MemoryLayout, PageRun, PAGE_SIZE};

/// The dirty pages of one region: bit `i` of `words` is page `i` of the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Pages in the region.
    pub pages: u64,
    /// Bitmap words.
    pub words: Vec<u64>,
}

/// Dirty pages of the whole guest, one entry per region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtySet {
    /// Per-region bitmaps.
    pub regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// Every page of the layout.
    pub fn all(layout: &MemoryLayout) -> Self {
        let regions = layout
            .regions
            .iter()
            .map(|r| {
                let pages = r.size / PAGE_SIZE;
                let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
                if !pages.is_multiple_of(64) {
                    *words.last_mut().expect("non-empty") = (1u64 << (pages % 64)) - 1;
                }
                RegionDirty {
                    gpa: r.gpa,
                    pages,
                    words,
                }
            })
            .collect();
        DirtySet { regions }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Adds the pages of `other` (same layout).
    pub fn merge(&mut self, other: &DirtySet) {
        if self.regions.is_empty() {
            self.regions = other.regions.clone();
            return;
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.words.iter_mut().zip(&b.words) {
                *x |= *y;
            }
        }
    }

    /// Contiguous runs of dirty pages, each at most `max_pages` long,
    /// in address order.
    pub fn runs(&self, max_pages: u32) -> impl Iterator<Item = PageRun> + '_ {
        self.regions
            .iter()
            .flat_map(move |r| region_runs(r, max_pages))
    }
}

fn region_runs(r: &RegionDirty, max_pages: u32) -> impl Iterator<Item = PageRun> + '_ {
    let mut page = 0u64;
    std::iter::from_fn(move || {
        // Find the next set bit.
        while page < r.pages {
            let w = r.words[(page / 64) as usize] >> (page % 64);
            if w == 0 {
                page = (page / 64 + 1) * 64;
                continue;
            }
            page += u64::from(w.trailing_zeros());
            break;
        }
        if page >= r.pages {
            return None;
        }
        let start = page;
        while page < r.pages
            && page - start < u64::from(max_pages)
            && r.words[(page / 64) as usize] >> (page % 64) & 1 == 1
        {
            page += 1;
        }
        Some(PageRun {
            gpa: r.gpa + start * PAGE_SIZE,
            pages: (page - start) as u32,
            zero: false,
        })
    })
}

/// A source of dirty-page information.
pub trait DirtyLog: Send + Sync {
    /// Clears the log: from now on, writes are recorded.
    fn start(&self);
    /// Returns the pages written since the last call (or `start`) and clears them.
    fn harvest(&self) -> DirtySet;
    /// Marks pages dirty again (their send failed or must be repeated).
    fn restore(&self, runs: &[PageRun]);
}

/// [`DirtyLog`] over the `vm-memory` atomic bitmaps of source guest memory.
#[derive(Debug)]
pub struct BitmapDirtyLog {
    mem: std::sync::Arc<SourceMemory>,
}

impl BitmapDirtyLog {
    /// Tracks `mem`.
    pub fn new(mem: std::sync::Arc<SourceMemory>) -> Self {
        BitmapDirtyLog { mem }
    }

    fn bitmaps(&self) -> impl Iterator<Item = (u64, u64, &AtomicBitmap)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), region_bitmap(r)))
    }
}

impl DirtyLog for BitmapDirtyLog {
    fn start(&self) {
        for (_, _, b) in self.bitmaps() {
            b.reset();
        }
    }

    fn harvest(&self) -> DirtySet {
        let mut regions: Vec<RegionDirty> = self
            .bitmaps()
            .map(|(gpa, len, b)| RegionDirty {
                gpa,
                pages: len / PAGE_SIZE,
                words: b.get_and_reset(),
            })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        DirtySet { regions }
    }

    fn restore(&self, runs: &[PageRun]) {
        for run in runs {
            for (gpa, len, b) in self.bitmaps() {
                if run.gpa >= gpa && run.gpa < gpa + len {
                    b.set_addr_range((run.gpa - gpa) as usize, run.bytes() as usize);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{default_layout, source_memory};
    use proptest::prelude::*;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    fn set_from(pages: u64, bits: &[u64]) -> DirtySet {
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        for &b in bits {
            words[(b / 64) as usize] |= 1 << (b % 64);
        }
        DirtySet {
            regions: vec![RegionDirty {
                gpa: 0x10000,
                pages,
                words,
            }],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Runs built from a bitmap cover exactly the set bits (naive oracle).
        #[test]
        fn runs_cover_exactly_the_dirty_pages(pages in 1u64..400, bits in proptest::collection::vec(0u64..400, 0..200), max in 1u32..70) {
            let bits: Vec<u64> = bits.into_iter().filter(|&b| b < pages).collect();
            let set = set_from(pages, &bits);
            let mut covered = std::collections::BTreeSet::new();
            let mut last_end = 0;
            for r in set.runs(max) {
                prop_assert!(r.pages >= 1 && r.pages <= max);
                prop_assert!(r.gpa >= last_end, "runs in order, disjoint");
                for p in 0..u64::from(r.pages) {
                    covered.insert((r.gpa - 0x10000) / PAGE_SIZE + p);
                }
                last_end = r.gpa + r.bytes();
            }
            let oracle: std::collections::BTreeSet<u64> = bits.into_iter().collect();
            prop_assert_eq!(covered, oracle.clone());
            prop_assert_eq!(set.count(), oracle.len() as u64);
        }
    }

    #[test]
    fn all_covers_every_page_including_a_partial_last_word() {
        let l = default_layout(100 * PAGE_SIZE).unwrap();
        let s = DirtySet::all(&l);
        assert_eq!(s.count(), 100);
        let runs: Vec<_> = s.runs(1000).collect();
        assert_eq!(
            runs,
            vec![PageRun {
                gpa: 0,
                pages: 100,
                zero: false
            }]
        );
    }

    #[test]
    fn harvest_returns_and_clears_and_restore_puts_back() {
        let mem = Arc::new(source_memory(&default_layout(1 << 20).unwrap()).unwrap());
        let log = BitmapDirtyLog::new(mem.clone());
        mem.write_slice(&[1], GuestAddress(0)).unwrap();
        log.start();
        assert_eq!(log.harvest().count(), 0, "start clears earlier writes");
        mem.write_slice(&[1; 5000], GuestAddress(3 * 4096 + 100))
            .unwrap();
        let h = log.harvest();
        assert_eq!(
            h.runs(64).collect::<Vec<_>>(),
            vec![PageRun {
                gpa: 3 * 4096,
                pages: 2,
                zero: false
            }]
        );
        assert_eq!(log.harvest().count(), 0, "harvest clears");
        log.restore(&[PageRun {
            gpa: 8 * 4096,
            pages: 3,
            zero: false,
        }]);
        assert_eq!(log.harvest().count(), 3);
    }

    #[test]
    fn merge_unions() {
        let mut a = set_from(128, &[1, 2]);
        a.merge(&set_from(128, &[2, 100]));
        assert_eq!(a.count(), 3);
        let mut e = DirtySet::default();
        e.merge(&a);
        assert_eq!(e, a);
    }
}
