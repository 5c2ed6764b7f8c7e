//! The relay (`ferry relay`, issue 13): a hypervisor's own migration
//! connections carried as ordered byte streams over Ferry's data channels.
//! Pure state machines and wire formats, no IO (see `docs/relay.md`).
//!
//! * [`RelayOffer`]: what the source relay asks for, in place of a guest
//!   offer; [`check_deliver_to`] is the destination's `--relay-allow` rule.
//! * [`StreamChunk`]: the data-channel frame of stream bytes and its
//!   [`RelayAck`], both tagged under the session's relay key.
//! * [`SendWindow`]: one stream direction on its sending side: credit
//!   (bytes it may read from the hypervisor beyond what the peer
//!   delivered), `Fin`, and whether the peer confirmed the end.
//! * [`Reassembly`]: one stream direction on its receiving side: chunks by
//!   offset, duplicates dropped, the contiguous prefix handed out in order,
//!   the window enforced, the digest and `Fin` checked, credit reported.
//! * [`OpenFifo`]: the destination's order of connects (stream k only
//!   after stream k-1's connect completed).
//! * [`Streams`]: the end and abort rules of one relay.
//!
//! ```text
//! stream chunk (data channel), 68 bytes + payload:
//! +------+-------+-----+------+--------+---------+----------+---------+---------+--------+--------+
//! | FRYS | codec | dir | rsvd | stream | raw len | wire len |  seq    | offset  | digest |  tag   |
//! |  4   |   1   |  1  |  2   |   4    |    4    |    4     |   8     |   8     |   16   |   16   |
//! +------+-------+-----+------+--------+---------+----------+---------+---------+--------+--------+
//! digest = keyed XXH3-128 of the raw (uncompressed) payload, relay secret
//! tag    = HMAC(relay chunk key, "ferry relay chunk v1" | bytes 0..52)
//!
//! ack (data channel, the other way), 32 bytes:
//! +------+--------+------+-------+-------+
//! | FRYA | status | rsvd |  seq  |  tag  |
//! |  4   |   1    |  3   |   8   |  16   |
//! +------+--------+------+-------+-------+
//! tag = HMAC(relay chunk key, "ferry relay ack v1" | seq | status)
//! ```
//!
//! The header tag covers the payload's keyed digest, so a receiver checks
//! the tag before it reads the payload and the digest before a byte is
//! placed: nothing changed on the way reaches a hypervisor.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Result, WireError};
use crate::keys::{MacKey, SessionKeys, SECRET_LEN};
use crate::net::Cidr;
use crate::option::PerformanceOption;
use crate::units::{human, human_exact};

/// Default window of one stream direction: bytes a sender may have read
/// beyond what the receiver delivered into its hypervisor socket.
pub const DEFAULT_WINDOW: u32 = 32 << 20;
/// Smallest window (one chunk must fit).
pub const MIN_WINDOW: u32 = 64 << 10;
/// Largest window.
pub const MAX_WINDOW: u32 = 256 << 20;
/// Default and largest chunk payload.
pub const MAX_STREAM_CHUNK: u32 = 256 << 10;
/// Default most streams of one relay: QEMU's main channel and 64 multifd.
pub const DEFAULT_MAX_STREAMS: u32 = 65;
/// The most streams any relay may ask for.
pub const MAX_STREAMS: u32 = 1024;
/// Stream chunk magic.
pub const CHUNK_MAGIC: [u8; 4] = *b"FRYS";
/// Ack magic.
pub const ACK_MAGIC: [u8; 4] = *b"FRYA";
/// Bytes of a stream chunk header.
pub const CHUNK_HEADER_LEN: usize = 68;
/// Bytes of an ack.
pub const ACK_LEN: usize = 32;
/// Bytes a data channel's reader buffers (the next headers and acks come
/// with the payload before them in one read).
pub const CHANNEL_READ_BUFFER: u64 = 64 << 10;

const CHUNK_LABEL: &[u8] = b"ferry relay chunk v1";
const ACK_LABEL: &[u8] = b"ferry relay ack v1";
const FIN_LABEL: &[u8] = b"ferry relay fin v1";

/// One direction of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dir {
    /// From the source hypervisor to the destination's (QEMU's migration data).
    Forward,
    /// From the destination hypervisor back to the source's (QEMU's return path).
    Back,
}

impl Dir {
    /// The wire byte.
    pub fn id(self) -> u8 {
        match self {
            Dir::Forward => 0,
            Dir::Back => 1,
        }
    }

    /// From the wire byte.
    pub fn from_id(id: u8) -> Result<Dir> {
        match id {
            0 => Ok(Dir::Forward),
            1 => Ok(Dir::Back),
            d => Err(WireError::Invalid {
                field: "stream chunk direction",
                detail: format!("{d} (0 forward, 1 back)"),
            }),
        }
    }
}

impl std::fmt::Display for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dir::Forward => "source->destination",
            Dir::Back => "destination->source",
        })
    }
}

/// The source relay's request, in place of a guest offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOffer {
    /// Where the destination connects the streams (`--deliver-to`), as the
    /// user wrote it (`HOST:PORT`); resolved and checked by the destination.
    pub deliver_to: String,
    /// Most streams the relay will open.
    pub max_streams: u32,
    /// Window of each stream direction.
    pub window: u32,
    /// Largest chunk payload.
    pub chunk: u32,
    /// Transport: TCP or compression (RDMA is not offered for streams).
    pub option: PerformanceOption,
    /// Most data channels the relay will open.
    pub channels: u16,
}

