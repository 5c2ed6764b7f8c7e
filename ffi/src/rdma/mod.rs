//! RDMA verbs and rdma_cm behind safe types (feature `rdma`).
//!
//! Built on [`sideway`] 0.4.3, which `dlopen`s libibverbs/librdmacm at run
//! time: a binary with this feature starts on a machine without rdma-core
//! and reports [`RdmaError::LibraryMissing`] or [`RdmaError::NoDevice`]
//! (both [`RdmaError::is_unavailable`]) instead of failing to load.
//!
//! # Objects and lifetimes
//!
//! ```text
//! RdmaListener::bind(addr, domains) ──accept_checked(check)──▶ RdmaConnection ◀── connect_with(src, dst, domains, private data)
//!                                          │ owns: RC QP ─▶ CQ ─▶ completion channel (AsyncFd)
//!                                          │       cm id (cm.rs: rdma_cm over rdma-mummy-sys)
//!                                          ▼
//! ProtectionDomain (one per device per Domains, i.e. per migration) ◀── Arc ── MemoryRegion<O> ── owns ──▶ O
//!                                                          ▲
//!                 in-flight work request ── Segment ── Arc ┘ (until its completion is reaped)
//! ```
//!
//! * A [`MemoryRegion<O>`] owns its backing `O` ([`RdmaMemory`]: e.g.
//!   `Arc<vm_memory::MmapRegion>` or `Arc<GuestRegionMmap>` for guest RAM),
//!   is deregistered before `O` is dropped, and keeps its protection domain
//!   alive. Registering a raw pointer is [`ProtectionDomain::register_raw`],
//!   an `unsafe fn` with the contract written out.
//! * A queue pair keeps its protection domain and CQ alive (sideway's `Arc`s).
//! * Every posted work request stores [`Segment`]s, which hold `Arc`s of
//!   their regions, until its completion is reaped; dropping a connection
//!   destroys the QP first, then releases what was still in flight.
//! * CPU access to registered memory goes through `VolatileSlice`
//!   ([`MemoryRegion::as_volatile_slice`]) since the NIC writes concurrently.
//!
//! # How the transport uses it
//!
//! Destination (one listener per RDMA NIC address):
//! 1. `let domains = Domains::new();` (one set per migration), then
//!    `let mut l = RdmaListener::bind(nic_ip:port, opts, &domains)?;`
//! 2. `let pd = l.protection_domain();` then register each guest region
//!    once: `pd.register(Arc::clone(&guest_region), Access::RemoteWrite)?`
//!    (zero-based: its [`MemoryRegion::remote_region`] has address 0), and
//!    send each region's (len, rkey) over the encrypted control channel;
//! 3. `let mut c = l.accept_checked(|req| check(req.peer, req.private_data)).await?;`
//!    (requests the check refuses are rejected; waiting goes on), post
//!    receives (`c.post_recv(&[], id)`)
//!    for the WRITE_WITH_IMM notifications, then `c.poll_completions(&mut v)`:
//!    a [`WorkKind::RecvImm`] completion with `imm` means every write posted
//!    before it on that QP has landed.
//!
//! Source (one connection per device pair):
//! 1. `let mut c = RdmaConnection::connect_with(Some(src_ip:0), dst_ip:port, opts, &domains, &token).await?;`
//! 2. register guest regions with [`Access::LocalRead`] on `c.protection_domain()`;
//! 3. `c.post_write(&mr, off, len, &remote, remote_off, wr_id)` (or
//!    [`RdmaConnection::post_writes`] with several scatter-gather
//!    [`WriteOp`]s per doorbell), closing a chunk with
//!    [`RdmaConnection::post_write_imm`]; remote ranges are checked against
//!    the peer's [`RemoteRegion`] and refused locally when out of range;
//! 4. reap with `c.poll_completions(&mut v).await` to free queue slots.
//!
//! Small control messages can use [`RdmaConnection::post_send`] /
//! [`RdmaConnection::post_recv`] with registered buffers.
//!
//! # Work-arounds for sideway 0.4.3
//! * rdma_cm itself (`cm.rs`) is called through `rdma_mummy_sys`: sideway
//!   can neither send nor read a connection request's private data, nor
//!   reject a request. Verbs objects (PD, CQ, QP) stay sideway's; the
//!   device context of an rdma_cm id is found through a sideway id bound to
//!   the same address (librdmacm opens each device once per process).
//! * Remote-write regions are registered with `ibv_reg_mr_iova2` (iova 0),
//!   which sideway does not wrap.
//! * No wrappers for `ibv_req_notify_cq`/`ibv_get_cq_event`/`ibv_ack_cq_events`:
//!   called through `rdma_mummy_sys` in `cq.rs`.
//! * Connection parameters: 7 retries, RNR retry "infinite" (sideway's
//!   `ConnectionParameter::new()` would set 0).
//!
//! # Memlock
//! Registration pins memory and counts against `RLIMIT_MEMLOCK` unless the
//! process has `CAP_IPC_LOCK`. `ENOMEM` from `ibv_reg_mr` becomes
//! [`RdmaError::MemlockLimit`], which names the limit and the fix
//! (`ulimit -l unlimited`, or `LimitMEMLOCK=infinity` in a systemd unit).
//!
//! RDMA data is not encrypted.

mod cm;
mod conn;
mod cq;
mod device;
mod error;
mod memory;

pub use cm::{MAX_PRIVATE_DATA, REFUSAL};
pub use conn::{
    Completion, ConnectionOptions, RdmaConnection, RdmaListener, Request, WorkKind, WriteOp,
};
pub use cq::WcStatus;
pub use device::{
    check_libraries, list_devices, Device, DeviceInfo, Domains, ProtectionDomain, LIBIBVERBS,
    LIBRDMACM,
};
pub use error::{RdmaError, Result};
pub use memory::{Access, GuestRegion, MemoryRegion, RdmaMemory, RemoteRegion, Segment};

/// A page-aligned anonymous buffer usable as [`RdmaMemory`] (tests, control
/// message buffers): `vm-memory`'s owned anonymous mapping.
pub type AnonBuffer = vm_memory::MmapRegion<()>;

/// Allocates an anonymous, zeroed, page-aligned buffer of `len` bytes.
pub fn anon_buffer(len: usize) -> Result<AnonBuffer> {
    vm_memory::MmapRegion::new(len).map_err(|e| RdmaError::Verbs {
        call: "mmap(anonymous buffer)",
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests;
