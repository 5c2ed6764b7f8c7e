//! The guest seen by the engine ([`GuestControl`]) and Ferry's built-in
//! synthetic guest.
//!
//! The synthetic guest is a worker thread that keeps writing whole pages at a
//! set rate (`--dirty-rate`), through `vm-memory` so every write marks the
//! dirty bitmap. Each page it writes is self-describing:
//!
//! ```text
//! word 0: PAGE_MAGIC   word 1: guest physical address   word 2: version
//! words 3..512: splitmix64(gpa ^ version.rotate_left(32) + i)
//! ```
//!
//! so the destination can check every page on its own ([`verify_pages`]): a
//! page is either all zero, a valid pattern page for its own address, or (with
//! `--guest-image`) image content that only the digest can vouch for.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ffi::vio;
use ferry_transport::proto::GuestConfig;
use ferry_transport::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::error::{MigrationError, Result};
use crate::memory::SourceMemory;

/// What the engine needs from the guest it migrates.
pub trait GuestControl: Send + Sync {
    /// Configuration the destination validates.
    fn config(&self) -> GuestConfig;
    /// Stops the guest writing memory. When it returns, every write is done
    /// and recorded in the dirty log.
    fn pause(&self) -> Result<()>;
    /// Lets the guest run again (after a failed migration).
    fn resume(&self) -> Result<()>;
    /// Device state (vCPU registers, device models), taken while paused.
    fn device_state(&self) -> Result<Vec<u8>>;
    /// The expected size of [`GuestControl::device_state`], asked while the
    /// guest runs: the pause budget counts its transfer. The default, 1 MiB,
    /// is on the large side for a VM's vCPU and device state.
    fn device_state_size_hint(&self) -> u64 {
        1 << 20
    }
    /// Auto-converge: slows the guest so it dirties memory more slowly,
    /// keeping it off its vCPUs `percent`% of the time (0: full speed again,
    /// at most 99). A VMM implements it by making its vCPU threads sleep,
    /// as QEMU's CPU throttling does; the default says it cannot.
    fn throttle(&self, percent: u8) -> Result<()> {
        Err(MigrationError::Guest(format!(
            "this guest cannot be throttled (asked for {percent}%)"
        )))
    }
    /// CPU time the guest's own threads have used so far (vCPUs, or the
    /// synthetic guest's worker), if this process runs them: excluded from
    /// Ferry's CPU figure ([`crate::cpu`]). The default: none.
    fn cpu_time(&self) -> Duration {
        Duration::ZERO
    }
}

/// First word of every pattern page ("FERRYPG1").
pub const PAGE_MAGIC: u64 = 0x3147_5059_5252_4546;
const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Device-state format of the synthetic guest.
pub const SYNTHETIC_FORMAT: &str = "ferry-synthetic-v1";

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `page` with the pattern of (`gpa`, `version`).
pub fn pattern_page(page: &mut [u64; WORDS], gpa: u64, version: u64) {
    page[0] = PAGE_MAGIC;
    page[1] = gpa;
    page[2] = version;
    let seed = gpa ^ version.rotate_left(32);
    for (i, w) in page.iter_mut().enumerate().skip(3) {
        *w = splitmix(seed.wrapping_add(i as u64));
    }
}

fn page_bytes(page: &[u64; WORDS]) -> [u8; PAGE_SIZE as usize] {
    let mut b = [0u8; PAGE_SIZE as usize];
    for (c, w) in b.chunks_exact_mut(8).zip(page) {
        c.copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Settings of the synthetic guest.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Bytes per second the worker writes (0: idle guest).
    pub dirty_rate: u64,
    /// Fraction of pages left zero at start.
    pub zero_fraction: f64,
    /// Initial memory content from a file instead of pattern pages.
    pub image: Option<PathBuf>,
    /// Seed for page choice.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            dirty_rate: 64_000_000,
            zero_fraction: 0.25,
            image: None,
            seed: 1,
        }
    }
}

#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    parked: bool,
}

#[derive(Debug, Default)]
struct Shared {
    pause_requested: AtomicBool,
    stop: AtomicBool,
    /// Auto-converge throttle, percent of the time the worker sleeps.
    throttle: std::sync::atomic::AtomicU8,
    gate: Mutex<Gate>,
    cv: Condvar,
    writes: AtomicU64,
    /// The worker thread's CPU time, nanoseconds (refreshed as it runs).
    cpu_ns: AtomicU64,
}

