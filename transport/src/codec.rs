//! The compression option's codec: lz4/zstd encoders and decoders, the one
//! encoder of a compressed chunk frame ([`encode_frame`]) and the landing
//! of a compressed segment straight into claimed guest memory
//! ([`land_segment`]). The source's worker pipeline is `compress`; the
//! receiving side is the TCP channel's.

use ferry_ffi::vio;
use vm_memory::GuestAddress;
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use crate::error::{Result, TransportError};
use crate::guest::{claim_error, GuestMem, Tally};
use crate::layout::{PageRun, PAGE_SIZE};
use crate::wire::{
    encode_head, Codec, CompressedHeader, CompressionSpec, RunDesc, FLAG_COMPRESSED, HEADER_LEN,
    MAX_SEGMENT, SEGMENT_STORED,
};
use crate::Chunk;
use ferry_proto::MacKey;
use ferry_proto::WireError;

/// A chunk is sent compressed only if that saves at least 1/`MIN_SAVING_DIVISOR`
/// of its bytes; below that, decompression on the destination costs more
/// than the link time saved.
pub const MIN_SAVING_DIVISOR: usize = 8;
/// Pieces and piece size of the sample compressed after an incompressible chunk.
const PROBE_PIECES: usize = 4;
const PROBE_BYTES: usize = 16 << 10;
/// A compressor for one thread.
pub struct Encoder {
    spec: CompressionSpec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("spec", &self.spec).finish()
    }
}

impl Encoder {
    /// A compressor for `spec`.
    pub fn new(spec: CompressionSpec) -> Result<Self> {
        spec.validate()?;
        let zstd =
            match spec.codec {
                Codec::Lz4 => None,
                Codec::Zstd => Some(zstd::bulk::Compressor::new(spec.level).map_err(|e| {
                    TransportError::Io {
                        context: format!("creating a zstd level {} compressor", spec.level),
                        source: e,
                    }
                })?),
            };
        Ok(Encoder { spec, zstd })
    }

    /// Largest output for `n` input bytes.
    pub fn bound(&self, n: usize) -> usize {
        match self.spec.codec {
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(n),
            Codec::Zstd => zstd::zstd_safe::compress_bound(n),
        }
    }

    /// Compresses `src` into `dst` (at least [`Encoder::bound`] bytes).
    pub fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> std::result::Result<usize, String> {
        match &mut self.zstd {
            None => lz4_flex::block::compress_into(src, dst).map_err(|e| e.to_string()),
            Some(z) => z.compress_to_buffer(src, dst).map_err(|e| e.to_string()),
        }
    }
}

/// A decompressor for one channel.
#[derive(Default)]
pub struct Decoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    /// Decompresses `src` into exactly `dst`: output that would not fit, or
    /// that falls short of filling it, is an error.
    pub fn decompress_exact(
        &mut self,
        codec: Codec,
        src: &[u8],
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        let n = match codec {
            Codec::Lz4 => lz4_flex::block::decompress_into(src, dst).map_err(|e| e.to_string())?,
            Codec::Zstd => {
                let z = match &mut self.zstd {
                    Some(z) => z,
                    None => self.zstd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| format!("creating a zstd decompressor: {e}"))?,
                    ),
                };
                z.decompress_to_buffer(src, dst)
                    .map_err(|e| e.to_string())?
            }
        };
        if n != dst.len() {
            return Err(format!(
                "it decompresses to {n} bytes but its run holds {}",
                dst.len()
            ));
        }
        Ok(())
    }
}

fn outside(r: &PageRun) -> TransportError {
    TransportError::Wire(WireError::OutsideLayout {
        gpa: r.gpa,
        pages: r.pages.into(),
    })
}

