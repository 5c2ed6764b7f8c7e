//! Memory the destination sets aside for migrations, and the receive
//! buffers counted against it.
//!
//! A destination books every accepted migration's guest memory against its
//! `--memory-limit` ([`MemoryPool::reserve`]). Everything else a peer can
//! make it allocate — the buffer a compressed frame is read into, a run
//! table, the scratch a refused payload is drained through — is a
//! [`RecvBuf`]: it starts empty, grows only as bytes actually arrive (in
//! steps, never to a length a header merely announces), and every step is
//! booked on the same reservation ([`Reservation::grow`]), so the total
//! stays within `--memory-limit` whatever the peers announce. A step that
//! does not fit is refused with an error naming the limit, and the channel
//! that asked for it is closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, TransportError};
use ferry_proto::WireError;

/// Bytes a migration may set aside, for all migrations together.
#[derive(Debug)]
pub struct MemoryPool {
    limit: u64,
    used: Mutex<u64>,
}

/// Why a reservation did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFull {
    /// Bytes asked for.
    pub bytes: u64,
    /// Bytes already booked.
    pub used: u64,
    /// The pool's limit.
    pub limit: u64,
}

impl MemoryPool {
    /// A pool of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemoryPool {
            limit,
            used: Mutex::new(0),
        })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes booked now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, bytes: u64) -> std::result::Result<(), PoolFull> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.saturating_add(bytes) > self.limit {
            return Err(PoolFull {
                bytes,
                used: *used,
                limit: self.limit,
            });
        }
        *used += bytes;
        Ok(())
    }

    fn give(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(bytes);
    }

    /// Books `bytes`; released when the returned reservation drops.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> std::result::Result<Reservation, PoolFull> {
        self.take(bytes)?;
        Ok(Reservation {
            pool: self.clone(),
            held: AtomicU64::new(bytes),
        })
    }
}

/// Bytes booked by one migration: its guest memory, plus its receive
/// buffers as they grow and shrink.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<MemoryPool>,
    held: AtomicU64,
}

impl Reservation {
    /// Books `bytes` more.
    ///
    /// # Errors
    /// [`TransportError::Wire`] (`WireError::TooLarge`) naming `what` and the limit when the
    /// pool cannot take them.
    pub fn grow(&self, bytes: u64, what: &'static str) -> Result<()> {
        self.pool.take(bytes).map_err(|f| {
            TransportError::Wire(WireError::TooLarge {
                field: what,
                len: f.used.saturating_add(f.bytes),
                limit: f.limit,
            })
        })?;
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Gives back `bytes` booked with [`Reservation::grow`].
    pub fn shrink(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.pool.give(bytes);
    }

    /// Bytes this reservation holds now.
    pub fn bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.give(self.held.load(Ordering::Relaxed));
    }
}

/// The most receive-buffer bytes one data channel of a migration with
/// `option` holds: a TCP channel [`channel_buffers`], an RDMA
/// channel [`crate::rdma_wire::RDMA_CHANNEL_BUFFERS`].
pub fn channel_allowance(option: crate::proto::PerformanceOption) -> u64 {
    use crate::proto::PerformanceOption;
    match option {
        PerformanceOption::Rdma => crate::rdma_wire::RDMA_CHANNEL_BUFFERS,
        PerformanceOption::Compression { .. } => channel_buffers(true),
        _ => channel_buffers(false),
    }
}

/// The receive buffers of one migration's data channels. Each channel
/// books its allowance on the migration's reservation when it starts (the
/// first `prebooked` were booked with the guest memory, when the offer was
/// accepted) and keeps every buffer within it; when it ends, the booking
/// goes back. A channel that does not fit is refused, naming the limit;
/// the others carry the migration.
#[derive(Debug)]
pub struct ChannelBudgets {
    reservation: Arc<Reservation>,
    per_channel: u64,
    prebooked: std::sync::atomic::AtomicU32,
    /// Each live channel's pool, for [`ChannelBudgets::buffered`].
    pools: Mutex<Vec<std::sync::Weak<MemoryPool>>>,
}

