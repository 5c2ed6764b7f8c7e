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
//! * [`session`]: both sides of the handshake as state machines
//!   (messages and transcripts in, messages out; no IO).
//! * [`opening`]: the opening of a migration around the handshake as state
//!   machines: the destination's checks on a connection's `Hello` and on
//!   the offer (with what it can restore, [`opening::GuestSupport`]), the
//!   offer and its answer on the source.
//! * [`source`]: the source's migration session (rounds, fence, switchover,
//!   commit or abort) as a state machine: events and `now` in, messages
//!   and steps out.
//! * [`dest`]: the destination's migration session (rounds and fences
//!   seen, progress timeout, `Ready`, the check of `Commit`, restore before
//!   `Committed`) as a state machine.
//! * [`session_fuzz`]: arbitrary event sequences for both migration
//!   sessions (the `session` fuzz target and its run in the tests).
//! * [`handshake`]: the handshake's proofs (the source proves first, bound to
//!   the TLS session and every frame before them) and the tags that
//!   authenticate every control message after it.
//!
//! Wire formats, each with one encoder and one decoder that every transport
//! uses, all failing with one typed [`WireError`]:
//! * [`wire`]: data-channel frames (chunk header, run table, compressed
//!   sub-header, ack), zerocopy little-endian headers.
//! * [`control`]: control messages ([`control::Msg`]) and their framing.
//! * [`layout`]: the guest memory layout and page runs, checked against it.
//! * [`net`]: interfaces, subnets and the one pairing rule of TCP
//!   multichannel and RDMA; the channel limit [`net::MAX_CHANNELS`].
//! * [`rdma`]: what the RDMA option exchanges on the control connection.
//! * [`units`]: sizes for people (`1.00 GiB (1073741824 bytes)`), as the
//!   refusals write them.
//! * [`relay`]: `ferry relay`'s stream chunks and its state machines
//!   (credit windows, reassembly, the open order, the end).
//! * [`policy`]: the policies, in one place: which options combine (what
//!   each performance option can encrypt and what each side then
//!   requires) and convergence (after each pre-copy round: another round,
//!   the switchover or a cancellation, and the auto-converge throttle).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budget;
pub mod control;
pub mod dest;
pub mod error;
pub mod evidence;
pub mod frame;
pub mod handshake;
pub mod keys;
pub mod layout;
pub mod net;
pub mod opening;
pub mod option;
pub mod policy;
pub mod rdma;
pub mod relay;
pub mod session;
pub mod session_fuzz;
pub mod source;
pub mod switchover;
pub mod units;
pub mod wire;

pub use error::{ErrorKind, WireError, WireKind};
pub use evidence::{Evidence, Ledger, PageHash, PageTable};
pub use keys::{MacKey, PageKey, SessionKeys};
