//! Reusable page buffers: the private copies a chunk's pages are read into
//! when a transport cannot send them straight from guest memory.
//!
//! A chunk's copy lives from the page pass that made it until its frame was
//! written (compressed, encrypted, or written raw); then the buffer goes
//! back to its pool, so a migration reuses a handful of chunk-sized buffers
//! instead of mapping and faulting in a fresh one per chunk.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// Buffers returned by dropped [`PooledBuf`]s, for reuse.
#[derive(Debug)]
pub struct BufPool {
    spare: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` idle buffers.
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(BufPool {
            spare: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// A buffer of `len` bytes (contents unspecified: the caller fills it).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self.spare();
        if buf.is_empty() {
            // Zeroed by the allocator (fresh pages from the kernel), not
            // written here: the page pass overwrites it anyway, and on a
            // host where the first touch of memory is costly one pass
            // over 4 MiB of new memory is enough.
            buf = vec![0; len];
        } else if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledBuf {
            buf,
            len,
            pool: Some(self.clone()),
        }
    }

    /// An empty buffer with room for `cap` bytes, for a caller that fills
    /// a `Vec` itself and gives it back with [`BufPool::give`] (the relay's
    /// chunks): a spare one when the pool holds one.
    pub fn take_vec(&self, cap: usize) -> Vec<u8> {
        let mut buf = self.spare();
        buf.clear();
        buf.reserve_exact(cap);
        buf
    }

    /// An idle buffer, or an empty one.
    fn spare(&self) -> Vec<u8> {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Keeps `buf` for a later take, unless the pool already holds `keep`
    /// idle buffers.
    pub fn give(&self, buf: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < self.keep {
            spare.push(buf);
        }
    }

    /// Idle buffers held.
    pub fn idle(&self) -> usize {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A buffer that goes back to its pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl PooledBuf {
    /// The whole buffer, for filling.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Shortens the buffer's visible length to `len` (no reallocation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Shares the buffer as a chunk's [`PageData`].
    pub fn freeze(self) -> PageData {
        PageData(Arc::new(self))
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

/// A chunk's private copy of its page bytes, shared by the clones of the
/// chunk that are still on their way to the wire.
#[derive(Clone)]
pub struct PageData(Arc<PooledBuf>);

impl PageData {
    /// Wraps bytes that belong to no pool.
    pub fn from_vec(buf: Vec<u8>) -> Self {
        let len = buf.len();
        PageData(Arc::new(PooledBuf {
            buf,
            len,
            pool: None,
        }))
    }
}

impl Deref for PageData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for PageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageData({} bytes)", self.len())
    }
}

impl PartialEq for PageData {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PageData {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_go_back_to_their_pool_up_to_its_size() {
        let pool = BufPool::new(1);
        let mut a = pool.take(8);
        a.as_mut_slice().copy_from_slice(b"abcdefgh");
        a.truncate(3);
        assert_eq!(&*a, b"abc");
        let d = a.freeze();
        let d2 = d.clone();
        drop(d);
        assert_eq!(pool.idle(), 0, "still shared");
        drop(d2);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(4);
        let c = pool.take(4);
        assert_eq!(b.len(), 4);
        drop((b, c));
        assert_eq!(pool.idle(), 1, "keeps at most one");
        assert_eq!(
            format!("{:?}", PageData::from_vec(vec![1, 2])),
            "PageData(2 bytes)"
        );
    }
}
