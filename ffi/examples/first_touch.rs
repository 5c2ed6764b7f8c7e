//! What the destination's first touch of fresh guest memory costs, by how
//! the memory is backed.
//!
//! `cargo run --release -p ferry-ffi --example first_touch [MiB] [rounds]`
//!
//! Maps MiB (default 1024) of memory, makes it writable page by page as
//! the destination's landing does, and writes all of it (a 4 MiB `memcpy`
//! at a time, as pages landing from a socket), then unmaps it; per case
//! and round it prints the CPU seconds per GiB of the touch and write and
//! of the unmap (`CLOCK_PROCESS_CPUTIME_ID`). Cases:
//!
//! - `backed`: memory populated before the clock starts (the write alone:
//!   a preallocated destination, `ferry listen --prealloc-guest`);
//! - `4k-populate`: 4 KiB pages, `MADV_POPULATE_WRITE` per 4 MiB before its
//!   write (Ferry's default landing);
//! - `4k-fault`: 4 KiB pages, a fault per page as the write reaches it;
//! - `4k-populate-all`: 4 KiB pages, one `MADV_POPULATE_WRITE` of the
//!   whole range first;
//! - `thp-fault`, `thp-populate`: `MADV_HUGEPAGE` (transparent huge pages,
//!   subject to the host's `defrag` setting), then faults or populate per
//!   4 MiB;
//! - `hugetlb-fault`, `hugetlb-populate`: 2 MiB pages from the hugetlb pool
//!   (`MAP_HUGETLB`, `ferry listen --hugepages`), skipped when the pool has
//!   too few free pages (`sysctl vm.nr_hugepages=N`).
//!
//! Run the hugetlb cases twice after reserving a pool to see a pool page's
//! first use (on a VM with free page reporting the hypervisor backs it
//! then) apart from its reuse.

use std::time::Duration;

const BATCH: usize = 4 << 20;

fn cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One case: (touch and write, unmap) CPU seconds per GiB, or why not.
fn run(case: &str, size: usize, src: &[u8]) -> Result<(f64, f64), String> {
    let hugetlb = case.starts_with("hugetlb");
    let flags = if hugetlb {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
    };
    // SAFETY: a new private anonymous mapping, not MAP_FIXED: it overlaps
    // nothing and is only used through `mem` below, then unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let advise = |off: usize, len: usize, advice: libc::c_int| {
        // SAFETY: the range lies inside the mapping made above; these
        // advices do not change what the memory reads as.
        let r = unsafe { libc::madvise(p.cast::<u8>().add(off).cast(), len, advice) };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    };
    match case {
        "thp-fault" | "thp-populate" => advise(0, size, libc::MADV_HUGEPAGE),
        "hugetlb-fault" | "hugetlb-populate" => {}
        _ => advise(0, size, libc::MADV_NOHUGEPAGE),
    }
    if case == "backed" {
        advise(0, size, libc::MADV_POPULATE_WRITE);
    }
    // SAFETY: the mapping is `size` bytes, readable and writable, and only
    // this function uses it until it is unmapped below.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), size) };
    let t0 = cpu();
    if case == "4k-populate-all" {
        advise(0, size, libc::MADV_POPULATE_WRITE);
    }
    for off in (0..size).step_by(BATCH) {
        let n = BATCH.min(size - off);
        if case.ends_with("-populate") {
            advise(off, n, libc::MADV_POPULATE_WRITE);
        }
        mem[off..off + n].copy_from_slice(&src[..n]);
    }
    std::hint::black_box(&mem[size - 1]);
    let t1 = cpu();
    // SAFETY: unmaps the mapping made above; `mem` is not used after.
    unsafe { libc::munmap(p, size) };
    let t2 = cpu();
    let gib = size as f64 / (1u64 << 30) as f64;
    Ok(((t1 - t0).as_secs_f64() / gib, (t2 - t1).as_secs_f64() / gib))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let size = (mib << 20).next_multiple_of(BATCH);
    let src: Vec<u8> = (0..BATCH).map(|i| (i * 7 + 1) as u8).collect();
    println!(
        "first touch of {} MiB, CPU s per GiB (touch+write / unmap), {rounds} rounds",
        size >> 20
    );
    for case in [
        "backed",
        "4k-populate",
        "4k-fault",
        "4k-populate-all",
        "thp-fault",
        "thp-populate",
        "hugetlb-fault",
        "hugetlb-populate",
    ] {
        let mut line = format!("{case:<17}");
        for _ in 0..rounds {
            match run(case, size, &src) {
                Ok((touch, unmap)) => line += &format!(" {touch:.3}/{unmap:.3}"),
                Err(e) => {
                    line += &format!(" skipped ({e})");
                    break;
                }
            }
        }
        println!("{line}");
    }
}
