//! The TCP performance option: one data channel per TCP connection.
//!
//! Source side ([`TcpSender`]): each chunk goes out as one `writev` of
//! header + run table + the guest pages themselves (no staging copy: the
//! kernel copies from guest memory). Destination side ([`receive_channel`]):
//! the header and run table are read and checked, every page the chunk
//! names is claimed ([`vio::claim`]: no other channel lands there
//! meanwhile), then the payload is read with `readv` straight into the
//! destination guest memory at the addresses the runs name; every page is
//! hashed into the migration's ledger ([`Inbound::ledger`]) right after it
//! lands, the chunk's CRC checked, and an ack returned. On a channel of the
//! compression option compressed frames are read into one buffer and
//! decompressed from there straight into guest memory ([`crate::compress`]).
//!
//! # Encrypted channels (`--encrypt`)
//! On a TLS channel ([`Stream::Tls`]) the same frames travel inside the TLS
//! session, and nothing can be zero-copy: the sender copies each run's
//! guest pages out of guest memory ([`vio::copy_out`]) and hands the copy to
//! the TLS session, and the receiver has the TLS session decrypt straight
//! into the run's claimed guest pages (each piece CRC'd and hashed as it
//! lands, as on a plain channel). Every channel has its own TLS session, so
//! its encryption runs in its own task and channels spread over cores. The
//! plain path is unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ferry_ffi::vio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};
use zerocopy::IntoBytes;

use crate::compress::{land_compressed, Decoder};
use crate::error::{Result, TransportError};
use crate::layout::PAGE_SIZE;
use crate::layout::{MemoryLayout, PageRun};
use crate::ratelimit::RateLimiter;
use crate::stream::Stream;
use crate::wire::{self, AckFrame, AckStatus, ChunkHeader, ChunkKind, Codec, RunDesc};
use crate::{Caps, ChannelStats, Chunk, Flushed, Transport};
use ferry_proto::evidence::PageHash;
use ferry_proto::frame::RoundGate;
use ferry_proto::Ledger;

/// Guest memory the transport can read from or land pages in.
pub trait GuestMem: GuestMemoryBackend + Send + Sync + 'static {}
impl<T: GuestMemoryBackend + Send + Sync + 'static> GuestMem for T {}

/// Default bytes in flight per channel before `send` waits for acks.
pub const DEFAULT_WINDOW: u64 = 16 << 20;

/// The slices of guest memory holding the non-zero runs, in run order.
pub fn run_slices<'m, M: GuestMem>(
    mem: &'m M,
    runs: &[PageRun],
) -> Result<Vec<VolatileSlice<'m, MS<'m, M>>>> {
    runs.iter()
        .filter(|r| !r.zero)
        .map(|r| {
            mem.get_slice(
                GuestAddress(r.gpa),
                usize::try_from(r.bytes()).unwrap_or(usize::MAX),
            )
            .map_err(|_| TransportError::OutsideLayout {
                gpa: r.gpa,
                pages: r.pages.into(),
            })
        })
        .collect()
}

/// CRC32 of a run table followed by the given slices (read through copies
/// into `scratch`).
pub fn chunk_crc<B: vm_memory::bitmap::BitmapSlice>(
    table: &[u8],
    slices: &[VolatileSlice<'_, B>],
    scratch: &mut Vec<u8>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(table);
    for s in slices {
        let _ = vio::read_pieces::<_, ()>(s, scratch, 64 << 10, |_, b| {
            h.update(b);
            Ok(())
        });
    }
    h.finalize()
}

/// Copies the non-zero runs' pages, in run order, out of guest memory into
/// `out` (resized to their total) with [`vio::copy_out`]: the private copy
/// compression and encryption work from.
pub fn copy_runs<M: GuestMem>(mem: &M, runs: &[PageRun], out: &mut Vec<u8>) -> Result<()> {
    let total: u64 = runs.iter().map(PageRun::payload_bytes).sum();
    out.resize(total as usize, 0);
    let mut at = 0usize;
    for r in runs.iter().filter(|r| !r.zero) {
        let s = run_slice(mem, r)?;
        at += vio::copy_out(&s, &mut out[at..]);
    }
    Ok(())
}

/// Fills a zero run in destination memory with zeros.
pub fn zero_run<M: GuestMem>(mem: &M, run: &PageRun) -> Result<()> {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut left = run.bytes();
    let mut gpa = run.gpa;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        mem.write_slice(&ZEROS[..n as usize], GuestAddress(gpa))
            .map_err(|_| TransportError::OutsideLayout {
                gpa: run.gpa,
                pages: run.pages.into(),
            })?;
        left -= n;
        gpa += n;
    }
    Ok(())
}

