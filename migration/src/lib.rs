//! `ferry-migration`: the pre-copy engine, guest memory and dirty tracking,
//! and the destination daemon. The `ferry` binary is a thin CLI over it.
//!
//! * [`memory`]: guest memory (`vm-memory` `GuestMemoryMmap`) on both sides.
//! * [`dirty`]: the [`dirty::DirtyLog`] trait and its bitmap source.
//! * [`guest`]: [`guest::GuestControl`] and the synthetic guest.
//! * [`engine`]: the source (rounds, convergence, switchover).
//! * [`dest`]: the destination (validation, landing, verification, commit).
//! * [`admission`]: before authentication (accept errors, caps on
//!   unauthenticated connections, the handshake deadline).
//! * `rdma` (feature `rdma`, on by default): the RDMA performance option's
//!   set-up on both sides.
//! * [`digest`]: the whole-memory digest compared before commit.
//! * [`metrics`]: the destination's Prometheus metrics; [`summary`]: what a
//!   committed incoming migration looked like.
//! * [`report`]: the `--json` record, its time series, and its SVG drawing.
//! * [`nics`]: interface discovery and pairing for multichannel migration.
//! * [`units`]: sizes for people.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod cpu;
pub mod dest;
pub mod digest;
pub mod dirty;
pub mod engine;
pub mod error;
pub mod guest;
pub mod memory;
pub mod metrics;
pub mod nics;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod relay;
pub mod report;
pub mod summary;
pub mod units;

pub use error::{MigrationError, Result};
