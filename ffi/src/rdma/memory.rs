//! Memory registration: local memory regions that own (or share) their
//! backing, segments of them for work requests, and remote regions.

use std::any::Any;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys::{ibv_dereg_mr, ibv_mr, ibv_reg_mr_iova2};
use sideway::ibverbs::protection_domain::ProtectionDomain as SwPd;
use sideway::ibverbs::AccessFlags;
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileSlice};

use super::device::ProtectionDomain;
use super::error::{RdmaError, Result};

/// Memory that can back a [`MemoryRegion`]: a stable mapping owned (or
/// shared) by the implementing value.
///
/// The memory region takes the value by ownership (often an `Arc`), so the
/// mapping cannot be unmapped while the NIC may still access it.
///
/// # Safety
/// Implementors guarantee, for as long as the value lives:
/// * [`as_ptr`](Self::as_ptr) and [`len`](Self::len) return the same values
///   on every call, and `len` bytes from `as_ptr` are mapped and readable
///   (and writable, if the mapping is to be registered with write access);
///   the mapping is not unmapped or replaced while the value lives;
/// * the type hands out no `&[u8]`/`&mut [u8]` to those bytes from safe
///   code: the NIC (or a remote peer) writes them concurrently, so every
///   CPU access must be volatile (as through `vm-memory`'s `VolatileSlice`).
pub unsafe trait RdmaMemory: Send + Sync + 'static {
    /// Start of the mapping.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the mapping in bytes.
    fn len(&self) -> usize;
    /// Whether the mapping is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: `MmapRegion` owns its mapping (munmap in Drop) or, when built from
// a raw pointer, was created under vm-memory's own unsafe contract that the
// mapping outlives it. `as_ptr`/`size` are fixed at construction. Its API
// exposes the bytes only through volatile accessors (`VolatileMemory`).
unsafe impl<B: Bitmap + Send + Sync + 'static> RdmaMemory for MmapRegion<B> {
    fn as_ptr(&self) -> *mut u8 {
        MmapRegion::as_ptr(self)
    }
    fn len(&self) -> usize {
        self.size()
    }
}

// SAFETY: a `GuestRegionMmap` is an `MmapRegion` plus a guest base address
// (it derefs to the region); the same reasoning as above applies.
unsafe impl<B: Bitmap + Send + Sync + 'static> RdmaMemory for GuestRegionMmap<B> {
    fn as_ptr(&self) -> *mut u8 {
        MmapRegion::as_ptr(self)
    }
    fn len(&self) -> usize {
        self.size()
    }
}

// SAFETY: the `Arc` keeps the inner value (and so its mapping) alive for as
// long as this clone lives, and forwards to its guarantees unchanged.
unsafe impl<T: RdmaMemory> RdmaMemory for Arc<T> {
    fn as_ptr(&self) -> *mut u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// One region of a shared `vm-memory` guest memory, registrable as RDMA
/// memory: guest RAM that the rest of the program holds as
/// `Arc<GuestMemoryMmap<B>>` (whose regions are not reachable as `Arc`s).
///
/// Holds the whole guest memory alive, so the region's mapping outlives any
/// registration of it.
pub struct GuestRegion<B: Bitmap + 'static> {
    mem: Arc<GuestMemoryMmap<B>>,
    index: usize,
    gpa: u64,
    // The mapping's address, as an integer so the type stays Send + Sync.
    addr: usize,
    len: usize,
}

impl<B: Bitmap + 'static> std::fmt::Debug for GuestRegion<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRegion")
            .field("index", &self.index)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &self.len)
            .finish()
    }
}

impl<B: Bitmap + 'static> GuestRegion<B> {
    /// Every region of `mem`, in the order `mem.iter()` lists them.
    pub fn all(mem: &Arc<GuestMemoryMmap<B>>) -> Vec<GuestRegion<B>> {
        mem.iter()
            .enumerate()
            .map(|(index, r)| GuestRegion {
                mem: Arc::clone(mem),
                index,
                gpa: r.start_addr().0,
                addr: MmapRegion::as_ptr(r) as usize,
                len: r.size(),
            })
            .collect()
    }
    /// Guest physical address of the region's first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Position of the region in its guest memory.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The guest memory the region belongs to.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap<B>> {
        &self.mem
    }
}

