//! Data-channel frames, format v2: fixed little-endian headers defined with
//! `zerocopy`, authenticated with the session's frame key.
//!
//! A data channel carries, source to destination, a sequence of *chunk
//! frames*; destination to source, one *ack frame* per chunk. Every field is
//! checked before it is used ([`ChunkHeader::decode`], [`decode_runs`]).
//!
//! ```text
//! Chunk frame
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                        magic "FRYC"                           |  0
//! +---------------+---------------+-------------------------------+
//! |  version (2)  |     kind      |            flags              |  4
//! +---------------+---------------+-------------------------------+
//! |                          seq (u64)                            |  8
//! |                                                               |
//! +---------------------------------------------------------------+
//! |                         round (u32)                           | 16
//! +---------------------------------------------------------------+
//! |                       run_count (u32)                         | 20
//! +---------------------------------------------------------------+
//! |                      payload_len (u32)                        | 24
//! +---------------------------------------------------------------+
//! |                        reserved (0)                           | 28
//! +---------------------------------------------------------------+
//! |   payload tag (16 bytes): HMAC(frame key, seq | round |       | 32
//! |     sum of the chunk's pages' keyed contributions)            |
//! +---------------------------------------------------------------+
//! |   header tag (16 bytes): HMAC(frame key, bytes 0..48 |        | 48
//! |     run table)                                                |
//! +---------------------------------------------------------------+
//! |  run_count x RunDesc (16 bytes each), ascending, disjoint     | 64
//! +---------------------------------------------------------------+
//! |  payload: the pages of every non-zero run, in run order       |
//! +---------------------------------------------------------------+
//!
//! RunDesc: gpa (u64) | pages (u32) | flags (u32, bit 0 = zero run)
//!
//! Ack frame (32 bytes): magic "FRYA" | status (u8) | 3 reserved | seq (u64)
//!                       | ack tag (16 bytes): HMAC(frame key, seq | status)
//! ```
//!
//! The tags are defined in [`crate::frame`]. The header tag covers
//! every byte before the payload, so a destination checks it before any
//! byte lands: a frame whose header or run table was changed on the way is
//! refused with nothing written, and since its lengths can no longer be
//! trusted the channel is closed (the source fails its chunks over to the
//! other channels). The payload tag is checked over what landed; a mismatch
//! is answered with [`AckStatus::Mismatch`] and the chunk is sent again.
//!
//! With [`FLAG_COMPRESSED`] (only on a channel whose migration negotiated the
//! compression option) the payload is a [`CompressedHeader`], a segment table
//! and one segment per non-zero run:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------+---------------+-------------------------------+
//! |  codec id     |  reserved (0) |       segment_count (u16)     |  0
//! +---------------+---------------+-------------------------------+
//! |    uncompressed_len (u32): bytes of the non-zero runs         |  4
//! +---------------------------------------------------------------+
//! |    compressed_len (u32): segment table + segments             |  8
//! +---------------------------------------------------------------+
//! |    reserved (0)                                               | 12
//! +---------------------------------------------------------------+
//! |  segment_count x u32: segment length, bit 31 = stored raw     | 16
//! +---------------------------------------------------------------+
//! |  segments, in run order: one codec block per non-zero run     |
//! +---------------------------------------------------------------+
//! ```
//!
//! Every non-zero run of a compressed frame is at most [`MAX_SEGMENT`]
//! bytes (the sender splits longer ones), so the destination reads and
//! decompresses one bounded segment at a time. The payload tag covers the
//! pages as they landed after decompression; a compressed payload that
//! does not decode (damaged on the way) lands what it can, is recorded as
//! it landed, and is answered `Mismatch`.

use std::str::FromStr;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Result, WireError};
use crate::frame::{self, Tag, TAG_LEN};
use crate::layout::{MemoryLayout, PageRun};
use crate::MacKey;