impl RelayOffer {
    /// Checks the numbers of an offer (not the address).
    pub fn validate(&self) -> Result<()> {
        if self.max_streams == 0 || self.max_streams > MAX_STREAMS {
            return Err(WireError::Invalid {
                field: "relay max_streams",
                detail: format!("{} (1 to {MAX_STREAMS})", self.max_streams),
            });
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&self.window) {
            return Err(WireError::Invalid {
                field: "relay window",
                detail: format!("{} bytes ({MIN_WINDOW} to {MAX_WINDOW})", self.window),
            });
        }
        if self.chunk == 0 || self.chunk > MAX_STREAM_CHUNK || self.chunk > self.window {
            return Err(WireError::Invalid {
                field: "relay chunk size",
                detail: format!(
                    "{} bytes (1 to {MAX_STREAM_CHUNK}, at most the window)",
                    self.chunk
                ),
            });
        }
        if self.channels == 0 || self.channels > crate::net::MAX_CHANNELS {
            return Err(WireError::Invalid {
                field: "relay channels",
                detail: format!("{} (1 to {})", self.channels, crate::net::MAX_CHANNELS),
            });
        }
        if matches!(self.option, PerformanceOption::Rdma) {
            return Err(WireError::Invalid {
                field: "relay performance option",
                detail: "rdma does not carry streams; use tcp or compression".into(),
            });
        }
        Ok(())
    }

    /// Bytes one opened stream holds at most at either end: its two
    /// directions, each at most a window (reassembly on the receiving side,
    /// copies kept for a resend on the sending side). A destination books
    /// them when the stream opens and gives them back when it ends.
    pub fn stream_reservation(&self) -> u64 {
        2 * u64::from(self.window)
    }

    /// Bytes a destination books when it admits the relay: what the relay
    /// needs at least, its main stream (every relay has one), and each data
    /// channel's read buffer and the payload it reads into (`chunk`). The
    /// other streams are booked as they open
    /// ([`RelayOffer::stream_reservation`]), not `max_streams` of them up
    /// front.
    pub fn admission_reservation(&self) -> u64 {
        self.stream_reservation()
            + u64::from(self.channels) * (CHANNEL_READ_BUFFER + u64::from(self.chunk))
    }
}

/// The default `--relay-allow`: loopback only.
pub fn default_allow() -> Vec<Cidr> {
    vec![
        "127.0.0.0/8".parse().expect("valid CIDR"),
        "::1/128".parse().expect("valid CIDR"),
    ]
}

/// `--relay-allow`: is `addr` inside one of `allowed`? Returns the message
/// of the refusal otherwise (`Reject(RelayNotAllowed)`).
pub fn check_deliver_to(addr: SocketAddr, allowed: &[Cidr]) -> std::result::Result<(), String> {
    let ip: IpAddr = addr.ip().to_canonical();
    if allowed.iter().any(|c| c.contains(ip)) {
        return Ok(());
    }
    Err(format!(
        "--deliver-to {addr} is not allowed by this destination's --relay-allow {}",
        if allowed.is_empty() {
            "(none)".to_string()
        } else {
            allowed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    ))
}

/// The relay's keys, derived from the session's frame key (HKDF-Expand's
/// construction: HMAC chained over a purpose label), so no other purpose
/// shares them.
#[derive(Clone)]
pub struct RelayKeys {
    /// Tags of stream chunks and acks.
    pub chunk: MacKey,
    /// Finishes a direction's digest (binds stream, direction, length).
    pub fin: MacKey,
    digest: [u8; SECRET_LEN],
}

impl std::fmt::Debug for RelayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayKeys(..)")
    }
}

impl RelayKeys {
    /// Derives the relay's keys from the session's.
    pub fn derive(keys: &SessionKeys) -> Self {
        Self::from_frame_key(&keys.frame)
    }

    /// Derives them from a frame key (tests).
    pub fn from_frame_key(frame: &MacKey) -> Self {
        let mut digest = [0u8; SECRET_LEN];
        let mut prev: Vec<u8> = Vec::new();
        for (i, block) in digest.chunks_mut(32).enumerate() {
            let t = frame.mac(&[&prev, b"ferry relay stream digest", &[i as u8 + 1]]);
            block.copy_from_slice(&t[..block.len()]);
            prev = t.to_vec();
        }
        RelayKeys {
            chunk: MacKey::from_bytes(frame.mac(&[b"ferry relay chunk key"])),
            fin: MacKey::from_bytes(frame.mac(&[b"ferry relay fin key"])),
            digest,
        }
    }

    /// Keyed XXH3-128 of one chunk's payload.
    ///
    /// On twox-hash, which picks the CPU's widest vector unit at run time
    /// (AVX2 where there is one) as the page hash does, where xxhash-rust
    /// (which earlier versions used, and the tests check against) runs the
    /// SSE2 loop a baseline x86-64 build compiles in: the relay hashes every
    /// byte twice on each side (this and the stream digest). XXH3's output
    /// is the same whatever the vector width.
    pub fn chunk_digest(&self, payload: &[u8]) -> [u8; 16] {
        twox_hash::XxHash3_128::oneshot_with_secret(&self.digest, payload)
            .expect("a 192-byte secret is longer than XXH3's minimum")
            .to_le_bytes()
    }

    /// A running digest of one stream direction.
    pub fn stream_digest(&self, stream: u32, dir: Dir) -> StreamDigest {
        StreamDigest {
            h: Box::new(
                twox_hash::XxHash3_128::with_seed_and_secret(0, self.digest)
                    .expect("a 192-byte secret is longer than XXH3's minimum"),
            ),
            short: Vec::new(),
            stream,
            dir,
            len: 0,
        }
    }
}

/// The keyed digest of one stream direction's bytes in order.
#[derive(Clone)]
pub struct StreamDigest {
    h: Box<twox_hash::XxHash3_128>,
    /// The bytes while there are at most [`XXH3_SHORT`]: twox-hash's
    /// streaming hasher finishes an input that short under XXH3's default
    /// secret (its seed-and-secret variant), so such a stream is hashed
    /// whole under the relay's secret instead, as XXH3-with-secret does.
    short: Vec<u8>,
    stream: u32,
    dir: Dir,
    len: u64,
}

