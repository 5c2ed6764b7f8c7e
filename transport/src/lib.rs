//! `ferry-transport`: how Ferry moves guest pages.
//!
//! The wire formats live in the protocol core, `ferry_proto` (no IO):
//! [`wire`] (data-channel frames), [`proto`] (control messages),
//! [`layout`] (the memory layout and page runs) and [`rdma_wire`] are its
//! modules, re-exported here so callers keep one path.
//!
//! * [`conn`]: the framed, authenticated control connection; [`auth`]: the
//!   pre-shared key.
//! * [`Transport`]: the trait every performance option implements;
//!   [`tcp`]: the TCP implementation (zero-copy `writev`/`readv` between
//!   guest memory and the socket); [`compress`]: the compression option
//!   (lz4/zstd on a worker pool, decompression straight into guest memory);
//!   [`multichannel`]: one migration striped over several channels (every
//!   NIC both hosts share), with failover; [`ratelimit`]: the
//!   `--bandwidth-limit` token bucket all channels of a migration share.
//!
//! * [`tls`]: encryption (on unless `--plaintext`), TLS 1.3 with rustls, identities
//!   from certificates or from the pre-shared key; [`stream`]: a connection,
//!   plain or TLS.
//!
//! * `rdma` (feature `rdma`): the RDMA data path, RDMA WRITE from
//!   registered source guest memory into registered destination memory.
//!
//! The transport knows nothing about VMs: it moves [`Chunk`]s of
//! [`PageRun`]s out of a `vm-memory` guest memory and lands them in another.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "Ferry needs a 64-bit host: guest memory sizes and offsets are u64 and are used as usize"
);

use std::future::Future;

use serde::Serialize;

pub mod auth;
pub mod codec;
pub mod compress;
pub mod conn;
pub mod error;
pub mod guest;
pub mod inbound;
pub mod inflight;
pub mod multichannel;
pub mod pool;
pub mod ratelimit;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod reservation;
pub mod stream;
pub mod tcp;
pub mod tls;

/// Data-channel frames, format v2: defined in the protocol core
/// ([`ferry_proto::wire`]: one encoder and one decoder for TCP,
/// compression and RDMA) and re-exported here.
pub mod wire {
    pub use ferry_proto::wire::*;
}

/// Control-channel messages and their framing: defined in the protocol
/// core ([`ferry_proto::control`]) and re-exported here.
pub mod proto {
    pub use ferry_proto::control::*;
}

/// What the RDMA option exchanges on the control connection and the checks
/// both sides make on it: defined in the protocol core
/// ([`ferry_proto::rdma`]) and re-exported here. The data path is `rdma`
/// (feature `rdma`).
pub mod rdma_wire {
    pub use ferry_proto::rdma::*;
}

/// The guest memory layout and page runs (defined in the protocol core,
/// [`ferry_proto::layout`]), and the layout of a `vm-memory` guest memory.
pub mod layout {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    pub use ferry_proto::layout::*;

    /// Reads the layout of a `vm-memory` guest memory.
    pub fn of<M: GuestMemoryBackend>(mem: &M) -> MemoryLayout {
        MemoryLayout::from_regions(mem.iter().map(|r| (r.start_addr().0, r.len())))
    }
}

pub use error::{Result, TransportError};
pub use layout::{MemoryLayout, PageRun, PAGE_SIZE};
pub use pool::{BufPool, PageData, PooledBuf};

use ferry_proto::frame::Tag;
use ferry_proto::{MacKey, PageKey};

/// A unit of transfer: runs of pages read in one round, sent as one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number, unique within a migration.
    pub seq: u64,
    /// Pre-copy round.
    pub round: u32,
    /// Page runs, ascending and disjoint; zero runs carry no data.
    pub runs: Vec<PageRun>,
    /// The payload tag ([`ferry_proto::frame::payload_tag`]): computed from
    /// the hashes of the pages as the source read them (the hashes its
    /// evidence records). The destination computes it again from what
    /// landed.
    pub tag: Tag,
    /// The private copy of the non-zero runs' bytes (in run order) the tag
    /// was computed from, for transports that cannot send straight from
    /// guest memory (compression, TLS): they encode or encrypt it, so guest
    /// memory is read once. `None`: the transport reads guest memory itself
    /// (the kernel's `writev`, an RDMA WRITE, or a fresh copy).
    pub data: Option<PageData>,
}

impl Chunk {
    /// A chunk of `runs` read from `mem` now: every page copied out of
    /// guest memory, hashed with `page`, and the payload tag computed with
    /// `frame`. What the engine's page pass does, without a ledger (tests,
    /// tools). `copy` keeps the copy as the chunk's [`Chunk::data`].
    pub fn read<M: guest::GuestMem>(
        mem: &M,
        page: &PageKey,
        frame: &MacKey,
        seq: u64,
        round: u32,
        runs: Vec<PageRun>,
        copy: bool,
    ) -> Result<Chunk> {
        let mut bytes = Vec::new();
        guest::copy_runs(mem, &runs, &mut bytes)?;
        let mut sum = 0u128;
        let mut at = 0usize;
        for r in runs.iter().filter(|r| !r.zero) {
            for p in 0..u64::from(r.pages) {
                let b = &bytes[at..at + PAGE_SIZE as usize];
                let h = page.hash_or_zero(b);
                sum = sum.wrapping_add(page.contribution(r.gpa + p * PAGE_SIZE, h));
                at += PAGE_SIZE as usize;
            }
        }
        Ok(Chunk {
            seq,
            round,
            tag: ferry_proto::frame::payload_tag(frame, seq, round, sum),
            data: copy.then(|| PageData::from_vec(bytes)),
            runs,
        })
    }