/// Magic of a chunk frame.
pub const CHUNK_MAGIC: [u8; 4] = *b"FRYC";
/// Magic of an ack frame.
pub const ACK_MAGIC: [u8; 4] = *b"FRYA";
/// Data frame format version.
pub const FRAME_VERSION: u8 = 2;
/// Bytes of a chunk frame header.
pub const HEADER_LEN: usize = 64;
/// Bytes of an ack frame.
pub const ACK_LEN: usize = 32;
/// Largest payload of one chunk frame.
pub const MAX_CHUNK_PAYLOAD: u32 = 16 << 20;
/// Largest number of runs in one chunk frame.
pub const MAX_RUNS: u32 = 4096;
/// Chunk frame flag: the payload is compressed (reserved for the compression option).
pub const FLAG_COMPRESSED: u16 = 1;
/// Run flag: the run's pages are all zero and have no payload.
pub const RUN_ZERO: u32 = 1;
/// Segment-table flag: the segment holds the run's bytes as they are
/// (the codec did not shrink them).
pub const SEGMENT_STORED: u32 = 1 << 31;
/// Longest non-zero run of a compressed frame, so its segment (compressed,
/// or stored when it did not shrink) is never longer: the destination reads
/// and decompresses one segment at a time through a buffer of this size.
/// The compression sender splits longer runs.
pub const MAX_SEGMENT: usize = 256 << 10;

/// A compression codec, by its wire id (0 is reserved as invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// LZ4 block format (`lz4_flex`), one block per segment.
    Lz4 = 1,
    /// Zstandard, one frame per segment.
    Zstd = 2,
}

impl Codec {
    /// Every codec this build knows.
    pub const ALL: [Codec; 2] = [Codec::Lz4, Codec::Zstd];

    /// Wire id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// The codec with this wire id, or an error naming the unknown id.
    pub fn from_id(id: u8) -> Result<Codec> {
        Codec::ALL
            .into_iter()
            .find(|c| c.id() == id)
            .ok_or_else(|| WireError::Invalid {
                field: "compression codec id",
                detail: format!("unknown codec id {id} (this host knows 1 = lz4, 2 = zstd)"),
            })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Highest zstd level accepted (levels above 19 need very large windows).
pub const ZSTD_MAX_LEVEL: i32 = 19;

/// A codec and its level, as given by `--compression lz4|zstd[:LEVEL]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionSpec {
    /// The codec.
    pub codec: Codec,
    /// zstd level (1..=19); 0 for lz4, which has none.
    pub level: i32,
}

impl Default for CompressionSpec {
    /// zstd level 1: on this project's memory mix it shrinks non-zero pages
    /// about 2.1x at about 500 MB/s per core (lz4: 1.8x at 650 MB/s; zstd-3:
    /// 2.25x at 335 MB/s), which is what a 1 Gbit/s link needs to run twice
    /// as fast as uncompressed with one or two cores.
    fn default() -> Self {
        CompressionSpec {
            codec: Codec::Zstd,
            level: 1,
        }
    }
}

impl CompressionSpec {
    /// Checks the level against the codec.
    pub fn validate(&self) -> Result<()> {
        let ok = match self.codec {
            Codec::Lz4 => self.level == 0,
            Codec::Zstd => (1..=ZSTD_MAX_LEVEL).contains(&self.level),
        };
        if ok {
            Ok(())
        } else {
            Err(WireError::Invalid {
                field: "compression level",
                detail: match self.codec {
                    Codec::Lz4 => format!("lz4 has no levels, got {}", self.level),
                    Codec::Zstd => {
                        format!("zstd level {} is not in 1..={ZSTD_MAX_LEVEL}", self.level)
                    }
                },
            })
        }
    }
}

impl FromStr for CompressionSpec {
    type Err = String;

    /// Parses `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (
                n,
                Some(
                    l.parse::<i32>()
                        .map_err(|_| format!("compression level {l:?} is not a number"))?,
                ),
            ),
            None => (s, None),
        };
        let spec = match (name, level) {
            ("lz4", None) => CompressionSpec {
                codec: Codec::Lz4,
                level: 0,
            },
            ("lz4", Some(_)) => return Err("lz4 takes no level".into()),
            ("zstd", l) => CompressionSpec {
                codec: Codec::Zstd,
                level: l.unwrap_or(1),
            },
            _ => {
                return Err(format!(
                    "unknown codec {name:?}: use lz4, zstd or zstd:LEVEL"
                ))
            }
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }
}

impl std::fmt::Display for CompressionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.codec {
            Codec::Lz4 => f.write_str("lz4"),
            Codec::Zstd => write!(f, "zstd:{}", self.level),
        }
    }
}

/// Kind of a chunk frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkKind {
    /// Page data.
    Pages = 1,
    /// The source is done with this channel; no payload.
    End = 2,
}

