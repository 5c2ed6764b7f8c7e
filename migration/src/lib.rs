//! `ferry-migration`: the pre-copy engine, guest memory and dirty tracking,
//! and the destination daemon. The `ferry` binary is a thin CLI over it.
//!
//! * [`memory`]: guest memory (`vm-memory` `GuestMemoryMmap`) on both sides.
//! * [`dirty`]: the [`dirty::DirtyLog`] trait and its bitmap source.
//! * [`guest`]: [`guest::GuestControl`] and the synthetic guest.
//! * [`engine`]: the source (rounds, convergence, switchover).
//! * [`dest`]: the destination (validation, landing, verification, commit).
//! * [`digest`]: the whole-memory digest compared before commit.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dest;
pub mod digest;
pub mod dirty;
pub mod engine;
pub mod error;
pub mod guest;
pub mod memory;

pub use error::{MigrationError, Result};