// SAFETY: `GuestMemoryMmap` keeps each region as an `Arc<GuestRegionMmap>`
// in a collection that `&self` methods never change (adding or removing a
// region builds a new collection), so the mapping at `addr..addr+len`,
// read from that region when this value was built, stays mapped for as
// long as `self.mem` lives, and `as_ptr`/`len` return fixed fields. The
// bytes are reachable from safe code only through vm-memory's volatile
// accessors.
unsafe impl<B: Bitmap + Send + Sync + 'static> RdmaMemory for GuestRegion<B> {
    fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// What the NIC may do with a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// Local reads only: source of RDMA WRITEs and SENDs (source guest memory).
    LocalRead,
    /// Local writes too: buffers for RECV.
    LocalWrite,
    /// The peer may RDMA WRITE into it (destination guest memory).
    ///
    /// Registered **zero-based**: the NIC addresses the region by offsets
    /// from 0, not by this host's virtual addresses, so what the peer is
    /// told (and what crosses the wire in every RDMA WRITE) reveals nothing
    /// of this process's address space.
    RemoteWrite,
}

impl Access {
    fn flags(self) -> AccessFlags {
        match self {
            // Local read access is always enabled for a memory region.
            Access::LocalRead => AccessFlags::none(),
            Access::LocalWrite => AccessFlags::LocalWrite,
            Access::RemoteWrite => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        }
    }
}

/// An `ibv_mr`, deregistered on drop.
struct RawMr(NonNull<ibv_mr>);

// SAFETY: an ibv_mr is a handle the kernel validates; libibverbs allows
// deregistering it from any thread, and it is deregistered once, in Drop.
unsafe impl Send for RawMr {}
// SAFETY: `&RawMr` only reads the immutable lkey/rkey fields.
unsafe impl Sync for RawMr {}

impl Drop for RawMr {
    fn drop(&mut self) {
        // SAFETY: the MR came from ibv_reg_mr_iova2 and is deregistered once,
        // here. After this returns the NIC no longer accepts its keys: a
        // peer's RDMA WRITE naming the rkey fails with a remote access error.
        unsafe { ibv_dereg_mr(self.0.as_ptr()) };
    }
}

impl RawMr {
    fn lkey(&self) -> u32 {
        // SAFETY: the MR is alive while `self` is; lkey is set at registration.
        unsafe { self.0.as_ref().lkey }
    }
    fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.0.as_ref().rkey }
    }
}

/// A registered memory region that owns (or shares) its backing `O`.
///
/// The registration is dropped (`ibv_dereg_mr`) before `O`, so the mapping
/// outlives the registration; the region holds its protection domain alive;
/// every posted work request holds an `Arc` of the region until its
/// completion is reaped (see [`super::RdmaConnection`]). Regions are handed
/// out as `Arc<MemoryRegion<O>>` for that reason.
pub struct MemoryRegion<O> {
    // Field order is drop order: deregister, then release the PD, then the owner.
    mr: RawMr,
    pd: ProtectionDomain,
    addr: u64,
    iova: u64,
    len: usize,
    access: Access,
    owner: O,
}

impl<O> std::fmt::Debug for MemoryRegion<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("device", &self.pd.device_name())
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.mr.lkey()))
            .field("rkey", &format_args!("{:#x}", self.mr.rkey()))
            .field("access", &self.access)
            .finish()
    }
}

impl<O> MemoryRegion<O> {
    /// Local key, used in scatter-gather entries.
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    /// Remote key, handed to the peer (meaningful with [`Access::RemoteWrite`]).
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
    /// This process's virtual address of the first byte (local use only:
    /// never tell it a peer).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// The address the NIC knows the first byte by: 0 for a zero-based
    /// region ([`Access::RemoteWrite`]), the virtual address otherwise.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Registered length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the region is empty (never: registration refuses empty regions).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Access the region was registered with.
    pub fn access(&self) -> Access {
        self.access
    }
    /// The backing owner.
    pub fn owner(&self) -> &O {
        &self.owner
    }
    /// Name of the device the region is registered on.
    pub fn device_name(&self) -> &str {
        self.pd.device_name()
    }
    /// The descriptor the peer needs to RDMA WRITE into this region: send it
    /// over the control channel.
    pub fn remote_region(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.iova,
            len: self.len as u64,
            rkey: self.rkey(),
        }
    }
    /// Volatile view of the registered bytes, for the CPU side (filling a
    /// source buffer, verifying a destination).
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        // SAFETY: `addr..addr+len` was valid when registered and `self.owner`
        // keeps it mapped for as long as `self` (and so the returned borrow)
        // lives (RdmaMemory / register_raw contracts). VolatileSlice accesses
        // are volatile, which tolerates concurrent DMA by the NIC.
        unsafe { VolatileSlice::new(self.addr as *mut u8, self.len) }
    }
    /// Deregisters the region and gives the owner back.
    pub fn into_owner(self) -> O {
        let MemoryRegion { mr, pd, owner, .. } = self;
        drop(mr);
        drop(pd);
        owner
    }
    pub(crate) fn pd(&self) -> &Arc<SwPd> {
        &self.pd.pd
    }
}

