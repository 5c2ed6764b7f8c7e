//! Page evidence: verification of guest memory built while pages move, so
//! that the pause holds a constant-size comparison instead of a pass over
//! the whole memory.
//!
//! Each side keeps, for every page, the keyed hash of the bytes it last
//! sent (source) or that last landed there (destination), and the sum of
//! every page's *contribution*:
//!
//! ```text
//! h(page)          = XXH3-128(page bytes, secret = page secret)      0 for an all-zero page
//! c(gpa, h)        = XXH3-128(gpa | h, secret = mix secret)          0 when h = 0
//! evidence         = Σ c(gpa, h[gpa])  over every page, wrapping mod 2^128
//! ```
//!
//! A page that is sent again replaces its old contribution with the new one
//! (`evidence += c(gpa, new) - c(gpa, old)`), so the sum depends only on
//! what each page holds now, not on the order in which chunks landed or on
//! how many channels carried them. Zero pages contribute nothing, so a
//! guest's untouched memory costs no work and the table's untouched
//! segments are never allocated.
//!
//! Equal evidence on both sides means, up to a collision of the keyed
//! 128-bit hashes: every page holds at the destination what the source
//! last sent for it, at the address the source read it from. A corrupted
//! page, a missing page, a page landed at another address, and a stale copy
//! landed over a newer one each change the destination's sum. What it
//! cannot see is a page the source never re-sent because the dirty log
//! missed a guest write: both sides then agree on stale content. The audit
//! after commit (a full hash of the frozen source memory) covers that.
//!
//! Both secrets come from the session keys ([`crate::keys`]): page hashes
//! and contributions are never sent, only HMAC tags over them, so a peer on
//! the path sees no output of either function.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::keys::{PageKey, SECRET_LEN};

// XXH3 needs a secret of at least 136 bytes: `xxh3_128` cannot fail.
const _: () = assert!(SECRET_LEN >= 136);

/// XXH3-128 of `bytes` under `secret`.
///
/// twox-hash picks the widest vector unit the CPU has at run time (AVX2,
/// else SSE2 on x86-64; NEON on aarch64; scalar elsewhere) while the build
/// targets baseline x86-64: a page hashes about twice as fast with AVX2 as
/// with the SSE2 loop a baseline build compiles in (docs/performance.md).
/// XXH3's output is defined bit for bit whatever the vector width, so every
/// CPU computes the same hashes: the two sides of a migration may run on
/// different CPUs, and the tests check the values against the reference
/// implementation (xxhash-rust, which earlier versions used).
fn xxh3_128(bytes: &[u8], secret: &[u8; SECRET_LEN]) -> u128 {
    twox_hash::XxHash3_128::oneshot_with_secret(secret, bytes)
        .expect("a 192-byte secret is longer than XXH3's minimum")
}

/// Bytes in a page.
pub const PAGE: usize = 4096;

/// The keyed hash of one page's bytes; [`PageHash::ZERO`] stands for a page
/// of zeros (which is never hashed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageHash(pub u128);

impl PageHash {
    /// An all-zero page.
    pub const ZERO: PageHash = PageHash(0);
}

/// Whether every byte of `bytes` is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(64);
    chunks.remainder().iter().all(|&b| b == 0)
        && chunks
            .into_iter()
            .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl PageKey {
    /// The keyed hash of `bytes` (a page, or any piece of memory hashed as
    /// one unit). Never [`PageHash::ZERO`]: that value is reserved for zero
    /// pages, which callers detect with [`is_zero`] and do not hash.
    pub fn hash(&self, bytes: &[u8]) -> PageHash {
        match xxh3_128(bytes, &self.page) {
            0 => PageHash(1),
            h => PageHash(h),
        }
    }

    /// [`PageHash::ZERO`] for a page of zeros, else [`PageKey::hash`].
    pub fn hash_or_zero(&self, bytes: &[u8]) -> PageHash {
        if is_zero(bytes) {
            PageHash::ZERO
        } else {
            self.hash(bytes)
        }
    }

    /// What page `gpa` holding content `h` adds to the evidence.
    pub fn contribution(&self, gpa: u64, h: PageHash) -> u128 {
        if h == PageHash::ZERO {
            return 0;
        }
        let mut input = [0u8; 24];
        input[..8].copy_from_slice(&gpa.to_le_bytes());
        input[8..].copy_from_slice(&h.0.to_le_bytes());
        xxh3_128(&input, &self.mix)
    }
}

