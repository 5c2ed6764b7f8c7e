//! What the memory report (`memory::memory_use`, on both sides of every
//! migration) costs for 1 GiB of written guest memory: CPU seconds of this
//! thread per call, five calls.
//!
//! `cargo run --release -p ferry-migration --example memuse_bench`

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// CPU seconds this thread has used.
fn cpu_s() -> f64 {
    let t = ferry_ffi::cpu::thread_times().expect("thread CPU time");
    t.total().as_secs_f64()
}

fn main() {
    let size = 1usize << 30;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("map guest memory");
    let block = vec![1u8; 1 << 20];
    for off in (0..size).step_by(block.len()) {
        mem.write_slice(&block, GuestAddress(off as u64)).unwrap();
    }
    for _ in 0..5 {
        let t = cpu_s();
        let u = ferry_migration::memory::memory_use(&mem);
        println!(
            "memory_use of 1 GiB: {:.4} CPU s ({} bytes resident)",
            cpu_s() - t,
            u.guest_resident_bytes
        );
    }
}