/// Fixed header of a chunk frame (64 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHeader {
    /// [`CHUNK_MAGIC`].
    pub magic: [u8; 4],
    /// [`FRAME_VERSION`].
    pub version: u8,
    /// [`ChunkKind`].
    pub kind: u8,
    /// `FLAG_*`.
    pub flags: U16,
    /// Sequence number, unique within a migration.
    pub seq: U64,
    /// Pre-copy round the pages were read in.
    pub round: U32,
    /// Number of [`RunDesc`] that follow.
    pub run_count: U32,
    /// Payload bytes after the run table.
    pub payload_len: U32,
    /// Zero.
    pub reserved: U32,
    /// [`frame::payload_tag`] over `seq`, `round` and the pages' contributions.
    pub payload_tag: [u8; TAG_LEN],
    /// [`frame::header_tag`] over bytes 0..48 and the run table.
    pub header_tag: [u8; TAG_LEN],
}
const _: () = assert!(std::mem::size_of::<ChunkHeader>() == HEADER_LEN);

/// Bytes of a header the header tag covers (all before the tag).
const TAGGED: usize = HEADER_LEN - TAG_LEN;

/// One run in a chunk's run table (16 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RunDesc {
    /// Guest physical address of the first page.
    pub gpa: U64,
    /// Number of pages.
    pub pages: U32,
    /// `RUN_*` flags.
    pub flags: U32,
}
const _: () = assert!(std::mem::size_of::<RunDesc>() == 16);

/// Sub-header at the start of a compressed chunk's payload (16 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CompressedHeader {
    /// [`Codec`] id.
    pub codec: u8,
    /// Zero.
    pub reserved: u8,
    /// Number of segments: one per non-zero run.
    pub segment_count: U16,
    /// Bytes the segments decompress to: must equal the non-zero runs' bytes.
    pub uncompressed_len: U32,
    /// Bytes after this sub-header: segment table and segments.
    pub compressed_len: U32,
    /// Zero.
    pub reserved2: U32,
}
const _: () = assert!(std::mem::size_of::<CompressedHeader>() == 16);

/// One segment of a compressed payload, located and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the segment's bytes in the payload.
    pub offset: usize,
    /// Its length.
    pub len: usize,
    /// Stored as-is rather than compressed.
    pub stored: bool,
}

/// A compressed payload's sub-header and segments, checked against the runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedPayload {
    /// The codec.
    pub codec: Codec,
    /// One per non-zero run, in run order.
    pub segments: Vec<Segment>,
}

impl CompressedHeader {
    /// Bytes of the sub-header and segment table of a compressed payload
    /// whose sub-header is `head` (its first 16 bytes).
    pub fn prefix_len(head: &[u8]) -> Result<usize> {
        let (h, _) =
            CompressedHeader::read_from_prefix(head).map_err(|_| WireError::Malformed {
                what: "compressed payload",
                detail: format!("{} bytes, need at least 16", head.len()),
            })?;
        Ok(16 + 4 * usize::from(h.segment_count.get()))
    }