impl std::fmt::Debug for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDigest")
            .field("stream", &self.stream)
            .field("dir", &self.dir)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl StreamDigest {
    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.h.write(bytes);
        self.len += bytes.len() as u64;
        if self.len <= XXH3_SHORT as u64 {
            self.short.extend_from_slice(bytes);
        } else if !self.short.is_empty() {
            self.short = Vec::new();
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before any byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything so far, bound to stream, direction and
    /// length under the relay's fin key.
    pub fn finish(&self, keys: &RelayKeys) -> [u8; 16] {
        keys.fin.tag(&[
            FIN_LABEL,
            &self.stream.to_le_bytes(),
            &[self.dir.id()],
            &self.len.to_le_bytes(),
            &self.hash(keys).to_le_bytes(),
        ])
    }

    /// XXH3-128 of the bytes under the relay's secret.
    fn hash(&self, keys: &RelayKeys) -> u128 {
        if self.len <= XXH3_SHORT as u64 {
            twox_hash::XxHash3_128::oneshot_with_secret(&keys.digest, &self.short)
                .expect("a 192-byte secret is longer than XXH3's minimum")
        } else {
            self.h.finish_128()
        }
    }
}

/// XXH3's short-input cutoff: inputs up to this many bytes are hashed
/// without the stripe loop.
const XXH3_SHORT: usize = 240;

/// Wire layout of a stream chunk header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ChunkWire {
    magic: [u8; 4],
    codec: u8,
    dir: u8,
    reserved: U16,
    stream: U32,
    raw_len: U32,
    wire_len: U32,
    seq: U64,
    offset: U64,
    digest: [u8; 16],
    tag: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<ChunkWire>() == CHUNK_HEADER_LEN);
const TAGGED: usize = CHUNK_HEADER_LEN - 16;

/// A stream chunk's header, decoded and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamChunk {
    /// Stream id (accept order at the source, 0 = first).
    pub stream: u32,
    /// Direction.
    pub dir: Dir,
    /// Offset of the first byte in the direction's byte sequence.
    pub offset: u64,
    /// Payload bytes once decompressed.
    pub raw_len: u32,
    /// Payload bytes on the wire.
    pub wire_len: u32,
    /// Codec id of the payload (0: raw, else [`crate::wire::Codec`]).
    pub codec: u8,
    /// Sender's sequence number (acks name it; resends keep it).
    pub seq: u64,
    /// Keyed digest of the raw payload.
    pub digest: [u8; 16],
}

impl StreamChunk {
    /// Encodes the header with its tag.
    pub fn encode(&self, keys: &RelayKeys) -> [u8; CHUNK_HEADER_LEN] {
        let mut w = ChunkWire {
            magic: CHUNK_MAGIC,
            codec: self.codec,
            dir: self.dir.id(),
            reserved: U16::new(0),
            stream: U32::new(self.stream),
            raw_len: U32::new(self.raw_len),
            wire_len: U32::new(self.wire_len),
            seq: U64::new(self.seq),
            offset: U64::new(self.offset),
            digest: self.digest,
            tag: [0; 16],
        };
        w.tag = keys.chunk.tag(&[CHUNK_LABEL, &w.as_bytes()[..TAGGED]]);
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out.copy_from_slice(w.as_bytes());
        out
    }

    /// Decodes a header after its magic was seen: checks the tag (before
    /// any field is trusted) and every length against `max_chunk`.
    pub fn decode(
        bytes: &[u8; CHUNK_HEADER_LEN],
        keys: &RelayKeys,
        max_chunk: u32,
    ) -> Result<Self> {
        let w = ChunkWire::read_from_bytes(bytes).expect("68 bytes");
        if w.magic != CHUNK_MAGIC {
            return Err(WireError::BadMagic {
                what: "stream chunk",
                expected: CHUNK_MAGIC,
                found: w.magic,
            });
        }
        if !keys
            .chunk
            .verify_tag(&[CHUNK_LABEL, &bytes[..TAGGED]], &w.tag)
        {
            return Err(WireError::BadTag {
                field: "stream chunk header tag",
                detail: format!(
                    "chunk {} of stream {} changed on the way or not from this session",
                    w.seq.get(),
                    w.stream.get()
                ),
            });
        }
        let dir = Dir::from_id(w.dir)?;
        let (raw, wire) = (w.raw_len.get(), w.wire_len.get());
        if raw == 0 || raw > max_chunk {
            return Err(WireError::TooLarge {
                field: "stream chunk length",
                len: raw.into(),
                limit: max_chunk.into(),
            });
        }
        if w.codec == 0 && wire != raw {
            return Err(WireError::Invalid {
                field: "stream chunk wire length",
                detail: format!("{wire} bytes for a raw chunk of {raw}"),
            });
        }
        if w.codec != 0 {
            crate::wire::Codec::from_id(w.codec)?;
            if wire == 0 || wire > raw {
                return Err(WireError::Invalid {
                    field: "stream chunk wire length",
                    detail: format!("{wire} compressed bytes for {raw} raw"),
                });
            }
        }
        let offset = w.offset.get();
        if offset.checked_add(raw.into()).is_none() {
            return Err(WireError::Invalid {
                field: "stream chunk offset",
                detail: format!("{offset} + {raw} overflows"),
            });
        }
        Ok(StreamChunk {
            stream: w.stream.get(),
            dir,
            offset,
            raw_len: raw,
            wire_len: wire,
            codec: w.codec,
            seq: w.seq.get(),
            digest: w.digest,
        })
    }

    /// Checks the payload (decompressed) against the header's digest.
    pub fn check_payload(&self, keys: &RelayKeys, raw: &[u8]) -> Result<()> {
        if raw.len() != self.raw_len as usize || keys.chunk_digest(raw) != self.digest {
            return Err(WireError::BadTag {
                field: "stream chunk payload digest",
                detail: format!(
                    "chunk {} of stream {} ({}, offset {}): payload changed on the way",
                    self.seq, self.stream, self.dir, self.offset
                ),
            });
        }
        Ok(())
    }
}

/// An ack of one stream chunk: received, checked and placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAck {
    /// The chunk's sequence number.
    pub seq: u64,
}