impl ChannelBudgets {
    /// Budgets of `per_channel` bytes on `reservation`, of which
    /// `prebooked` are already part of it.
    pub fn new(reservation: Arc<Reservation>, per_channel: u64, prebooked: u32) -> Arc<Self> {
        Arc::new(ChannelBudgets {
            reservation,
            per_channel,
            prebooked: prebooked.into(),
            pools: Mutex::new(Vec::new()),
        })
    }

    /// Bytes the live channels' buffers hold now (at most their bookings).
    pub fn buffered(&self) -> u64 {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools
            .iter()
            .filter_map(|p| p.upgrade())
            .map(|p| p.used())
            .sum()
    }

    /// Bytes one channel may hold.
    pub fn per_channel(&self) -> u64 {
        self.per_channel
    }

    /// Books one channel's allowance.
    ///
    /// # Errors
    /// The reservation cannot grow by it (`--memory-limit`).
    pub fn book(self: &Arc<Self>) -> Result<ChannelBooking> {
        let prebooked = self
            .prebooked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !prebooked {
            self.reservation.grow(
                self.per_channel,
                "receive buffers with another data channel",
            )?;
        }
        let pool = MemoryPool::new(self.per_channel);
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&pool));
        let buffers = Arc::new(pool.reserve(0).expect("an empty reservation fits"));
        Ok(ChannelBooking {
            budgets: self.clone(),
            prebooked,
            buffers,
        })
    }
}

/// One channel's booking ([`ChannelBudgets::book`]); given back on drop.
#[derive(Debug)]
pub struct ChannelBooking {
    budgets: Arc<ChannelBudgets>,
    prebooked: bool,
    /// Where the channel's buffers grow: at most the allowance.
    pub buffers: Arc<Reservation>,
}

impl Drop for ChannelBooking {
    fn drop(&mut self) {
        if self.prebooked {
            self.budgets.prebooked.fetch_add(1, Ordering::AcqRel);
        } else {
            self.budgets.reservation.shrink(self.budgets.per_channel);
        }
    }
}

/// First allocation of a [`RecvBuf`], and the smallest growth step.
pub const RECV_STEP: usize = 64 << 10;

/// A receive buffer that grows only as bytes arrive, booked on a
/// reservation (when it has one).
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    budget: Option<Arc<Reservation>>,
    what: &'static str,
}

impl RecvBuf {
    /// An empty buffer booking its growth on `budget`; `what` names it in
    /// errors.
    pub fn new(budget: Option<Arc<Reservation>>, what: &'static str) -> Self {
        RecvBuf {
            buf: Vec::new(),
            budget,
            what,
        }
    }

    /// Bytes allocated (and booked).
    pub fn allocated(&self) -> usize {
        self.buf.len()
    }

    /// Makes at least `have + 1` bytes (and at most `need`) available, for
    /// the next bytes of a message of `need` bytes of which `have` arrived:
    /// grows by doubling, from [`RECV_STEP`], never past `need`.
    ///
    /// # Errors
    /// The reservation cannot take the growth.
    pub fn room_for(&mut self, have: usize, need: usize) -> Result<&mut [u8]> {
        if have >= self.buf.len() && have < need {
            let target = need.min(self.buf.len().saturating_mul(2).max(RECV_STEP));
            self.resize(target)?;
        }
        let end = need.min(self.buf.len());
        Ok(&mut self.buf[have.min(end)..end])
    }

    /// Grows (booking) or shrinks (giving back) to exactly `len` bytes.
    pub fn resize(&mut self, len: usize) -> Result<()> {
        let old = self.buf.len();
        if len > old {
            if let Some(b) = &self.budget {
                b.grow((len - old) as u64, self.what)?;
            }
            self.buf.resize(len, 0);
        } else if len < old {
            self.buf.truncate(len);
            self.buf.shrink_to_fit();
            if let Some(b) = &self.budget {
                b.shrink((old - len) as u64);
            }
        }
        Ok(())
    }

