//! The compression performance option: chunks compressed with lz4 or zstd by
//! one pool of worker threads per migration, sent over the TCP data
//! channels, decompressed straight into destination guest memory.
//!
//! # Source: one pool, a pipeline per channel
//! A migration starts one [`CompressPool`] (its worker threads, sized for
//! the host's cores) and every data channel's [`CompressSender`] feeds it.
//! `send` queues a chunk for the pool and returns at once while fewer than
//! a few chunks per worker are waiting; past that it writes one of its
//! channel's chunks out first, so compression of the next chunks overlaps
//! the socket write of this one. Which one:
//!
//! 1. any chunk a worker has finished for this channel, as a compressed
//!    frame (or raw, if it did not shrink by at least
//!    [`MIN_SAVING_DIVISOR`]⁻¹);
//! 2. otherwise, if the socket's send queue is about to run dry (fewer
//!    unacknowledged bytes than the link drains in [`IDLE_MARGIN`]; the drain
//!    rate is measured from bytes written and the queue depth), the oldest
//!    chunk of this channel no worker has started, raw and zero-copy, unless
//!    the next worker result is due sooner than the link time compressing
//!    that chunk would save (from the workers' measured speed and ratio): the
//!    link waits on a core only when waiting pays. While recent chunks did
//!    not shrink, the sender does not wait at all;
//! 3. otherwise it waits for either (a worker result, an acknowledgement, or
//!    a 1 ms tick) and decides again.
//!
//! Below that depth, `send` still writes the results workers have finished
//! while the socket's queue is about to run dry (never waiting for one), so
//! the link starts as soon as the first chunk is done rather than once the
//! pipeline is full.
//!
//! So a link slower than the pool carries almost only compressed chunks,
//! and a link faster than the pool (loopback) carries what the pool can
//! compress plus the rest raw. Workers run niced, so on a host with few
//! cores the threads that move bytes win the CPU.
//!
//! # Memory that does not compress
//! The pool remembers, per [`GRANULE`] of guest-physical addresses, whether
//! chunks there compressed ([`CopyHint`]). The first attempts in a granule,
//! and the next attempt after a chunk there did not shrink, compress a
//! sample of the chunk first (four 16 KiB pieces) and give up if that does
//! not shrink either;
//! after two failures in a row, chunks of that granule skip the pool
//! altogether, 1, 2, 4, … up to [`MAX_SKIP`] of them between attempts
//! (back-off). One chunk that compresses ends the back-off. A granule seen
//! for the first time starts where the one below it is when that one is
//! backing off, so a large region of random memory is learnt once. A
//! skipped chunk is not even copied: the engine's page pass asks
//! [`CopyHint::plan`] when it starts a chunk and, told [`CopyPlan::Skip`],
//! reads each page into one scratch page for its hash as on plain TCP, and
//! the chunk goes out as plain TCP sends it (the kernel copies from guest
//! memory; a guest write in between makes the destination's tag differ and
//! the chunk is sent again). An attempt that samples first does so in the
//! page pass ([`CopyPlan::Sample`]): it copies the chunk's first
//! [`SAMPLE_BYTES`], compresses them ([`CopyHint::sampled`]) and, if they
//! do not shrink, drops the copy and reads the rest of the chunk as a
//! skipped one, so the verdict is known before the next chunk is read and
//! no chunk of random memory is copied or waits for a worker. Random memory
//! so costs what plain TCP costs, plus a 64 KiB sample compression every
//! [`MAX_SKIP`] chunks.
//!
//! Chunks of one round may leave in any order (they cover distinct pages);
//! `flush` drains the pipeline before the engine starts the next round, so
//! rounds never interleave on the wire. A chunk without its private copy
//! ([`Chunk::data`]: skipped by the back-off, or sent again after another
//! channel failed) goes raw.
//!
//! # Destination
//! `land_compressed` checks the sub-header against the run table before
//! touching memory (see [`CompressedHeader::decode`]), then decompresses
//! each segment straight into its run's guest pages, inside the chunk's
//! landing claim ([`vio::Claim::with_bytes_mut`]): the only buffer is the
//! compressed chunk itself. Each run's pages are hashed into the
//! migration's ledger right after they land. The payload tag of the landed
//! pages is compared with the frame's.
//!
//! The workers compress from the chunk's private copy of the pages (the
//! copy the page pass made, [`vio::copy_out`]: the bytes its tag was
//! computed from), never from a reference to guest memory.
//!
//! [`vio::Claim::with_bytes_mut`]: ferry_ffi::vio::Claim::with_bytes_mut
//! [`vio::copy_out`]: ferry_ffi::vio::copy_out
//! [`CompressedHeader::decode`]: crate::wire::CompressedHeader::decode

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::codec::{
    encode_frame, probe_incompressible, split_runs, Decoder, Encoder, MIN_SAVING_DIVISOR,
};
use crate::error::{Result, TransportError};
use crate::guest::GuestMem;
use crate::ratelimit::RateLimiter;
use crate::tcp::TcpSender;
use crate::wire::{HEADER_LEN, MAX_CHUNK_PAYLOAD};
use crate::{Caps, ChannelStats, Chunk, Flushed, Transport};
use ferry_proto::MacKey;

/// The sender considers sending a chunk raw rather than wait for a worker
/// when the link would otherwise drain its queue within this time (the wait
/// loop wakes at least once a millisecond; scheduling on a busy host adds
/// more).
pub const IDLE_MARGIN: Duration = Duration::from_millis(4);
/// Lower bound of the "about to go idle" send-queue depth (about 0.5 ms at 1 Gbit/s).
const MIN_IDLE_QUEUE: f64 = 64.0 * 1024.0;
/// Upper bound of it.
const MAX_IDLE_QUEUE: f64 = 8.0 * 1024.0 * 1024.0;
/// Shortest window over which the link's drain rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(20);
/// Nice value of compression worker threads (the page path's pool and
/// `ferry relay`'s): lz4 takes only what moving bytes leaves.
pub const WORKER_NICE: i32 = 10;
/// Guest-physical bytes whose chunks share one compressibility record
/// (256 MiB).
pub const GRANULE: u64 = 256 << 20;
/// Most chunks of a granule sent raw without an attempt between two
/// attempts that failed.
pub const MAX_SKIP: u32 = 16;
pub use ferry_proto::wire::{CompressionSpec, ZSTD_MAX_LEVEL};

/// Settings of the compression option on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressConfig {
    /// Codec and level.
    pub spec: CompressionSpec,
    /// Worker threads of the migration's pool.
    pub workers: usize,
    /// Send a chunk raw when the link is about to go idle before a worker
    /// got to it (see the module docs). Off, every chunk waits for a worker:
    /// only for tests and measurements of the codecs alone.
    pub adaptive: bool,
}

impl CompressConfig {
    /// One worker per core: workers are niced, and the sender sends raw
    /// rather than wait for them, so they only use what the network path
    /// leaves.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// Bytes of a chunk's first non-zero pages the page pass copies and
/// samples ([`CopyHint::sampled`]) before it decides whether to copy the
/// rest (64 KiB).
pub const SAMPLE_BYTES: usize = 64 << 10;

/// What the page pass does with a chunk's pages ([`CopyHint::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPlan {
    /// Copy every page into the chunk's buffer: the chunk goes to the
    /// workers to be compressed.
    Copy,
    /// Read each page into a scratch page only: the chunk goes raw, sent
    /// from guest memory as plain TCP sends it.
    Skip,
    /// Copy the chunk's first [`SAMPLE_BYTES`] of non-zero pages, then ask
    /// [`CopyHint::sampled`]: copy the rest, or drop the copy and read the
    /// rest as [`CopyPlan::Skip`] does. A chunk that ends before that much
    /// keeps its copy (the workers sample it).
    Sample,
}

/// Whether the page pass should keep a private copy of a chunk's pages
/// ([`Chunk::data`]) for the transport to encode. Asked once per chunk, when
/// its first page is read, and, for [`CopyPlan::Sample`], once more after
/// its first [`SAMPLE_BYTES`].
pub trait CopyHint: Send + Sync + std::fmt::Debug {
    /// For the chunk whose first page is at `gpa`.
    fn plan(&self, gpa: u64) -> CopyPlan;

