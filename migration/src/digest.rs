//! Whole-memory digest compared at switchover.
//!
//! xxh3-128 of every 4 MiB block (in parallel over the available cores), then
//! xxh3-128 over the layout and the block digests in address order. It is a
//! check against transfer bugs and corruption, not a cryptographic proof
//! (authentication and, later, encryption cover an active attacker).

use ferry_ffi::vio;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

const BLOCK: usize = 4 << 20;

/// Digest of the whole guest memory.
pub fn memory_digest<M: GuestMemoryBackend + Sync>(mem: &M) -> [u8; 16] {
    // (region start, region len, block offset, block len)
    let mut blocks = Vec::new();
    for r in mem.iter() {
        let len = r.len() as usize;
        let mut off = 0;
        while off < len {
            blocks.push((r.start_addr().0, len, off, BLOCK.min(len - off)));
            off += BLOCK;
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let mut hashes = vec![0u128; blocks.len()];
    let per = blocks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (bl, out) in blocks.chunks(per).zip(hashes.chunks_mut(per)) {
            s.spawn(move || {
                // Guest memory is read through a private copy, never a
                // reference (ferry_ffi::vio): the streaming hash of the
                // pieces equals the one-shot hash of the block.
                let mut buf = Vec::new();
                for (&(start, _, off, len), h) in bl.iter().zip(out.iter_mut()) {
                    let r = mem
                        .find_region(vm_memory::GuestAddress(start))
                        .expect("region exists");
                    let slice = r
                        .get_slice(MemoryRegionAddress(off as u64), len)
                        .expect("block inside region");
                    let mut x = Xxh3::new();
                    let _ = vio::read_pieces::<_, ()>(&slice, &mut buf, 256 << 10, |_, b| {
                        x.update(b);
                        Ok(())
                    });
                    *h = x.digest128();
                }
            });
        }
    });
    let mut all = Vec::with_capacity(blocks.len() * 16 + 16 * mem.num_regions());
    for r in mem.iter() {
        all.extend_from_slice(&r.start_addr().0.to_le_bytes());
        all.extend_from_slice(&r.len().to_le_bytes());
    }
    for h in hashes {
        all.extend_from_slice(&h.to_le_bytes());
    }
    xxh3_128(&all).to_le_bytes()
}

/// Hex form of a digest.
pub fn hex(d: &[u8; 16]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{default_layout, dest_memory, source_memory};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn equal_content_equal_digest_any_change_differs() {
        let l = default_layout(9 << 20).unwrap();
        let a = source_memory(&l).unwrap();
        let b = dest_memory(&l).unwrap();
        assert_eq!(
            memory_digest(&a),
            memory_digest(&b),
            "same content, different bitmap types"
        );
        a.write_slice(&[1], GuestAddress((9 << 20) - 1)).unwrap();
        assert_ne!(memory_digest(&a), memory_digest(&b));
        b.write_slice(&[1], GuestAddress((9 << 20) - 1)).unwrap();
        assert_eq!(memory_digest(&a), memory_digest(&b));
        assert_eq!(hex(&[0xab; 16]).len(), 32);
    }
}
