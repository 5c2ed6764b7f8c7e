//! The compression performance option: chunks compressed with lz4 or zstd by
//! a pool of worker threads, sent over the TCP data channel, decompressed
//! straight into destination guest memory.
//!
//! # Source: a pipeline that never lets the link wait on a core
//! [`CompressSender`] wraps a [`TcpSender`]. `send` queues a chunk for the
//! worker pool and returns at once while fewer than a few chunks per worker
//! are waiting; past that it writes one chunk out first. Which one:
//!
//! 1. any chunk a worker has finished, as a compressed frame (or raw, if it
//!    did not shrink by at least [`MIN_SAVING_DIVISOR`]⁻¹);
//! 2. otherwise, if the socket's send queue is about to run dry (fewer
//!    unacknowledged bytes than the link drains in [`IDLE_MARGIN`]; the drain
//!    rate is measured from bytes written and the queue depth), the oldest
//!    chunk no worker has started, raw and zero-copy, unless the next worker
//!    result is due sooner than the link time compressing that chunk would
//!    save (from the workers' measured speed and ratio): the link waits on a
//!    core only when waiting pays. While recent chunks did not shrink, the
//!    sender does not wait at all and leaves workers only the chunks needed
//!    to notice when memory becomes compressible again;
//! 3. otherwise it waits for either (a worker result, an acknowledgement, or
//!    a 1 ms tick) and decides again.
//!
//! So a link slower than the pool carries almost only compressed chunks,
//! and a link faster than the pool (loopback) carries what the pool can
//! compress plus the rest raw. Workers run niced, so on a host with few
//! cores the threads that move bytes win the CPU. After a chunk that did not
//! shrink, workers first compress a sample of the next one (four 16 KiB
//! pieces) and send it raw if the sample does not shrink either: random
//! memory costs a fraction of a compression pass.
//!
//! Chunks of one round may leave in any order (they cover distinct pages);
//! `flush` drains the pipeline before the engine starts the next round, so
//! rounds never interleave on the wire.
//!
//! # Destination
//! `land_compressed` checks the sub-header against the run table before
//! touching memory (see [`CompressedHeader::decode`]), then decompresses
//! each segment straight into its run's guest pages, inside the chunk's
//! landing claim ([`vio::Claim::with_bytes_mut`]): the only buffer is the
//! compressed chunk itself. Each run's pages are hashed into the
//! migration's ledger right after they land. The CRC of the landed pages is
//! compared with the frame's `data_crc32`.
//!
//! The workers compress from a private copy of the pages
//! ([`crate::tcp::copy_runs`]), never from a reference to guest memory.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::codec::{
    encode_frame, probe_incompressible, split_runs, Decoder, Encoder, MIN_SAVING_DIVISOR,
};
use crate::error::{Result, TransportError};
use crate::guest::{copy_runs, GuestMem};
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
/// Nice value of the worker threads.
const WORKER_NICE: i32 = 10;
pub use ferry_proto::wire::{CompressionSpec, ZSTD_MAX_LEVEL};

/// Settings of the compression option on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressConfig {
    /// Codec and level.
    pub spec: CompressionSpec,
    /// Worker threads.
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

/// Why a chunk of a compressed channel went raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawWhy {
    /// It (or its sample) did not shrink enough.
    Incompressible,
    /// The link was about to go idle before a worker got to it.
    LinkIdle,
}

struct Job {
    chunk: Chunk,
}

enum Done {
    Frame { seq: u64, buf: Vec<u8>, len: usize },
    Raw { seq: u64 },
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Job>,
    done: VecDeque<Done>,
    shutdown: bool,
    /// Chunks in a row that did not shrink.
    streak: u32,
    /// Frame buffers to reuse.
    spare: Vec<Vec<u8>>,
    /// Jobs being compressed: sequence number, start, page bytes.
    busy: Vec<(u64, Instant, u64)>,
    /// Moving averages of a worker's seconds per page byte, and of wire
    /// bytes per page byte (1 for chunks that went raw).
    secs_per_byte: f64,
    wire_per_byte: f64,
}