    /// For a chunk planned [`CopyPlan::Sample`] whose first page is at
    /// `gpa`: its first [`SAMPLE_BYTES`] of page bytes, the page pass's
    /// copy. True to copy the rest (the sample compressed), false to send
    /// the chunk raw from guest memory.
    fn sampled(&self, gpa: u64, sample: &[u8]) -> bool;
}

/// The back-off of a sequence of chunks that did not shrink (a granule of
/// guest memory here, a stream in `ferry relay`): attempts in a row that
/// failed, and chunks still to send raw without an attempt. After one
/// failure the next attempt samples first ([`Backoff::sample_first`],
/// [`probe_incompressible`]); after two, 1, 2, 4, ... up to [`MAX_SKIP`]
/// chunks go raw untried between attempts; a chunk that shrinks ends it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    fails: u32,
    skip: u32,
}

impl Backoff {
    /// Whether to try the next chunk; `false`: send it raw untried (it is
    /// counted off the skip).
    pub fn try_next(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            false
        } else {
            true
        }
    }

    /// Whether the next attempt should compress a sample first (the last
    /// one failed).
    pub fn sample_first(&self) -> bool {
        self.fails > 0
    }

    /// Records an attempt: whether the chunk (or its sample) shrank.
    pub fn learned(&mut self, shrank: bool) {
        if shrank {
            *self = Backoff::default();
        } else {
            self.fails = self.fails.saturating_add(1);
            self.skip = skip_after(self.fails);
        }
    }
}

/// Which granules of guest memory recently did not compress (see the
/// module docs): the pool's [`CopyHint`]. Its encoder compresses the page
/// pass's samples.
#[derive(Debug)]
pub struct Compressibility {
    granules: Mutex<HashMap<u64, Granule>>,
    /// The samples' encoder (none if it could not be made: samples then
    /// count as compressible and the workers decide) and its output buffer.
    sampler: Mutex<(Option<Encoder>, Vec<u8>)>,
}

/// What the pool knows of one granule.
#[derive(Debug, Default, Clone, Copy)]
struct Granule {
    backoff: Backoff,
    /// A worker has tried a chunk of it.
    tried: bool,
}