/// The sending half of a data channel.
#[derive(Debug)]
enum Wire {
    /// Plain TCP: zero-copy `writev` from guest memory.
    Plain(OwnedWriteHalf),
    /// TLS: pages go through the session; `fd` is a duplicate of the socket
    /// for the compression option's send-queue depth (`SIOCOUTQ`).
    Tls {
        write: WriteHalf<Stream>,
        fd: Option<OwnedFd>,
    },
}

/// Largest piece of guest memory handed to a TLS session or landed by it in
/// one call (bounds the dirty-bitmap marking per call on the destination).
const TLS_PIECE: usize = 256 << 10;

/// Source side of one TCP data channel.
#[derive(Debug)]
pub struct TcpSender<M: GuestMem> {
    mem: Arc<M>,
    write: Wire,
    acks: mpsc::UnboundedReceiver<Result<(u64, AckStatus)>>,
    /// Sequence number -> (runs, bytes counted against the window).
    in_flight: HashMap<u64, (Vec<PageRun>, u64)>,
    in_flight_bytes: u64,
    window: u64,
    timeout: Duration,
    resend: Vec<PageRun>,
    stats: ChannelStats,
    ack_task: tokio::task::JoinHandle<()>,
    /// `--bandwidth-limit`, shared with the migration's other channels.
    limiter: Option<Arc<RateLimiter>>,
    /// Private buffer guest pages are copied into when they cannot go to
    /// the kernel straight from guest memory.
    scratch: Vec<u8>,
}

impl<M: GuestMem> Drop for TcpSender<M> {
    fn drop(&mut self) {
        self.ack_task.abort();
    }
}

async fn read_acks<R: AsyncRead + Unpin>(
    mut read: R,
    tx: mpsc::UnboundedSender<Result<(u64, AckStatus)>>,
) {
    let mut buf = [0u8; 16];
    loop {
        let r = match read.read_exact(&mut buf).await {
            Ok(_) => AckFrame::decode(&buf),
            Err(e) => Err(TransportError::io("reading acks", "data channel", e)),
        };
        let stop = r.is_err();
        if tx.send(r).is_err() || stop {
            return;
        }
    }
}

impl<M: GuestMem> TcpSender<M> {
    /// Wraps a data channel (plain or TLS) whose hello was accepted.
    /// `timeout` bounds the wait for any acknowledgement.
    pub fn new(stream: impl Into<Stream>, mem: Arc<M>, channel: u16, timeout: Duration) -> Self {
        let stream = stream.into();
        let _ = stream.tcp().set_nodelay(true);
        let (tx, acks) = mpsc::unbounded_channel();
        let (write, ack_task) = match stream {
            Stream::Plain(s) => {
                let (read, write) = s.into_split();
                (Wire::Plain(write), tokio::spawn(read_acks(read, tx)))
            }
            tls => {
                let fd = tls.tcp().as_fd().try_clone_to_owned().ok();
                let (read, write) = tokio::io::split(tls);
                (Wire::Tls { write, fd }, tokio::spawn(read_acks(read, tx)))
            }
        };
        TcpSender {
            mem,
            write,
            acks,
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            window: DEFAULT_WINDOW,
            timeout,
            resend: Vec::new(),
            stats: ChannelStats {
                channel,
                ..Default::default()
            },
            ack_task,
            limiter: None,
            scratch: Vec::new(),
        }
    }

    /// Sets how many payload bytes may be unacknowledged at once (default
    /// [`DEFAULT_WINDOW`]; at least one chunk is always let through).
    pub fn with_window(mut self, bytes: u64) -> Self {
        self.window = bytes;
        self
    }

    /// Paces this channel's writes with `limiter` (shared by every channel
    /// of the migration, so the cap holds for all of them together).
    pub fn with_limiter(mut self, limiter: Option<Arc<RateLimiter>>) -> Self {
        self.set_limiter(limiter);
        self
    }

    pub(crate) fn set_limiter(&mut self, limiter: Option<Arc<RateLimiter>>) {
        self.limiter = limiter;
    }

    /// The shared `--bandwidth-limit`, if any.
    pub(crate) fn limiter(&self) -> Option<&RateLimiter> {
        self.limiter.as_deref()
    }