impl ProtectionDomain {
    /// Registers `owner`'s memory; the region keeps `owner` alive.
    ///
    /// # Errors
    /// [`RdmaError::MemlockLimit`] when the locked-memory limit is too small
    /// (names the limit and the fix), [`RdmaError::Verbs`] otherwise,
    /// [`RdmaError::InvalidRequest`] for an empty mapping.
    pub fn register<O: RdmaMemory>(
        &self,
        owner: O,
        access: Access,
    ) -> Result<Arc<MemoryRegion<O>>> {
        let (ptr, len) = (owner.as_ptr(), owner.len());
        // SAFETY: `RdmaMemory` guarantees `ptr..ptr+len` stays mapped for as
        // long as `owner` lives, and `owner` is moved into the region.
        unsafe { self.register_raw(ptr, len, owner, access) }
    }

    /// Registers `len` bytes at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads (and writes, for write access) of `len`
    /// bytes for as long as `owner` lives, must not be unmapped or remapped
    /// during that time, and every CPU access to those bytes elsewhere must
    /// tolerate concurrent DMA (volatile accesses only).
    pub unsafe fn register_raw<O: Send + Sync + 'static>(
        &self,
        ptr: *mut u8,
        len: usize,
        owner: O,
        access: Access,
    ) -> Result<Arc<MemoryRegion<O>>> {
        if len == 0 || ptr.is_null() {
            return Err(RdmaError::InvalidRequest {
                reason: "cannot register an empty or null region",
            });
        }
        // Remote-write regions are zero-based (see Access::RemoteWrite).
        let iova = match access {
            Access::RemoteWrite => 0,
            _ => ptr as u64,
        };
        // SAFETY: `self.pd` owns a live ibv_pd (the returned pointer is used
        // only for this call, while `self` borrows the domain); `ptr..ptr+len`
        // is valid as this function's contract requires. A page-aligned
        // `ptr` (every mapping Ferry registers) has the same offset in its
        // page as `iova`, which ibv_reg_mr_iova2 requires.
        let mr = unsafe {
            ibv_reg_mr_iova2(
                self.pd.pd().as_ptr(),
                ptr.cast::<std::ffi::c_void>(),
                len,
                iova,
                access.flags().bits() as u32,
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let io = io::Error::last_os_error();
            return Err(if io.raw_os_error() == Some(libc::ENOMEM) {
                RdmaError::MemlockLimit {
                    len,
                    limit: memlock_limit(),
                    source: io,
                }
            } else {
                RdmaError::verbs("ibv_reg_mr", io)
            });
        };
        Ok(Arc::new(MemoryRegion {
            addr: ptr as u64,
            iova,
            mr: RawMr(mr),
            pd: self.clone(),
            len,
            access,
            owner,
        }))
    }
}

/// The soft RLIMIT_MEMLOCK, formatted for an error message.
pub(crate) fn memlock_limit() -> String {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit for the duration of the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    if r != 0 {
        return "unknown".into();
    }
    if rl.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} bytes", rl.rlim_cur)
    }
}

/// A region the peer registered and advertised: where RDMA WRITEs may land.
///
/// Ferry's destinations register zero-based regions, so `addr` is 0 and a
/// write's remote address is its offset ([`RemoteRegion::zero_based`]).
///
/// Every write is checked against it before it is posted; a write the
/// descriptor does not cover is refused locally (the NIC would otherwise
/// fail the whole queue pair with a remote access error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Peer virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

