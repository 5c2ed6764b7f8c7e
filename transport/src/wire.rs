//! Data-channel frames: fixed little-endian headers defined with `zerocopy`.
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
//! |    version    |     kind      |            flags              |  4
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
//! |          crc32 of run table + payload (crc32fast)             | 28
//! +---------------------------------------------------------------+
//! |  run_count x RunDesc (16 bytes each)                          | 32
//! +---------------------------------------------------------------+
//! |  payload: the pages of every non-zero run, in run order       |
//! +---------------------------------------------------------------+
//!
//! RunDesc: gpa (u64) | pages (u32) | flags (u32, bit 0 = zero run)
//!
//! Ack frame: magic "FRYA" | status (u8) | 3 reserved | seq (u64)
//! ```
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
//! |    data_crc32 (u32): crc32fast of the uncompressed pages      | 12
//! +---------------------------------------------------------------+
//! |  segment_count x u32: segment length, bit 31 = stored raw     | 16
//! +---------------------------------------------------------------+
//! |  segments, in run order: one codec block per non-zero run     |
//! +---------------------------------------------------------------+
//! ```
//!
//! The header's `crc32` still covers run table + the whole payload as sent,
//! so a damaged frame is refused (and resent) before any decompression; the
//! `data_crc32` is checked over the pages as they landed.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Result, TransportError};
use crate::layout::{MemoryLayout, PageRun};

/// Magic of a chunk frame.
pub const CHUNK_MAGIC: [u8; 4] = *b"FRYC";
/// Magic of an ack frame.
pub const ACK_MAGIC: [u8; 4] = *b"FRYA";
/// Data frame format version.
pub const FRAME_VERSION: u8 = 1;
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
            .ok_or_else(|| TransportError::Invalid {
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

/// Kind of a chunk frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkKind {
    /// Page data.
    Pages = 1,
    /// The source is done with this channel; no payload.
    End = 2,
}

/// Fixed header of a chunk frame (32 bytes).
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
    /// CRC32 (crc32fast) of run table and payload.
    pub crc32: U32,
}
const _: () = assert!(std::mem::size_of::<ChunkHeader>() == 32);

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
    /// CRC32 (crc32fast) of the uncompressed pages, in run order.
    pub data_crc32: U32,
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
    /// CRC32 of the uncompressed pages.
    pub data_crc32: u32,
    /// One per non-zero run, in run order.
    pub segments: Vec<Segment>,
}

impl CompressedHeader {
    /// Parses and checks a compressed payload: a known codec (and the one the
    /// migration negotiated, when given), an uncompressed length equal to
    /// `run_bytes` (so a frame cannot claim more output than its runs hold:
    /// no decompression bombs), a compressed length equal to what follows
    /// the sub-header, one segment per non-zero run, stored segments exactly
    /// as long as their run, and segment lengths adding up.
    ///
    /// `data_runs` are the byte lengths of the frame's non-zero runs.
    pub fn decode(
        payload: &[u8],
        data_runs: &[u64],
        negotiated: Option<Codec>,
    ) -> Result<CompressedPayload> {
        let (h, _) =
            CompressedHeader::read_from_prefix(payload).map_err(|_| TransportError::Malformed {
                what: "compressed payload",
                detail: format!("{} bytes, need at least 16", payload.len()),
            })?;
        let codec = Codec::from_id(h.codec)?;
        if let Some(want) = negotiated {
            if want != codec {
                return Err(TransportError::Invalid {
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
            return Err(TransportError::Invalid {
                field: "uncompressed length",
                detail: format!(
                    "compressed payload claims {claimed} bytes but its non-zero runs hold {run_bytes}"
                ),
            });
        }
        let after = payload.len() - 16;
        if h.compressed_len.get() as usize != after {
            return Err(TransportError::Invalid {
                field: "compressed length",
                detail: format!(
                    "sub-header says {} bytes but {after} follow it",
                    h.compressed_len.get()
                ),
            });
        }
        let n = usize::from(h.segment_count.get());
        if n != data_runs.len() {
            return Err(TransportError::Invalid {
                field: "segment count",
                detail: format!("{n} segments for {} non-zero runs", data_runs.len()),
            });
        }
        let table_end = 16 + 4 * n;
        let table = payload
            .get(16..table_end)
            .ok_or_else(|| TransportError::Malformed {
                what: "compressed payload",
                detail: format!("{n} segments need a {}-byte table", 4 * n),
            })?;
        let lens = <[U32]>::ref_from_bytes(table).map_err(|_| TransportError::Malformed {
            what: "segment table",
            detail: "not a whole number of u32".into(),
        })?;
        let mut segments = Vec::with_capacity(n);
        let mut offset = table_end;
        for (i, (raw, &run)) in lens.iter().zip(data_runs).enumerate() {
            let stored = raw.get() & SEGMENT_STORED != 0;
            let len = (raw.get() & !SEGMENT_STORED) as usize;
            if len == 0 || (stored && len as u64 != run) {
                return Err(TransportError::Invalid {
                    field: "segment length",
                    detail: format!(
                        "segment {i} is {len} bytes{} for a run of {run} bytes",
                        if stored { " stored" } else { "" }
                    ),
                });
            }
            let end = offset
                .checked_add(len)
                .filter(|&e| e <= payload.len())
                .ok_or_else(|| TransportError::Invalid {
                    field: "segment length",
                    detail: format!(
                        "segment {i} ({len} bytes at offset {offset}) runs past the {}-byte payload",
                        payload.len()
                    ),
                })?;
            segments.push(Segment {
                offset,
                len,
                stored,
            });
            offset = end;
        }
        if offset != payload.len() {
            return Err(TransportError::Invalid {
                field: "segment length",
                detail: format!(
                    "segments end at {offset} but the payload is {} bytes",
                    payload.len()
                ),
            });
        }
        Ok(CompressedPayload {
            codec,
            data_crc32: h.data_crc32.get(),
            segments,
        })
    }
}

/// Ack status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    /// The chunk landed and its CRC matched.
    Landed = 0,
    /// The chunk's CRC did not match: the source must send its pages again.
    CrcMismatch = 1,
}

/// Ack frame (16 bytes), destination to source.
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
}
const _: () = assert!(std::mem::size_of::<AckFrame>() == 16);

impl ChunkHeader {
    /// Builds the header of a page chunk.
    pub fn pages(
        seq: u64,
        round: u32,
        run_count: u32,
        payload_len: u32,
        flags: u16,
        crc32: u32,
    ) -> Self {
        ChunkHeader {
            magic: CHUNK_MAGIC,
            version: FRAME_VERSION,
            kind: ChunkKind::Pages as u8,
            flags: U16::new(flags),
            seq: U64::new(seq),
            round: U32::new(round),
            run_count: U32::new(run_count),
            payload_len: U32::new(payload_len),
            crc32: U32::new(crc32),
        }
    }