    /// The same chunk without its private copy (what is kept to send it
    /// again after a channel failed: the copy is not held for a whole round).
    pub fn without_data(&self) -> Chunk {
        Chunk {
            data: None,
            runs: self.runs.clone(),
            ..*self
        }
    }

    /// Bytes of page data this chunk puts on the wire.
    pub fn payload_bytes(&self) -> u64 {
        self.runs.iter().map(PageRun::payload_bytes).sum()
    }
    /// Pages the chunk covers, zero pages included.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }
}

/// What a transport can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Largest chunk payload it takes.
    pub max_chunk: u32,
    /// Page data goes from guest memory to the wire without a staging copy.
    pub zero_copy: bool,
}

/// Result of [`Transport::flush`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flushed {
    /// Runs the destination could not accept (payload tag mismatch, pages
    /// busy): the engine
    /// must send them again (it marks them dirty).
    pub resend: Vec<PageRun>,
}

/// Per-channel counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    /// Channel index.
    pub channel: u16,
    /// Bytes written to the socket: headers, run tables and payload.
    pub bytes_on_wire: u64,
    /// Page bytes carried (payload before any encoding).
    pub payload_bytes: u64,
    /// Chunks acknowledged.
    pub chunks: u64,
    /// Chunks the destination asked to be resent: their payload tag did not
    /// match what landed, or their pages were being landed by another chunk.
    /// (Named for the CRC of frame format v1; the `--json` field keeps it.)
    pub crc_resends: u64,
    /// Compression option: chunks sent compressed.
    pub compressed_chunks: u64,
    /// Compression option: chunks sent raw because they (or a sample of
    /// them) did not shrink enough.
    pub raw_incompressible_chunks: u64,
    /// Compression option: chunks sent raw because the link was about to go
    /// idle before a worker got to them.
    pub raw_link_idle_chunks: u64,
    /// Multichannel: local address of the channel's socket.
    pub local: Option<String>,
    /// Multichannel: destination address of the channel.
    pub remote: Option<String>,
    /// Multichannel: device the socket is bound to, where routing needs it.
    pub device: Option<String>,
    /// Active, ended (end frame sent) or failed.
    pub state: ChannelState,
    /// Why the channel failed.
    pub error: Option<String>,
    /// Chunks it had not had acknowledged when it failed, sent again on the
    /// other channels.
    pub requeued_chunks: u64,
    /// Milliseconds from the channel's start until it ended or failed (so
    /// far, while active).
    pub active_ms: u64,
    /// Page bytes per second over `active_ms`.
    pub rate_bytes_per_sec: u64,
}

/// State of a data channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Carrying chunks.
    #[default]
    Active,
    /// Ended cleanly (end frame sent).
    Ended,
    /// Failed; its unacknowledged chunks went to the other channels.
    Failed,
}

/// A way of moving chunks of guest pages to the destination.
///
/// The engine is generic over it; all data-path errors come back as
/// [`TransportError`].
pub trait Transport: Send {
    /// What this transport can do.
    fn capabilities(&self) -> Caps;

    /// Sends one chunk. Returns once the chunk was handed to the network,
    /// waiting while too many bytes are unacknowledged (backpressure).
    ///
    /// # Cancel safety
    /// Not cancel safe: if the future is dropped, part of the frame may have
    /// been written and the channel is unusable; the migration must abort.
    /// Guest memory stays valid regardless: the transport holds it by `Arc`.
    fn send(&mut self, chunk: Chunk) -> impl Future<Output = Result<()>> + Send + '_;

    /// Waits until every chunk sent so far is acknowledged, and returns the
    /// runs that must be sent again.
    ///
    /// # Cancel safety
    /// Cancel safe: acknowledgements that arrive later are collected by the
    /// next call.
    fn flush(&mut self) -> impl Future<Output = Result<Flushed>> + Send + '_;

    /// Tells the destination no more chunks follow, after a final flush.
    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send + '_;

    /// Counters per channel.
    fn stats(&self) -> Vec<ChannelStats>;

    /// Data channels that failed since the last call. Their unacknowledged
    /// chunks were sent again on the others, but bytes of theirs may still
    /// be in the network: before the next round the engine must have the
    /// destination fence them (see [`multichannel`]). A single-channel
    /// transport never reports one: its failure is the migration's.
    fn lost_channels(&mut self) -> Vec<multichannel::LostChannel> {
        Vec::new()
    }
}