    async fn pace(&self, wire: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(wire).await;
        }
    }

    fn apply_ack(&mut self, ack: Result<(u64, AckStatus)>) -> Result<()> {
        let (seq, status) = ack?;
        let (runs, bytes) = self
            .in_flight
            .remove(&seq)
            .ok_or_else(|| TransportError::Invalid {
                field: "ack sequence number",
                detail: format!("{seq} is not in flight"),
            })?;
        self.in_flight_bytes -= bytes;
        self.stats.chunks += 1;
        if status == AckStatus::CrcMismatch {
            // Expected now and then during pre-copy (a guest write racing our
            // read of the page); counted in the summary, so not a warning.
            tracing::debug!(
                seq,
                "destination reported a CRC mismatch; pages will be sent again"
            );
            self.stats.crc_resends += 1;
            self.resend.extend(runs);
        }
        Ok(())
    }

    async fn wait_ack(&mut self) -> Result<()> {
        match tokio::time::timeout(self.timeout, self.acks.recv()).await {
            Ok(Some(ack)) => self.apply_ack(ack),
            Ok(None) => Err(TransportError::PeerClosed {
                what: "data channel",
            }),
            Err(_) => Err(TransportError::Timeout {
                what: "chunk acknowledgements",
                after: self.timeout,
            }),
        }
    }

    fn drain_ready_acks(&mut self) -> Result<()> {
        while let Ok(ack) = self.acks.try_recv() {
            self.apply_ack(ack)?;
        }
        Ok(())
    }

    /// Waits for an acknowledgement (and applies it) or for `other`,
    /// whichever comes first. Used by the compression pipeline to wake up
    /// when the link drains.
    pub(crate) async fn wait_ack_or(&mut self, other: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            ack = self.acks.recv() => match ack {
                Some(ack) => self.apply_ack(ack),
                None => Err(TransportError::PeerClosed {
                    what: "data channel",
                }),
            },
            () = other => Ok(()),
        }
    }

    /// The socket (for its send-queue depth).
    pub(crate) fn socket_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.write {
            Wire::Plain(w) => Some(AsRef::<TcpStream>::as_ref(w).as_fd()),
            Wire::Tls { fd, .. } => fd.as_ref().map(AsFd::as_fd),
        }
    }

    /// Writes bytes built elsewhere, flushing a TLS session.
    async fn write_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.write {
            Wire::Plain(w) => w.write_all(bytes).await,
            Wire::Tls { write, .. } => {
                write.write_all(bytes).await?;
                write.flush().await
            }
        }
    }

    /// Counters, for the compression pipeline's own.
    pub(crate) fn stats_mut(&mut self) -> &mut ChannelStats {
        &mut self.stats
    }

    /// After an error: the sequence numbers of the chunks sent and not
    /// acknowledged, and the runs the destination refused (CRC) since the
    /// last flush. Multichannel sends them again on another channel; this
    /// one is not used again.
    pub fn take_unlanded(&mut self) -> (Vec<u64>, Vec<PageRun>) {
        (
            self.in_flight.keys().copied().collect(),
            std::mem::take(&mut self.resend),
        )
    }

    /// Waits until `bytes` more fit the window.
    async fn reserve(&mut self, bytes: u64) -> Result<()> {
        self.drain_ready_acks()?;
        while !self.in_flight.is_empty() && self.in_flight_bytes + bytes > self.window {
            self.wait_ack().await?;
        }
        Ok(())
    }

    fn sent(&mut self, chunk: Chunk, wire: u64, window_bytes: u64) {
        self.stats.bytes_on_wire += wire;
        self.stats.payload_bytes += chunk.payload_bytes();
        self.in_flight_bytes += window_bytes;
        self.in_flight.insert(chunk.seq, (chunk.runs, window_bytes));
    }

    /// Sends a frame built elsewhere (a compressed chunk: header, run table
    /// and payload in `frame`) for `chunk`'s pages.
    pub(crate) async fn send_frame(&mut self, chunk: Chunk, frame: &[u8]) -> Result<()> {
        let wire = frame.len() as u64;
        self.reserve(wire).await?;
        self.pace(wire).await;
        self.write_bytes(frame)
            .await
            .map_err(|e| TransportError::io("writing a chunk", "data channel", e))?;
        self.stats.compressed_chunks += 1;
        self.sent(chunk, wire, wire);
        Ok(())
    }

    /// Writes `head` and the chunk's guest pages with `writev`, resuming after
    /// short writes. Slices are rebuilt inside each non-blocking attempt so
    /// that no raw guest pointer is held across an await. On a TLS channel
    /// the pages go through the session instead ([`write_pages`]).
    async fn write_frame(&mut self, head: &[u8], runs: &[PageRun], total: usize) -> Result<()> {
        let mem = &*self.mem;
        let scratch = &mut self.scratch;
        let stream: &TcpStream = match &mut self.write {
            Wire::Plain(w) => AsRef::<TcpStream>::as_ref(&*w),
            Wire::Tls { write, .. } => {
                let r = async {
                    write.write_all(head).await?;
                    write_pages(write, mem, runs, scratch).await?;
                    write.flush().await
                };
                return r
                    .await
                    .map_err(|e| TransportError::io("writing a chunk", "data channel", e));
            }
        };
        let mut done = 0usize;
        while done < total {
            stream
                .writable()
                .await
                .map_err(|e| TransportError::io("waiting for socket", "data channel", e))?;
            let r = stream.try_io(Interest::WRITABLE, || {
                let slices = run_slices(mem, runs).map_err(std::io::Error::other)?;
                vio::writev_volatile(stream.as_fd(), head, &slices, done)
            });
            match r {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(TransportError::io("writing a chunk", "data channel", e)),
            }
        }
        Ok(())
    }
}