    /// Parses and checks a compressed payload from its prefix (`prefix`: the
    /// sub-header and the segment table, [`CompressedHeader::prefix_len`]
    /// bytes) and its total length: a known codec (and the one the
    /// migration negotiated, when given), an uncompressed length equal to
    /// the non-zero runs' bytes (so a frame cannot claim more output than
    /// its runs hold: no decompression bombs), a compressed length equal to
    /// what follows the sub-header, one segment per non-zero run, every
    /// non-zero run at most [`MAX_SEGMENT`] bytes (so the destination reads
    /// one bounded segment at a time), stored segments exactly as long as
    /// their run and compressed ones shorter, and segment lengths adding up.
    ///
    /// `data_runs` are the byte lengths of the frame's non-zero runs.
    /// Segment offsets are from the start of the payload.
    pub fn decode_prefix(
        prefix: &[u8],
        payload_len: usize,
        data_runs: &[u64],
        negotiated: Option<Codec>,
    ) -> Result<CompressedPayload> {
        let (h, _) =
            CompressedHeader::read_from_prefix(prefix).map_err(|_| WireError::Malformed {
                what: "compressed payload",
                detail: format!("{} bytes, need at least 16", prefix.len()),
            })?;
        let codec = Codec::from_id(h.codec)?;
        if h.reserved != 0 || h.reserved2.get() != 0 {
            return Err(WireError::Invalid {
                field: "compressed sub-header",
                detail: "reserved bytes are not zero".into(),
            });
        }
        if let Some(want) = negotiated {
            if want != codec {
                return Err(WireError::Invalid {
                    field: "compression codec id",
                    detail: format!(
                        "frame uses {codec} (id {}) but the migration negotiated {want} (id {})",
                        codec.id(),
                        want.id()
                    ),
                });
            }
        }
        let run_bytes: u64 = data_runs.iter().sum();
        let claimed = u64::from(h.uncompressed_len.get());
        if claimed != run_bytes {
            return Err(WireError::Invalid {
                field: "uncompressed length",
                detail: format!(
                    "compressed payload claims {claimed} bytes but its non-zero runs hold {run_bytes}"
                ),
            });
        }
        if let Some(long) = data_runs.iter().find(|&&r| r > MAX_SEGMENT as u64) {
            return Err(WireError::Invalid {
                field: "compressed run",
                detail: format!(
                    "a run of {long} bytes in a compressed frame (at most {MAX_SEGMENT} per run)"
                ),
            });
        }
        let after = payload_len.checked_sub(16).ok_or(WireError::Malformed {
            what: "compressed payload",
            detail: format!("{payload_len} bytes, need at least 16"),
        })?;
        if h.compressed_len.get() as usize != after {
            return Err(WireError::Invalid {
                field: "compressed length",
                detail: format!(
                    "sub-header says {} bytes but {after} follow it",
                    h.compressed_len.get()
                ),
            });
        }
        let n = usize::from(h.segment_count.get());
        if n != data_runs.len() {
            return Err(WireError::Invalid {
                field: "segment count",
                detail: format!("{n} segments for {} non-zero runs", data_runs.len()),
            });
        }
        let table_end = 16 + 4 * n;
        let table = prefix
            .get(16..table_end)
            .ok_or_else(|| WireError::Malformed {
                what: "compressed payload",
                detail: format!("{n} segments need a {}-byte table", 4 * n),
            })?;
        let lens = <[U32]>::ref_from_bytes(table).map_err(|_| WireError::Malformed {
            what: "segment table",
            detail: "not a whole number of u32".into(),
        })?;
        let mut segments = Vec::with_capacity(n);
        let mut offset = table_end;
        for (i, (raw, &run)) in lens.iter().zip(data_runs).enumerate() {
            let stored = raw.get() & SEGMENT_STORED != 0;
            let len = (raw.get() & !SEGMENT_STORED) as usize;
            if len == 0 || (stored && len as u64 != run) || (!stored && len as u64 >= run) {
                return Err(WireError::Invalid {
                    field: "segment length",
                    detail: format!(
                        "segment {i} is {len} bytes{} for a run of {run} bytes",
                        if stored { " stored" } else { "" }
                    ),
                });
            }
            let end = offset
                .checked_add(len)
                .filter(|&e| e <= payload_len)
                .ok_or_else(|| WireError::Invalid {
                    field: "segment length",
                    detail: format!(
                        "segment {i} ({len} bytes at offset {offset}) runs past the {payload_len}-byte payload"
                    ),
                })?;
            segments.push(Segment {
                offset,
                len,
                stored,
            });
            offset = end;
        }
        if offset != payload_len {
            return Err(WireError::Invalid {
                field: "segment length",
                detail: format!("segments end at {offset} but the payload is {payload_len} bytes"),
            });
        }
        Ok(CompressedPayload { codec, segments })
    }

    /// [`CompressedHeader::decode_prefix`] on a whole payload.
    pub fn decode(
        payload: &[u8],
        data_runs: &[u64],
        negotiated: Option<Codec>,
    ) -> Result<CompressedPayload> {
        let prefix = Self::prefix_len(payload)?;
        let head = payload.get(..prefix).ok_or_else(|| WireError::Malformed {
            what: "compressed payload",
            detail: format!(
                "{} segments need a {}-byte table",
                (prefix - 16) / 4,
                prefix - 16
            ),
        })?;
        Self::decode_prefix(head, payload.len(), data_runs, negotiated)
    }
}

/// Ack status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    /// The chunk landed and its payload tag matched what landed.
    Landed = 0,
    /// The chunk landed but its payload tag did not match what landed (a
    /// guest write racing the source's read, or damage on the way): the
    /// source must send its pages again.
    Mismatch = 1,
    /// Another chunk was landing on some of the same pages (a stale copy in
    /// flight on another channel): nothing landed, the source must send the
    /// pages again.
    Busy = 2,
}

/// Ack frame (32 bytes), destination to source.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AckFrame {
    /// [`ACK_MAGIC`].
    pub magic: [u8; 4],
    /// [`AckStatus`].
    pub status: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// Sequence number of the chunk.
    pub seq: U64,
    /// [`frame::ack_tag`] over `seq` and `status`.
    pub tag: [u8; TAG_LEN],
}
const _: () = assert!(std::mem::size_of::<AckFrame>() == ACK_LEN);