/// Device state of the synthetic guest.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyntheticState {
    /// Pages written by the worker since start.
    pub writes: u64,
    /// Configured rate.
    pub dirty_rate: u64,
}

/// Ferry's built-in guest: memory plus a page-dirtying worker thread.
#[derive(Debug)]
pub struct SyntheticGuest {
    mem: Arc<SourceMemory>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    cfg: SyntheticConfig,
}

impl SyntheticGuest {
    /// Fills `mem` (pattern pages, or the image) and starts the worker.
    pub fn start(mem: Arc<SourceMemory>, cfg: SyntheticConfig) -> Result<Self> {
        match &cfg.image {
            Some(path) => load_image(&mem, path)?,
            None => fill_pattern(&mem, cfg.zero_fraction, cfg.seed),
        }
        let shared = Arc::new(Shared::default());
        let worker = if cfg.dirty_rate > 0 {
            let (m, s, c) = (mem.clone(), shared.clone(), cfg.clone());
            Some(
                std::thread::Builder::new()
                    .name("synthetic-guest".into())
                    .spawn(move || dirty_worker(&m, &s, &c))
                    .map_err(|e| {
                        MigrationError::Guest(format!("cannot start the guest worker: {e}"))
                    })?,
            )
        } else {
            None
        };
        Ok(SyntheticGuest {
            mem,
            shared,
            worker,
            cfg,
        })
    }

    /// The guest's memory.
    pub fn memory(&self) -> &Arc<SourceMemory> {
        &self.mem
    }

    /// Pages written by the worker so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// True while the worker is running (not paused).
    pub fn is_running(&self) -> bool {
        !self.shared.gate.lock().expect("gate").paused
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let mut g = self.shared.gate.lock().expect("gate");
            g.paused = false;
            self.shared.cv.notify_all();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl GuestControl for SyntheticGuest {
    fn config(&self) -> GuestConfig {
        GuestConfig {
            vcpus: 1,
            cpu_vendor: cpu_vendor(),
            device_state_format: SYNTHETIC_FORMAT.into(),
        }
    }

    fn pause(&self) -> Result<()> {
        let mut g = self.shared.gate.lock().expect("gate");
        g.paused = true;
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        if self.worker.is_none() {
            return Ok(());
        }
        let (g, t) = self
            .shared
            .cv
            .wait_timeout_while(g, Duration::from_secs(5), |g| !g.parked)
            .expect("gate");
        if t.timed_out() && !g.parked {
            return Err(MigrationError::Guest(
                "the guest worker did not pause within 5 s".into(),
            ));
        }
        Ok(())
    }

    fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.shared.cpu_ns.load(Ordering::Relaxed))
    }

    fn resume(&self) -> Result<()> {
        let mut g = self.shared.gate.lock().expect("gate");
        g.paused = false;
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn device_state(&self) -> Result<Vec<u8>> {
        let st = SyntheticState {
            writes: self.writes(),
            dirty_rate: self.cfg.dirty_rate,
        };
        serde_json::to_vec(&st).map_err(|e| MigrationError::Guest(e.to_string()))
    }

    fn device_state_size_hint(&self) -> u64 {
        self.device_state().map_or(0, |s| s.len() as u64)
    }

    fn throttle(&self, percent: u8) -> Result<()> {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        Ok(())
    }
}

/// This host's CPU vendor (`vendor_id` in /proc/cpuinfo; `unknown` when
/// it says none).
pub fn cpu_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("vendor_id"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Every page of guest memory by index, in address order, without a list
/// of them (that would cost 8 bytes a page: 32 MiB for 16 GiB).
#[derive(Debug, Clone)]
struct Pages {
    /// (first guest address, pages) of each region.
    regions: Vec<(u64, u64)>,
}

impl Pages {
    fn of(mem: &SourceMemory) -> Pages {
        Pages {
            regions: mem
                .iter()
                .map(|r| (r.start_addr().0, r.len() / PAGE_SIZE))
                .collect(),
        }
    }
    fn len(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }
    /// The guest address of page `i` (< `len()`).
    fn gpa(&self, mut i: u64) -> u64 {
        for &(start, pages) in &self.regions {
            if i < pages {
                return start + i * PAGE_SIZE;
            }
            i -= pages;
        }
        unreachable!("page index inside guest memory")
    }
}

fn fill_pattern(mem: &SourceMemory, zero_fraction: f64, seed: u64) {
    let pages = Pages::of(mem);
    let threshold = (zero_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4) as u64;
    let per = pages.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let pages = &pages;
            s.spawn(move || {
                let mut page = [0u64; WORDS];
                for i in (t * per)..((t + 1) * per).min(pages.len()) {
                    let gpa = pages.gpa(i);
                    if zero_fraction > 0.0 && splitmix(gpa ^ seed) <= threshold {
                        continue;
                    }
                    pattern_page(&mut page, gpa, 0);
                    mem.write_slice(&page_bytes(&page), GuestAddress(gpa))
                        .expect("page inside guest memory");
                }
            });
        }
    });
}

