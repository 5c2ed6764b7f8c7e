//! What the audit's whole-memory read costs per GiB on one core: copying
//! guest memory out a piece at a time (`vio::read_pieces`, the sound read)
//! and hashing every page of the copy (`PageKey::hash_or_zero`), for
//! several piece sizes, against hashing a private buffer in place (what a
//! read without the copy could at best cost).
//!
//! `cargo run --release -p ferry-migration --example audit_bench [MiB] [rounds]`
//!
//! Prints each case's CPU seconds per GiB (this thread's user + system
//! time), one line per round; compare cases within one run.

#[path = "../../ffi/examples/common/mod.rs"]
mod common;

use ferry_ffi::vio;
use ferry_proto::PageKey;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// CPU seconds this thread has used.
fn cpu_s() -> f64 {
    let t = ferry_ffi::cpu::thread_times().expect("thread CPU time");
    t.total().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let size = mib << 20;
    let per_gib = 1024.0 / mib as f64;
    let key = PageKey::from_secrets([3; 192], [5; 192]);
    let mut private = vec![0u8; size];
    let mem = common::random_guest(size, |off, block| {
        private[off..off + block.len()].copy_from_slice(block)
    });
    let slice = mem.get_slice(GuestAddress(0), size).unwrap();
    for round in 0..rounds {
        for piece in [256usize << 10, 32 << 10, 8 << 10, 4 << 10] {
            let mut buf = Vec::new();
            let mut acc = 0u128;
            let t = cpu_s();
            let _ = vio::read_pieces::<_, ()>(&slice, &mut buf, piece, |_, b| {
                for p in b.chunks_exact(4096) {
                    acc ^= key.hash_or_zero(p).0;
                }
                Ok(())
            });
            let d = cpu_s() - t;
            println!(
                "round {round}: copy {:>3} KiB pieces + hash: {:.3} s/GiB ({:08x})",
                piece >> 10,
                d * per_gib,
                acc as u32
            );
        }
        let mut acc = 0u128;
        let t = cpu_s();
        for p in private.chunks_exact(4096) {
            acc ^= key.hash_or_zero(p).0;
        }
        let d = cpu_s() - t;
        println!(
            "round {round}: hash in place (private memory): {:.3} s/GiB ({:08x})",
            d * per_gib,
            acc as u32
        );
    }
}