impl RelayAck {
    /// Encodes it with its tag.
    pub fn encode(&self, keys: &RelayKeys) -> [u8; ACK_LEN] {
        let mut out = [0u8; ACK_LEN];
        out[..4].copy_from_slice(&ACK_MAGIC);
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        let tag = keys.chunk.tag(&[ACK_LABEL, &out[..16]]);
        out[16..].copy_from_slice(&tag);
        out
    }

    /// Decodes and checks one.
    pub fn decode(bytes: &[u8; ACK_LEN], keys: &RelayKeys) -> Result<Self> {
        if bytes[..4] != ACK_MAGIC {
            return Err(WireError::BadMagic {
                what: "stream ack",
                expected: ACK_MAGIC,
                found: bytes[..4].try_into().expect("4 bytes"),
            });
        }
        let tag: [u8; 16] = bytes[16..].try_into().expect("16 bytes");
        if !keys.chunk.verify_tag(&[ACK_LABEL, &bytes[..16]], &tag) {
            return Err(WireError::BadTag {
                field: "stream ack tag",
                detail: "an ack changed on the way or not from this session".into(),
            });
        }
        if bytes[4..8] != [0; 4] {
            return Err(WireError::Invalid {
                field: "stream ack status",
                detail: format!("{:?}", &bytes[4..8]),
            });
        }
        Ok(RelayAck {
            seq: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
        })
    }
}

/// A peer broke the relay's rules, or a stream cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// A frame or message that breaks the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// More streams than the offer allows.
    #[error("stream {stream} is past the relay's limit of {max} streams")]
    TooManyStreams {
        /// The stream id.
        stream: u32,
        /// The limit.
        max: u32,
    },
    /// A stream's buffers do not fit the destination's `--memory-limit`.
    #[error(
        "stream {stream} refused: its buffers ({}: two {} windows) and the {} already booked are above this destination's --memory-limit of {}",
        human_exact(*.needs),
        human(*.needs / 2),
        human_exact(*.used),
        human_exact(*.limit)
    )]
    MemoryLimit {
        /// The stream id.
        stream: u32,
        /// Bytes it needs (two windows).
        needs: u64,
        /// Bytes booked already (every migration and relay together).
        used: u64,
        /// `--memory-limit`.
        limit: u64,
    },
    /// A direction's digest or length did not match at its end.
    #[error("stream {stream} ({dir}): {what}")]
    Mismatch {
        /// Stream.
        stream: u32,
        /// Direction.
        dir: Dir,
        /// What differs.
        what: String,
    },
}

fn invalid(field: &'static str, detail: String) -> RelayError {
    RelayError::Wire(WireError::Invalid { field, detail })
}

/// One stream direction on its sending side.
///
/// The sender reads from its hypervisor socket only while it has credit:
/// at most `window` bytes beyond the receiver's delivered offset. So a
/// receiver whose hypervisor reads slowly stops this sender's reads, and
/// the sending hypervisor's writes block, as with a slow TCP peer.
#[derive(Debug, Clone)]
pub struct SendWindow {
    window: u64,
    read: u64,
    delivered: u64,
    fin: Option<u64>,
    finished: bool,
}

impl SendWindow {
    /// A direction with this window and nothing read.
    pub fn new(window: u32) -> Self {
        SendWindow {
            window: window.into(),
            read: 0,
            delivered: 0,
            fin: None,
            finished: false,
        }
    }

    /// Bytes that may be read now.
    pub fn credit(&self) -> u64 {
        if self.fin.is_some() {
            return 0;
        }
        self.window - (self.read - self.delivered)
    }

    /// Offset of the next byte read.
    pub fn read_offset(&self) -> u64 {
        self.read
    }

    /// The receiver's delivered offset as last reported.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// `n` bytes were read: returns their offset.
    ///
    /// # Panics
    /// When `n` exceeds the credit (a bug of the caller, never of a peer).
    pub fn on_read(&mut self, n: usize) -> u64 {
        assert!(n as u64 <= self.credit(), "read beyond credit");
        let at = self.read;
        self.read += n as u64;
        at
    }

    /// The hypervisor closed its side: the `Fin`'s length.
    pub fn on_eof(&mut self) -> u64 {
        self.fin = Some(self.read);
        self.read
    }

    /// True once `Fin` was due.
    pub fn at_eof(&self) -> bool {
        self.fin.is_some()
    }

    /// The receiver's `Credit`: its delivered offset, and whether it
    /// delivered the end (digest checked, EOF passed on).
    pub fn on_credit(
        &mut self,
        delivered: u64,
        finished: bool,
    ) -> std::result::Result<(), RelayError> {
        if delivered > self.read {
            return Err(invalid(
                "Credit",
                format!(
                    "delivered {delivered} but only {} bytes were sent",
                    self.read
                ),
            ));
        }
        if finished && self.fin != Some(delivered) {
            return Err(invalid(
                "Credit",
                format!(
                    "end confirmed at {delivered} but the stream {}",
                    match self.fin {
                        Some(l) => format!("ends at {l}"),
                        None => "has not ended".into(),
                    }
                ),
            ));
        }
        // Credits travel on one ordered connection: an older one is stale.
        self.delivered = self.delivered.max(delivered);
        self.finished |= finished;
        Ok(())
    }

    /// True when the receiver confirmed every byte and the end.
    pub fn is_done(&self) -> bool {
        self.finished
    }
}

/// What [`Reassembly::insert`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// New bytes, kept.
    New,
    /// Every byte already delivered or held: a resend after a failover.
    Duplicate,
}

/// One stream direction on its receiving side.
#[derive(Debug)]
pub struct Reassembly {
    window: u64,
    /// Next offset handed out by `pop`.
    next: u64,
    /// Bytes written into the hypervisor socket.
    delivered: u64,
    /// Delivered offset last reported to the sender.
    reported: u64,
    held: BTreeMap<u64, Vec<u8>>,
    held_bytes: u64,
    fin: Option<(u64, [u8; 16])>,
    digest: StreamDigest,
    finished: bool,
}