/// The sum of every page's contribution (see the module documentation).
/// Compared at switchover, inside a MAC, never in the clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Evidence(pub u128);

impl Evidence {
    /// Adds a change.
    pub fn apply(&mut self, delta: u128) {
        self.0 = self.0.wrapping_add(delta);
    }
    /// Little-endian bytes, for MACs.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
}

/// Pages per lazily allocated segment of a [`PageTable`] (64 KiB each).
const SEG_PAGES: u64 = 4096;

/// One region of guest memory as the table indexes it.
#[derive(Debug, Clone, Copy)]
struct Span {
    gpa: u64,
    pages: u64,
    first: u64,
}

/// The layout given to a [`PageTable`] is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LayoutError {}

/// A page outside the table's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideLayout {
    /// Its guest physical address.
    pub gpa: u64,
}

impl std::fmt::Display for OutsideLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "page at guest address {:#x} is outside the memory layout",
            self.gpa
        )
    }
}
impl std::error::Error for OutsideLayout {}

/// The hash of every page, 16 bytes a page (0.4% of guest memory at most),
/// allocated in 64 KiB segments when a page in them first holds data.
/// Every entry is an atomic pair, so channels on several threads record
/// pages concurrently; the protocol never has two chunks carrying the same
/// page in flight at once, so a page's entry has one writer at a time.
#[derive(Debug)]
pub struct PageTable {
    spans: Vec<Span>,
    segs: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl PageTable {
    /// A table for `regions` (`(gpa, size in bytes)`, sorted, page aligned,
    /// non-overlapping), every page [`PageHash::ZERO`].
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, LayoutError> {
        let mut spans = Vec::with_capacity(regions.len());
        let mut first = 0u64;
        let mut end = 0u64;
        for &(gpa, size) in regions {
            if gpa % PAGE as u64 != 0 || size % PAGE as u64 != 0 || size == 0 {
                return Err(LayoutError(format!(
                    "region at {gpa:#x} of {size} bytes is not page aligned"
                )));
            }
            if gpa < end {
                return Err(LayoutError(format!(
                    "region at {gpa:#x} overlaps or precedes the one before"
                )));
            }
            end = gpa.checked_add(size).ok_or_else(|| {
                LayoutError(format!("region at {gpa:#x} wraps the address space"))
            })?;
            let pages = size / PAGE as u64;
            spans.push(Span { gpa, pages, first });
            first += pages;
        }
        let segs = (0..first.div_ceil(SEG_PAGES))
            .map(|_| OnceLock::new())
            .collect();
        Ok(PageTable { spans, segs })
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.spans.last().map_or(0, |s| s.first + s.pages)
    }

    /// Index of the page at `gpa` in layout order.
    pub fn index(&self, gpa: u64) -> Result<u64, OutsideLayout> {
        let i = self.spans.partition_point(|s| s.gpa <= gpa);
        let s = i
            .checked_sub(1)
            .map(|i| self.spans[i])
            .ok_or(OutsideLayout { gpa })?;
        let off = (gpa - s.gpa) / PAGE as u64;
        if off >= s.pages {
            return Err(OutsideLayout { gpa });
        }
        Ok(s.first + off)
    }

    fn slot(&self, index: u64, alloc: bool) -> Option<(&[AtomicU64], usize)> {
        let seg = &self.segs[(index / SEG_PAGES) as usize];
        let words = match seg.get() {
            Some(w) => w,
            None if alloc => {
                seg.get_or_init(|| (0..2 * SEG_PAGES).map(|_| AtomicU64::new(0)).collect())
            }
            None => return None,
        };
        Some((words, 2 * (index % SEG_PAGES) as usize))
    }

    /// The hash recorded for page `index`.
    pub fn get(&self, index: u64) -> PageHash {
        match self.slot(index, false) {
            Some((w, i)) => PageHash(
                u128::from(w[i].load(Ordering::Relaxed))
                    | u128::from(w[i + 1].load(Ordering::Relaxed)) << 64,
            ),
            None => PageHash::ZERO,
        }
    }

    /// Records `h` for page `index` and returns the hash it replaces.
    pub fn replace(&self, index: u64, h: PageHash) -> PageHash {
        if h == PageHash::ZERO && self.slot(index, false).is_none() {
            return PageHash::ZERO;
        }
        let (w, i) = self.slot(index, true).expect("allocated on demand");
        let lo = w[i].swap(h.0 as u64, Ordering::Relaxed);
        let hi = w[i + 1].swap((h.0 >> 64) as u64, Ordering::Relaxed);
        PageHash(u128::from(lo) | u128::from(hi) << 64)
    }

    /// Bytes the table holds now (for memory accounting).
    pub fn allocated_bytes(&self) -> u64 {
        let segs = self.segs.iter().filter(|s| s.get().is_some()).count() as u64;
        segs * SEG_PAGES * 16 + self.segs.len() as u64 * 8
    }
}

/// One side's evidence: the page table, the key, and the running sum.
#[derive(Debug)]
pub struct Ledger {
    key: PageKey,
    table: PageTable,
    sum: Mutex<u128>,
}

impl Ledger {
    /// An empty ledger (every page zero, evidence 0) for `regions`.
    pub fn new(key: PageKey, regions: &[(u64, u64)]) -> Result<Self, LayoutError> {
        Ok(Ledger {
            key,
            table: PageTable::new(regions)?,
            sum: Mutex::new(0),
        })
    }