impl<M: GuestMem> Transport for TcpSender<M> {
    fn capabilities(&self) -> Caps {
        Caps {
            max_chunk: wire::MAX_CHUNK_PAYLOAD,
            zero_copy: matches!(self.write, Wire::Plain(_)),
            channels: 1,
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        let payload = chunk.payload_bytes();
        if payload > u64::from(wire::MAX_CHUNK_PAYLOAD)
            || chunk.runs.len() > wire::MAX_RUNS as usize
        {
            return Err(TransportError::TooLarge {
                field: "chunk",
                len: payload,
                limit: wire::MAX_CHUNK_PAYLOAD.into(),
            });
        }
        self.reserve(payload).await?;
        // Paced before the CRC is taken: a page the guest writes while this
        // chunk waits would otherwise fail its CRC and the chunk go again.
        let table_bytes = (chunk.runs.len() * std::mem::size_of::<RunDesc>()) as u64;
        self.pace(32 + table_bytes + payload).await;
        let table: Vec<RunDesc> = chunk.runs.iter().map(RunDesc::from_run).collect();
        let crc = {
            let slices = run_slices(&*self.mem, &chunk.runs)?;
            chunk_crc(table.as_bytes(), &slices, &mut self.scratch)
        };
        let header = ChunkHeader::pages(
            chunk.seq,
            chunk.round,
            table.len() as u32,
            payload as u32,
            0,
            crc,
        );
        let mut head = Vec::with_capacity(32 + table.as_bytes().len());
        head.extend_from_slice(header.as_bytes());
        head.extend_from_slice(table.as_bytes());
        let total = head.len() + payload as usize;
        self.write_frame(&head, &chunk.runs, total).await?;
        self.sent(chunk, total as u64, payload);
        Ok(())
    }

    async fn flush(&mut self) -> Result<Flushed> {
        self.drain_ready_acks()?;
        while !self.in_flight.is_empty() {
            self.wait_ack().await?;
        }
        Ok(Flushed {
            resend: std::mem::take(&mut self.resend),
        })
    }

    async fn finish(&mut self) -> Result<()> {
        let end = ChunkHeader::end(u64::MAX);
        self.write_bytes(end.as_bytes())
            .await
            .map_err(|e| TransportError::io("ending the data channel", "data channel", e))?;
        self.stats.bytes_on_wire += 32;
        Ok(())
    }

    fn stats(&self) -> Vec<ChannelStats> {
        vec![self.stats.clone()]
    }
}

/// Destination-side counters, shared with the session for progress and checks.
#[derive(Debug, Default)]
pub struct RecvCounters {
    /// Page bytes landed (payload).
    pub payload_bytes: AtomicU64,
    /// Bytes read from the socket.
    pub bytes_on_wire: AtomicU64,
    /// Pages covered, zero pages included.
    pub pages: AtomicU64,
    /// Chunks accepted.
    pub chunks: AtomicU64,
    /// Chunks whose CRC did not match.
    pub crc_errors: AtomicU64,
    /// Highest round seen.
    pub round: AtomicU64,
    /// Chunks that arrived compressed.
    pub compressed_chunks: AtomicU64,
}

/// What every data channel of one incoming migration shares (TCP and RDMA
/// alike): the layout pages must lie in, the negotiated codec, the
/// destination's evidence, and the round gate.
#[derive(Debug)]
pub struct Inbound {
    /// The offered memory layout.
    pub layout: MemoryLayout,
    /// The codec the migration negotiated (compression option); `None`
    /// refuses compressed frames.
    pub codec: Option<Codec>,
    /// The destination's evidence: every page a channel lands is hashed
    /// (from destination memory, under the landing claim, right after it
    /// landed) and recorded here; zero runs record zero pages.
    pub ledger: Arc<Ledger>,
    /// One gate for every channel: a frame from an earlier round than any
    /// channel has seen is a stale copy and refused.
    pub rounds: RoundGate,
}

impl Inbound {
    /// The shared state of a migration's channels.
    pub fn new(layout: MemoryLayout, codec: Option<Codec>, ledger: Arc<Ledger>) -> Self {
        Inbound {
            layout,
            codec,
            ledger,
            rounds: RoundGate::new(),
        }
    }