    /// Builds an end-of-channel header.
    pub fn end(seq: u64) -> Self {
        let mut h = Self::pages(seq, 0, 0, 0, 0, 0);
        h.kind = ChunkKind::End as u8;
        h
    }

    /// Parses and checks a header: magic, version, kind, and the length
    /// fields against their limits. Returns the header and its kind.
    pub fn decode(bytes: &[u8]) -> Result<(Self, ChunkKind)> {
        let (h, _) =
            ChunkHeader::read_from_prefix(bytes).map_err(|_| TransportError::Malformed {
                what: "chunk header",
                detail: format!(
                    "{} bytes, need {}",
                    bytes.len(),
                    std::mem::size_of::<ChunkHeader>()
                ),
            })?;
        if h.magic != CHUNK_MAGIC {
            return Err(TransportError::BadMagic {
                what: "chunk header",
                expected: CHUNK_MAGIC,
                found: h.magic,
            });
        }
        if h.version != FRAME_VERSION {
            return Err(TransportError::Invalid {
                field: "chunk frame version",
                detail: format!("{} (this host reads {FRAME_VERSION})", h.version),
            });
        }
        let kind = match h.kind {
            1 => ChunkKind::Pages,
            2 => ChunkKind::End,
            k => {
                return Err(TransportError::Invalid {
                    field: "chunk kind",
                    detail: format!("unknown kind {k}"),
                })
            }
        };
        if h.flags.get() & !FLAG_COMPRESSED != 0 {
            return Err(TransportError::Invalid {
                field: "chunk flags",
                detail: format!("unknown flags {:#x}", h.flags.get()),
            });
        }
        if h.run_count.get() > MAX_RUNS {
            return Err(TransportError::TooLarge {
                field: "chunk run count",
                len: h.run_count.get().into(),
                limit: MAX_RUNS.into(),
            });
        }
        if h.payload_len.get() > MAX_CHUNK_PAYLOAD {
            return Err(TransportError::TooLarge {
                field: "chunk payload length",
                len: h.payload_len.get().into(),
                limit: MAX_CHUNK_PAYLOAD.into(),
            });
        }
        if kind == ChunkKind::End && (h.run_count.get() != 0 || h.payload_len.get() != 0) {
            return Err(TransportError::Invalid {
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

/// Decodes and checks a run table: every run inside the layout, known flags,
/// and the non-zero runs adding up to exactly `payload_len` bytes (for an
/// uncompressed chunk) or to the uncompressed size the codec must produce.
/// Returns the runs and the total bytes of their non-zero pages.
pub fn decode_runs(table: &[u8], layout: &MemoryLayout) -> Result<(Vec<PageRun>, u64)> {
    let descs = <[RunDesc]>::ref_from_bytes(table).map_err(|_| TransportError::Malformed {
        what: "run table",
        detail: format!(
            "{} bytes is not a whole number of 16-byte runs",
            table.len()
        ),
    })?;
    let mut runs = Vec::with_capacity(descs.len());
    let mut data_bytes = 0u64;
    for d in descs {
        let flags = d.flags.get();
        if flags & !RUN_ZERO != 0 {
            return Err(TransportError::Invalid {
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
        data_bytes += run.payload_bytes();
        runs.push(run);
    }
    Ok((runs, data_bytes))
}

impl AckFrame {
    /// Builds an ack.
    pub fn new(seq: u64, status: AckStatus) -> Self {
        AckFrame {
            magic: ACK_MAGIC,
            status: status as u8,
            reserved: [0; 3],
            seq: U64::new(seq),
        }
    }

    /// Parses and checks an ack.
    pub fn decode(bytes: &[u8]) -> Result<(u64, AckStatus)> {
        let (a, _) = AckFrame::read_from_prefix(bytes).map_err(|_| TransportError::Malformed {
            what: "ack frame",
            detail: format!("{} bytes, need 16", bytes.len()),
        })?;
        if a.magic != ACK_MAGIC {
            return Err(TransportError::BadMagic {
                what: "ack frame",
                expected: ACK_MAGIC,
                found: a.magic,
            });
        }
        let status = match a.status {
            0 => AckStatus::Landed,
            1 => AckStatus::CrcMismatch,
            s => {
                return Err(TransportError::Invalid {
                    field: "ack status",
                    detail: format!("unknown status {s}"),
                })
            }
        };
        Ok((a.seq.get(), status))
    }
}

/// Runs the frame and run-table decoders on arbitrary bytes; used by the fuzz
/// target. Never panics.
pub fn fuzz_decode(data: &[u8], layout: &MemoryLayout) {
    if let Ok((h, _)) = ChunkHeader::decode(data) {
        let rest = &data[32..];
        let table_len = (h.run_count.get() as usize) * 16;
        if rest.len() >= table_len {
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
    let _ = AckFrame::decode(data);
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

    #[test]
    fn header_bytes_are_pinned_little_endian() {
        let h = ChunkHeader::pages(0x0102030405060708, 3, 2, 8192, 0, 0xdeadbeef);
        let b = h.as_bytes();
        assert_eq!(&b[0..4], b"FRYC");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 1);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[3, 0, 0, 0]);
        assert_eq!(&b[24..28], &8192u32.to_le_bytes());
        assert_eq!(&b[28..32], &0xdeadbeefu32.to_le_bytes());
        let (back, kind) = ChunkHeader::decode(b).unwrap();
        assert_eq!(kind, ChunkKind::Pages);
        assert_eq!(back.seq.get(), 0x0102030405060708);
    }

    #[test]
    fn header_checks_name_the_bad_field() {
        let mut h = ChunkHeader::pages(1, 0, 1, 4096, 0, 0);
        h.magic = *b"XXXX";
        let e = ChunkHeader::decode(h.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut h = ChunkHeader::pages(1, 0, 1, 4096, 0, 0);
        h.version = 9;
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("version"));
        let h = ChunkHeader::pages(1, 0, 1, MAX_CHUNK_PAYLOAD + 1, 0, 0);
        let e = ChunkHeader::decode(h.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("payload length") && e.contains("limit"), "{e}");
        let h = ChunkHeader::pages(1, 0, MAX_RUNS + 1, 0, 0, 0);
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("run count"));
        let mut h = ChunkHeader::pages(1, 0, 0, 0, 0, 0);
        h.kind = 77;
        assert!(ChunkHeader::decode(h.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("kind"));
        assert!(ChunkHeader::decode(&[0u8; 10])
            .unwrap_err()
            .to_string()
            .contains("malformed chunk header"));
    }

    #[test]
    fn run_table_rejects_runs_outside_layout_and_counts_payload() {
        let l = layout();
        let runs = [
            RunDesc::from_run(&PageRun {
                gpa: 0,
                pages: 2,
                zero: false,
            }),
            RunDesc::from_run(&PageRun {
                gpa: 8 * PAGE_SIZE,
                pages: 4,
                zero: true,
            }),
        ];
        let (decoded, bytes) = decode_runs(runs.as_bytes(), &l).unwrap();
        assert_eq!(bytes, 2 * PAGE_SIZE);
        assert_eq!(
            decoded[1],
            PageRun {
                gpa: 8 * PAGE_SIZE,
                pages: 4,
                zero: true
            }
        );
        let bad = [RunDesc::from_run(&PageRun {
            gpa: 63 * PAGE_SIZE,
            pages: 2,
            zero: false,
        })];
        let e = decode_runs(bad.as_bytes(), &l).unwrap_err().to_string();
        assert!(e.contains("outside the offered memory layout"), "{e}");
        assert!(decode_runs(&[0u8; 15], &l).is_err());
    }

    #[test]
    fn ack_round_trips_and_rejects_garbage() {
        let a = AckFrame::new(42, AckStatus::CrcMismatch);
        assert_eq!(
            AckFrame::decode(a.as_bytes()).unwrap(),
            (42, AckStatus::CrcMismatch)
        );
        let mut b = a.as_bytes().to_vec();
        b[4] = 9;
        assert!(AckFrame::decode(&b).is_err());
        b[0] = b'Z';
        assert!(AckFrame::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