impl ChunkHeader {
    /// The header of a page chunk, its header tag computed over it and
    /// `table` (the run table's bytes) with `key`.
    #[allow(clippy::too_many_arguments)]
    pub fn pages(
        key: &MacKey,
        seq: u64,
        round: u32,
        table: &[u8],
        payload_len: u32,
        flags: u16,
        payload_tag: Tag,
    ) -> Self {
        let mut h = ChunkHeader {
            magic: CHUNK_MAGIC,
            version: FRAME_VERSION,
            kind: ChunkKind::Pages as u8,
            flags: U16::new(flags),
            seq: U64::new(seq),
            round: U32::new(round),
            run_count: U32::new((table.len() / std::mem::size_of::<RunDesc>()) as u32),
            payload_len: U32::new(payload_len),
            reserved: U32::new(0),
            payload_tag,
            header_tag: [0; TAG_LEN],
        };
        h.seal(key, table);
        h
    }

    /// An end-of-channel header (`seq` carries RDMA's lost-channel mask).
    pub fn end(key: &MacKey, seq: u64) -> Self {
        let mut h = Self::pages(key, seq, 0, &[], 0, 0, [0; TAG_LEN]);
        h.kind = ChunkKind::End as u8;
        h.seal(key, &[]);
        h
    }

    /// Computes the header tag over the header's fields and `table`.
    pub fn seal(&mut self, key: &MacKey, table: &[u8]) {
        self.header_tag = frame::header_tag(key, &self.as_bytes()[..TAGGED], table);
    }

    /// Checks the header tag over the header's fields and `table`, in
    /// constant time.
    ///
    /// # Errors
    /// [`WireError::BadTag`] naming the chunk: the header or run table
    /// was changed on the way (or the peer holds another key). Nothing of
    /// the chunk may land, and the channel's framing can no longer be
    /// trusted.
    pub fn verify(&self, key: &MacKey, table: &[u8]) -> Result<()> {
        if frame::header_tag_ok(key, &self.as_bytes()[..TAGGED], table, &self.header_tag) {
            Ok(())
        } else {
            Err(WireError::BadTag {
                field: "chunk header tag",
                detail: format!(
                    "chunk {} (round {}): the header or run table was changed on the way; nothing of it landed and the channel is closed",
                    self.seq.get(),
                    self.round.get()
                ),
            })
        }
    }

    /// Parses and checks a header's plain fields: magic, version, kind,
    /// flags, and the length fields against their limits, so that the rest
    /// of the frame can be read safely. The header tag is checked after the
    /// run table was read ([`ChunkHeader::verify`]). Returns the header and
    /// its kind.
    pub fn decode(bytes: &[u8]) -> Result<(Self, ChunkKind)> {
        let (h, _) = ChunkHeader::read_from_prefix(bytes).map_err(|_| WireError::Malformed {
            what: "chunk header",
            detail: format!("{} bytes, need {HEADER_LEN}", bytes.len()),
        })?;
        if h.magic != CHUNK_MAGIC {
            return Err(WireError::BadMagic {
                what: "chunk header",
                expected: CHUNK_MAGIC,
                found: h.magic,
            });
        }
        if h.version != FRAME_VERSION {
            return Err(WireError::Invalid {
                field: "chunk frame version",
                detail: format!(
                    "{} (this host reads {FRAME_VERSION}: the peer runs an incompatible ferry; upgrade both ends to the same release)",
                    h.version
                ),
            });
        }
        let kind = match h.kind {
            1 => ChunkKind::Pages,
            2 => ChunkKind::End,
            k => {
                return Err(WireError::Invalid {
                    field: "chunk kind",
                    detail: format!("unknown kind {k}"),
                })
            }
        };
        if h.flags.get() & !FLAG_COMPRESSED != 0 {
            return Err(WireError::Invalid {
                field: "chunk flags",
                detail: format!("unknown flags {:#x}", h.flags.get()),
            });
        }
        if h.reserved.get() != 0 {
            return Err(WireError::Invalid {
                field: "chunk header",
                detail: format!("reserved field is {:#x}, not 0", h.reserved.get()),
            });
        }
        if h.run_count.get() > MAX_RUNS {
            return Err(WireError::TooLarge {
                field: "chunk run count",
                len: h.run_count.get().into(),
                limit: MAX_RUNS.into(),
            });
        }
        if h.payload_len.get() > MAX_CHUNK_PAYLOAD {
            return Err(WireError::TooLarge {
                field: "chunk payload length",
                len: h.payload_len.get().into(),
                limit: MAX_CHUNK_PAYLOAD.into(),
            });
        }
        if kind == ChunkKind::End && (h.run_count.get() != 0 || h.payload_len.get() != 0) {
            return Err(WireError::Invalid {
                field: "end frame",
                detail: "carries runs or payload".into(),
            });
        }
        Ok((h, kind))
    }
}