impl Compressibility {
    /// No granule known yet; samples compressed with `spec`.
    pub fn new(spec: CompressionSpec) -> Self {
        let enc = Encoder::new(spec)
            .map_err(|e| tracing::debug!("no sample compressor, the workers sample: {e}"))
            .ok();
        Compressibility {
            granules: Mutex::default(),
            sampler: Mutex::new((enc, Vec::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Granule>> {
        self.granules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of the granule at `gpa`. A granule seen for the first
    /// time starts where the one below it is, if that one is backing off
    /// (memory next to memory that does not compress rarely does: a large
    /// region of it is learnt once, not once per granule).
    fn granule(g: &mut HashMap<u64, Granule>, gpa: u64) -> &mut Granule {
        let k = gpa / GRANULE;
        let below = k
            .checked_sub(1)
            .and_then(|p| g.get(&p))
            .filter(|b| b.backoff.fails >= 2)
            .map(|b| Granule {
                backoff: Backoff {
                    fails: b.backoff.fails,
                    skip: skip_after(b.backoff.fails),
                },
                tried: true,
            });
        g.entry(k).or_insert(below.unwrap_or_default())
    }

    /// Whether an attempt on the chunk at `gpa` should compress a sample
    /// first: its granule's last attempt failed, or none was made yet (the
    /// first chunks of memory that does not compress then cost a sample
    /// each before the link gets them, not a whole chunk's compression;
    /// memory that compresses pays one sample per granule).
    fn sample_first(&self, gpa: u64) -> bool {
        let g = *Self::granule(&mut self.lock(), gpa);
        !g.tried || g.backoff.sample_first()
    }

    /// Records an attempt on the chunk at `gpa`.
    fn learned(&self, gpa: u64, shrank: bool) {
        let mut g = self.lock();
        let g = Self::granule(&mut g, gpa);
        g.tried = true;
        g.backoff.learned(shrank);
    }
}

/// Chunks skipped after `fails` failed attempts in a row: none after one
/// (the next attempt samples first), then 1, 2, 4, ... up to [`MAX_SKIP`].
fn skip_after(fails: u32) -> u32 {
    match fails {
        0 | 1 => 0,
        n => 1u32.checked_shl(n - 2).unwrap_or(MAX_SKIP).min(MAX_SKIP),
    }
}

impl CopyHint for Compressibility {
    /// A granule backing off skips its chunks between attempts; an attempt
    /// that would sample first (the granule never tried, or its last
    /// attempt failed) samples in the page pass, so that memory that does
    /// not compress is neither copied nor queued for a worker, and its
    /// verdict is known before the next chunk is read.
    fn plan(&self, gpa: u64) -> CopyPlan {
        let mut g = self.lock();
        let g = Self::granule(&mut g, gpa);
        if !g.backoff.try_next() {
            CopyPlan::Skip
        } else if !g.tried || g.backoff.sample_first() {
            CopyPlan::Sample
        } else {
            CopyPlan::Copy
        }
    }

    fn sampled(&self, gpa: u64, sample: &[u8]) -> bool {
        let shrank = {
            let mut s = self.sampler.lock().unwrap_or_else(|e| e.into_inner());
            let (enc, scratch) = &mut *s;
            match enc {
                Some(e) => !probe_incompressible(e, sample, scratch),
                None => return true,
            }
        };
        self.learned(gpa, shrank);
        shrank
    }
}

/// Where a worker puts a channel's results.
#[derive(Debug, Default)]
struct Outbox {
    /// The channel's id in its pool.
    id: u64,
    done: Mutex<VecDeque<Done>>,
    ready: tokio::sync::Notify,
}

impl Outbox {
    fn pop(&self) -> Option<Done> {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

struct Job {
    chunk: Chunk,
    outbox: Arc<Outbox>,
}

/// A worker's result: the frame of a chunk that shrank, or the chunk
/// itself (with its copy, to be sent raw from it).
#[derive(Debug)]
enum Done {
    Frame { seq: u64, buf: Vec<u8>, len: usize },
    Raw { seq: u64, chunk: Chunk },
}

/// A job being compressed: its channel's outbox id, sequence number,
/// start, page bytes.
struct Busy {
    outbox: u64,
    seq: u64,
    start: Instant,
    bytes: u64,
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Job>,
    shutdown: bool,
    /// Frame buffers to reuse.
    spare: Vec<Vec<u8>>,
    busy: Vec<Busy>,
    /// Chunks workers took so far.
    attempts: u64,
    /// Moving averages of a worker's seconds per page byte, and of wire
    /// bytes per page byte (1 for chunks that went raw).
    secs_per_byte: f64,
    wire_per_byte: f64,
}

impl PoolState {
    /// When the next result for `outbox` is expected, from now (seconds;
    /// infinite if none is being compressed or nothing was measured yet).
    fn next_result_in(&self, outbox: u64, now: Instant) -> f64 {
        self.busy
            .iter()
            .filter(|b| b.outbox == outbox)
            .map(|b| {
                remaining(
                    self.secs_per_byte * b.bytes as f64,
                    now.duration_since(b.start).as_secs_f64(),
                )
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Whether recent chunks did not shrink.
    fn incompressible(&self) -> bool {
        self.secs_per_byte > 0.0
            && self.wire_per_byte * MIN_SAVING_DIVISOR as f64 > (MIN_SAVING_DIVISOR - 1) as f64
    }
}

/// How long a job expected to take `expected` seconds, started `elapsed`
/// ago, may still take: the rest of its time while on time; once late, as
/// long again as it has taken (a worker that is late lacks a core: on a
/// busy host a niced worker may wait long, and a result "due any moment"
/// would keep the link waiting on it); unknown (infinite) before anything
/// was measured, so the link never waits on a guess.
fn remaining(expected: f64, elapsed: f64) -> f64 {
    if expected <= 0.0 {
        f64::INFINITY
    } else if elapsed < expected {
        expected - elapsed
    } else {
        elapsed
    }
}

/// What the workers and the channels share.
struct Shared {
    st: Mutex<PoolState>,
    work: Condvar,
    hint: Arc<Compressibility>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One migration's compression workers, shared by all its data channels
/// (see the module docs). Dropping the last handle stops the workers once
/// they finish the chunk in hand.
pub struct CompressPool {
    shared: Arc<Shared>,
    spec: CompressionSpec,
    workers: usize,
    adaptive: bool,
    frame: MacKey,
    next_outbox: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for CompressPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressPool")
            .field("spec", &self.spec)
            .field("workers", &self.workers)
            .field("adaptive", &self.adaptive)
            .finish_non_exhaustive()
    }
}

impl Drop for CompressPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

impl CompressPool {
    /// Starts `cfg.workers` (at least one) worker threads that compress with
    /// `cfg.spec` and seal frames with `frame`, the session's frame key.
    pub fn start(cfg: CompressConfig, frame: MacKey) -> Result<Arc<Self>> {
        cfg.spec.validate()?;
        let workers = cfg.workers.max(1);
        let pool = Arc::new(CompressPool {
            shared: Arc::new(Shared {
                st: Mutex::default(),
                work: Condvar::new(),
                hint: Arc::new(Compressibility::new(cfg.spec)),
            }),
            spec: cfg.spec,
            workers,
            adaptive: cfg.adaptive,
            frame,
            next_outbox: Default::default(),
        });
        for i in 0..workers {
            let (sh, k) = (pool.shared.clone(), pool.frame.clone());
            std::thread::Builder::new()
                .name(format!("ferry-compress-{i}"))
                .spawn(move || worker(sh, cfg.spec, k))
                .map_err(|e| TransportError::Io {
                    context: "starting a compression worker".into(),
                    source: e,
                })?;
        }
        Ok(pool)
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Chunks the workers took so far (compressed, or found not to shrink),
    /// from every channel.
    pub fn attempts(&self) -> u64 {
        self.shared.lock().attempts
    }

    /// Which chunks the page pass should copy for compression (see the
    /// module docs).
    pub fn copy_hint(&self) -> Arc<dyn CopyHint> {
        self.shared.hint.clone()
    }

    fn outbox(&self) -> Arc<Outbox> {
        Arc::new(Outbox {
            id: self
                .next_outbox
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        })
    }
}

fn worker(shared: Arc<Shared>, spec: CompressionSpec, key: MacKey) {
    if let Err(e) = ferry_ffi::net::set_current_thread_nice(WORKER_NICE) {
        tracing::debug!("cannot nice the compression worker: {e}");
    }
    let mut enc = match Encoder::new(spec) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!("compression worker without a compressor, chunks go raw: {e}");
            None
        }
    };
    let mut scratch = Vec::new();
    loop {
        let (job, mut buf) = {
            let mut st = shared.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(j) = st.queue.pop_front() {
                    let buf = st.spare.pop().unwrap_or_default();
                    st.attempts += 1;
                    st.busy.push(Busy {
                        outbox: j.outbox.id,
                        seq: j.chunk.seq,
                        start: Instant::now(),
                        bytes: j.chunk.payload_bytes(),
                    });
                    break (j, buf);
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let outbox = job.outbox.clone();
        let seq = job.chunk.seq;
        let gpa = job.chunk.runs.first().map_or(0, |r| r.gpa);
        let (started, bytes) = (Instant::now(), job.chunk.payload_bytes());
        let out = match (enc.as_mut(), &job.chunk.data) {
            (Some(e), Some(data)) => {
                if shared.hint.sample_first(gpa) && probe_incompressible(e, data, &mut scratch) {
                    None
                } else {
                    match encode_frame(e, &key, &job.chunk, data, &mut buf) {
                        Ok(r) => r,
                        Err(err) => {
                            tracing::warn!(seq, "chunk goes raw: {err}");
                            None
                        }
                    }
                }
            }
            _ => None,
        };
        shared.hint.learned(gpa, out.is_some());
        let mut st = shared.lock();
        if let Some(i) = st
            .busy
            .iter()
            .position(|b| b.outbox == job.outbox.id && b.seq == seq)
        {
            st.busy.swap_remove(i);
        }
        let spb = started.elapsed().as_secs_f64() / bytes.max(1) as f64;
        let wpb = out.map_or(1.0, |len| len as f64 / bytes.max(1) as f64);
        (st.secs_per_byte, st.wire_per_byte) = if st.secs_per_byte == 0.0 {
            (spb, wpb)
        } else {
            (
                0.7 * st.secs_per_byte + 0.3 * spb,
                0.7 * st.wire_per_byte + 0.3 * wpb,
            )
        };
        let done = match out {
            Some(len) => Done::Frame { seq, buf, len },
            None => {
                st.spare.push(buf);
                Done::Raw {
                    seq,
                    chunk: job.chunk,
                }
            }
        };
        drop(st);
        outbox
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(done);
        outbox.ready.notify_one();
    }
}

/// Whether a data channel's link is about to go idle, so that compressing
/// its next chunk would cost CPU and save no link time: its socket's send
/// queue holds less than the link drains in [`IDLE_MARGIN`] (the drain rate
/// measured from the bytes written and the queue depth, [`LinkMeter`]),
/// and no `--bandwidth-limit` backlog makes the cap the link. One per data
/// channel; the page path's [`CompressSender`] and `ferry relay`'s channel
/// writers both ask it.
#[derive(Debug)]
pub struct LinkProbe {
    /// A duplicate of the channel's socket, for its send-queue depth
    /// (`SIOCOUTQ`); `None` if it could not be duplicated (the link then
    /// always counts as about to go idle).
    fd: Option<OwnedFd>,
    /// Bytes written to the socket.
    written: u64,
    meter: LinkMeter,
}

impl LinkProbe {
    /// A probe of the channel whose socket `fd` duplicates.
    pub fn new(fd: Option<OwnedFd>) -> Self {
        LinkProbe {
            fd,
            written: 0,
            meter: LinkMeter {
                since: Instant::now(),
                written: 0,
                queued: 0,
                rate: 0.0,
            },
        }
    }

    /// `bytes` more were written to the socket.
    pub fn wrote(&mut self, bytes: u64) {
        self.written += bytes;
    }

    /// The link's measured drain rate, bytes per second (0 before the first
    /// measurement).
    pub fn rate(&self) -> f64 {
        self.meter.rate
    }

    /// Whether the link is about to go idle: compressing the next chunk
    /// would not save link time. Under `limiter` (`--bandwidth-limit`) the
    /// cap is the link: busy while what was booked against it takes longer
    /// than [`IDLE_MARGIN`] to drain.
    pub fn about_to_idle(&mut self, limiter: Option<&RateLimiter>) -> bool {
        if limiter.is_some_and(|l| l.backlog(Instant::now()) > IDLE_MARGIN) {
            return false;
        }
        let Some(fd) = &self.fd else {
            return true;
        };
        match ferry_ffi::net::send_queue_bytes(fd.as_fd()) {
            Ok(q) => {
                let q = q as u64;
                q < self.meter.idle_queue(self.written, q)
            }
            Err(_) => true,
        }
    }
}

/// The link's drain rate: bytes the kernel got acknowledged per second,
/// from the bytes written and the send-queue depth.
#[derive(Debug)]
struct LinkMeter {
    since: Instant,
    /// Bytes written and queue depth at `since`.
    written: u64,
    queued: u64,
    rate: f64,
}

impl LinkMeter {
    /// Records the bytes written so far and the current queue depth; returns
    /// the depth below which the link is about to go idle.
    fn idle_queue(&mut self, written: u64, queued: u64) -> u64 {
        let dt = self.since.elapsed();
        if dt >= RATE_WINDOW {
            let drained = (written - self.written) as f64 - (queued as f64 - self.queued as f64);
            let r = drained.max(0.0) / dt.as_secs_f64();
            self.rate = if self.rate == 0.0 {
                r
            } else {
                0.5 * self.rate + 0.5 * r
            };
            (self.since, self.written, self.queued) = (Instant::now(), written, queued);
        }
        (self.rate * IDLE_MARGIN.as_secs_f64()).clamp(MIN_IDLE_QUEUE, MAX_IDLE_QUEUE) as u64
    }
}

/// Why a chunk of a compressed channel went raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawWhy {
    /// It (or its sample, or memory near it) did not shrink enough.
    Incompressible,
    /// The link was about to go idle before a worker got to it.
    LinkIdle,
}

/// Source side of a compressed TCP data channel: feeds the migration's
/// [`CompressPool`]. See the module docs.
#[derive(Debug)]
pub struct CompressSender<M: GuestMem> {
    tcp: TcpSender<M>,
    /// `--bandwidth-limit`, shared with the migration's other channels.
    limiter: Option<Arc<RateLimiter>>,
    /// Chunks sent compressed, raw because they did not shrink, raw because
    /// the link was about to go idle.
    compressed: u64,
    raw_incompressible: u64,
    raw_link_idle: u64,
    pool: Arc<CompressPool>,
    outbox: Arc<Outbox>,
    /// Chunks handed to the pool and not yet written (without their copy),
    /// by sequence number.
    pending: HashMap<u64, Chunk>,
    depth: usize,
    link: LinkProbe,
}

impl<M: GuestMem> Drop for CompressSender<M> {
    fn drop(&mut self) {
        // Jobs of this channel no worker started are of no use any more.
        let id = self.outbox.id;
        self.pool.shared.lock().queue.retain(|j| j.outbox.id != id);
    }
}

impl<M: GuestMem> CompressSender<M> {
    /// Wraps a data channel (plain or TLS) whose hello was accepted, feeding
    /// `pool` (the migration's, shared by its channels; its frame key is the
    /// session's). `limiter` is the migration's shared `--bandwidth-limit`
    /// (see [`TcpSender::with_limiter`]).
    pub fn new(
        stream: impl Into<crate::stream::Stream>,
        mem: Arc<M>,
        channel: u16,
        timeout: Duration,
        pool: Arc<CompressPool>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        let stream = stream.into();
        let fd = stream.tcp().as_fd().try_clone_to_owned().ok();
        let tcp = TcpSender::new(stream, mem, channel, timeout, pool.frame.clone())
            .with_limiter(limiter.clone());
        CompressSender {
            tcp,
            limiter,
            compressed: 0,
            raw_incompressible: 0,
            raw_link_idle: 0,
            outbox: pool.outbox(),
            depth: 2 * pool.workers + 2,
            pool,
            pending: HashMap::new(),
            link: LinkProbe::new(fd),
        }
    }

    fn link_about_to_idle(&mut self) -> bool {
        self.link.about_to_idle(self.limiter.as_deref())
    }

    /// Writes a worker's result: the compressed frame, or the chunk raw.
    async fn write_done(&mut self, done: Done) -> Result<()> {
        match done {
            Done::Frame { seq, buf, len } => {
                let chunk = self.pending.remove(&seq).expect("a pending chunk");
                let r = self.tcp.send_encoded(chunk, &buf[..len]).await;
                self.pool.shared.lock().spare.push(buf);
                r?;
                self.link.wrote(len as u64);
                self.compressed += 1;
                Ok(())
            }
            Done::Raw { seq, chunk } => {
                self.pending.remove(&seq);
                self.send_raw(chunk, RawWhy::Incompressible).await
            }
        }
    }

    /// Writes the results workers have finished while the link is about to
    /// go idle, without waiting for anything: the pipeline otherwise writes
    /// only once it holds more than `depth` chunks, so at the start of a
    /// migration (and after each round's flush) the link would sit idle
    /// while the first chunks are copied, queued and compressed. A busy
    /// link (its queue full: a slow link, or plenty queued) changes
    /// nothing: results wait for the pipeline as before, and the page pass
    /// is not held up by a write that would block.
    async fn emit_finished_while_idle(&mut self) -> Result<()> {
        while !self.pending.is_empty() && self.link_about_to_idle() {
            let Some(done) = self.outbox.pop() else {
                break;
            };
            self.write_done(done).await?;
        }
        Ok(())
    }

    /// Writes one pending chunk: see the module docs for which.
    async fn emit_one(&mut self) -> Result<()> {
        loop {
            if let Some(done) = self.outbox.pop() {
                return self.write_done(done).await;
            }
            let id = self.outbox.id;
            let incompressible = {
                let st = self.pool.shared.lock();
                // Recent chunks did not shrink and a worker is measuring one
                // of ours: nothing to wait for, send as plain TCP would.
                st.incompressible() && st.busy.iter().any(|b| b.outbox == id)
            };
            if self.pool.adaptive && (incompressible || self.link_about_to_idle()) {
                let job = {
                    let mut st = self.pool.shared.lock();
                    let at = st.queue.iter().position(|j| j.outbox.id == id);
                    let saves = at.map_or(0.0, |i| {
                        // Link time compressing the chunk would save.
                        let bytes = st.queue[i].chunk.payload_bytes() as f64;
                        bytes * (1.0 - st.wire_per_byte).max(0.0) / self.link.rate().max(1.0)
                    });
                    match at {
                        Some(i) if st.next_result_in(id, Instant::now()) >= saves => {
                            st.queue.remove(i)
                        }
                        _ => None,
                    }
                };
                if let Some(job) = job {
                    self.pending.remove(&job.chunk.seq);
                    return self.send_raw(job.chunk, RawWhy::LinkIdle).await;
                }
            }
            let outbox = self.outbox.clone();
            self.tcp
                .wait_ack_or(async move {
                    tokio::select! {
                        _ = outbox.ready.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    }
                })
                .await?;
        }
    }

    async fn send_raw(&mut self, chunk: Chunk, why: RawWhy) -> Result<()> {
        let wire = raw_frame_bytes(&chunk);
        self.tcp.send(chunk).await?;
        self.link.wrote(wire);
        match why {
            RawWhy::Incompressible => self.raw_incompressible += 1,
            RawWhy::LinkIdle => self.raw_link_idle += 1,
        }
        Ok(())
    }
}

impl<M: GuestMem> Transport for CompressSender<M> {
    fn capabilities(&self) -> Caps {
        Caps {
            max_chunk: MAX_CHUNK_PAYLOAD,
            zero_copy: false,
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.payload_bytes() == 0 {
            // Zero runs only: nothing to compress.
            let wire = raw_frame_bytes(&chunk);
            self.tcp.send(chunk).await?;
            self.link.wrote(wire);
            return Ok(());
        }
        if chunk.data.is_none() {
            // No private copy (see the module docs): raw, from guest memory.
            return self.send_raw(chunk, RawWhy::Incompressible).await;
        }
        self.pending.insert(chunk.seq, chunk.without_data());
        self.pool.shared.lock().queue.push_back(Job {
            chunk,
            outbox: self.outbox.clone(),
        });
        self.pool.shared.work.notify_one();
        while self.pending.len() > self.depth {
            self.emit_one().await?;
        }
        self.emit_finished_while_idle().await
    }

    async fn flush(&mut self) -> Result<Flushed> {
        while !self.pending.is_empty() {
            self.emit_one().await?;
        }
        self.tcp.flush().await
    }

    async fn finish(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.emit_one().await?;
        }
        self.tcp.finish().await
    }

    fn stats(&self) -> Vec<ChannelStats> {
        let mut s = self.tcp.stats();
        for c in &mut s {
            c.compressed_chunks = self.compressed;
            c.raw_incompressible_chunks = self.raw_incompressible;
            c.raw_link_idle_chunks = self.raw_link_idle;
        }
        s
    }
}

/// Bytes a chunk takes on the wire sent raw: header, run table, pages.
fn raw_frame_bytes(chunk: &Chunk) -> u64 {
    (HEADER_LEN + std::mem::size_of::<crate::wire::RunDesc>() * chunk.runs.len()) as u64
        + chunk.payload_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::land_compressed;
    use crate::guest::Tally;
    use crate::layout::PageRun;
    use crate::layout::{MemoryLayout, PAGE_SIZE};
    use crate::tcp::{
        receive_channel, test_frame_key, test_inbound, test_layout, test_mem, test_page_key,
        RecvCounters,
    };
    use crate::wire::{AckFrame, AckStatus};
    use crate::wire::{ChunkHeader, Codec, CompressedHeader, FLAG_COMPRESSED};
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryBackend;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use zerocopy::byteorder::little_endian::{U16, U32};
    use zerocopy::IntoBytes;

    const PAGES: u64 = 256;

    /// Whether the page pass copies (some of) the chunk at `gpa`.
    fn copies(h: &dyn CopyHint, gpa: u64) -> bool {
        h.plan(gpa) != CopyPlan::Skip
    }

    fn mem() -> GuestMemoryMmap {
        test_mem(PAGES)
    }

    fn layout() -> MemoryLayout {
        test_layout(PAGES)
    }

    fn splitmix(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn random_page(seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..PAGE_SIZE / 8)
            .flat_map(|_| splitmix(&mut x).to_le_bytes())
            .collect()
    }

    fn text_page(seed: u64) -> Vec<u8> {
        let words = [
            "guest ",
            "memory ",
            "page ",
            "migration ",
            "ferry ",
            "dirty ",
        ];
        let mut x = seed;
        let mut p = Vec::new();
        while p.len() < PAGE_SIZE as usize {
            p.extend_from_slice(words[(splitmix(&mut x) % 6) as usize].as_bytes());
        }
        p.truncate(PAGE_SIZE as usize);
        p
    }

    /// Pages 0..64 text, 64..72 random, 72..80 zero, 80..128 text, the rest
    /// random.
    fn filled() -> GuestMemoryMmap {
        let m = mem();
        for p in 0..PAGES {
            let bytes = match p {
                0..=63 | 80..=127 => text_page(p),
                72..=79 => continue,
                _ => random_page(p),
            };
            m.write_slice(&bytes, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        m
    }

    fn run(first: u64, pages: u32, zero: bool) -> PageRun {
        PageRun {
            gpa: first * PAGE_SIZE,
            pages,
            zero,
        }
    }

    /// Chunk 7 of round 1 of `runs` (its tag is computed when encoded).
    fn chunk(runs: Vec<PageRun>) -> Chunk {
        Chunk {
            seq: 7,
            round: 1,
            runs,
            tag: [0; 16],
            data: None,
        }
    }

    /// `c` read from `src` as the page pass does: tagged, with its copy.
    fn read(src: &GuestMemoryMmap, c: &Chunk) -> Chunk {
        Chunk::read(
            src,
            &test_page_key(),
            &test_frame_key(),
            c.seq,
            c.round,
            c.runs.clone(),
            true,
        )
        .unwrap()
    }

    fn page_bytes<M: GuestMemoryBackend>(m: &M, first: u64, pages: u64) -> Vec<u8> {
        let mut v = vec![0u8; (pages * PAGE_SIZE) as usize];
        m.read_slice(&mut v, GuestAddress(first * PAGE_SIZE))
            .unwrap();
        v
    }

    fn spec(codec: Codec) -> CompressionSpec {
        match codec {
            Codec::Lz4 => CompressionSpec { codec, level: 0 },
            Codec::Zstd => CompressionSpec { codec, level: 3 },
        }
    }

    /// Encodes `c` from `src`; returns the frame.
    fn encode(codec: Codec, src: &GuestMemoryMmap, c: &Chunk) -> Vec<u8> {
        let mut enc = Encoder::new(spec(codec)).unwrap();
        let mut buf = Vec::new();
        let c = read(src, c);
        let data = c.data.clone().unwrap();
        let n = encode_frame(&mut enc, &test_frame_key(), &c, &data, &mut buf)
            .unwrap()
            .expect("compressible chunk");
        buf.truncate(n);
        buf
    }

    /// Lands a compressed payload in `dst` under a claim, into the ledger
    /// of `inbound`; returns the landed pages' contribution sum.
    fn land_into(
        inbound: &crate::tcp::Inbound,
        dst: &GuestMemoryMmap,
        runs: &[PageRun],
        payload: &[u8],
        codec: Codec,
    ) -> crate::Result<u128> {
        let mut claim = crate::tcp::claim_runs(dst, runs).unwrap().unwrap();
        let mut tally = Tally::new(&inbound.ledger);
        land_compressed(
            &mut Decoder::default(),
            &mut claim,
            dst,
            7,
            runs,
            payload,
            codec,
            &mut tally,
        )?;
        Ok(tally.sum)
    }

    /// Lands a compressed payload in `dst` into a fresh ledger.
    fn land(
        dst: &GuestMemoryMmap,
        runs: &[PageRun],
        payload: &[u8],
        codec: Codec,
    ) -> crate::Result<u128> {
        land_into(
            &test_inbound(layout(), Some(codec)),
            dst,
            runs,
            payload,
            codec,
        )
    }

    /// Splits a frame into (header, run table, payload) after checking it.
    fn split(frame: &[u8]) -> (ChunkHeader, Vec<PageRun>, &[u8]) {
        let (h, _) = ChunkHeader::decode(frame).unwrap();
        let t = HEADER_LEN + 16 * h.run_count.get() as usize;
        h.verify(&test_frame_key(), &frame[HEADER_LEN..t])
            .expect("the header tag covers header and run table");
        let (runs, _) = crate::wire::decode_runs(&frame[HEADER_LEN..t], &layout()).unwrap();
        assert_eq!(h.payload_len.get() as usize, frame.len() - t);
        (h, runs, &frame[t..])
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!(
            "lz4".parse::<CompressionSpec>().unwrap(),
            CompressionSpec {
                codec: Codec::Lz4,
                level: 0
            }
        );
        assert_eq!("zstd".parse::<CompressionSpec>().unwrap().level, 1);
        assert_eq!(
            "zstd:7".parse::<CompressionSpec>().unwrap().to_string(),
            "zstd:7"
        );
        for (bad, why) in [
            ("zstd:0", "not in 1..=19"),
            ("zstd:20", "not in 1..=19"),
            ("zstd:x", "not a number"),
            ("lz4:3", "no level"),
            ("gzip", "unknown codec"),
        ] {
            let e = bad.parse::<CompressionSpec>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(CompressionSpec::default().to_string(), "zstd:1");
    }

    #[test]
    fn compressed_sub_header_bytes_are_pinned() {
        let h = CompressedHeader {
            codec: 2,
            reserved: 0,
            segment_count: U16::new(3),
            uncompressed_len: U32::new(0x0102_0304),
            compressed_len: U32::new(99),
            reserved2: U32::new(0),
        };
        let b = h.as_bytes();
        assert_eq!(b[0], 2);
        assert_eq!(&b[2..4], &[3, 0]);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..12], &99u32.to_le_bytes());
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(Codec::from_id(1).unwrap(), Codec::Lz4);
        assert_eq!(Codec::from_id(2).unwrap(), Codec::Zstd);
        let e = Codec::from_id(0).unwrap_err().to_string();
        assert!(e.contains("unknown codec id 0"), "{e}");
    }

    #[test]
    fn frames_round_trip_into_guest_memory_with_both_codecs() {
        let src = filled();
        // Text, random (stored inside the compressed chunk), a zero run, text.
        let c = chunk(vec![
            run(0, 64, false),
            run(64, 8, false),
            run(72, 8, true),
            run(80, 48, false),
        ]);
        for codec in Codec::ALL {
            let frame = encode(codec, &src, &c);
            let (h, runs, payload) = split(&frame);
            assert_eq!(h.flags.get(), FLAG_COMPRESSED);
            assert_eq!(runs, c.runs);
            let p = CompressedHeader::decode(
                payload,
                &[64 * PAGE_SIZE, 8 * PAGE_SIZE, 48 * PAGE_SIZE],
                None,
            )
            .unwrap();
            assert_eq!(p.codec, codec);
            assert_eq!(
                p.segments.iter().map(|s| s.stored).collect::<Vec<_>>(),
                [false, true, false],
                "{codec}: random pages are stored, text compressed"
            );
            assert!(
                frame.len() < (120 * PAGE_SIZE / 2) as usize,
                "{codec}: {} bytes",
                frame.len()
            );
            let dst = mem();
            dst.write_slice(&[0xee; 4096], GuestAddress(100 * PAGE_SIZE))
                .unwrap();
            let ok = land(&dst, &runs, payload, codec).unwrap();
            assert!(
                test_inbound(layout(), None).payload_ok(7, 1, ok, &h.payload_tag),
                "{codec}: what landed matches the payload tag"
            );
            for (first, n) in [(0, 72), (80, 48)] {
                assert_eq!(
                    page_bytes(&dst, first, n),
                    page_bytes(&src, first, n),
                    "{codec}: pages {first}..{}",
                    first + n
                );
            }
        }
    }

    #[test]
    fn random_memory_goes_raw_and_the_probe_sees_it() {
        let src = filled();
        let random = chunk(vec![run(128, 128, false)]);
        let text = chunk(vec![run(0, 64, false)]);
        let (mut rdata, mut tdata) = (Vec::new(), Vec::new());
        crate::tcp::copy_runs(&src, &random.runs, &mut rdata).unwrap();
        crate::tcp::copy_runs(&src, &text.runs, &mut tdata).unwrap();
        let mut scratch = Vec::new();
        for codec in Codec::ALL {
            let mut enc = Encoder::new(spec(codec)).unwrap();
            let mut buf = Vec::new();
            assert_eq!(
                encode_frame(&mut enc, &test_frame_key(), &random, &rdata, &mut buf).unwrap(),
                None
            );
            assert!(probe_incompressible(&mut enc, &rdata, &mut scratch));
            assert!(!probe_incompressible(&mut enc, &tdata, &mut scratch));
        }
    }

    /// Rewrites a frame's compressed payload with `f` and seals the header
    /// again with the session's key (as only a holder of the key could: the
    /// payload-level checks are what is tested).
    fn tamper(frame: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let (h, _, payload) = split(frame);
        let t = HEADER_LEN + 16 * h.run_count.get() as usize;
        let mut p = payload.to_vec();
        f(&mut p);
        let mut out = frame[..t].to_vec();
        out.extend_from_slice(&p);
        let mut h2 = h;
        h2.payload_len = U32::new(p.len() as u32);
        h2.seal(&test_frame_key(), &frame[HEADER_LEN..t]);
        out[..HEADER_LEN].copy_from_slice(h2.as_bytes());
        out
    }

    fn land_err(frame: &[u8], codec: Codec) -> String {
        let (_, runs, payload) = split(frame);
        land(&mem(), &runs, payload, codec)
            .expect_err("bad payload must be refused")
            .to_string()
    }

    #[test]
    fn bad_compressed_payloads_are_refused_with_the_reason() {
        let src = filled();
        let c = chunk(vec![run(0, 16, false)]);
        for codec in Codec::ALL {
            let frame = encode(codec, &src, &c);
            // Unknown codec id.
            let e = land_err(&tamper(&frame, |p| p[0] = 9), codec);
            assert!(e.contains("unknown codec id 9"), "{e}");
            // The other codec than the negotiated one.
            let other = if codec == Codec::Lz4 {
                Codec::Zstd
            } else {
                Codec::Lz4
            };
            let e = land_err(&tamper(&frame, |p| p[0] = other.id()), codec);
            assert!(e.contains("negotiated"), "{e}");
            // Decompression bomb, declared: uncompressed size above the runs'.
            let e = land_err(
                &tamper(&frame, |p| {
                    p[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes())
                }),
                codec,
            );
            assert!(
                e.contains("uncompressed length") && e.contains("claims 1073741824"),
                "{e}"
            );
            // Compressed length that does not match what follows.
            let e = land_err(&tamper(&frame, |p| p.push(0)), codec);
            assert!(e.contains("compressed length"), "{e}");
            // Segment table pointing past the payload.
            let e = land_err(
                &tamper(&frame, |p| {
                    p[16..20].copy_from_slice(&u32::MAX.to_le_bytes()[..4])
                }),
                codec,
            );
            assert!(e.contains("segment length"), "{e}");
            // Corrupt compressed bytes.
            let e = land_err(
                &tamper(&frame, |p| {
                    for b in &mut p[20..] {
                        *b = !*b;
                    }
                }),
                codec,
            );
            assert!(
                e.contains("does not decompress") && e.contains(codec.name()),
                "{codec}: {e}"
            );
        }
    }

    #[test]
    fn a_segment_that_inflates_beyond_its_run_is_refused() {
        // Decompression bombs, hidden: the sub-header matches the run (one
        // page) but the segment holds 16 pages of compressed data.
        let src = mem();
        src.write_slice(&[0x41; 16 * PAGE_SIZE as usize], GuestAddress(0))
            .unwrap();
        let text = filled();
        for codec in Codec::ALL {
            // Longer than the run: refused before decompression.
            let big = encode(codec, &text, &chunk(vec![run(0, 16, false)]));
            let (_, _, payload) = split(&big);
            let small = chunk(vec![run(0, 1, false)]);
            let mut p = payload.to_vec();
            p[4..8].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            let e = land(&mem(), &small.runs, &p, codec)
                .expect_err("segment longer than its run")
                .to_string();
            assert!(e.contains("segment length"), "{codec}: {e}");
            // Shorter than the run but inflating past it: the decoder stops
            // at the run's end.
            let bomb = encode(codec, &src, &chunk(vec![run(0, 16, false)]));
            let (_, _, payload) = split(&bomb);
            let mut p = payload.to_vec();
            assert!(p.len() < 4096, "{codec}: a tight segment");
            p[4..8].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            let e = land(&mem(), &small.runs, &p, codec)
                .expect_err("inflating segment")
                .to_string();
            assert!(e.contains("does not decompress"), "{codec}: {e}");
        }
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Sends raw frames to a receiving channel; returns its result and the
    /// acks it sent.
    async fn receive_frames(
        frames: Vec<Vec<u8>>,
        codec: Option<Codec>,
    ) -> (crate::Result<()>, Vec<AckStatus>, GuestMemoryMmap) {
        let (mut a, b) = pair().await;
        let dst = Arc::new(mem());
        let d = dst.clone();
        let rx = tokio::spawn(async move {
            let c = RecvCounters::default();
            receive_channel(b, &test_inbound(layout(), codec), &*d, &c).await
        });
        let n = frames.len();
        // The receiver may refuse a frame and close: later writes may fail.
        for f in frames {
            let _ = a.write_all(&f).await;
        }
        let _ = a
            .write_all(ChunkHeader::end(&test_frame_key(), u64::MAX).as_bytes())
            .await;
        let mut acks = Vec::new();
        let mut buf = [0u8; 32];
        for _ in 0..n {
            if a.read_exact(&mut buf).await.is_err() {
                break;
            }
            acks.push(AckFrame::decode(&test_frame_key(), &buf).unwrap().1);
        }
        let r = rx.await.unwrap();
        let m = Arc::try_unwrap(dst).expect("receiver done");
        (r, acks, m)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receiver_lands_acks_and_refuses_bad_compressed_frames() {
        let src = filled();
        let c = chunk(vec![run(0, 16, false), run(72, 4, true)]);
        let zstd = Some(Codec::Zstd);
        let good = encode(Codec::Zstd, &src, &c);
        let (r, acks, dst) = receive_frames(vec![good.clone()], zstd).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Landed]);
        assert_eq!(page_bytes(&dst, 0, 16), page_bytes(&src, 0, 16));

        // Damaged in transit: the payload tag does not match what landed,
        // the chunk is asked for again and the channel goes on.
        let mut damaged = good.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x55;
        let (r, acks, _) = receive_frames(vec![damaged, good.clone()], zstd).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Mismatch, AckStatus::Landed]);

        // A payload that does not decode, an unknown codec id: the frame is
        // the source's (its header tag holds), the payload was damaged:
        // asked for again, the channel goes on.
        let corrupt = tamper(&good, |p| {
            for b in &mut p[20..] {
                *b = b.wrapping_add(1);
            }
        });
        let unknown = tamper(&good, |p| p[0] = 200);
        let (r, acks, _) = receive_frames(vec![corrupt, unknown, good.clone()], zstd).await;
        r.unwrap();
        assert_eq!(
            acks,
            [AckStatus::Mismatch, AckStatus::Mismatch, AckStatus::Landed]
        );

        // A header changed on the way (its tag not fixable without the key):
        // refused before anything lands, the channel closed.
        let mut forged = good.clone();
        forged[HEADER_LEN] ^= 0x01; // the run table's first address
        let (r, acks, dst) = receive_frames(vec![forged], zstd).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("chunk header tag"), "{e}");
        assert!(acks.is_empty());
        assert!(
            page_bytes(&dst, 0, 17).iter().all(|&b| b == 0),
            "nothing landed"
        );

        // Compressed frame on a channel without compression.
        let (r, _, _) = receive_frames(vec![good.clone()], None).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("negotiated without compression"), "{e}");

        // A run table that claims 1 MiB of pages while the sub-header still
        // says 64 KiB (sealed by a holder of the key): refused before
        // anything is decompressed, and asked for again.
        let mut huge = good.clone();
        let (h, _, _) = split(&good);
        let t = HEADER_LEN + 16 * h.run_count.get() as usize;
        huge.truncate(HEADER_LEN);
        let big = crate::wire::run_table(&[run(0, PAGES as u32, false)]);
        huge.extend_from_slice(&big);
        huge.extend_from_slice(&good[t..]);
        let mut h2 = h;
        h2.run_count = U32::new(1);
        h2.seal(&test_frame_key(), &big);
        huge[..HEADER_LEN].copy_from_slice(h2.as_bytes());
        let (r, acks, dst) = receive_frames(vec![huge], zstd).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Mismatch]);
        assert!(
            page_bytes(&dst, 0, PAGES).iter().all(|&b| b == 0),
            "nothing decompressed"
        );
    }

    /// Runs `runs` through a compression sender into a receiver, over TLS
    /// when `tls` (the encrypted data path), and checks every page landed.
    async fn pipeline(
        src: GuestMemoryMmap,
        codec: Codec,
        adaptive: bool,
        runs: Vec<Vec<PageRun>>,
        tls: bool,
    ) -> ChannelStats {
        let (a, b) = pair().await;
        let (a, b): (crate::stream::Stream, crate::stream::Stream) = if tls {
            let key = crate::auth::AuthKey::new(vec![5; 32]).unwrap();
            let t = crate::tls::TlsConfig::from_psk(&key).unwrap();
            let d = Duration::from_secs(10);
            let (a, b) = tokio::join!(t.connect(a, d), t.accept(b, d));
            (a.unwrap(), b.unwrap())
        } else {
            (a.into(), b.into())
        };
        let src = Arc::new(src);
        let dst = Arc::new(mem());
        let d = dst.clone();
        let counters = Arc::new(RecvCounters::default());
        let c2 = counters.clone();
        let inbound = Arc::new(test_inbound(layout(), Some(codec)));
        let i2 = inbound.clone();
        let rx = tokio::spawn(async move { receive_channel(b, &i2, &*d, &c2).await });
        let pool = CompressPool::start(
            CompressConfig {
                spec: spec(codec),
                workers: 2,
                adaptive,
            },
            test_frame_key(),
        )
        .unwrap();
        let mut tx = CompressSender::new(a, src.clone(), 0, Duration::from_secs(10), pool, None);
        for (i, r) in runs.iter().enumerate() {
            let c = Chunk::read(
                &*src,
                &test_page_key(),
                &test_frame_key(),
                i as u64,
                0,
                r.clone(),
                true,
            )
            .unwrap();
            tx.send(c).await.unwrap();
        }
        let f = tx.flush().await.unwrap();
        assert!(f.resend.is_empty());
        tx.finish().await.unwrap();
        rx.await.unwrap().unwrap();
        for r in runs.iter().flatten() {
            let first = r.gpa / PAGE_SIZE;
            let want = if r.zero {
                vec![0; r.bytes() as usize]
            } else {
                page_bytes(&*src, first, r.pages.into())
            };
            assert!(
                page_bytes(&*dst, first, r.pages.into()) == want,
                "pages {first}..+{} differ",
                r.pages
            );
        }
        let s = tx.stats().remove(0);
        assert_eq!(s.chunks, runs.len() as u64);
        assert_eq!(
            counters.compressed_chunks.load(Ordering::Relaxed),
            s.compressed_chunks
        );
        // The destination's evidence is that of the pages sent.
        assert_eq!(
            inbound.ledger.evidence(),
            crate::tcp::evidence_of(&*src, &runs.concat()),
            "evidence of what landed"
        );
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_moves_compressible_memory_compressed() {
        // One page per chunk keeps the link mostly busy with 64 small chunks;
        // text pages always compress.
        let runs: Vec<Vec<PageRun>> = (0..64).map(|p| vec![run(p, 1, false)]).collect();
        let mut runs = runs;
        runs.push(vec![run(80, 48, false)]);
        runs.push(vec![run(72, 8, true)]);
        // Every chunk waits for a worker: all compress.
        let s = pipeline(filled(), Codec::Lz4, false, runs.clone(), false).await;
        assert_eq!(s.chunks, 66);
        assert_eq!(s.compressed_chunks, 65, "{s:?}");
        assert!(s.bytes_on_wire < s.payload_bytes / 2, "{s:?}");
        // Adaptive over loopback, which drains faster than the workers
        // compress: some chunks may go raw, and every one is accounted for.
        let s = pipeline(filled(), Codec::Zstd, true, runs.clone(), false).await;
        assert_eq!(
            s.compressed_chunks + s.raw_incompressible_chunks + s.raw_link_idle_chunks,
            65,
            "{s:?}"
        );
        assert_eq!(s.raw_incompressible_chunks, 0, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_over_tls_lands_compressed_raw_and_zero_runs() {
        // Compressed frames (through the TLS session from the frame buffer),
        // raw chunks (guest memory handed to the session, decrypted straight
        // into guest memory) and zero runs, over an encrypted channel.
        let mut runs: Vec<Vec<PageRun>> = (0..16).map(|p| vec![run(p, 1, false)]).collect();
        runs.push(vec![run(128, 64, false)]);
        runs.push(vec![run(72, 8, true), run(192, 64, false)]);
        let s = pipeline(filled(), Codec::Zstd, false, runs.clone(), true).await;
        assert_eq!(s.compressed_chunks, 16, "{s:?}");
        assert_eq!(s.raw_incompressible_chunks, 2, "{s:?}");
        let s = pipeline(filled(), Codec::Lz4, true, runs, true).await;
        assert_eq!(s.chunks, 18, "{s:?}");
    }

    #[test]
    fn a_backoff_skips_1_2_4_chunks_after_failures_and_a_chunk_that_shrinks_ends_it() {
        let mut b = Backoff::default();
        assert!(b.try_next() && !b.sample_first());
        b.learned(false);
        assert!(
            b.sample_first() && b.try_next(),
            "one failure: sample, skip none"
        );
        let skipped = |b: &mut Backoff| {
            let mut n = 0;
            while !b.try_next() {
                n += 1;
            }
            n
        };
        let mut seen = Vec::new();
        for _ in 0..7 {
            b.learned(false);
            seen.push(skipped(&mut b));
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 16, 16]);
        b.learned(true);
        assert!(b.try_next() && !b.sample_first(), "ended");
    }

    #[test]
    fn a_link_probe_without_a_socket_counts_as_idle_unless_the_cap_has_a_backlog() {
        let mut p = LinkProbe::new(None);
        assert!(p.about_to_idle(None));
        let cap = RateLimiter::new(1 << 20);
        cap.book(4 << 20, Instant::now());
        assert!(!p.about_to_idle(Some(&cap)), "the cap is the link");
    }

    #[test]
    fn backoff_skips_more_chunks_after_each_failure_and_a_success_ends_it() {
        let h = Compressibility::new(spec(Codec::Zstd));
        let g = GRANULE;
        // Unknown memory: every chunk is copied, the first attempts sample
        // first.
        assert!(copies(&h, g) && h.sample_first(g));
        // One failure: still attempted, sample first.
        h.learned(g, false);
        assert!(copies(&h, g) && h.sample_first(g));
        // From the second failure in a row: 1, 2, 4, 8, 16, 16 skipped
        // between attempts.
        for want in [1, 2, 4, 8, 16, 16] {
            h.learned(g + 4096, false);
            let skipped = std::iter::from_fn(|| (!copies(&h, g)).then_some(()))
                .take(100)
                .count();
            assert_eq!(skipped, want);
        }
        // The granule below is not affected (never tried: sample first);
        // the one above, seen for the first time, starts backing off where
        // this one is (16 skipped).
        assert!(copies(&h, 0) && h.sample_first(0));
        assert!(h.sample_first(2 * g));
        let skipped = std::iter::from_fn(|| (!copies(&h, 2 * g)).then_some(()))
            .take(100)
            .count();
        assert_eq!(skipped, 16);
        // A granule above one that compresses starts fresh.
        h.learned(3 * g, true);
        assert!(copies(&h, 4 * g) && h.sample_first(4 * g));
        // Memory that compressed: no sample before the next attempt.
        assert!(!h.sample_first(3 * g));
        // A chunk that shrank ends the back-off.
        h.learned(g, false);
        h.learned(g, true);
        assert!(copies(&h, g) && copies(&h, g) && !h.sample_first(g));
    }

    #[test]
    fn the_page_pass_samples_unknown_or_failing_memory_and_learns_from_it() {
        let h = Compressibility::new(spec(Codec::Lz4));
        let g = GRANULE;
        let random: Vec<u8> = (0..16).flat_map(random_page).collect();
        let text: Vec<u8> = (0..16).flat_map(text_page).collect();
        assert_eq!(random.len(), SAMPLE_BYTES);
        // Never tried: sampled; a failure: sampled again; two: backing off.
        assert_eq!(h.plan(g), CopyPlan::Sample);
        assert!(!h.sampled(g, &random));
        assert_eq!(h.plan(g), CopyPlan::Sample);
        assert!(!h.sampled(g, &random));
        assert_eq!(h.plan(g), CopyPlan::Skip);
        assert_eq!(h.plan(g), CopyPlan::Sample);
        // A sample that shrinks ends the back-off: the next chunks are
        // copied whole, and the workers compress them without a sample.
        assert!(h.sampled(g, &text));
        assert_eq!(h.plan(g), CopyPlan::Copy);
        assert!(!h.sample_first(g));
        // The granule above, memory not tried yet, is sampled.
        assert_eq!(h.plan(2 * g), CopyPlan::Sample);
    }

    /// A compression channel over loopback into a receiving task.
    struct Channel {
        tx: CompressSender<GuestMemoryMmap>,
        rx: tokio::task::JoinHandle<crate::Result<()>>,
        dst: Arc<GuestMemoryMmap>,
        inbound: Arc<crate::tcp::Inbound>,
    }

    async fn channel(
        src: &Arc<GuestMemoryMmap>,
        pool: &Arc<CompressPool>,
        codec: Codec,
        n: u16,
    ) -> Channel {
        let (a, b) = pair().await;
        let dst = Arc::new(mem());
        let inbound = Arc::new(test_inbound(layout(), Some(codec)));
        let (d, i) = (dst.clone(), inbound.clone());
        let rx =
            tokio::spawn(
                async move { receive_channel(b, &i, &*d, &RecvCounters::default()).await },
            );
        let tx = CompressSender::new(
            a,
            src.clone(),
            n,
            Duration::from_secs(10),
            pool.clone(),
            None,
        );
        Channel {
            tx,
            rx,
            dst,
            inbound,
        }
    }

    impl Channel {
        /// Ends the channel; returns its counters once the receiver is done.
        async fn end(mut self) -> (ChannelStats, Arc<GuestMemoryMmap>, Arc<crate::tcp::Inbound>) {
            assert!(self.tx.flush().await.unwrap().resend.is_empty());
            self.tx.finish().await.unwrap();
            self.rx.await.unwrap().unwrap();
            (self.tx.stats().remove(0), self.dst, self.inbound)
        }
    }

    fn pool(codec: Codec, workers: usize, adaptive: bool) -> Arc<CompressPool> {
        CompressPool::start(
            CompressConfig {
                spec: spec(codec),
                workers,
                adaptive,
            },
            test_frame_key(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_pool_compresses_for_every_channel() {
        // One worker for two channels: their chunks can only have been
        // compressed by the migration's one pool.
        let src = Arc::new(filled());
        let pool = pool(Codec::Zstd, 1, false);
        assert_eq!(pool.workers(), 1);
        let mut chans = Vec::new();
        for n in 0..2 {
            chans.push(channel(&src, &pool, Codec::Zstd, n).await);
        }
        // Text pages 0..64 and 80..128, one page per chunk, alternating.
        let pages: Vec<u64> = (0..64).chain(80..128).collect();
        for (i, &p) in pages.iter().enumerate() {
            let c = Chunk::read(
                &*src,
                &test_page_key(),
                &test_frame_key(),
                i as u64,
                0,
                vec![run(p, 1, false)],
                true,
            )
            .unwrap();
            chans[i % 2].tx.send(c).await.unwrap();
        }
        let mut compressed = 0;
        for (n, ch) in chans.into_iter().enumerate() {
            let (s, dst, _) = ch.end().await;
            assert_eq!(
                s.compressed_chunks,
                pages.len() as u64 / 2,
                "channel {n}: {s:?}"
            );
            compressed += s.compressed_chunks;
            for &p in pages.iter().skip(n).step_by(2) {
                assert_eq!(page_bytes(&*dst, p, 1), page_bytes(&*src, p, 1), "page {p}");
            }
        }
        assert_eq!(pool.attempts(), compressed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_memory_skips_the_pool_lands_identical_and_compressible_memory_is_noticed() {
        // The page pass's side, as the engine does it: a chunk is copied for
        // the workers only if the pool's hint says so at its first page.
        // Every chunk the pool gets is attempted (not adaptive: over
        // loopback the link would take some raw first).
        let src = Arc::new(filled());
        let pool = pool(Codec::Zstd, 2, false);
        let hint = pool.copy_hint();
        let mut ch = channel(&src, &pool, Codec::Zstd, 0).await;
        let mut seq = 0u64;
        let mut send = |round: u32, first: u64| {
            let copy = hint.plan(first * PAGE_SIZE) != CopyPlan::Skip;
            seq += 1;
            Chunk::read(
                &*src,
                &test_page_key(),
                &test_frame_key(),
                seq,
                round,
                vec![run(first, 4, false)],
                copy,
            )
            .unwrap()
        };
        // Round 0: 32 chunks of random pages (128..256), each flushed so
        // the pool's verdict is known before the next one is read.
        let mut sent = Vec::new();
        for k in 0..32 {
            let c = send(0, 128 + 4 * k);
            sent.extend(c.runs.clone());
            ch.tx.send(c).await.unwrap();
            ch.tx.flush().await.unwrap();
        }
        let s = ch.tx.stats().remove(0);
        assert_eq!(s.compressed_chunks, 0, "{s:?}");
        assert_eq!(s.raw_incompressible_chunks, 32, "{s:?}");
        let tried = pool.attempts();
        // Two failures, then 1, 2, 4, 8, 16 chunks skipped between tries.
        assert!(tried <= 8, "the pool tried {tried} of 32 random chunks");
        // The memory turns compressible: text pages where random were.
        for p in 128..256 {
            src.write_slice(&text_page(p), GuestAddress(p * PAGE_SIZE))
                .unwrap();
        }
        let mut compressed_at = None;
        for k in 0..32 {
            let c = send(1, 128 + 4 * k);
            sent.extend(c.runs.clone());
            ch.tx.send(c).await.unwrap();
            ch.tx.flush().await.unwrap();
            if compressed_at.is_none() && ch.tx.stats()[0].compressed_chunks > 0 {
                compressed_at = Some(k);
            }
        }
        let at = compressed_at.expect("compressible memory noticed");
        assert!(at <= MAX_SKIP as u64, "noticed after {at} chunks");
        let (s, dst, inbound) = ch.end().await;
        assert!(s.compressed_chunks >= 32 - MAX_SKIP as u64, "{s:?}");
        assert_eq!(
            page_bytes(&*dst, 128, 128),
            page_bytes(&*src, 128, 128),
            "what landed is the source's memory"
        );
        assert_eq!(
            inbound.ledger.evidence(),
            crate::tcp::evidence_of(&*src, &sent[sent.len() - 32..]),
            "evidence of what landed last"
        );
    }

    #[test]
    fn a_late_worker_is_not_waited_on_as_if_its_result_were_due() {
        // On time: the rest of its expected time.
        assert!((remaining(0.010, 0.004) - 0.006).abs() < 1e-12);
        // Late (no core for it): as long again, so a link that would save
        // less than that does not wait.
        assert_eq!(remaining(0.010, 0.030), 0.030);
        // Nothing measured yet: unknown, never "due now".
        assert_eq!(remaining(0.0, 0.001), f64::INFINITY);
        let mut st = PoolState {
            secs_per_byte: 1e-9,
            ..Default::default()
        };
        let now = Instant::now();
        assert_eq!(st.next_result_in(1, now), f64::INFINITY, "nothing busy");
        st.busy.push(Busy {
            outbox: 1,
            seq: 0,
            start: now - Duration::from_millis(50),
            bytes: 4 << 20,
        });
        let r = st.next_result_in(1, now);
        assert!(r >= 0.049, "a job 46 ms late is not due now: {r}");
        assert_eq!(
            st.next_result_in(2, now),
            f64::INFINITY,
            "another channel's job"
        );
    }

    #[tokio::test]
    async fn pipeline_sends_random_memory_raw_on_a_current_thread_runtime() {
        let runs: Vec<Vec<PageRun>> = (0..8).map(|i| vec![run(128 + 16 * i, 16, false)]).collect();
        let s = pipeline(filled(), Codec::Zstd, false, runs, false).await;
        assert_eq!(s.compressed_chunks, 0, "{s:?}");
        assert_eq!(s.raw_incompressible_chunks, 8, "{s:?}");
        assert!(s.bytes_on_wire > s.payload_bytes, "raw: headers on top");
    }
}