impl Reassembly {
    /// A direction with this window and digest.
    pub fn new(window: u32, digest: StreamDigest) -> Self {
        Reassembly {
            window: window.into(),
            next: 0,
            delivered: 0,
            reported: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            fin: None,
            digest,
            finished: false,
        }
    }

    /// Places a checked chunk's bytes at `offset`. Bytes below the next
    /// offset or already held are dropped; a chunk beyond the window or the
    /// `Fin`'s length breaks the rules.
    pub fn insert(
        &mut self,
        offset: u64,
        bytes: Vec<u8>,
    ) -> std::result::Result<Placed, RelayError> {
        let end = offset + bytes.len() as u64;
        if end > self.delivered + self.window {
            return Err(invalid(
                "stream chunk offset",
                format!(
                    "bytes {offset}..{end} beyond the window ({} delivered, window {})",
                    self.delivered, self.window
                ),
            ));
        }
        if let Some((len, _)) = self.fin {
            if end > len {
                return Err(invalid(
                    "stream chunk offset",
                    format!("bytes {offset}..{end} beyond the stream's end at {len}"),
                ));
            }
        }
        if end <= self.next || self.held.contains_key(&offset) {
            return Ok(Placed::Duplicate);
        }
        let (offset, bytes) = if offset < self.next {
            let skip = (self.next - offset) as usize;
            (self.next, bytes[skip..].to_vec())
        } else {
            (offset, bytes)
        };
        // Chunks are cut once by the sender and never change, so a resend
        // has the same boundaries: an overlap that is not a duplicate is a
        // broken sender.
        if let Some((&o, b)) = self.held.range(..offset).next_back() {
            if o + b.len() as u64 > offset {
                return Err(invalid(
                    "stream chunk offset",
                    format!("bytes at {offset} overlap a chunk at {o}"),
                ));
            }
        }
        if let Some((&o, _)) = self.held.range(offset..).next() {
            if o < end {
                return Err(invalid(
                    "stream chunk offset",
                    format!("bytes {offset}..{end} overlap a chunk at {o}"),
                ));
            }
        }
        self.held_bytes += bytes.len() as u64;
        self.held.insert(offset, bytes);
        Ok(Placed::New)
    }

    /// The next bytes in order, if any: to write into the hypervisor socket.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let bytes = self.held.remove(&self.next)?;
        self.held_bytes -= bytes.len() as u64;
        self.next += bytes.len() as u64;
        self.digest.update(&bytes);
        Some(bytes)
    }

    /// Bytes held out of order.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// `n` bytes handed out by `pop` reached the hypervisor socket.
    pub fn on_written(&mut self, n: usize) {
        self.delivered += n as u64;
        debug_assert!(self.delivered <= self.next);
    }

    /// Bytes written into the hypervisor socket.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// A `Credit` to send now: when a quarter window was delivered since
    /// the last report, or the direction has no bytes left in hand (so a
    /// sender waiting on its window always hears of the progress).
    pub fn credit_due(&mut self) -> Option<u64> {
        let idle = self.delivered == self.next && self.held.is_empty();
        let unreported = self.delivered - self.reported;
        if unreported > 0 && (unreported >= self.window / 4 || idle) {
            self.reported = self.delivered;
            return Some(self.delivered);
        }
        None
    }

    /// The sender's `Fin`: its length and digest. Checked when every byte
    /// is delivered ([`Reassembly::end`]).
    pub fn on_fin(
        &mut self,
        length: u64,
        digest: [u8; 16],
        stream: u32,
        dir: Dir,
    ) -> std::result::Result<(), RelayError> {
        if self.fin.is_some() {
            return Err(invalid(
                "Fin",
                format!("a second Fin for stream {stream} ({dir})"),
            ));
        }
        let highest = self
            .held
            .iter()
            .next_back()
            .map_or(self.next, |(o, b)| o + b.len() as u64);
        if length < highest.max(self.next) {
            return Err(invalid(
                "Fin",
                format!(
                    "stream {stream} ({dir}) ends at {length} but bytes up to {highest} arrived"
                ),
            ));
        }
        self.fin = Some((length, digest));
        Ok(())
    }

    /// When every byte up to the `Fin` is delivered: compares length and
    /// digest. `Ok(true)`: pass the EOF on to the hypervisor and confirm
    /// with `Credit { finished }`; `Ok(false)`: not yet.
    pub fn end(
        &mut self,
        keys: &RelayKeys,
        stream: u32,
        dir: Dir,
    ) -> std::result::Result<bool, RelayError> {
        let Some((len, digest)) = self.fin else {
            return Ok(false);
        };
        if self.delivered < len {
            return Ok(false);
        }
        let mine = self.digest.finish(keys);
        // Not secret, but compared whole: a mismatch fails the relay.
        if mine != digest || self.digest.len() != len {
            return Err(RelayError::Mismatch {
                stream,
                dir,
                what: format!(
                    "digest of the {len} bytes delivered differs from the sender's: bytes were lost, repeated or reordered"
                ),
            });
        }
        self.finished = true;
        self.reported = self.delivered;
        Ok(true)
    }

    /// True once the end was delivered and checked.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether a failed write into the hypervisor socket fails the relay:
    /// not when nothing was left to deliver (the hypervisor closed a socket
    /// whose end we were only passing on).
    pub fn write_error_is_fatal(&self) -> bool {
        !matches!(self.fin, Some((len, _)) if self.delivered >= len)
    }
}

/// The destination's order of connects: stream k is connected only after
/// stream k-1's connect completed, so the destination hypervisor accepts
/// them in the order the source's accepted them (QEMU 7.2 takes the first
/// as its main channel).
#[derive(Debug, Clone)]
pub struct OpenFifo {
    max: u32,
    next_open: u32,
    queue: VecDeque<u32>,
    connecting: Option<u32>,
}

impl OpenFifo {
    /// A FIFO for at most `max` streams.
    pub fn new(max: u32) -> Self {
        OpenFifo {
            max,
            next_open: 0,
            queue: VecDeque::new(),
            connecting: None,
        }
    }

