//! `ferry-ffi`: the only crate in Ferry that contains `unsafe` code.
//!
//! Everything here wraps an operating-system or library call behind a safe
//! function whose arguments make misuse impossible:
//!
//! * [`vio`]: vectored I/O (`writev`/`readv`) straight between a socket and
//!   guest memory described by `vm-memory` [`VolatileSlice`]s, read-only byte
//!   views of guest memory for checksums and digests, and `madvise` hints.
//!   This is what keeps the TCP data path zero-copy without `unsafe` in the
//!   transport crate.
//! * [`net`]: TCP send-queue depth and per-thread nice, which the
//!   compression option's pipeline steers by; TCP keepalive and
//!   `TCP_USER_TIMEOUT`; raising `RLIMIT_NOFILE`.
//! * [`cpu`]: CPU time of the process and of the calling thread
//!   (`getrusage`), for the CPU-seconds-per-GiB accounting.
//! * [`ifaddrs`]: the host's interface addresses (`getifaddrs`), for
//!   multichannel discovery.
//! * [`pagemap`]: which pages of a range are backed (`PAGEMAP_SCAN`), for
//!   the memory report.
//! * `rdma` (feature `rdma`): rdma-core verbs and rdma_cm behind safe types.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment (enforced by
//! `clippy::undocumented_unsafe_blocks = "deny"`).
//!
//! [`VolatileSlice`]: vm_memory::VolatileSlice
#![warn(missing_docs)]

pub mod cpu;
pub mod ifaddrs;
pub mod net;
pub mod pagemap;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod vio;
