//! Whole-memory evidence: the same keyed page hashes as the evidence built
//! while pages move ([`ferry_proto::evidence`]), recomputed from a whole,
//! frozen guest memory.
//!
//! Two uses:
//! * `--verify full`: both sides hash their memory inside the pause and
//!   prove the result to each other with the other switchover claims (what
//!   the previous protocol's digest did, now keyed).
//! * The audit: after `Committed` the source's memory is frozen (its guest
//!   stays paused for good); the source hashes it in the background and
//!   compares every page with what its ledger says was sent, which the
//!   destination proved it holds. A page that differs is one the dirty log
//!   never reported: invisible to every transfer check.
//!
//! Work is split over the available cores in 4 MiB blocks; zero pages are
//! detected and not hashed (they contribute nothing), exactly as the
//! ledgers treat them.

use ferry_ffi::vio;
use ferry_proto::evidence::{PageHash, PAGE};
use ferry_proto::{Evidence, Ledger, PageKey, PageTable};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const BLOCK: usize = 4 << 20;
/// Bytes copied out of guest memory at a time (a multiple of the page): one
/// page, so that the copy stays in L1 while it is hashed. A 256 KiB piece
/// (before) spilled the copy out of L1 and cost 1.7x the CPU for the same
/// work: 0.083-0.088 against 0.049-0.053 s/GiB on one core of this 2-core
/// VM, copy and hash of 1 GiB of random pages (`cargo run --release -p
/// ferry-migration --example audit_bench`, docs/performance.md).
const PIECE: usize = PAGE;

/// What a scan of the whole memory found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scan {
    /// Pages scanned.
    pub pages: u64,
    /// Pages holding data (not all zero).
    pub data_pages: u64,
    /// The evidence of the memory as it is.
    pub evidence: Evidence,
    /// Pages whose content differs from the ledger's record (audits only).
    pub mismatched: u64,
    /// The lowest guest address among them.
    pub first_mismatch: Option<u64>,
    /// CPU time the scan's worker threads used.
    pub cpu: std::time::Duration,
}

impl Scan {
    fn add(&mut self, o: &Scan) {
        self.pages += o.pages;
        self.data_pages += o.data_pages;
        self.evidence.apply(o.evidence.0);
        self.mismatched += o.mismatched;
        self.cpu += o.cpu;
        self.first_mismatch = match (self.first_mismatch, o.first_mismatch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The keyed evidence of the whole memory (`--verify full`).
pub fn memory_evidence<M: GuestMemoryBackend + Sync>(mem: &M, key: &PageKey) -> Scan {
    scan(mem, key, None)
}

/// Recomputes the evidence of the whole memory and compares every page with
/// what `ledger` recorded for it (the audit).
pub fn audit<M: GuestMemoryBackend + Sync>(mem: &M, ledger: &Ledger) -> Scan {
    scan(mem, ledger.key(), Some(ledger.table()))
}

fn scan<M: GuestMemoryBackend + Sync>(mem: &M, key: &PageKey, table: Option<&PageTable>) -> Scan {
    // (region start, block offset, block len, table index of the block's first page)
    let mut blocks = Vec::new();
    let mut first = 0u64;
    for r in mem.iter() {
        let len = r.len() as usize;
        let mut off = 0;
        while off < len {
            blocks.push((
                r.start_addr().0,
                off,
                BLOCK.min(len - off),
                first + (off / PAGE) as u64,
            ));
            off += BLOCK;
        }
        first += r.len() / PAGE as u64;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let per = blocks.len().div_ceil(threads).max(1);
    let mut total = Scan::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = blocks
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    let started = ferry_ffi::cpu::thread_times().ok();
                    let mut out = Scan::default();
                    let mut buf = Vec::new();
                    for &(start, off, len, index) in part {
                        let r = mem
                            .find_region(vm_memory::GuestAddress(start))
                            .expect("region exists");
                        let slice = r
                            .get_slice(MemoryRegionAddress(off as u64), len)
                            .expect("block inside region");
                        let gpa = start + off as u64;
                        // Through a private copy, never a reference to
                        // guest memory (ferry_ffi::vio), a piece at a time.
                        let _ = vio::read_pieces::<_, ()>(&slice, &mut buf, PIECE, |at, b| {
                            let pages = (at / PAGE) as u64;
                            scan_block(b, gpa + at as u64, index + pages, key, table, &mut out);
                            Ok(())
                        });
                    }
                    if let (Some(a), Ok(b)) = (started, ferry_ffi::cpu::thread_times()) {
                        out.cpu = b.since(&a).total();
                    }
                    out
                })
            })
            .collect();
        for w in workers {
            total.add(&w.join().expect("scan worker"));
        }
    });
    total
}