    /// Admits a frame of `round` through the shared gate.
    pub fn admit_round(&self, seq: u64, round: u32) -> Result<()> {
        self.rounds
            .admit(round)
            .map_err(|newest| TransportError::Invalid {
                field: "chunk round",
                detail: format!(
                "chunk {seq} is from round {round}, after round {newest} began: stale copy refused"
            ),
            })
    }
}

/// Shared channel state for tests: a fixed page key.
#[cfg(test)]
pub(crate) fn test_inbound(layout: MemoryLayout, codec: Option<Codec>) -> Inbound {
    let key = ferry_proto::PageKey::from_secrets([3; 192], [5; 192]);
    let ledger = Arc::new(layout.ledger(key).expect("a valid test layout"));
    Inbound::new(layout, codec, ledger)
}

/// The destination's side of the evidence for one chunk: hashes pages as
/// they land, records them in the ledger, and sums their contributions.
#[derive(Debug)]
pub(crate) struct Tally<'a> {
    ledger: &'a Ledger,
    delta: u128,
    /// Sum of the landed pages' contributions (what the payload tag covers).
    pub(crate) sum: u128,
}

impl<'a> Tally<'a> {
    pub(crate) fn new(ledger: &'a Ledger) -> Self {
        Tally {
            ledger,
            delta: 0,
            sum: 0,
        }
    }

    /// Records page `gpa` as holding `bytes`.
    pub(crate) fn page(&mut self, gpa: u64, bytes: &[u8]) {
        let h = self.ledger.key().hash_or_zero(bytes);
        self.hashed(gpa, h);
    }

    /// Records page `gpa` as holding content that hashes to `h`.
    pub(crate) fn hashed(&mut self, gpa: u64, h: PageHash) {
        // Runs were checked against the layout the ledger was built for.
        if let Ok((d, c)) = self.ledger.record_page(gpa, h) {
            self.delta = self.delta.wrapping_add(d);
            self.sum = self.sum.wrapping_add(c);
        }
    }

    /// Records every page of a zero run as zero.
    pub(crate) fn zero_run(&mut self, run: &PageRun) {
        for p in 0..u64::from(run.pages) {
            self.hashed(run.gpa + p * PAGE_SIZE, PageHash::ZERO);
        }
    }
}

impl Drop for Tally<'_> {
    /// Applies the chunk's changes to the evidence in one step, also when
    /// landing stopped half way (what landed is recorded either way).
    fn drop(&mut self) {
        self.ledger.apply(self.delta);
    }
}

