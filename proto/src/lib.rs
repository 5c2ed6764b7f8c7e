//! `ferry-proto`: Ferry's protocol core. No IO runtime, no sockets, no
//! `unsafe`, no clock: callers pass time in.
//!
//! * [`keys`]: the session keys both sides derive after authentication.
//! * [`evidence`]: page hashes and the evidence that verifies guest memory
//!   while it moves (compared at switchover in constant time).
//! * [`frame`]: the tags of data-channel frames (header, payload, ack) and
//!   the round gate every channel of a migration shares.
//! * [`budget`]: convergence and the pause budget (when to switch over,
//!   what the pause will cost).
//! * [`switchover`]: the `Ready` / `Commit` / `Committed` proofs that bind
//!   the transcripts, the evidence and the device state to the session.
//! * [`handshake`]: the handshake's proofs (the source proves first, bound to
//!   the TLS session and every frame before them) and the tags that
//!   authenticate every control message after it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budget;
pub mod evidence;
pub mod frame;
pub mod handshake;
pub mod keys;
pub mod switchover;

pub use evidence::{Evidence, Ledger, PageHash, PageTable};
pub use keys::{MacKey, PageKey, SessionKeys};
