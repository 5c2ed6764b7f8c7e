//! What the benchmark examples share (`ffi/examples/copy_bench.rs`, and
//! `migration/examples/audit_bench.rs` through `#[path]`): guest memory
//! full of random bytes.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Maps `size` bytes of guest memory and fills them with xorshift64 words
/// (no zero pages, nothing a compressor would shrink), 1 MiB at a time;
/// `each` sees every block once it is written (its offset and bytes).
pub fn random_guest(size: usize, mut each: impl FnMut(usize, &[u8])) -> GuestMemoryMmap<()> {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("map guest memory");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for off in (0..size).step_by(block.len()) {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_slice(&block, GuestAddress(off as u64)).unwrap();
        each(off, &block);
    }
    mem
}
