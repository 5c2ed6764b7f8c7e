//! The one error type of [`crate::rdma`].

use std::io;
use std::net::SocketAddr;

/// Everything that can go wrong in [`crate::rdma`].
///
/// Messages name what is missing or what to do; the underlying OS error (if
/// any) is the [`std::error::Error::source`], never repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// `libibverbs.so.1` (or `librdmacm.so.1`) could not be loaded at run time.
    #[error(
        "RDMA unavailable: {library} is not installed or cannot be loaded \
         (install rdma-core: `apt-get install rdma-core ibverbs-providers librdmacm1`)"
    )]
    LibraryMissing {
        /// The shared object that is missing, e.g. `libibverbs.so.1`.
        library: &'static str,
    },
    /// libibverbs loaded, but the kernel reports no RDMA device.
    #[error(
        "RDMA unavailable: no RDMA device found (libibverbs is loaded, but /sys/class/infiniband \
         is empty or missing: the kernel has no RDMA support or no device is configured; for \
         soft-RoCE: `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev IFACE`)"
    )]
    NoDevice,
    /// A device name given by the caller does not exist.
    #[error("RDMA device {name:?} not found (available: {available:?})")]
    DeviceNotFound {
        /// Name asked for.
        name: String,
        /// Names that exist.
        available: Vec<String>,
    },
    /// A verbs or rdma_cm call failed.
    #[error("RDMA call {call} failed")]
    Verbs {
        /// Which call, e.g. `ibv_alloc_pd` or `rdma_resolve_addr`.
        call: &'static str,
        /// The OS error the call reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_reg_mr` failed with `ENOMEM`: the locked-memory limit is too small.
    #[error(
        "cannot register {len} bytes of memory for RDMA: RLIMIT_MEMLOCK too small (soft limit \
         {limit}); raise it with `ulimit -l unlimited` in the shell, or `LimitMEMLOCK=infinity` \
         in the systemd unit (or run with CAP_IPC_LOCK)"
    )]
    MemlockLimit {
        /// Bytes that were to be registered.
        len: usize,
        /// The soft RLIMIT_MEMLOCK in force, formatted (`"unlimited"` or bytes).
        limit: String,
        /// The `ENOMEM` error.
        #[source]
        source: io::Error,
    },
    /// A remote write would fall outside the region the peer registered.
    #[error(
        "remote write out of range: offset {offset:#x} + len {len:#x} exceeds remote region \
         (addr {region_addr:#x}, len {region_len:#x}, rkey {rkey:#x})"
    )]
    RemoteOutOfRange {
        /// Offset into the remote region.
        offset: u64,
        /// Length of the write.
        len: u64,
        /// Start of the remote region.
        region_addr: u64,
        /// Length of the remote region.
        region_len: u64,
        /// rkey of the remote region.
        rkey: u32,
    },
    /// A local segment lies outside its memory region.
    #[error("local segment out of range: offset {offset:#x} + len {len:#x} exceeds memory region of {region_len:#x} bytes")]
    LocalOutOfRange {
        /// Offset into the local region.
        offset: usize,
        /// Length of the segment.
        len: usize,
        /// Length of the local memory region.
        region_len: usize,
    },
    /// A work request is malformed (too many segments, too long, empty, ...).
    #[error("invalid work request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: &'static str,
    },
    /// A memory region registered in another protection domain (another
    /// device) was used on this connection.
    #[error("memory region belongs to another RDMA device/protection domain than this connection")]
    WrongProtectionDomain,
    /// The send (or receive) queue has no free slot; reap completions first.
    #[error("{queue} queue full ({depth} work requests in flight); reap completions first")]
    QueueFull {
        /// `"send"` or `"receive"`.
        queue: &'static str,
        /// Queue depth.
        depth: u32,
    },
    /// rdma_cm reported an event other than the one the handshake expected.
    #[error("rdma_cm connection to {peer} failed: got event {event} (status {status}) while waiting for {expected}")]
    Connect {
        /// Peer address.
        peer: SocketAddr,
        /// The event received, e.g. `Rejected`.
        event: String,
        /// Event status (negative errno or reject reason).
        status: i32,
        /// Event that was expected.
        expected: &'static str,
    },
    /// A Ferry listener refused the connection request: its private data
    /// did not carry what the listener expects (the migration's token for
    /// that channel), or the channel is connected already.
    #[error("RDMA listener {peer} refused the connection request (no valid token for this migration and channel)")]
    Refused {
        /// The listener's address.
        peer: SocketAddr,
    },
    /// A work request completed with an error status.
    #[error("RDMA work request {wr_id} ({kind}) failed: {status} (vendor error {vendor_err:#x})")]
    WorkRequestFailed {
        /// The caller's work request id.
        wr_id: u64,
        /// What it was (`Write`, `Recv`, ...).
        kind: String,
        /// rdma-core's name of the completion status.
        status: String,
        /// Vendor error code.
        vendor_err: u32,
    },
    /// The connection can no longer post: the peer disconnected or an
    /// earlier request failed.
    #[error("RDMA connection unusable: peer disconnected or an earlier work request failed")]
    Disconnected,
}

impl RdmaError {
    pub(crate) fn verbs(call: &'static str, source: io::Error) -> Self {
        RdmaError::Verbs { call, source }
    }

    /// True when the error means "this machine has no usable RDMA", as
    /// opposed to a failure of a machine that has it. Callers use this to
    /// fall back (e.g. `--performance-option auto`) or to skip tests.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RdmaError::LibraryMissing { .. } | RdmaError::NoDevice)
    }
}

/// Result alias for [`crate::rdma`].
pub type Result<T, E = RdmaError> = std::result::Result<T, E>;