    /// The source's `Open { stream }`: ids come in order from 0.
    pub fn on_open(&mut self, stream: u32) -> std::result::Result<(), RelayError> {
        if stream >= self.max {
            return Err(RelayError::TooManyStreams {
                stream,
                max: self.max,
            });
        }
        if stream != self.next_open {
            return Err(invalid(
                "Open",
                format!("stream {stream} opened, expected {}", self.next_open),
            ));
        }
        self.next_open += 1;
        self.queue.push_back(stream);
        Ok(())
    }

    /// The stream to connect now, if no connect is in progress.
    pub fn next_connect(&mut self) -> Option<u32> {
        if self.connecting.is_some() {
            return None;
        }
        let s = self.queue.pop_front()?;
        self.connecting = Some(s);
        Some(s)
    }

    /// The connect of `stream` completed (or failed: the relay ends then).
    ///
    /// # Panics
    /// When `stream` is not the one connecting (a bug of the caller).
    pub fn on_connected(&mut self, stream: u32) {
        assert_eq!(
            self.connecting,
            Some(stream),
            "connect completions in order"
        );
        self.connecting = None;
    }

    /// Streams opened so far.
    pub fn opened(&self) -> u32 {
        self.next_open
    }
}

/// The end and abort rules of one relay, on either side.
#[derive(Debug, Clone)]
pub struct Streams {
    max: u32,
    /// (forward done, back done) per stream.
    done: Vec<(bool, bool)>,
    /// The source declared the last stream (`RelayEnd`).
    declared: Option<u32>,
}

impl Streams {
    /// No stream yet; at most `max`.
    pub fn new(max: u32) -> Self {
        Streams {
            max,
            done: Vec::new(),
            declared: None,
        }
    }

    /// Streams opened.
    pub fn count(&self) -> u32 {
        self.done.len() as u32
    }

    /// Whether another stream may open, and its id. Refused once the main
    /// stream (0) ended (QEMU opens every channel before it ends), past
    /// the limit, or after the source declared its last.
    pub fn open(&mut self) -> std::result::Result<u32, RelayError> {
        let id = self.count();
        if self.declared.is_some() {
            return Err(invalid(
                "Open",
                format!("stream {id} after the relay's end"),
            ));
        }
        if self.done.first().is_some_and(|d| d.0 && d.1) {
            return Err(invalid(
                "Open",
                format!("stream {id} opened after the main stream (0) ended"),
            ));
        }
        if id >= self.max {
            return Err(RelayError::TooManyStreams {
                stream: id,
                max: self.max,
            });
        }
        self.done.push((false, false));
        Ok(id)
    }

    /// A direction of `stream` is done (delivered and confirmed). Returns
    /// true when this made the whole stream done (both directions): its
    /// buffers can be given back.
    pub fn finish(&mut self, stream: u32, dir: Dir) -> std::result::Result<bool, RelayError> {
        let d = self
            .done
            .get_mut(stream as usize)
            .ok_or_else(|| invalid("stream id", format!("{stream} was never opened")))?;
        let was = d.0 && d.1;
        match dir {
            Dir::Forward => d.0 = true,
            Dir::Back => d.1 = true,
        }
        Ok(!was && d.0 && d.1)
    }

    /// True when the main stream is done and every stream opened too:
    /// the source then declares the end.
    pub fn all_done(&self) -> bool {
        !self.done.is_empty() && self.done.iter().all(|d| d.0 && d.1)
    }