impl RunDesc {
    /// Wire form of a run.
    pub fn from_run(r: &PageRun) -> Self {
        RunDesc {
            gpa: U64::new(r.gpa),
            pages: U32::new(r.pages),
            flags: U32::new(if r.zero { RUN_ZERO } else { 0 }),
        }
    }
}

/// The run table of `runs`, as bytes.
pub fn run_table(runs: &[PageRun]) -> Vec<u8> {
    let descs: Vec<RunDesc> = runs.iter().map(RunDesc::from_run).collect();
    descs.as_bytes().to_vec()
}

/// The head of a page frame as every backend sends it (TCP before the
/// pages, RDMA as the descriptor, compression before its sub-header): the
/// [`ChunkHeader`], its header tag computed with `key` over it and the run
/// table, then the run table of `runs`. The one encoder of a frame's head;
/// [`ChunkHeader::decode`], [`ChunkHeader::verify`] and [`decode_runs`]
/// are its decoder.
#[allow(clippy::too_many_arguments)]
pub fn encode_head(
    key: &MacKey,
    seq: u64,
    round: u32,
    runs: &[PageRun],
    payload_len: u32,
    flags: u16,
    payload_tag: Tag,
) -> Vec<u8> {
    let table = run_table(runs);
    let h = ChunkHeader::pages(key, seq, round, &table, payload_len, flags, payload_tag);
    let mut head = Vec::with_capacity(HEADER_LEN + table.len());
    head.extend_from_slice(h.as_bytes());
    head.extend_from_slice(&table);
    head
}

/// Decodes and checks a run table: every run inside the layout, known
/// flags, runs in ascending address order without overlap (so no page is
/// landed twice by one chunk). Returns the runs and the total bytes of their
/// non-zero pages (which must equal `payload_len` for an uncompressed chunk
/// and the uncompressed size for a compressed one).
pub fn decode_runs(table: &[u8], layout: &MemoryLayout) -> Result<(Vec<PageRun>, u64)> {
    let descs = <[RunDesc]>::ref_from_bytes(table).map_err(|_| WireError::Malformed {
        what: "run table",
        detail: format!(
            "{} bytes is not a whole number of 16-byte runs",
            table.len()
        ),
    })?;
    let mut runs = Vec::with_capacity(descs.len());
    let mut data_bytes = 0u64;
    let mut next = 0u64;
    for d in descs {
        let flags = d.flags.get();
        if flags & !RUN_ZERO != 0 {
            return Err(WireError::Invalid {
                field: "run flags",
                detail: format!("unknown flags {flags:#x}"),
            });
        }
        let run = PageRun {
            gpa: d.gpa.get(),
            pages: d.pages.get(),
            zero: flags & RUN_ZERO != 0,
        };
        layout.check_run(run.gpa, run.pages.into())?;
        if run.gpa < next {
            return Err(WireError::Invalid {
                field: "run table",
                detail: format!(
                    "the run at {:#x} overlaps or precedes the run before it (runs must ascend)",
                    run.gpa
                ),
            });
        }
        next = run.gpa + run.bytes();
        data_bytes += run.payload_bytes();
        runs.push(run);
    }
    Ok((runs, data_bytes))
}

impl AckFrame {
    /// An ack with its tag.
    pub fn new(key: &MacKey, seq: u64, status: AckStatus) -> Self {
        AckFrame {
            magic: ACK_MAGIC,
            status: status as u8,
            reserved: [0; 3],
            seq: U64::new(seq),
            tag: frame::ack_tag(key, seq, status as u8),
        }
    }

    /// Parses an ack and checks its fields and its tag.
    pub fn decode(key: &MacKey, bytes: &[u8]) -> Result<(u64, AckStatus)> {
        let (seq, status, a) = Self::decode_fields(bytes)?;
        if !frame::ack_tag_ok(key, seq, a.status, &a.tag) {
            return Err(WireError::BadTag {
                field: "ack tag",
                detail: format!(
                    "the ack of chunk {seq} was changed on the way (or comes from a peer without the session's key)"
                ),
            });
        }
        Ok((seq, status))
    }