fn load_image(mem: &SourceMemory, path: &std::path::Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        MigrationError::Config(format!("cannot open guest image {}: {e}", path.display()))
    })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut left = len;
    for r in mem.iter() {
        if left == 0 {
            break;
        }
        let n = left.min(r.len()) as usize;
        r.read_exact_volatile_from(MemoryRegionAddress(0), &mut f, n)
            .map_err(|e| {
                MigrationError::Config(format!("cannot read guest image {}: {e}", path.display()))
            })?;
        left -= n as u64;
    }
    Ok(())
}

fn dirty_worker(mem: &SourceMemory, shared: &Shared, cfg: &SyntheticConfig) {
    let pages = Pages::of(mem);
    let hot = (pages.len() / 16).max(1);
    let mut rng = splitmix(cfg.seed ^ 0xD1B5_4A32_D192_ED03);
    let mut page = [0u64; WORDS];
    // Bytes the rate allows so far; a throttled worker earns them only
    // for the (100 - throttle)% of the time it is let run.
    let mut allowed = 0.0f64;
    let mut last = Instant::now();
    // This thread's CPU time, published every 64 turns and before parking
    // (the CPU accounting leaves the guest's work out of Ferry's).
    let publish = || {
        if let Ok(t) = ferry_ffi::cpu::thread_times() {
            let ns = u64::try_from(t.total().as_nanos()).unwrap_or(u64::MAX);
            shared.cpu_ns.store(ns, Ordering::Relaxed);
        }
    };
    let mut turns = 0u64;
    loop {
        turns += 1;
        if turns.is_multiple_of(64) {
            publish();
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if shared.pause_requested.load(Ordering::SeqCst) {
            publish();
            let mut g = shared.gate.lock().expect("gate");
            g.parked = true;
            shared.cv.notify_all();
            while g.paused && !shared.stop.load(Ordering::Relaxed) {
                g = shared.cv.wait(g).expect("gate");
            }
            g.parked = false;
            last = Instant::now();
            continue;
        }
        // Token bucket: write what the rate allows by now, else sleep a tick
        // (at most 10 ms of writes banked: a worker that fell behind does
        // not catch up in a burst, and a throttle bites at once).
        let now = Instant::now();
        let run = 1.0 - f64::from(shared.throttle.load(Ordering::Relaxed)) / 100.0;
        let rate = cfg.dirty_rate as f64;
        let bank = (rate / 100.0).max(PAGE_SIZE as f64);
        allowed = (allowed + now.duration_since(last).as_secs_f64() * rate * run).min(bank);
        last = now;
        if allowed < PAGE_SIZE as f64 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        rng = splitmix(rng);
        // Three writes in four go to a hot sixteenth of memory.
        let idx = if !rng.is_multiple_of(4) {
            (rng >> 8) % hot
        } else {
            (rng >> 8) % pages.len()
        };
        let gpa = pages.gpa(idx);
        let version = shared.writes.fetch_add(1, Ordering::Relaxed) + 1;
        pattern_page(&mut page, gpa, version);
        mem.write_slice(&page_bytes(&page), GuestAddress(gpa))
            .expect("page inside guest memory");
        allowed -= PAGE_SIZE as f64;
    }
}

/// What [`verify_pages`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct PageCheck {
    /// Valid pattern pages.
    pub pattern: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Other content (an image), vouched for by the digest only.
    pub other: u64,
    /// Pattern pages whose body does not match their header (torn or corrupt).
    pub corrupt: u64,
    /// Address of the first corrupt page.
    pub first_corrupt: Option<u64>,
}