    /// The source's `RelayEnd { streams }`: it must name exactly the
    /// streams opened, all done.
    pub fn on_end(&mut self, streams: u32) -> std::result::Result<(), RelayError> {
        if streams != self.count() {
            return Err(invalid(
                "RelayEnd",
                format!("{streams} streams declared, {} opened", self.count()),
            ));
        }
        if !self.all_done() {
            let open: Vec<u32> = (0..self.count())
                .filter(|&i| !(self.done[i as usize].0 && self.done[i as usize].1))
                .collect();
            return Err(invalid(
                "RelayEnd",
                format!("the end declared while streams {open:?} are still open"),
            ));
        }
        self.declared = Some(streams);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RelayKeys {
        RelayKeys::from_frame_key(&MacKey::from_bytes([5; 32]))
    }

    fn chunk(k: &RelayKeys, payload: &[u8], offset: u64) -> StreamChunk {
        StreamChunk {
            stream: 3,
            dir: Dir::Back,
            offset,
            raw_len: payload.len() as u32,
            wire_len: payload.len() as u32,
            codec: 0,
            seq: 9,
            digest: k.chunk_digest(payload),
        }
    }

    /// The digests are XXH3-128 under the relay's secret bit for bit as
    /// the reference (xxhash-rust, which earlier versions hashed with), at
    /// every length around XXH3's cutoffs and however the bytes are split:
    /// relays of either version agree.
    #[test]
    fn digests_are_the_reference_xxh3_at_every_length_and_split() {
        let k = keys();
        // Varied bytes: the top byte of a multiplicative hash of the index.
        let bytes: Vec<u8> = (0..(256u64 << 10) + 300)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        let reference = |b: &[u8]| xxhash_rust::xxh3::xxh3_128_with_secret(b, &k.digest);
        for len in [
            0,
            1,
            3,
            4,
            8,
            9,
            16,
            17,
            128,
            129,
            239,
            240,
            241,
            1023,
            1024,
            1025,
            4096,
            65537,
            256 << 10,
            (256 << 10) + 300,
        ] {
            let b = &bytes[..len];
            assert_eq!(
                k.chunk_digest(b),
                reference(b).to_le_bytes(),
                "chunk of {len}"
            );
            for piece in [1, 7, 64, 240, 241, 4096, 1 << 20] {
                let mut d = k.stream_digest(0, Dir::Forward);
                for p in b.chunks(piece) {
                    d.update(p);
                }
                d.update(&[]);
                assert_eq!(
                    d.hash(&k),
                    reference(b),
                    "stream of {len} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn chunk_headers_round_trip_and_every_byte_is_tagged() {
        let k = keys();
        let c = chunk(&k, b"hello", 100);
        let b = c.encode(&k);
        assert_eq!(StreamChunk::decode(&b, &k, 1024).unwrap(), c);
        c.check_payload(&k, b"hello").unwrap();
        assert!(c.check_payload(&k, b"hellp").is_err(), "payload digest");
        for i in 4..CHUNK_HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            let e = StreamChunk::decode(&bad, &k, 1024).unwrap_err();
            assert!(matches!(e, WireError::BadTag { .. }), "byte {i}: {e}");
        }
        let other = RelayKeys::from_frame_key(&MacKey::from_bytes([6; 32]));
        assert!(
            StreamChunk::decode(&b, &other, 1024).is_err(),
            "another session"
        );
        assert!(
            StreamChunk::decode(&b, &k, 4).is_err(),
            "longer than the offer's chunk"
        );
    }

    #[test]
    fn acks_round_trip_and_are_tagged() {
        let k = keys();
        let a = RelayAck { seq: 77 }.encode(&k);
        assert_eq!(RelayAck::decode(&a, &k).unwrap().seq, 77);
        let mut bad = a;
        bad[9] ^= 1;
        assert!(RelayAck::decode(&bad, &k).is_err());
    }

    #[test]
    fn digests_bind_stream_direction_and_order() {
        let k = keys();
        let d = |s, dir, parts: &[&[u8]]| {
            let mut h = k.stream_digest(s, dir);
            for p in parts {
                h.update(p);
            }
            h.finish(&k)
        };
        let a = d(1, Dir::Forward, &[b"ab", b"cd"]);
        assert_eq!(
            a,
            d(1, Dir::Forward, &[b"a", b"bcd"]),
            "chunking does not matter"
        );
        assert_ne!(a, d(1, Dir::Forward, &[b"cd", b"ab"]), "order");
        assert_ne!(a, d(2, Dir::Forward, &[b"ab", b"cd"]), "stream");
        assert_ne!(a, d(1, Dir::Back, &[b"ab", b"cd"]), "direction");
        assert_ne!(a, d(1, Dir::Forward, &[b"ab", b"cd", b"cd"]), "repeat");
    }

    #[test]
    fn the_send_window_stops_reads_at_the_window_and_moves_with_credit() {
        let mut w = SendWindow::new(100);
        assert_eq!(w.credit(), 100);
        assert_eq!(w.on_read(60), 0);
        assert_eq!(w.on_read(40), 60);
        assert_eq!(w.credit(), 0, "a full window stops reads");
        w.on_credit(30, false).unwrap();
        assert_eq!(w.credit(), 30);
        w.on_credit(20, false).unwrap();
        assert_eq!(w.credit(), 30, "a stale credit changes nothing");
        assert!(w.on_credit(101, false).is_err(), "beyond what was sent");
        assert!(w.on_credit(100, true).is_err(), "finished before the Fin");
        assert_eq!(w.on_eof(), 100);
        assert_eq!(w.credit(), 0, "nothing read after EOF");
        assert!(w.on_credit(90, true).is_err(), "finished short of the end");
        assert!(!w.is_done());
        w.on_credit(100, true).unwrap();
        assert!(w.is_done());
    }

    fn reasm() -> (RelayKeys, Reassembly) {
        let k = keys();
        let d = k.stream_digest(3, Dir::Back);
        (k, Reassembly::new(16, d))
    }

    #[test]
    fn reassembly_hands_out_bytes_in_order_and_drops_duplicates() {
        let (_, mut r) = reasm();
        assert_eq!(r.insert(4, b"efgh".to_vec()).unwrap(), Placed::New);
        assert_eq!(r.pop(), None, "a gap holds later bytes back");
        assert_eq!(r.insert(0, b"abcd".to_vec()).unwrap(), Placed::New);
        assert_eq!(r.insert(4, b"efgh".to_vec()).unwrap(), Placed::Duplicate);
        assert_eq!(r.pop().unwrap(), b"abcd");
        assert_eq!(r.pop().unwrap(), b"efgh");
        assert_eq!(
            r.insert(0, b"abcd".to_vec()).unwrap(),
            Placed::Duplicate,
            "below the next offset"
        );
        assert_eq!(r.held_bytes(), 0);
        assert!(r.insert(10, b"xy".to_vec()).is_ok());
        assert!(
            r.insert(9, b"zz".to_vec()).is_err(),
            "a changed boundary overlaps"
        );
    }

    #[test]
    fn reassembly_enforces_the_window_against_delivered_bytes() {
        let (_, mut r) = reasm();
        assert!(r.insert(12, vec![0; 5]).is_err(), "17 > window 16");
        r.insert(0, vec![1; 8]).unwrap();
        let b = r.pop().unwrap();
        assert!(r.insert(8, vec![0; 9]).is_err(), "popped is not delivered");
        r.on_written(b.len());
        r.insert(8, vec![0; 9]).unwrap();
    }

    #[test]
    fn credit_is_reported_by_quarter_windows_or_when_idle() {
        let (_, mut r) = reasm();
        r.insert(0, vec![1; 2]).unwrap();
        r.insert(4, vec![1; 2]).unwrap();
        let b = r.pop().unwrap();
        r.on_written(b.len());
        assert_eq!(r.credit_due(), None, "2 < 4 and bytes held");
        r.insert(2, vec![1; 2]).unwrap();
        for _ in 0..2 {
            let b = r.pop().unwrap();
            r.on_written(b.len());
        }
        assert_eq!(r.credit_due(), Some(6));
        assert_eq!(r.credit_due(), None, "reported once");
    }

    #[test]
    fn the_end_checks_length_and_digest() {
        let (k, mut r) = reasm();
        let mut sender = k.stream_digest(3, Dir::Back);
        sender.update(b"abcdef");
        r.insert(0, b"abc".to_vec()).unwrap();
        r.on_fin(6, sender.finish(&k), 3, Dir::Back).unwrap();
        assert!(
            r.on_fin(6, sender.finish(&k), 3, Dir::Back).is_err(),
            "second Fin"
        );
        assert!(r.insert(4, b"defg".to_vec()).is_err(), "past the end");
        let b = r.pop().unwrap();
        r.on_written(b.len());
        assert!(!r.end(&k, 3, Dir::Back).unwrap(), "not all delivered");
        assert!(r.write_error_is_fatal());
        r.insert(3, b"def".to_vec()).unwrap();
        let b = r.pop().unwrap();
        r.on_written(b.len());
        assert!(r.end(&k, 3, Dir::Back).unwrap());
        assert!(r.is_finished());
        assert!(!r.write_error_is_fatal(), "nothing left to deliver");

        // The same bytes under a digest of other bytes: a mismatch.
        let (k, mut r) = reasm();
        let mut other = k.stream_digest(3, Dir::Back);
        other.update(b"abcdeX");
        r.insert(0, b"abcdef".to_vec()).unwrap();
        r.on_fin(6, other.finish(&k), 3, Dir::Back).unwrap();
        let b = r.pop().unwrap();
        r.on_written(b.len());
        assert!(matches!(
            r.end(&k, 3, Dir::Back),
            Err(RelayError::Mismatch { .. })
        ));

        let (k, mut r) = reasm();
        r.insert(0, b"abcdef".to_vec()).unwrap();
        assert!(
            r.on_fin(4, [0; 16], 3, Dir::Back).is_err(),
            "Fin shorter than arrived bytes"
        );
        let _ = k;
    }

    #[test]
    fn opens_are_connected_one_at_a_time_in_order() {
        let mut f = OpenFifo::new(3);
        assert!(f.on_open(1).is_err(), "out of order");
        f.on_open(0).unwrap();
        f.on_open(1).unwrap();
        assert_eq!(f.next_connect(), Some(0));
        assert_eq!(f.next_connect(), None, "1 waits for 0's connect");
        f.on_connected(0);
        assert_eq!(f.next_connect(), Some(1));
        f.on_connected(1);
        assert_eq!(f.next_connect(), None);
        f.on_open(2).unwrap();
        assert!(matches!(
            f.on_open(3),
            Err(RelayError::TooManyStreams { .. })
        ));
    }

    #[test]
    fn the_relay_ends_when_every_stream_is_done_and_refuses_late_streams() {
        let mut s = Streams::new(3);
        assert!(!s.all_done(), "no stream is not a finished relay");
        assert_eq!(s.open().unwrap(), 0);
        assert_eq!(s.open().unwrap(), 1);
        assert!(!s.finish(1, Dir::Forward).unwrap(), "one direction of two");
        assert!(s.finish(1, Dir::Back).unwrap(), "both: its buffers go back");
        assert!(
            !s.finish(1, Dir::Back).unwrap(),
            "a stream is done (and its buffers given back) once"
        );
        assert!(!s.finish(0, Dir::Forward).unwrap());
        assert!(!s.all_done());
        assert!(s.on_end(2).is_err(), "main still open");
        assert!(s.finish(0, Dir::Back).unwrap());
        assert!(s.all_done());
        assert!(s.open().is_err(), "no stream after the main stream ended");
        assert!(s.on_end(3).is_err(), "wrong count");
        s.on_end(2).unwrap();
        assert!(s.finish(7, Dir::Back).is_err());
        let mut s = Streams::new(1);
        s.open().unwrap();
        assert!(matches!(s.open(), Err(RelayError::TooManyStreams { .. })));
    }

    #[test]
    fn offers_are_checked_and_deliver_to_against_relay_allow() {
        let o = RelayOffer {
            deliver_to: "127.0.0.1:4444".into(),
            max_streams: DEFAULT_MAX_STREAMS,
            window: DEFAULT_WINDOW,
            chunk: MAX_STREAM_CHUNK,
            option: PerformanceOption::Tcp,
            channels: 4,
        };
        o.validate().unwrap();
        // Per opened stream: its two windows, not max_streams of them.
        assert_eq!(o.stream_reservation(), 2 * u64::from(DEFAULT_WINDOW));
        let many = RelayOffer {
            max_streams: MAX_STREAMS,
            ..o.clone()
        };
        assert_eq!(
            many.admission_reservation(),
            o.admission_reservation(),
            "admission does not scale with max_streams"
        );
        // At admission: the main stream and each channel's read buffers.
        assert_eq!(
            o.admission_reservation(),
            2 * u64::from(DEFAULT_WINDOW) + 4 * ((64 << 10) + (256 << 10))
        );
        let e = RelayError::MemoryLimit {
            stream: 3,
            needs: 64 << 20,
            used: 1 << 30,
            limit: 1 << 30,
        }
        .to_string();
        assert!(
            e.contains("stream 3")
                && e.contains("--memory-limit of 1.00 GiB")
                && e.contains("32.00 MiB windows"),
            "{e}"
        );
        for bad in [
            RelayOffer {
                max_streams: 0,
                ..o.clone()
            },
            RelayOffer {
                window: 1,
                ..o.clone()
            },
            RelayOffer {
                chunk: MAX_STREAM_CHUNK + 1,
                ..o.clone()
            },
            RelayOffer {
                channels: 0,
                ..o.clone()
            },
            RelayOffer {
                option: PerformanceOption::Rdma,
                ..o.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let allow = default_allow();
        check_deliver_to("127.0.0.1:1".parse().unwrap(), &allow).unwrap();
        check_deliver_to("[::1]:1".parse().unwrap(), &allow).unwrap();
        check_deliver_to("[::ffff:127.0.0.1]:1".parse().unwrap(), &allow).unwrap();
        let e = check_deliver_to("10.0.0.1:1".parse().unwrap(), &allow).unwrap_err();
        assert!(e.contains("10.0.0.1:1") && e.contains("127.0.0.0/8"), "{e}");
        let wide = vec!["10.0.0.0/8".parse().unwrap()];
        check_deliver_to("10.0.0.1:1".parse().unwrap(), &wide).unwrap();
    }
}