    /// The first `len` bytes (at most what is allocated).
    pub fn get(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.shrink(self.buf.len() as u64);
        }
    }
}

/// The most receive-buffer bytes one TCP data channel holds: a full run
/// table, a drain step, and on a compressed channel a full segment table
/// and one segment. Every compressed frame is read and decompressed one
/// segment at a time, so no buffer depends on how large a frame is.
pub const fn channel_buffers(compressed: bool) -> u64 {
    let base = (crate::wire::MAX_RUNS as usize * std::mem::size_of::<crate::wire::RunDesc>()
        + RECV_STEP) as u64;
    if compressed {
        base + (16 + 4 * crate::wire::MAX_RUNS as usize + crate::wire::MAX_SEGMENT) as u64
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_booked_grown_and_given_back() {
        let pool = MemoryPool::new(1000);
        let r = pool.reserve(600).unwrap();
        assert_eq!(pool.reserve(500).unwrap_err().used, 600);
        r.grow(300, "x").unwrap();
        let e = r.grow(200, "receive buffers").unwrap_err().to_string();
        assert!(e.contains("receive buffers") && e.contains("1000"), "{e}");
        assert_eq!(r.bytes(), 900);
        r.shrink(100);
        assert_eq!(pool.used(), 800);
        drop(r);
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn channels_book_their_allowance_and_give_it_back() {
        let pool = MemoryPool::new(900);
        let r = Arc::new(pool.reserve(400 + 200).unwrap());
        let budgets = ChannelBudgets::new(r.clone(), 200, 1);
        let first = budgets.book().unwrap();
        assert_eq!(pool.used(), 600, "the first was booked with the offer");
        let second = budgets.book().unwrap();
        assert_eq!(pool.used(), 800);
        let e = budgets.book().unwrap_err().to_string();
        assert!(
            e.contains("another data channel") && e.contains("900"),
            "{e}"
        );
        // A channel's buffers stay within its allowance.
        assert!(first.buffers.grow(200, "x").is_ok());
        assert!(first.buffers.grow(1, "x").is_err());
        second.buffers.grow(50, "x").unwrap();
        assert_eq!(budgets.buffered(), 250);
        drop(second);
        assert_eq!(pool.used(), 600);
        drop(first);
        let again = budgets.book().unwrap();
        assert_eq!(pool.used(), 600, "the pre-booked place is free again");
        drop((again, budgets, r));
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn a_receive_buffer_grows_only_as_bytes_arrive_and_within_the_reservation() {
        let pool = MemoryPool::new(1 << 20);
        let r = Arc::new(pool.reserve(64 << 10).unwrap());
        let mut b = RecvBuf::new(Some(r.clone()), "compressed frame buffer");
        // A header announcing 16 MiB allocates one step, not 16 MiB.
        let need = 16 << 20;
        assert_eq!(b.room_for(0, need).unwrap().len(), RECV_STEP);
        assert_eq!(pool.used(), (64 << 10) + RECV_STEP as u64);
        // No growth until those bytes arrived.
        assert_eq!(b.room_for(1000, need).unwrap().len(), RECV_STEP - 1000);
        assert_eq!(b.allocated(), RECV_STEP);
        // Then it doubles.
        b.room_for(RECV_STEP, need).unwrap();
        assert_eq!(b.allocated(), 2 * RECV_STEP);
        // Never past what the message needs.
        let mut small = RecvBuf::new(Some(r.clone()), "x");
        assert_eq!(small.room_for(0, 100).unwrap().len(), 100);
        assert_eq!(small.allocated(), 100);
        drop(small);
        // Past the limit: refused, naming the buffer and the limit.
        let mut have = b.allocated();
        let e = loop {
            match b.room_for(have, need) {
                Ok(room) => have += room.len(),
                Err(e) => break e.to_string(),
            }
        };
        assert!(
            e.contains("compressed frame buffer") && e.contains("1048576"),
            "{e}"
        );
        assert!(pool.used() <= pool.limit());
        drop(b);
        assert_eq!(pool.used(), 64 << 10, "buffers given back");
    }
}
