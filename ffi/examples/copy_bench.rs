//! How fast the sound copy reads guest memory, against `memcpy`.
//!
//! `cargo run --release -p ferry-ffi --example copy_bench [MiB] [passes]`
//!
//! Copies every 4 KiB page of a guest memory of MiB (default 1024) of
//! random bytes into a private page buffer (as the source's page pass
//! does), once per method per pass, and prints the median GB/s of each:
//! `memcpy` (vm-memory's `VolatileSlice::copy_to`, which is a plain
//! `memcpy` and not sound against a concurrent writer), the opaque copy
//! Ferry uses (`rep movsb` in inline assembly on x86-64), and volatile word
//! reads (the portable form).

mod common;

use std::time::Instant;

use ferry_ffi::vio::{copy_out_with, CopyMethod};
use vm_memory::{GuestAddress, GuestMemoryBackend};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let passes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let size = mib << 20;
    let mem = common::random_guest(size, |_, _| {});
    let slice = mem.get_slice(GuestAddress(0), size).unwrap();
    let mut page = vec![0u8; 4096];
    let mut sink = 0u8;
    let methods: [(&str, Option<CopyMethod>); 3] = [
        (
            "memcpy (VolatileSlice::copy_to, unsound under writes)",
            None,
        ),
        ("opaque copy (rep movsb, Ferry's)", Some(CopyMethod::Opaque)),
        ("volatile word reads", Some(CopyMethod::Volatile)),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
    for _ in 0..passes {
        for (i, (_, m)) in methods.iter().enumerate() {
            let t = Instant::now();
            for off in (0..size).step_by(4096) {
                let p = slice.subslice(off, 4096).unwrap();
                match m {
                    None => {
                        p.copy_to(&mut page[..]);
                    }
                    Some(m) => {
                        copy_out_with(*m, &p, &mut page);
                    }
                }
                sink ^= page[17];
            }
            rates[i].push(size as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    println!("{mib} MiB of random pages, {passes} passes, page by page into a 4 KiB buffer");
    for ((name, _), r) in methods.iter().zip(&mut rates) {
        r.sort_by(f64::total_cmp);
        let med = r[r.len() / 2];
        println!(
            "{name:<58} {med:6.2} GB/s  ({:.3} CPU s/GiB)",
            (1u64 << 30) as f64 / (med * 1e9)
        );
    }
    std::hint::black_box(sink);
}