impl RemoteRegion {
    /// A descriptor received from the peer.
    pub fn new(addr: u64, len: u64, rkey: u32) -> RemoteRegion {
        RemoteRegion { addr, len, rkey }
    }

    /// A zero-based region of `len` bytes (what Ferry's destinations
    /// register): remote addresses are offsets.
    pub fn zero_based(len: u64, rkey: u32) -> RemoteRegion {
        RemoteRegion { addr: 0, len, rkey }
    }

    /// The peer address of `offset`, if `offset..offset+len` lies inside the
    /// region (an empty range at the very end is allowed).
    ///
    /// # Errors
    /// [`RdmaError::RemoteOutOfRange`] otherwise, including on overflow.
    pub fn checked_addr(&self, offset: u64, len: u64) -> Result<u64> {
        let oor = || RdmaError::RemoteOutOfRange {
            offset,
            len,
            region_addr: self.addr,
            region_len: self.len,
            rkey: self.rkey,
        };
        let end = offset.checked_add(len).ok_or_else(oor)?;
        if end > self.len {
            return Err(oor());
        }
        self.addr.checked_add(offset).ok_or_else(oor)
    }
}

/// One scatter-gather entry: a byte range of a registered local region.
///
/// Holds an `Arc` of its region, which a posted work request keeps until its
/// completion is reaped.
#[derive(Clone)]
pub struct Segment {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) lkey: u32,
    pub(crate) pd: Arc<SwPd>,
    pub(crate) _keep: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .finish()
    }
}

impl Segment {
    /// `len` bytes at `offset` of `mr`.
    ///
    /// # Errors
    /// [`RdmaError::LocalOutOfRange`] if the range leaves the region,
    /// [`RdmaError::InvalidRequest`] if it is longer than 4 GiB - 1.
    pub fn new<O: Send + Sync + 'static>(
        mr: &Arc<MemoryRegion<O>>,
        offset: usize,
        len: usize,
    ) -> Result<Segment> {
        check_local(mr.len(), offset, len)?;
        let len32 = u32::try_from(len).map_err(|_| RdmaError::InvalidRequest {
            reason: "a scatter-gather entry is limited to 4 GiB - 1",
        })?;
        Ok(Segment {
            addr: mr.iova() + offset as u64,
            len: len32,
            lkey: mr.lkey(),
            pd: Arc::clone(mr.pd()),
            _keep: Arc::clone(mr) as Arc<dyn Any + Send + Sync>,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub(crate) fn check_local(region_len: usize, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(RdmaError::LocalOutOfRange {
            offset,
            len,
            region_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_range_checks() {
        let r = RemoteRegion::new(0x1000, 0x4000, 7);
        assert_eq!(r.checked_addr(0, 0x4000).unwrap(), 0x1000);
        assert_eq!(r.checked_addr(0x3000, 0x1000).unwrap(), 0x4000);
        assert_eq!(r.checked_addr(0x4000, 0).unwrap(), 0x5000);
        for (off, len) in [
            (0, 0x4001),
            (0x3fff, 2),
            (0x4001, 0),
            (u64::MAX, 1),
            (1, u64::MAX),
        ] {
            let e = r.checked_addr(off, len).unwrap_err();
            assert!(
                matches!(e, RdmaError::RemoteOutOfRange { rkey: 7, .. }),
                "{off:#x}+{len:#x}: {e}"
            );
        }
        // Address overflow of a bogus descriptor is refused too.
        let wrap = RemoteRegion::new(u64::MAX - 1, 16, 1);
        assert!(wrap.checked_addr(4, 1).is_err());
    }

    #[test]
    fn local_range_checks() {
        assert!(check_local(4096, 0, 4096).is_ok());
        assert!(check_local(4096, 4096, 0).is_ok());
        assert!(check_local(4096, 1, 4096).is_err());
        assert!(check_local(4096, usize::MAX, 2).is_err());
    }

    #[test]
    fn error_messages_name_the_fix() {
        let e = RdmaError::MemlockLimit {
            len: 1 << 30,
            limit: memlock_limit(),
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let msg = e.to_string();
        assert!(msg.contains("RLIMIT_MEMLOCK"), "{msg}");
        assert!(msg.contains("ulimit -l unlimited"), "{msg}");
        assert!(msg.contains("LimitMEMLOCK=infinity"), "{msg}");
    }
}