/// Builds the complete frame of `chunk` compressed (header with its tags
/// under `key`, run table, [`CompressedHeader`], segment table, segments) in
/// `buf`, from `data`: the bytes of the chunk's non-zero runs in run order,
/// the private copy of guest memory the chunk's payload tag was computed
/// from. Returns its length, or `None` when the chunk does not shrink by
/// at least 1/[`MIN_SAVING_DIVISOR`] and should go raw. Runs that do not
/// shrink are stored as they are inside an otherwise compressed chunk.
pub fn encode_frame(
    enc: &mut Encoder,
    key: &MacKey,
    chunk: &Chunk,
    data: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Option<usize>> {
    // Runs longer than a segment may be are split (the frame's run table
    // lists the pieces; the pages and so the payload tag are the same).
    let frame_runs = split_runs(&chunk.runs);
    let runs: Vec<&PageRun> = frame_runs.iter().filter(|r| !r.zero).collect();
    let raw: usize = runs.iter().map(|r| r.bytes() as usize).sum();
    if data.len() != raw {
        return Err(TransportError::Local(WireError::Invalid {
            field: "chunk data",
            detail: format!(
                "{} bytes for non-zero runs of {raw} bytes (chunk {})",
                data.len(),
                chunk.seq
            ),
        }));
    }
    let sub = HEADER_LEN + frame_runs.len() * std::mem::size_of::<RunDesc>();
    let segs = sub + 16;
    let body = segs + 4 * runs.len();
    let bound = body
        + runs
            .iter()
            .map(|r| enc.bound(r.bytes() as usize))
            .sum::<usize>();
    if buf.len() < bound {
        buf.resize(bound, 0);
    }
    let mut pos = body;
    let mut at = 0usize;
    for (i, r) in runs.iter().enumerate() {
        let b = &data[at..at + r.bytes() as usize];
        at += b.len();
        let out = &mut buf[pos..];
        let (len, stored) = match enc.compress(b, out) {
            Ok(n) if n < b.len() => (n, false),
            Ok(_) => {
                out[..b.len()].copy_from_slice(b);
                (b.len(), true)
            }
            Err(e) => {
                return Err(TransportError::Local(WireError::Invalid {
                    field: "compression",
                    detail: format!("{} failed on the run at {:#x}: {e}", enc.spec, r.gpa),
                }))
            }
        };
        let word = u32::try_from(len).expect("a run is below 2 GiB")
            | if stored { SEGMENT_STORED } else { 0 };
        buf[segs + 4 * i..segs + 4 * i + 4].copy_from_slice(&word.to_le_bytes());
        pos += len;
        if (pos - body) * MIN_SAVING_DIVISOR > raw * (MIN_SAVING_DIVISOR - 1) {
            return Ok(None);
        }
    }
    let payload = pos - sub;
    if payload * MIN_SAVING_DIVISOR > raw * (MIN_SAVING_DIVISOR - 1) {
        return Ok(None);
    }
    let sh = CompressedHeader {
        codec: enc.spec.codec.id(),
        reserved: 0,
        segment_count: U16::new(u16::try_from(runs.len()).expect("at most MAX_RUNS runs")),
        uncompressed_len: U32::new(u32::try_from(raw).expect("chunk below 4 GiB")),
        compressed_len: U32::new(u32::try_from(payload - 16).expect("chunk below 4 GiB")),
        reserved2: U32::new(0),
    };
    buf[sub..segs].copy_from_slice(sh.as_bytes());
    let head = encode_head(
        key,
        chunk.seq,
        chunk.round,
        &frame_runs,
        u32::try_from(payload).expect("chunk below 4 GiB"),
        FLAG_COMPRESSED,
        chunk.tag,
    );
    buf[..sub].copy_from_slice(&head);
    Ok(Some(pos))
}

/// `runs` with every non-zero run longer than [`MAX_SEGMENT`] split into
/// pieces of at most that (adjacent runs, in order).
pub fn split_runs(runs: &[PageRun]) -> Vec<PageRun> {
    let max = (MAX_SEGMENT as u64 / PAGE_SIZE) as u32;
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        if r.zero {
            out.push(*r);
            continue;
        }
        let mut at = 0u32;
        while at < r.pages {
            let pages = (r.pages - at).min(max);
            out.push(PageRun {
                gpa: r.gpa + u64::from(at) * PAGE_SIZE,
                pages,
                zero: false,
            });
            at += pages;
        }
    }
    out
}