impl PoolState {
    /// When the next worker result is expected, from now.
    fn next_result_in(&self, now: Instant) -> f64 {
        self.busy
            .iter()
            .map(|&(_, start, bytes)| {
                self.secs_per_byte * bytes as f64 - now.duration_since(start).as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

#[derive(Default)]
struct Pool {
    st: Mutex<PoolState>,
    work: Condvar,
    done: tokio::sync::Notify,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn worker<M: GuestMem>(pool: Arc<Pool>, mem: Arc<M>, spec: CompressionSpec, key: MacKey) {
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
    let mut data = Vec::new();
    loop {
        let (job, probe, mut buf) = {
            let mut st = pool.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(j) = st.queue.pop_front() {
                    let buf = st.spare.pop().unwrap_or_default();
                    st.busy
                        .push((j.chunk.seq, Instant::now(), j.chunk.payload_bytes()));
                    break (j, st.streak > 0, buf);
                }
                st = pool.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let seq = job.chunk.seq;
        let (started, bytes) = (Instant::now(), job.chunk.payload_bytes());
        let out = match enc.as_mut() {
            None => None,
            Some(e) => {
                // The page pass's private copy of the pages (the bytes the
                // tag was computed from), or, for a chunk sent again after
                // a channel failed, a fresh copy.
                let pages: std::result::Result<&[u8], TransportError> = match &job.chunk.data {
                    Some(d) => Ok(d),
                    None => copy_runs(&*mem, &job.chunk.runs, &mut data).map(|()| &data[..]),
                };
                match pages {
                    Err(err) => {
                        tracing::warn!(seq, "chunk goes raw: {err}");
                        None
                    }
                    Ok(b) if probe && probe_incompressible(e, b, &mut scratch) => None,
                    Ok(b) => match encode_frame(e, &key, &job.chunk, b, &mut buf) {
                        Ok(r) => r,
                        Err(err) => {
                            tracing::warn!(seq, "chunk goes raw: {err}");
                            None
                        }
                    },
                }
            }
        };
        let mut st = pool.lock();
        if let Some(i) = st.busy.iter().position(|&(s, _, _)| s == seq) {
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
        match out {
            Some(len) => {
                st.streak = 0;
                st.done.push_back(Done::Frame { seq, buf, len });
            }
            None => {
                st.streak = st.streak.saturating_add(1);
                st.spare.push(buf);
                st.done.push_back(Done::Raw { seq });
            }
        }
        drop(st);
        pool.done.notify_one();
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

/// Source side of a compressed TCP data channel. See the module docs.
#[derive(Debug)]
pub struct CompressSender<M: GuestMem> {
    tcp: TcpSender<M>,
    /// A duplicate of the channel's socket, for its send-queue depth
    /// (`SIOCOUTQ`); `None` if it could not be duplicated (the link then
    /// always counts as about to go idle).
    fd: Option<OwnedFd>,
    /// `--bandwidth-limit`, shared with the migration's other channels.
    limiter: Option<Arc<RateLimiter>>,
    /// Bytes written to the socket.
    written: u64,
    /// Chunks sent compressed, raw because they did not shrink, raw because
    /// the link was about to go idle.
    compressed: u64,
    raw_incompressible: u64,
    raw_link_idle: u64,
    pool: Arc<Pool>,
    /// Chunks handed to `send` and not yet written, by sequence number.
    pending: HashMap<u64, Chunk>,
    depth: usize,
    link: LinkMeter,
    adaptive: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl<M: GuestMem> Drop for CompressSender<M> {
    fn drop(&mut self) {
        self.pool.lock().shutdown = true;
        self.pool.work.notify_all();
    }
}

impl<M: GuestMem> CompressSender<M> {
    /// Wraps a data channel (plain or TLS) whose hello was accepted, and
    /// starts the workers. `limiter` is the migration's shared
    /// `--bandwidth-limit` (see [`TcpSender::with_limiter`]).
    pub fn new(
        stream: impl Into<crate::stream::Stream>,
        mem: Arc<M>,
        channel: u16,
        timeout: Duration,
        cfg: CompressConfig,
        frame: MacKey,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<Self> {
        let stream = stream.into();
        let fd = stream.tcp().as_fd().try_clone_to_owned().ok();
        cfg.spec.validate()?;
        let workers = cfg.workers.max(1);
        let pool = Arc::new(Pool::default());
        for i in 0..workers {
            let (p, m, k) = (pool.clone(), mem.clone(), frame.clone());
            std::thread::Builder::new()
                .name(format!("ferry-compress-{i}"))
                .spawn(move || worker(p, m, cfg.spec, k))
                .map_err(|e| TransportError::Io {
                    context: "starting a compression worker".into(),
                    source: e,
                })?;
        }
        Ok(CompressSender {
            tcp: TcpSender::new(stream, mem, channel, timeout, frame).with_limiter(limiter.clone()),
            fd,
            limiter,
            written: 0,
            compressed: 0,
            raw_incompressible: 0,
            raw_link_idle: 0,
            pool,
            pending: HashMap::new(),
            depth: 2 * workers + 2,
            adaptive: cfg.adaptive,
            link: LinkMeter {
                since: Instant::now(),
                written: 0,
                queued: 0,
                rate: 0.0,
            },
        })
    }

    fn link_about_to_idle(&mut self) -> bool {
        // Under --bandwidth-limit the cap is the link: busy while what was
        // booked against it takes longer than the margin to drain.
        if self
            .limiter
            .as_ref()
            .is_some_and(|l| l.backlog(Instant::now()) > IDLE_MARGIN)
        {
            return false;
        }
        let Some(fd) = &self.fd else {
            return true;
        };
        match ferry_ffi::net::send_queue_bytes(fd.as_fd()) {
            Ok(q) => {
                let q = q as u64;
                q < self.link.idle_queue(self.written, q)
            }
            Err(_) => true,
        }
    }

    /// Writes one pending chunk: see the module docs for which.
    async fn emit_one(&mut self) -> Result<()> {
        loop {
            let done = self.pool.lock().done.pop_front();
            match done {
                Some(Done::Frame { seq, buf, len }) => {
                    let chunk = self.pending.remove(&seq).expect("a pending chunk");
                    let r = self.tcp.send_encoded(chunk, &buf[..len]).await;
                    self.pool.lock().spare.push(buf);
                    r?;
                    self.written += len as u64;
                    self.compressed += 1;
                    return Ok(());
                }
                Some(Done::Raw { seq }) => {
                    let chunk = self.pending.remove(&seq).expect("a pending chunk");
                    return self.send_raw(chunk, RawWhy::Incompressible).await;
                }
                None => {}
            }
            let incompressible = {
                let st = self.pool.lock();
                // Recent chunks did not shrink and a worker is measuring the
                // next one: nothing to wait for, send as plain TCP would.
                st.secs_per_byte > 0.0
                    && st.wire_per_byte * MIN_SAVING_DIVISOR as f64
                        > (MIN_SAVING_DIVISOR - 1) as f64
                    && !st.busy.is_empty()
            };
            if self.adaptive && (incompressible || self.link_about_to_idle()) {
                let job = {
                    let mut st = self.pool.lock();
                    let saves = st.queue.front().map_or(0.0, |j| {
                        // Link time compressing the chunk would save.
                        let bytes = j.chunk.payload_bytes() as f64;
                        bytes * (1.0 - st.wire_per_byte).max(0.0) / self.link.rate.max(1.0)
                    });
                    if st.next_result_in(Instant::now()) >= saves {
                        st.queue.pop_front()
                    } else {
                        None
                    }
                };
                if let Some(job) = job {
                    self.pending.remove(&job.chunk.seq);
                    return self.send_raw(job.chunk, RawWhy::LinkIdle).await;
                }
            }
            let pool = self.pool.clone();
            self.tcp
                .wait_ack_or(async move {
                    tokio::select! {
                        _ = pool.done.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    }
                })
                .await?;
        }
    }

    async fn send_raw(&mut self, chunk: Chunk, why: RawWhy) -> Result<()> {
        let wire = raw_frame_bytes(&chunk);
        self.tcp.send(chunk).await?;
        self.written += wire;
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
            channels: 1,
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.payload_bytes() == 0 {
            // Zero runs only: nothing to compress.
            let wire = raw_frame_bytes(&chunk);
            self.tcp.send(chunk).await?;
            self.written += wire;
            return Ok(());
        }
        self.pending.insert(chunk.seq, chunk.clone());
        self.pool.lock().queue.push_back(Job { chunk });
        self.pool.work.notify_one();
        while self.pending.len() > self.depth {
            self.emit_one().await?;
        }
        Ok(())
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
        let mut tx = CompressSender::new(
            a,
            src.clone(),
            0,
            Duration::from_secs(10),
            CompressConfig {
                spec: spec(codec),
                workers: 2,
                adaptive,
            },
            test_frame_key(),
            None,
        )
        .unwrap();
        for (i, r) in runs.iter().enumerate() {
            // Every other chunk without its private copy, as a chunk sent
            // again after a channel failed is: read from guest memory.
            let c = Chunk::read(
                &*src,
                &test_page_key(),
                &test_frame_key(),
                i as u64,
                0,
                r.clone(),
                i % 2 == 0,
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

    #[tokio::test]
    async fn pipeline_sends_random_memory_raw_on_a_current_thread_runtime() {
        let runs: Vec<Vec<PageRun>> = (0..8).map(|i| vec![run(128 + 16 * i, 16, false)]).collect();
        let s = pipeline(filled(), Codec::Zstd, false, runs, false).await;
        assert_eq!(s.compressed_chunks, 0, "{s:?}");
        assert_eq!(s.raw_incompressible_chunks, 8, "{s:?}");
        assert!(s.bytes_on_wire > s.payload_bytes, "raw: headers on top");
    }
}