/// Checks every page of `mem` on its own (see the module docs).
pub fn verify_pages<M: GuestMemoryBackend>(mem: &M) -> PageCheck {
    let mut check = PageCheck::default();
    let mut expect = [0u64; WORDS];
    for r in mem.iter() {
        let base = r.start_addr().0;
        let Ok(slice) = r.get_slice(MemoryRegionAddress(0), r.len() as usize) else {
            continue;
        };
        // Through a private copy, a page at a time (ferry_ffi::vio).
        let mut buf = Vec::new();
        let _ = vio::read_pieces::<_, ()>(&slice, &mut buf, PAGE_SIZE as usize, |off, p| {
            if p.len() == PAGE_SIZE as usize {
                classify(p, base + off as u64, &mut expect, &mut check);
            }
            Ok(())
        });
    }
    check
}

fn classify(p: &[u8], gpa: u64, expect: &mut [u64; WORDS], check: &mut PageCheck) {
    let word = |i: usize| u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != PAGE_MAGIC {
        if p.iter().all(|&b| b == 0) {
            check.zero += 1;
        } else {
            check.other += 1;
        }
        return;
    }
    pattern_page(expect, gpa, word(2));
    if word(1) == gpa && page_bytes(expect)[..] == *p {
        check.pattern += 1;
    } else {
        check.corrupt += 1;
        check.first_corrupt.get_or_insert(gpa);
    }
}

/// Reads a slice's bytes (for tests and tools).
pub fn slice_to_vec<B: BitmapSlice>(s: &vm_memory::VolatileSlice<'_, B>) -> Vec<u8> {
    let mut v = vec![0u8; s.len()];
    vio::copy_out(s, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{default_layout, source_memory};

    #[test]
    fn filled_guest_verifies_and_a_flipped_byte_is_found() {
        let mem = Arc::new(source_memory(&default_layout(4 << 20).unwrap()).unwrap());
        let g = SyntheticGuest::start(
            mem.clone(),
            SyntheticConfig {
                dirty_rate: 0,
                ..Default::default()
            },
        )
        .unwrap();
        let c = verify_pages(&*mem);
        assert_eq!(c.corrupt, 0);
        assert!(c.zero > 100 && c.pattern > 600, "{c:?}");
        mem.write_slice(&[0xAA], GuestAddress(4096 * 7 + 100))
            .unwrap();
        let c2 = verify_pages(&*mem);
        // page 7 was either pattern (now corrupt) or zero (now "other").
        assert!(c2.corrupt == 1 || c2.other == 1, "{c2:?}");
        drop(g);
    }

    #[test]
    fn worker_dirties_at_about_the_rate_and_stops_when_paused() {
        let mem = Arc::new(source_memory(&default_layout(8 << 20).unwrap()).unwrap());
        let g = SyntheticGuest::start(
            mem.clone(),
            SyntheticConfig {
                dirty_rate: 40 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        while g.writes() < 50 {
            std::thread::sleep(Duration::from_millis(5));
        }
        g.pause().unwrap();
        let w = g.writes();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.writes(), w, "no writes while paused");
        assert!(!g.is_running());
        assert_eq!(
            verify_pages(&*mem).corrupt,
            0,
            "every written page is whole"
        );
        g.resume().unwrap();
        while g.writes() == w {
            std::thread::sleep(Duration::from_millis(5));
        }
        let st: SyntheticState = serde_json::from_slice(&g.device_state().unwrap()).unwrap();
        assert!(st.writes > w);
    }

    #[test]
    fn a_throttled_worker_dirties_proportionally_less() {
        let mem = Arc::new(source_memory(&default_layout(8 << 20).unwrap()).unwrap());
        let g = SyntheticGuest::start(
            mem,
            SyntheticConfig {
                dirty_rate: 40 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        // Pages written over 300 ms, by the worker's own count (so a slow
        // machine only makes both figures smaller, never the ratio wrong).
        let over = |g: &SyntheticGuest| {
            let (w, t) = (g.writes(), Instant::now());
            std::thread::sleep(Duration::from_millis(300));
            (g.writes() - w) as f64 / t.elapsed().as_secs_f64()
        };
        let full = over(&g);
        g.throttle(90).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let slow = over(&g);
        assert!(
            slow < full / 3.0,
            "90% throttle: {slow:.0} pages/s vs {full:.0} unthrottled"
        );
        g.throttle(0).unwrap();
    }
}