/// Compresses up to [`PROBE_PIECES`] pieces of [`PROBE_BYTES`] spread over
/// `data` (a chunk's page bytes); true if they do not shrink enough to be
/// worth compressing.
pub fn probe_incompressible(enc: &mut Encoder, data: &[u8], scratch: &mut Vec<u8>) -> bool {
    let total = data.len();
    if total == 0 {
        return false;
    }
    let starts = (0..PROBE_PIECES).map(|k| total * k / PROBE_PIECES);
    let (inp, out) = compress_pieces(enc, data, starts, PROBE_BYTES, scratch);
    out * MIN_SAVING_DIVISOR > inp * (MIN_SAVING_DIVISOR - 1)
}

/// Compresses the pieces of `data` of `len` bytes at each of `starts`
/// (clipped to its end) into `scratch`: the bytes read and what they
/// compressed to (a piece that does not compress counts as itself). The
/// sampling under [`probe_incompressible`] and the relay's yield sample.
pub fn compress_pieces(
    enc: &mut Encoder,
    data: &[u8],
    starts: impl IntoIterator<Item = usize>,
    len: usize,
    scratch: &mut Vec<u8>,
) -> (usize, usize) {
    let need = enc.bound(len);
    if scratch.len() < need {
        scratch.resize(need, 0);
    }
    let (mut inp, mut out) = (0usize, 0usize);
    for at in starts {
        let b = &data[at..data.len().min(at + len)];
        let n = enc.compress(b, scratch).unwrap_or(b.len());
        inp += b.len();
        out += n.min(b.len());
    }
    (inp, out)
}

/// Lands one segment (`src`: compressed, or `stored` as it is) in its
/// run's claimed guest memory, decompressing straight into it, and hashes
/// the run's pages into `tally` right after they land (whatever the
/// decoder wrote, also when it then fails). Whether they are what the
/// source sent is the payload tag's business (the caller's).
///
/// # Errors
/// A segment that does not decompress to exactly its run's bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn land_segment<M: GuestMem>(
    dec: &mut Decoder,
    claim: &mut vio::Claim,
    mem: &M,
    seq: u64,
    run: &PageRun,
    codec: Codec,
    src: &[u8],
    stored: bool,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let slice = mem
        .get_slice(GuestAddress(run.gpa), run.bytes() as usize)
        .map_err(|_| outside(run))?;
    let landed = claim
        .with_bytes_mut(&slice, |dst| {
            let out = if stored {
                dst.copy_from_slice(src);
                Ok(())
            } else {
                dec.decompress_exact(codec, src, dst)
            };
            // Whatever the decoder wrote is recorded, page by page, while
            // it is in cache.
            for (i, page) in dst.chunks_exact(PAGE_SIZE as usize).enumerate() {
                tally.page(run.gpa + i as u64 * PAGE_SIZE, page);
            }
            out
        })
        .map_err(claim_error)?;
    landed.map_err(|e| TransportError::Wire(WireError::Invalid {
        field: "compressed payload",
        detail: format!(
            "chunk {seq}: the {codec} segment of the run at {:#x} ({} pages) does not decompress: {e}",
            run.gpa, run.pages
        ),
    }))
}

/// Lands a whole compressed payload: checks it against the runs (see
/// [`CompressedHeader::decode`]) and lands every segment
/// ([`land_segment`]). The receiver streams segments instead; this is the
/// same on a payload already in memory.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn land_compressed<M: GuestMem>(
    dec: &mut Decoder,
    claim: &mut vio::Claim,
    mem: &M,
    seq: u64,
    runs: &[PageRun],
    payload: &[u8],
    negotiated: Codec,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let data: Vec<&PageRun> = runs.iter().filter(|r| !r.zero).collect();
    let lens: Vec<u64> = data.iter().map(|r| r.bytes()).collect();
    let p = CompressedHeader::decode(payload, &lens, Some(negotiated))?;
    for (r, seg) in data.iter().zip(&p.segments) {
        let src = &payload[seg.offset..seg.offset + seg.len];
        land_segment(dec, claim, mem, seq, r, p.codec, src, seg.stored, tally)?;
    }
    Ok(())
}
