//! Guest memory as every backend reads and lands it: the [`GuestMem`]
//! bound, the slices of page runs, the private copy compression and
//! encryption work from, and the landing side's claims and evidence tally
//! (every page hashed into the migration's ledger right after it lands).
//! Shared by TCP, compression and RDMA; knows nothing of sockets.

use ferry_ffi::vio;
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::error::{Result, TransportError};
use crate::layout::{PageRun, PAGE_SIZE};
use ferry_proto::evidence::PageHash;
use ferry_proto::Ledger;
use ferry_proto::WireError;

/// Guest memory the transport can read from or land pages in.
pub trait GuestMem: GuestMemoryBackend + Send + Sync + 'static {}
impl<T: GuestMemoryBackend + Send + Sync + 'static> GuestMem for T {}

/// The slices of guest memory holding the non-zero runs, in run order.
pub fn run_slices<'m, M: GuestMem>(
    mem: &'m M,
    runs: &[PageRun],
) -> Result<Vec<VolatileSlice<'m, MS<'m, M>>>> {
    runs.iter()
        .filter(|r| !r.zero)
        .map(|r| {
            mem.get_slice(
                GuestAddress(r.gpa),
                usize::try_from(r.bytes()).unwrap_or(usize::MAX),
            )
            .map_err(|_| {
                TransportError::Wire(WireError::OutsideLayout {
                    gpa: r.gpa,
                    pages: r.pages.into(),
                })
            })
        })
        .collect()
}

/// Copies the non-zero runs' pages, in run order, out of guest memory into
/// `out` (resized to their total) with [`vio::copy_out`]: the private copy
/// compression and encryption work from.
pub fn copy_runs<M: GuestMem>(mem: &M, runs: &[PageRun], out: &mut Vec<u8>) -> Result<()> {
    let total: u64 = runs.iter().map(PageRun::payload_bytes).sum();
    out.resize(total as usize, 0);
    let mut at = 0usize;
    for r in runs.iter().filter(|r| !r.zero) {
        let s = run_slice(mem, r)?;
        at += vio::copy_out(&s, &mut out[at..]);
    }
    Ok(())
}

/// Fills a zero run in destination memory with zeros.
pub fn zero_run<M: GuestMem>(mem: &M, run: &PageRun) -> Result<()> {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut left = run.bytes();
    let mut gpa = run.gpa;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        mem.write_slice(&ZEROS[..n as usize], GuestAddress(gpa))
            .map_err(|_| {
                TransportError::Wire(WireError::OutsideLayout {
                    gpa: run.gpa,
                    pages: run.pages.into(),
                })
            })?;
        left -= n;
        gpa += n;
    }
    Ok(())
}

/// The destination's side of the evidence for one chunk: hashes pages as
/// they land, records them in the ledger, and sums their contributions.
#[derive(Debug)]
pub(crate) struct Tally<'a> {
    ledger: &'a Ledger,
    delta: u128,
    /// Sum of the landed pages' contributions (what the payload tag covers).
    pub(crate) sum: u128,
}

impl<'a> Tally<'a> {
    pub(crate) fn new(ledger: &'a Ledger) -> Self {
        Tally {
            ledger,
            delta: 0,
            sum: 0,
        }
    }

    /// Records page `gpa` as holding `bytes`.
    pub(crate) fn page(&mut self, gpa: u64, bytes: &[u8]) {
        let h = self.ledger.key().hash_or_zero(bytes);
        self.hashed(gpa, h);
    }

    /// Records page `gpa` as holding content that hashes to `h`.
    pub(crate) fn hashed(&mut self, gpa: u64, h: PageHash) {
        // Runs were checked against the layout the ledger was built for.
        if let Ok((d, c)) = self.ledger.record_page(gpa, h) {
            self.delta = self.delta.wrapping_add(d);
            self.sum = self.sum.wrapping_add(c);
        }
    }

    /// Records every page of a zero run as zero.
    pub(crate) fn zero_run(&mut self, run: &PageRun) {
        for p in 0..u64::from(run.pages) {
            self.hashed(run.gpa + p * PAGE_SIZE, PageHash::ZERO);
        }
    }
}

impl Drop for Tally<'_> {
    /// Applies the chunk's changes to the evidence in one step, also when
    /// landing stopped half way (what landed is recorded either way).
    fn drop(&mut self) {
        self.ledger.apply(self.delta);
    }
}

/// Claims every run of a chunk (zero runs included) for landing. The outer
/// error is a run outside guest memory, the inner one an overlapping claim.
pub(crate) fn claim_runs<M: GuestMem>(
    mem: &M,
    runs: &[PageRun],
) -> Result<std::result::Result<vio::Claim, vio::Busy>> {
    let slices = runs
        .iter()
        .map(|r| run_slice(mem, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(vio::claim(&slices))
}

pub(crate) fn run_slice<'m, M: GuestMem>(
    mem: &'m M,
    r: &PageRun,
) -> Result<VolatileSlice<'m, MS<'m, M>>> {
    mem.get_slice(
        GuestAddress(r.gpa),
        usize::try_from(r.bytes()).unwrap_or(usize::MAX),
    )
    .map_err(|_| {
        TransportError::Wire(WireError::OutsideLayout {
            gpa: r.gpa,
            pages: r.pages.into(),
        })
    })
}

/// Writes a claimed zero run's zeros and records them.
pub(crate) fn land_zero_run<M: GuestMem>(
    claim: &mut vio::Claim,
    mem: &M,
    run: &PageRun,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let slice = run_slice(mem, run)?;
    claim
        .with_bytes_mut(&slice, |b| b.fill(0))
        .map_err(claim_error)?;
    tally.zero_run(run);
    Ok(())
}

pub(crate) fn claim_error(e: vio::NotClaimed) -> TransportError {
    TransportError::Local(WireError::Invalid {
        field: "landing claim",
        detail: e.to_string(),
    })
}

/// Hashes (from destination memory, under the claim) and records the pages
/// in payload bytes `from..to` of the non-zero runs `data`; `from` and `to`
/// are page aligned. Returns the offset reached.
pub(crate) fn hash_landed<M: GuestMem>(
    claim: &vio::Claim,
    mem: &M,
    data: &[PageRun],
    mut from: u64,
    to: u64,
    tally: &mut Tally<'_>,
) -> Result<u64> {
    let mut base = 0u64;
    for r in data {
        let end = base + r.bytes();
        while from < to && from < end {
            let gpa = r.gpa + (from - base);
            let page = mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .map_err(|_| TransportError::Wire(WireError::OutsideLayout { gpa, pages: 1 }))?;
            claim
                .with_bytes(&page, |b| tally.page(gpa, b))
                .map_err(claim_error)?;
            from += PAGE_SIZE;
        }
        base = end;
        if from >= to {
            break;
        }
    }
    Ok(from)
}