/// Claims every run of a chunk (zero runs included) for landing. The outer
/// error is a run outside guest memory, the inner one an overlapping claim.
pub(crate) fn claim_runs<M: GuestMem>(
    mem: &M,
    runs: &[PageRun],
) -> Result<std::result::Result<vio::Claim, vio::Busy>> {
    let slices = runs
        .iter()
        .map(|r| run_slice(mem, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(vio::claim(&slices))
}

fn run_slice<'m, M: GuestMem>(mem: &'m M, r: &PageRun) -> Result<VolatileSlice<'m, MS<'m, M>>> {
    mem.get_slice(
        GuestAddress(r.gpa),
        usize::try_from(r.bytes()).unwrap_or(usize::MAX),
    )
    .map_err(|_| TransportError::OutsideLayout {
        gpa: r.gpa,
        pages: r.pages.into(),
    })
}

/// Writes a claimed zero run's zeros and records them.
pub(crate) fn land_zero_run<M: GuestMem>(
    claim: &mut vio::Claim,
    mem: &M,
    run: &PageRun,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let slice = run_slice(mem, run)?;
    claim
        .with_bytes_mut(&slice, |b| b.fill(0))
        .map_err(claim_error)?;
    tally.zero_run(run);
    Ok(())
}

pub(crate) fn claim_error(e: vio::NotClaimed) -> TransportError {
    TransportError::Invalid {
        field: "landing claim",
        detail: e.to_string(),
    }
}

/// Hashes (from destination memory, under the claim) and records the pages
/// in payload bytes `from..to` of the non-zero runs `data`; `from` and `to`
/// are page aligned. Returns the offset reached.
fn hash_landed<M: GuestMem>(
    claim: &vio::Claim,
    mem: &M,
    data: &[PageRun],
    mut from: u64,
    to: u64,
    tally: &mut Tally<'_>,
) -> Result<u64> {
    let mut base = 0u64;
    for r in data {
        let end = base + r.bytes();
        while from < to && from < end {
            let gpa = r.gpa + (from - base);
            let page = mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .map_err(|_| TransportError::OutsideLayout { gpa, pages: 1 })?;
            claim
                .with_bytes(&page, |b| tally.page(gpa, b))
                .map_err(claim_error)?;
            from += PAGE_SIZE;
        }
        base = end;
        if from >= to {
            break;
        }
    }
    Ok(from)
}

/// Feeds bytes `from..from + len` of the concatenated `slices` (claimed) to `crc`.
fn crc_range<B: vm_memory::bitmap::BitmapSlice>(
    claim: &vio::Claim,
    crc: &mut crc32fast::Hasher,
    slices: &[VolatileSlice<'_, B>],
    mut from: usize,
    mut len: usize,
) {
    for s in slices {
        if len == 0 {
            break;
        }
        if from >= s.len() {
            from -= s.len();
            continue;
        }
        let take = (s.len() - from).min(len);
        if let Ok(part) = s.subslice(from, take) {
            let _ = claim.with_bytes(&part, |b| crc.update(b));
        }
        len -= take;
        from = 0;
    }
}

/// Hands the non-zero runs' guest pages to `w` (a TLS session, which
/// encrypts them into its records): each piece is copied out of guest
/// memory into `buf` ([`vio::copy_out`]) and written from there.
async fn write_pages<W: AsyncWrite + Unpin, M: GuestMem>(
    w: &mut W,
    mem: &M,
    runs: &[PageRun],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    if buf.len() < TLS_PIECE {
        buf.resize(TLS_PIECE, 0);
    }
    for r in runs.iter().filter(|r| !r.zero) {
        let len = r.bytes() as usize;
        let mut done = 0usize;
        while done < len {
            let take = (len - done).min(TLS_PIECE);
            {
                let slice = mem
                    .get_slice(GuestAddress(r.gpa + done as u64), take)
                    .map_err(std::io::Error::other)?;
                vio::copy_out(&slice, &mut buf[..take]);
            }
            w.write_all(&buf[..take]).await?;
            done += take;
        }
    }
    Ok(())
}

/// Reads the non-zero runs' payload from `r` (a TLS session) straight into
/// their claimed guest memory: the session decrypts into the pages, and
/// each piece is fed to `crc` and every completed page hashed into `tally`
/// right after it lands.
async fn read_pages<R: AsyncRead + Unpin, M: GuestMem>(
    r: &mut R,
    claim: &mut vio::Claim,
    mem: &M,
    runs: &[PageRun],
    crc: &mut crc32fast::Hasher,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let data: Vec<PageRun> = runs.iter().filter(|r| !r.zero).copied().collect();
    let total: u64 = data.iter().map(PageRun::bytes).sum();
    let mut landed = 0u64;
    let mut hashed = 0u64;
    for run in &data {
        let len = run.bytes() as usize;
        let mut done = 0usize;
        while done < len {
            let n = std::future::poll_fn(|cx| {
                let take = (len - done).min(TLS_PIECE);
                let slice = mem
                    .get_slice(GuestAddress(run.gpa + done as u64), take)
                    .map_err(std::io::Error::other)?;
                claim
                    .with_bytes_mut(&slice, |dst| {
                        let mut buf = ReadBuf::new(dst);
                        match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                            Poll::Ready(Ok(())) => {
                                let n = buf.filled().len();
                                crc.update(&dst[..n]);
                                Poll::Ready(Ok(n))
                            }
                            other => other.map(|r| r.map(|()| 0)),
                        }
                    })
                    .map_err(std::io::Error::other)?
            })
            .await
            .map_err(|e| TransportError::io("reading a chunk payload", "data channel", e))?;
            if n == 0 {
                hash_landed(claim, mem, &data, hashed, landed + done as u64, tally)?;
                return Err(TransportError::Malformed {
                    what: "chunk frame",
                    detail: format!(
                        "truncated: connection closed after {} of {total} payload bytes",
                        landed + done as u64
                    ),
                });
            }
            done += n;
            let whole = (landed + done as u64) / PAGE_SIZE * PAGE_SIZE;
            hashed = hash_landed(claim, mem, &data, hashed, whole, tally)?;
        }
        landed += len as u64;
    }
    Ok(())
}

/// Reads `total` payload bytes straight into the runs' claimed guest
/// memory, feeding each piece to `crc` and hashing every completed page
/// into `tally` right after it lands, while it is still in cache.
async fn read_payload<M: GuestMem>(
    stream: &TcpStream,
    claim: &mut vio::Claim,
    mem: &M,
    runs: &[PageRun],
    total: usize,
    crc: &mut crc32fast::Hasher,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let data: Vec<PageRun> = runs.iter().filter(|r| !r.zero).copied().collect();
    let mut done = 0usize;
    let mut hashed = 0u64;
    while done < total {
        stream
            .readable()
            .await
            .map_err(|e| TransportError::io("waiting for data", "data channel", e))?;
        let r = stream.try_io(Interest::READABLE, || {
            let slices = run_slices(mem, &data).map_err(std::io::Error::other)?;
            let n = claim.readv(stream.as_fd(), &slices, done)?;
            crc_range(claim, crc, &slices, done, n);
            Ok(n)
        });
        match r {
            Ok(0) => {
                // What landed is recorded (the partial page too): the
                // ledger describes destination memory whatever happens.
                let partial = (done as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                hash_landed(claim, mem, &data, hashed, partial, tally)?;
                return Err(TransportError::Malformed {
                    what: "chunk frame",
                    detail: format!(
                        "truncated: connection closed after {done} of {total} payload bytes"
                    ),
                });
            }
            Ok(n) => {
                done += n;
                let whole = done as u64 / PAGE_SIZE * PAGE_SIZE;
                hashed = hash_landed(claim, mem, &data, hashed, whole, tally)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                return Err(TransportError::io(
                    "reading a chunk payload",
                    "data channel",
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Destination side of one TCP data channel: reads chunk frames until the
/// source's end frame, lands every page straight in `mem` (under a landing
/// claim on the chunk's pages, so no other channel lands there meanwhile),
/// hashes what landed into the migration's ledger, checks each chunk's CRC
/// and acknowledges it (or asks for it again). On a channel of the
/// compression option compressed frames are read into one buffer, their
/// CRC checked, and decompressed straight into guest memory.
///
/// Frames must come in non-decreasing round order across every channel of
/// the migration ([`Inbound::rounds`]): a frame from an earlier round than
/// one any channel has seen is refused, so a stale copy can never
/// overwrite a newer one.
pub async fn receive_channel<M: GuestMem>(
    stream: impl Into<Stream>,
    inbound: &Inbound,
    mem: &M,
    counters: &RecvCounters,
) -> Result<()> {
    let mut stream = stream.into();
    let _ = stream.tcp().set_nodelay(true);
    let layout = &inbound.layout;
    let mut cbuf: Vec<u8> = Vec::new();
    let mut decoder = Decoder::default();
    let mut head = [0u8; 32];
    loop {
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| TransportError::io("reading a chunk header", "data channel", e))?;
        let (h, kind) = ChunkHeader::decode(&head)?;
        if kind == ChunkKind::End {
            return Ok(());
        }
        let (seq, round) = (h.seq.get(), h.round.get());
        inbound.admit_round(seq, round)?;
        counters.round.fetch_max(round.into(), Ordering::Relaxed);
        let codec = if h.flags.get() & wire::FLAG_COMPRESSED != 0 {
            match inbound.codec {
                Some(c) => Some(c),
                None => {
                    return Err(TransportError::Invalid {
                        field: "chunk flags",
                        detail: "compressed chunk on a channel negotiated without compression"
                            .into(),
                    })
                }
            }
        } else {
            None
        };
        let mut table = vec![0u8; h.run_count.get() as usize * 16];
        stream
            .read_exact(&mut table)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => TransportError::Malformed {
                    what: "chunk frame",
                    detail: format!("truncated inside the run table of chunk {seq}"),
                },
                _ => TransportError::io("reading a run table", "data channel", e),
            })?;
        let (runs, data_bytes) = wire::decode_runs(&table, layout)?;
        let payload_len = u64::from(h.payload_len.get());
        if codec.is_none() && data_bytes != payload_len {
            return Err(TransportError::Invalid {
                field: "chunk payload length",
                detail: format!(
                    "chunk {seq} says {payload_len} bytes but its runs hold {data_bytes}"
                ),
            });
        }
        if codec.is_some() && data_bytes > u64::from(wire::MAX_CHUNK_PAYLOAD) {
            return Err(TransportError::TooLarge {
                field: "uncompressed chunk",
                len: data_bytes,
                limit: wire::MAX_CHUNK_PAYLOAD.into(),
            });
        }
        // Nothing lands before every page the chunk names is claimed: no
        // other channel writes them meanwhile.
        let mut claim = match claim_runs(mem, &runs)? {
            Ok(c) => c,
            Err(busy) => {
                return Err(TransportError::Invalid {
                    field: "chunk pages",
                    detail: format!("chunk {seq}: {busy}"),
                })
            }
        };
        let mut tally = Tally::new(&inbound.ledger);
        let landed = match codec {
            None => {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&table);
                match &mut stream {
                    Stream::Plain(s) => {
                        read_payload(
                            s,
                            &mut claim,
                            mem,
                            &runs,
                            payload_len as usize,
                            &mut crc,
                            &mut tally,
                        )
                        .await?
                    }
                    Stream::Tls(t) => {
                        read_pages(&mut **t, &mut claim, mem, &runs, &mut crc, &mut tally).await?
                    }
                }
                crc.finalize() == h.crc32.get()
            }
            Some(codec) => {
                let n = payload_len as usize;
                if cbuf.len() < n {
                    cbuf.resize(n, 0);
                }
                let payload = &mut cbuf[..n];
                stream
                    .read_exact(payload)
                    .await
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => TransportError::Malformed {
                            what: "chunk frame",
                            detail: format!("truncated inside the payload of chunk {seq}"),
                        },
                        _ => TransportError::io("reading a chunk payload", "data channel", e),
                    })?;
                let mut crc = crc32fast::Hasher::new();
                crc.update(&table);
                crc.update(payload);
                if crc.finalize() != h.crc32.get() {
                    false
                } else {
                    counters.compressed_chunks.fetch_add(1, Ordering::Relaxed);
                    let payload = &*payload;
                    let mut land = || {
                        land_compressed(
                            &mut decoder,
                            &mut claim,
                            mem,
                            seq,
                            &runs,
                            payload,
                            codec,
                            &mut tally,
                        )
                    };
                    // Decompression is CPU work: keep it off the runtime's
                    // other tasks where the runtime allows.
                    match tokio::runtime::Handle::current().runtime_flavor() {
                        tokio::runtime::RuntimeFlavor::MultiThread => {
                            tokio::task::block_in_place(land)?
                        }
                        _ => land()?,
                    }
                }
            }
        };
        let status = if landed {
            for r in runs.iter().filter(|r| r.zero) {
                land_zero_run(&mut claim, mem, r, &mut tally)?;
            }
            counters
                .payload_bytes
                .fetch_add(data_bytes, Ordering::Relaxed);
            counters.pages.fetch_add(
                runs.iter().map(|r| u64::from(r.pages)).sum(),
                Ordering::Relaxed,
            );
            counters.chunks.fetch_add(1, Ordering::Relaxed);
            AckStatus::Landed
        } else {
            // During pre-copy a guest write racing the source's read causes
            // this too; the page is dirty and is sent again anyway.
            tracing::debug!(
                seq,
                expected = h.crc32.get(),
                "CRC mismatch: asking the source to send the chunk again"
            );
            counters.crc_errors.fetch_add(1, Ordering::Relaxed);
            AckStatus::CrcMismatch
        };
        drop(tally);
        drop(claim);
        counters
            .bytes_on_wire
            .fetch_add(32 + table.len() as u64 + payload_len, Ordering::Relaxed);
        // The flush sends a TLS session's record; a plain socket's does nothing.
        let ack = async {
            stream
                .write_all(AckFrame::new(seq, status).as_bytes())
                .await?;
            stream.flush().await
        };
        ack.await
            .map_err(|e| TransportError::io("sending an ack", "data channel", e))?;
    }
}