fn scan_block(
    bytes: &[u8],
    gpa: u64,
    index: u64,
    key: &PageKey,
    table: Option<&PageTable>,
    out: &mut Scan,
) {
    for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
        let h = key.hash_or_zero(page);
        let at = gpa + (i * PAGE) as u64;
        out.pages += 1;
        if h != PageHash::ZERO {
            out.data_pages += 1;
            out.evidence.apply(key.contribution(at, h));
        }
        if let Some(t) = table {
            if t.get(index + i as u64) != h {
                out.mismatched += 1;
                out.first_mismatch.get_or_insert(at);
            }
        }
    }
}

/// Bytes per second [`memory_evidence`] hashes on this host with every
/// core (pages of data, the costly case), measured on a private buffer: the
/// pause budget's estimate of `--verify full`.
pub fn scan_rate(key: &PageKey) -> f64 {
    const PER_THREAD: usize = 8 << 20;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let buf: Vec<u8> = (0..PER_THREAD).map(|i| (i % 251) as u8 | 1).collect();
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let buf = &buf;
            s.spawn(move || {
                let mut out = Scan::default();
                scan_block(buf, (t * PER_THREAD) as u64, 0, key, None, &mut out);
                out
            });
        }
    });
    (threads * PER_THREAD) as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// Hex form of a digest or fingerprint.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{default_layout, dest_memory, source_memory};
    use vm_memory::{Bytes, GuestAddress};

    fn key() -> PageKey {
        PageKey::from_secrets([3; 192], [5; 192])
    }

    #[test]
    fn equal_content_equal_evidence_any_change_differs() {
        let l = default_layout(9 << 20).unwrap();
        let a = source_memory(&l).unwrap();
        let b = dest_memory(&l).unwrap();
        // What a scan found, without the CPU time it took.
        let found = |s: Scan| Scan {
            cpu: std::time::Duration::ZERO,
            ..s
        };
        let ea = found(memory_evidence(&a, &key()));
        assert_eq!(
            ea,
            found(memory_evidence(&b, &key())),
            "same content, different bitmaps"
        );
        assert_eq!(ea.evidence, Evidence(0), "zero memory has zero evidence");
        assert_eq!(ea.pages, (9 << 20) / 4096);
        a.write_slice(&[1], GuestAddress((9 << 20) - 1)).unwrap();
        let ea = found(memory_evidence(&a, &key()));
        assert_ne!(ea.evidence, memory_evidence(&b, &key()).evidence);
        assert_eq!(ea.data_pages, 1);
        b.write_slice(&[1], GuestAddress((9 << 20) - 1)).unwrap();
        assert_eq!(ea, found(memory_evidence(&b, &key())));
        // Another key, another evidence.
        let other = PageKey::from_secrets([4; 192], [5; 192]);
        assert_ne!(ea.evidence, memory_evidence(&a, &other).evidence);
        assert_eq!(hex(&[0xab; 16]).len(), 32);
    }

    #[test]
    fn the_whole_memory_evidence_equals_a_ledger_of_every_page() {
        // Two regions, pages written in another order than the scan's.
        let l = ferry_transport::MemoryLayout {
            page_size: 4096,
            regions: vec![
                ferry_transport::layout::RegionDesc {
                    gpa: 0,
                    size: 16 << 20,
                },
                ferry_transport::layout::RegionDesc {
                    gpa: 4 << 30,
                    size: 8 << 20,
                },
            ],
        };
        let regions: Vec<(u64, u64)> = l.regions.iter().map(|r| (r.gpa, r.size)).collect();
        let mem = source_memory(&l).unwrap();
        let ledger = Ledger::new(key(), &regions).unwrap();
        for gpa in [(4u64 << 30) + 4096, 0, 12 << 20, (16 << 20) - 4096] {
            let page = [gpa as u8 ^ 0x5a; 4096];
            mem.write_slice(&page, GuestAddress(gpa)).unwrap();
            let d = ledger.record(gpa, key().hash_or_zero(&page)).unwrap();
            ledger.apply(d);
        }
        let s = audit(&mem, &ledger);
        assert_eq!(s.evidence, ledger.evidence());
        assert_eq!((s.mismatched, s.first_mismatch, s.data_pages), (0, None, 4));
        // A write the ledger never saw (a missed dirty page) is found, by address.
        mem.write_slice(&[7], GuestAddress((4 << 30) + 8192 + 5))
            .unwrap();
        mem.write_slice(&[7], GuestAddress(12 << 20)).unwrap();
        let s = audit(&mem, &ledger);
        assert_ne!(s.evidence, ledger.evidence());
        assert_eq!(s.mismatched, 2);
        assert_eq!(s.first_mismatch, Some(12 << 20));
    }
}