    /// The session's page key.
    pub fn key(&self) -> &PageKey {
        &self.key
    }

    /// The table (for audits and tests).
    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// Records that page `gpa` now holds content hashing to `h`; returns
    /// the change to the evidence, to be [`Ledger::apply`]'d (callers batch
    /// a chunk's changes into one).
    pub fn record(&self, gpa: u64, h: PageHash) -> Result<u128, OutsideLayout> {
        self.record_page(gpa, h).map(|(delta, _)| delta)
    }

    /// [`Ledger::record`], also returning the page's new contribution (what
    /// a chunk's payload tag sums, see [`crate::frame`]).
    pub fn record_page(&self, gpa: u64, h: PageHash) -> Result<(u128, u128), OutsideLayout> {
        let index = self.table.index(gpa)?;
        let old = self.table.replace(index, h);
        let new = self.key.contribution(gpa, h);
        if old == h {
            return Ok((0, new));
        }
        Ok((new.wrapping_sub(self.key.contribution(gpa, old)), new))
    }

    /// Adds changes returned by [`Ledger::record`].
    pub fn apply(&self, delta: u128) {
        let mut s = self.sum.lock().unwrap_or_else(|e| e.into_inner());
        *s = s.wrapping_add(delta);
    }

    /// The evidence now.
    pub fn evidence(&self) -> Evidence {
        Evidence(*self.sum.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes the ledger holds (its table).
    pub fn allocated_bytes(&self) -> u64 {
        self.table.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PageKey {
        PageKey::from_secrets([3; 192], [5; 192])
    }

    fn page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE];
        p[17] = fill.wrapping_add(1);
        p
    }

    #[test]
    fn page_hashes_equal_the_reference_xxh3_whatever_the_vector_unit() {
        // The runtime-dispatched hash (AVX2 here when the CPU has it) must
        // give what the reference implementation gives on every length a
        // hash sees (pages, contribution inputs, odd tails), or two hosts
        // with different CPUs would disagree about the same memory.
        let secret: [u8; SECRET_LEN] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let mut bytes = vec![0u8; 3 * PAGE + 7];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in bytes.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for len in [
            0,
            1,
            16,
            24,
            128,
            129,
            240,
            241,
            1024,
            4095,
            PAGE,
            PAGE + 1,
            2 * PAGE,
            3 * PAGE + 7,
        ] {
            for off in [0, 1] {
                let input = &bytes[off..off + len.min(bytes.len() - off)];
                assert_eq!(
                    xxh3_128(input, &secret),
                    xxhash_rust::xxh3::xxh3_128_with_secret(input, &secret),
                    "length {} at offset {off}",
                    input.len()
                );
            }
        }
        // And one known answer (xxhash-rust 0.8.19's), so that both cannot
        // drift together.
        assert_eq!(
            key().hash(&page(0x5a)).0,
            0x370abc70284c84b5bbeb36f7a145f946
        );
    }

    /// Lands `(gpa, bytes)` in order on a fresh ledger and returns its evidence.
    fn land(pages: &[(u64, &[u8])]) -> Evidence {
        let l = Ledger::new(key(), &[(0, 64 * PAGE as u64), (1 << 32, 8 * PAGE as u64)]).unwrap();
        for (gpa, b) in pages {
            let d = l.record(*gpa, l.key().hash_or_zero(b)).unwrap();
            l.apply(d);
        }
        l.evidence()
    }

    #[test]
    fn equal_content_gives_equal_evidence_in_any_order() {
        let (a, b) = (page(1), page(2));
        let x = land(&[(0, &a), (4096, &b), (1 << 32, &a)]);
        let y = land(&[(1 << 32, &a), (4096, &b), (0, &a)]);
        assert_eq!(x, y);
        // A page sent twice counts once, with its last content.
        let z = land(&[(0, &b), (4096, &b), (1 << 32, &a), (0, &a)]);
        assert_eq!(x, z);
        // Zero pages contribute nothing.
        assert_eq!(land(&[(0, &[0u8; PAGE])]), Evidence(0));
    }

    #[test]
    fn every_failure_kind_changes_the_evidence() {
        let (a, b, newer) = (page(1), page(2), page(3));
        let good = land(&[(0, &a), (4096, &b)]);
        let mut corrupt = b.clone();
        corrupt[4000] ^= 1;
        assert_ne!(good, land(&[(0, &a), (4096, &corrupt)]), "corrupted page");
        assert_ne!(good, land(&[(0, &a)]), "missing page");
        assert_ne!(good, land(&[(0, &a), (8192, &b)]), "wrong address");
        // Source sent b, then newer; a stale b landed last.
        let source = land(&[(0, &a), (4096, &b), (4096, &newer)]);
        assert_ne!(
            source,
            land(&[(0, &a), (4096, &newer), (4096, &b)]),
            "stale copy"
        );
        // Swapping two pages' contents is not the same memory either.
        assert_ne!(good, land(&[(0, &b), (4096, &a)]), "swapped pages");
    }

    #[test]
    fn other_keys_give_other_evidence() {
        let a = page(7);
        let k2 = PageKey::from_secrets([4; 192], [5; 192]);
        assert_ne!(key().hash(&a), k2.hash(&a));
        assert_ne!(
            key().contribution(0, key().hash(&a)),
            key().contribution(0, k2.hash(&a))
        );
    }

    #[test]
    fn table_indexes_regions_and_refuses_outside_pages() {
        let t = PageTable::new(&[(0, 2 * PAGE as u64), (1 << 20, 3 * PAGE as u64)]).unwrap();
        assert_eq!(t.pages(), 5);
        assert_eq!(t.index(0).unwrap(), 0);
        assert_eq!(t.index(4096).unwrap(), 1);
        assert_eq!(t.index((1 << 20) + 8192).unwrap(), 4);
        assert!(t.index(8192).is_err());
        assert!(t.index((1 << 20) + 3 * 4096).is_err());
        assert_eq!(t.allocated_bytes(), 8, "nothing allocated before data");
        assert_eq!(t.replace(4, PageHash(9)), PageHash::ZERO);
        assert_eq!(t.get(4), PageHash(9));
        assert_eq!(t.get(3), PageHash::ZERO);
        assert!(PageTable::new(&[(0, 100)]).is_err());
        assert!(PageTable::new(&[(8192, 4096), (0, 4096)]).is_err());
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 3]));
        assert!(!is_zero(&[0, 0, 1]));
    }
}