    /// Parses an ack's fields without checking its tag (tools that watch
    /// the wire, e.g. the test proxy).
    pub fn decode_fields(bytes: &[u8]) -> Result<(u64, AckStatus, AckFrame)> {
        let (a, _) = AckFrame::read_from_prefix(bytes).map_err(|_| WireError::Malformed {
            what: "ack frame",
            detail: format!("{} bytes, need {ACK_LEN}", bytes.len()),
        })?;
        if a.magic != ACK_MAGIC {
            return Err(WireError::BadMagic {
                what: "ack frame",
                expected: ACK_MAGIC,
                found: a.magic,
            });
        }
        let status = match a.status {
            0 => AckStatus::Landed,
            1 => AckStatus::Mismatch,
            2 => AckStatus::Busy,
            s => {
                return Err(WireError::Invalid {
                    field: "ack status",
                    detail: format!("unknown status {s}"),
                })
            }
        };
        Ok((a.seq.get(), status, a))
    }
}

/// Runs the frame and run-table decoders on arbitrary bytes; used by the fuzz
/// target. Never panics.
pub fn fuzz_decode(data: &[u8], layout: &MemoryLayout) {
    let key = MacKey::from_bytes([0x5a; 32]);
    if let Ok((h, _)) = ChunkHeader::decode(data) {
        let rest = &data[HEADER_LEN..];
        let table_len = (h.run_count.get() as usize) * 16;
        if rest.len() >= table_len {
            let _ = h.verify(&key, &rest[..table_len]);
            if let Ok((runs, _)) = decode_runs(&rest[..table_len], layout) {
                let data: Vec<u64> = runs
                    .iter()
                    .filter(|r| !r.zero)
                    .map(PageRun::bytes)
                    .collect();
                let _ = CompressedHeader::decode(&rest[table_len..], &data, None);
            }
        }
    }
    let _ = AckFrame::decode(&key, data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionDesc, PAGE_SIZE};

    fn layout() -> MemoryLayout {
        MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![RegionDesc {
                gpa: 0,
                size: 64 * PAGE_SIZE,
            }],
        }
    }

    fn key() -> MacKey {
        MacKey::from_bytes([9; 32])
    }

    fn table() -> Vec<u8> {
        run_table(&[
            PageRun {
                gpa: 0,
                pages: 2,
                zero: false,
            },
            PageRun {
                gpa: 8 * PAGE_SIZE,
                pages: 4,
                zero: true,
            },
        ])
    }

    #[test]
    fn header_bytes_are_pinned_little_endian() {
        let t = table();
        let h = ChunkHeader::pages(&key(), 0x0102030405060708, 3, &t, 8192, 0, [0xaa; 16]);
        let b = h.as_bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(&b[0..4], b"FRYC");
        assert_eq!(b[4], 2, "format version 2");
        assert_eq!(b[5], 1);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[3, 0, 0, 0]);
        assert_eq!(&b[20..24], &[2, 0, 0, 0], "run count from the table");
        assert_eq!(&b[24..28], &8192u32.to_le_bytes());
        assert_eq!(&b[28..32], &[0; 4]);
        assert_eq!(&b[32..48], &[0xaa; 16], "payload tag as given");
        assert_eq!(&b[48..64], &frame::header_tag(&key(), &b[..48], &t));
        let (back, kind) = ChunkHeader::decode(b).unwrap();
        assert_eq!(kind, ChunkKind::Pages);
        assert_eq!(back.seq.get(), 0x0102030405060708);
        back.verify(&key(), &t).unwrap();
    }

    #[test]
    fn the_header_tag_refuses_any_change_to_header_or_run_table() {
        let t = table();
        let h = ChunkHeader::pages(&key(), 5, 1, &t, 8192, 0, [1; 16]);
        h.verify(&key(), &t).unwrap();
        // Any byte of the header's fields or of the run table.
        for i in 0..48 {
            let mut b = h.as_bytes().to_vec();
            b[i] ^= 0x01;
            let (x, _) = ChunkHeader::read_from_prefix(&b[..]).unwrap();
            assert!(x.verify(&key(), &t).is_err(), "header byte {i}");
        }
        for i in 0..t.len() {
            let mut t2 = t.clone();
            t2[i] ^= 0x80;
            let e = h.verify(&key(), &t2).unwrap_err().to_string();
            assert!(
                e.contains("chunk header tag") && e.contains("chunk 5"),
                "{e}"
            );
        }
        // The tag itself, and another key.
        let mut x = h;
        x.header_tag[3] ^= 1;
        assert!(x.verify(&key(), &t).is_err());
        assert!(h.verify(&MacKey::from_bytes([8; 32]), &t).is_err());
        // End frames are tagged too.
        let e = ChunkHeader::end(&key(), 7);
        e.verify(&key(), &[]).unwrap();
        let mut forged = e;
        forged.seq = U64::new(6);
        assert!(forged.verify(&key(), &[]).is_err());
    }

    #[test]
    fn header_checks_name_the_bad_field() {
        let t = table();
        let mut h = ChunkHeader::pages(&key(), 1, 0, &t, 4096, 0, [0; 16]);
        h.magic = *b"XXXX";
        let e = ChunkHeader::decode(h.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut h = ChunkHeader::pages(&key(), 1, 0, &t, 4096, 0, [0; 16]);
        h.version = 1;
        let e = ChunkHeader::decode(h.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("chunk frame version: 1 (this host reads 2"),
            "a v1 peer is named: {e}"
        );
        let h = ChunkHeader::pages(&key(), 1, 0, &t, MAX_CHUNK_PAYLOAD + 1, 0, [0; 16]);
        let e = ChunkHeader::decode(h.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("payload length") && e.contains("limit"), "{e}");
        let mut h = ChunkHeader::pages(&key(), 1, 0, &t, 0, 0, [0; 16]);
        h.run_count = U32::new(MAX_RUNS + 1);
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("run count"));
        let mut h = ChunkHeader::pages(&key(), 1, 0, &[], 0, 0, [0; 16]);
        h.kind = 77;
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("kind"));
        let mut h = ChunkHeader::pages(&key(), 1, 0, &[], 0, 0, [0; 16]);
        h.reserved = U32::new(1);
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        assert!(ChunkHeader::decode(&[0u8; 40])
            .unwrap_err()
            .to_string()
            .contains("malformed chunk header"));
    }

    #[test]
    fn run_table_rejects_runs_outside_layout_out_of_order_or_overlapping() {
        let l = layout();
        let (decoded, bytes) = decode_runs(&table(), &l).unwrap();
        assert_eq!(bytes, 2 * PAGE_SIZE);
        assert_eq!(
            decoded[1],
            PageRun {
                gpa: 8 * PAGE_SIZE,
                pages: 4,
                zero: true
            }
        );
        let run = |gpa: u64, pages: u32| PageRun {
            gpa: gpa * PAGE_SIZE,
            pages,
            zero: false,
        };
        let e = decode_runs(&run_table(&[run(63, 2)]), &l)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the offered memory layout"), "{e}");
        assert!(decode_runs(&[0u8; 15], &l).is_err());
        for bad in [[run(4, 2), run(5, 1)], [run(8, 1), run(2, 1)]] {
            let e = decode_runs(&run_table(&bad), &l).unwrap_err().to_string();
            assert!(e.contains("runs must ascend"), "{e}");
        }
        // Touching runs are fine.
        decode_runs(&run_table(&[run(4, 2), run(6, 1)]), &l).unwrap();
    }

    #[test]
    fn acks_round_trip_with_their_tag_and_refuse_forgeries() {
        let a = AckFrame::new(&key(), 42, AckStatus::Mismatch);
        assert_eq!(a.as_bytes().len(), 32);
        assert_eq!(
            AckFrame::decode(&key(), a.as_bytes()).unwrap(),
            (42, AckStatus::Mismatch)
        );
        // Turning a refusal into "landed" without the key is refused.
        let mut b = a.as_bytes().to_vec();
        b[4] = AckStatus::Landed as u8;
        let e = AckFrame::decode(&key(), &b).unwrap_err().to_string();
        assert!(e.contains("ack tag") && e.contains("chunk 42"), "{e}");
        assert!(AckFrame::decode(&MacKey::from_bytes([1; 32]), a.as_bytes()).is_err());
        let busy = AckFrame::new(&key(), 3, AckStatus::Busy);
        assert_eq!(
            AckFrame::decode(&key(), busy.as_bytes()).unwrap(),
            (3, AckStatus::Busy)
        );
        let mut b = a.as_bytes().to_vec();
        b[4] = 9;
        assert!(AckFrame::decode(&key(), &b)
            .unwrap_err()
            .to_string()
            .contains("unknown status"));
        b[0] = b'Z';
        assert!(AckFrame::decode(&key(), &b)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
