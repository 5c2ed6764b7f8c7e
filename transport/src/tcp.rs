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
//! decompressed from there straight into guest memory (the compression
//! option's codec).
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

use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_ffi::vio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vm_memory::GuestAddress;
use zerocopy::IntoBytes;

use crate::codec::{land_segment, Decoder};
use crate::error::{Result, TransportError};
use crate::guest::hash_landed;
pub use crate::guest::{copy_runs, run_slices, zero_run, GuestMem};
use ferry_proto::WireError;
// The RDMA receiver lands through the same claims and tally.
pub(crate) use crate::guest::{claim_runs, land_zero_run, Tally};
use crate::inbound::Checked;
pub use crate::inbound::{Inbound, RecvCounters};
use crate::inflight::InFlight;
#[cfg(test)]
use crate::layout::MemoryLayout;
use crate::layout::PageRun;
use crate::layout::PAGE_SIZE;
use crate::ratelimit::RateLimiter;
pub use crate::reservation::channel_buffers;
use crate::reservation::{RecvBuf, RECV_STEP};
use crate::stream::Stream;
use crate::wire::{self, AckFrame, AckStatus, ChunkHeader, Codec, CompressedHeader, RunDesc};
use crate::{Caps, ChannelStats, Chunk, Flushed, Transport};
use ferry_proto::MacKey;

/// Default bytes in flight per channel before `send` waits for acks.
pub const DEFAULT_WINDOW: u64 = 16 << 20;

/// The sending half of a data channel.
#[derive(Debug)]
enum Wire {
    /// Plain TCP: zero-copy `writev` from guest memory.
    Plain(OwnedWriteHalf),
    /// TLS: pages go through the session.
    Tls { write: WriteHalf<Stream> },
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
    /// Chunks sent, not yet acknowledged, with the bytes each counts
    /// against the window.
    in_flight: InFlight<u64>,
    in_flight_bytes: u64,
    window: u64,
    timeout: Duration,
    stats: ChannelStats,
    ack_task: tokio::task::JoinHandle<()>,
    /// `--bandwidth-limit`, shared with the migration's other channels.
    limiter: Option<Arc<RateLimiter>>,
    /// Private buffer guest pages are copied into when they cannot go to
    /// the kernel straight from guest memory.
    scratch: Vec<u8>,
    /// The session's frame key: header tags, and ack tags checked.
    frame: MacKey,
}

impl<M: GuestMem> Drop for TcpSender<M> {
    fn drop(&mut self) {
        self.ack_task.abort();
    }
}

async fn read_acks<R: AsyncRead + Unpin>(
    mut read: R,
    key: MacKey,
    tx: mpsc::UnboundedSender<Result<(u64, AckStatus)>>,
) {
    let mut buf = [0u8; wire::ACK_LEN];
    loop {
        let r = match read.read_exact(&mut buf).await {
            Ok(_) => AckFrame::decode(&key, &buf).map_err(TransportError::from),
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
    /// `timeout` bounds the wait for any acknowledgement; `frame` is the
    /// session's frame key ([`ferry_proto::SessionKeys::frame`]).
    pub fn new(
        stream: impl Into<Stream>,
        mem: Arc<M>,
        channel: u16,
        timeout: Duration,
        frame: MacKey,
    ) -> Self {
        let stream = stream.into();
        let _ = stream.tcp().set_nodelay(true);
        let (tx, acks) = mpsc::unbounded_channel();
        let (write, ack_task) = match stream {
            Stream::Plain(s) => {
                let (read, write) = s.into_split();
                (
                    Wire::Plain(write),
                    tokio::spawn(read_acks(read, frame.clone(), tx)),
                )
            }
            tls => {
                let (read, write) = tokio::io::split(tls);
                (
                    Wire::Tls { write },
                    tokio::spawn(read_acks(read, frame.clone(), tx)),
                )
            }
        };
        TcpSender {
            mem,
            write,
            acks,
            in_flight: InFlight::default(),
            in_flight_bytes: 0,
            window: DEFAULT_WINDOW,
            timeout,
            stats: ChannelStats {
                channel,
                ..Default::default()
            },
            ack_task,
            limiter: None,
            scratch: Vec::new(),
            frame,
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
        self.limiter = limiter;
        self
    }

    async fn pace(&self, wire: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(wire).await;
        }
    }

    fn apply_ack(&mut self, ack: Result<(u64, AckStatus)>) -> Result<()> {
        let (seq, status) = ack?;
        let bytes = self
            .in_flight
            .acked(seq, status, &mut self.stats)
            .ok_or_else(|| {
                TransportError::Wire(WireError::Invalid {
                    field: "ack sequence number",
                    detail: format!("{seq} is not in flight"),
                })
            })?;
        self.in_flight_bytes -= bytes;
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
    /// whichever comes first: a sender with work of its own (the
    /// compression pipeline) wakes when the link drains or when that work
    /// is ready.
    ///
    /// # Cancel safety
    /// Cancel safe: an acknowledgement is applied in the same poll it is
    /// received in.
    pub async fn wait_ack_or(&mut self, other: impl Future<Output = ()>) -> Result<()> {
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

    /// After an error: the sequence numbers of the chunks sent and not
    /// acknowledged, and the runs the destination refused (CRC) since the
    /// last flush. Multichannel sends them again on another channel; this
    /// one is not used again.
    pub fn take_unlanded(&mut self) -> (Vec<u64>, Vec<PageRun>) {
        self.in_flight.take_unlanded()
    }

    /// Waits until `bytes` more fit the window.
    async fn reserve(&mut self, bytes: u64) -> Result<()> {
        self.drain_ready_acks()?;
        while !self.in_flight.is_empty() && self.in_flight_bytes + bytes > self.window {
            self.wait_ack().await?;
        }
        Ok(())
    }

    /// Records a written chunk; its private copy (if any) is dropped here,
    /// which returns the buffer to its pool.
    fn sent(&mut self, chunk: Chunk, wire: u64, window_bytes: u64) {
        self.stats.bytes_on_wire += wire;
        self.stats.payload_bytes += chunk.payload_bytes();
        self.in_flight_bytes += window_bytes;
        self.in_flight.sent(chunk.seq, chunk.runs, window_bytes);
    }

    /// Sends `chunk`'s pages as `frame`, built by the caller (an encoded
    /// chunk, e.g. compressed: header sealed with the session's frame key,
    /// run table and payload). It is paced, windowed (its frame bytes count
    /// against the window), acknowledged and, when the destination refuses
    /// it, its runs are returned by the next [`Transport::flush`], as with
    /// [`Transport::send`].
    ///
    /// # Cancel safety
    /// Not cancel safe, as [`Transport::send`].
    pub async fn send_encoded(&mut self, chunk: Chunk, frame: &[u8]) -> Result<()> {
        let wire = frame.len() as u64;
        self.reserve(wire).await?;
        self.pace(wire).await;
        self.write_bytes(frame)
            .await
            .map_err(|e| TransportError::io("writing a chunk", "data channel", e))?;
        self.sent(chunk, wire, wire);
        Ok(())
    }

    /// Writes `head` and the chunk's pages. From the chunk's private copy
    /// when it has one ([`Chunk::data`]: the bytes its tag was computed
    /// from), else straight from guest memory: on a plain channel with
    /// `writev`, resuming after short writes (slices are rebuilt inside each
    /// non-blocking attempt so that no raw guest pointer is held across an
    /// await); on a TLS channel through copies ([`write_pages`]).
    async fn write_frame(&mut self, head: &[u8], chunk: &Chunk, total: usize) -> Result<()> {
        let err = |e| TransportError::io("writing a chunk", "data channel", e);
        if let Some(data) = &chunk.data {
            let r = match &mut self.write {
                Wire::Plain(w) => write_two(w, head, data).await,
                Wire::Tls { write, .. } => {
                    async {
                        write_two(write, head, data).await?;
                        write.flush().await
                    }
                    .await
                }
            };
            return r.map_err(err);
        }
        let mem = &*self.mem;
        let runs = &chunk.runs;
        let scratch = &mut self.scratch;
        let stream: &TcpStream = match &mut self.write {
            Wire::Plain(w) => AsRef::<TcpStream>::as_ref(&*w),
            Wire::Tls { write, .. } => {
                let r = async {
                    write.write_all(head).await?;
                    write_pages(write, mem, runs, scratch).await?;
                    write.flush().await
                };
                return r.await.map_err(err);
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
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    }
}

/// Writes `a` then `b` with vectored writes, resuming after short writes.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    let total = a.len() + b.len();
    while done < total {
        let bufs = [
            std::io::IoSlice::new(&a[done.min(a.len())..]),
            std::io::IoSlice::new(&b[done.saturating_sub(a.len())..]),
        ];
        let n = w.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

impl<M: GuestMem> Transport for TcpSender<M> {
    fn capabilities(&self) -> Caps {
        Caps {
            max_chunk: wire::MAX_CHUNK_PAYLOAD,
            zero_copy: matches!(self.write, Wire::Plain(_)),
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        let payload = chunk.payload_bytes();
        if payload > u64::from(wire::MAX_CHUNK_PAYLOAD)
            || chunk.runs.len() > wire::MAX_RUNS as usize
        {
            return Err(TransportError::Local(WireError::TooLarge {
                field: "chunk",
                len: payload,
                limit: wire::MAX_CHUNK_PAYLOAD.into(),
            }));
        }
        self.reserve(payload).await?;
        let head = wire::encode_head(
            &self.frame,
            chunk.seq,
            chunk.round,
            &chunk.runs,
            payload as u32,
            0,
            chunk.tag,
        );
        self.pace(head.len() as u64 + payload).await;
        let total = head.len() + payload as usize;
        self.write_frame(&head, &chunk, total).await?;
        self.sent(chunk, total as u64, payload);
        Ok(())
    }

    async fn flush(&mut self) -> Result<Flushed> {
        self.drain_ready_acks()?;
        while !self.in_flight.is_empty() {
            self.wait_ack().await?;
        }
        Ok(Flushed {
            resend: self.in_flight.take_resend(),
        })
    }

    async fn finish(&mut self) -> Result<()> {
        let end = ChunkHeader::end(&self.frame, u64::MAX);
        self.write_bytes(end.as_bytes())
            .await
            .map_err(|e| TransportError::io("ending the data channel", "data channel", e))?;
        self.stats.bytes_on_wire += wire::HEADER_LEN as u64;
        Ok(())
    }

    fn stats(&self) -> Vec<ChannelStats> {
        vec![self.stats.clone()]
    }
}

/// Shared channel state for tests: a fixed page key.
#[cfg(test)]
pub(crate) fn test_inbound(layout: MemoryLayout, codec: Option<Codec>) -> Inbound {
    let ledger = Arc::new(layout.ledger(test_page_key()).expect("a valid test layout"));
    Inbound::new(layout, codec, ledger, test_frame_key())
}

/// The frame key of [`test_inbound`].
#[cfg(test)]
pub(crate) fn test_frame_key() -> MacKey {
    MacKey::from_bytes([7; 32])
}

/// The evidence of `runs` of `mem` under [`test_page_key`], as a source
/// that sent exactly them would hold.
#[cfg(test)]
pub(crate) fn evidence_of<M: GuestMem>(mem: &M, runs: &[PageRun]) -> ferry_proto::Evidence {
    let layout = crate::layout::of(mem);
    let ledger = layout.ledger(test_page_key()).unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for r in runs {
        for p in 0..u64::from(r.pages) {
            let gpa = r.gpa + p * PAGE_SIZE;
            let s = mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .unwrap();
            vio::copy_out(&s, &mut page);
            let h = ledger.key().hash_or_zero(&page);
            ledger.apply(ledger.record(gpa, h).unwrap());
        }
    }
    ledger.evidence()
}

/// A test guest: one region of `pages` pages at guest address 0.
#[cfg(test)]
pub(crate) fn test_mem(pages: u64) -> vm_memory::GuestMemoryMmap {
    vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)])
        .unwrap()
}

/// The layout of [`test_mem`]`(pages)`.
#[cfg(test)]
pub(crate) fn test_layout(pages: u64) -> MemoryLayout {
    MemoryLayout {
        page_size: PAGE_SIZE,
        regions: vec![crate::layout::RegionDesc {
            gpa: 0,
            size: pages * PAGE_SIZE,
        }],
    }
}

/// The page key of [`test_inbound`].
#[cfg(test)]
pub(crate) fn test_page_key() -> ferry_proto::PageKey {
    ferry_proto::PageKey::from_secrets([3; 192], [5; 192])
}

/// Faults in, writable, the destination pages the non-zero runs will land
/// in (`MADV_POPULATE_WRITE`, one call per run), before their payload is
/// read: pages the guest never touched cost a page fault each when
/// `readv`, a TLS session or a decoder first writes them, and one call per
/// run does that work for a fraction of the CPU (a 1 GiB range on this
/// 2-core VM: 0.34 s populated against 1.11 s faulted page by page;
/// docs/performance.md). Only pages not backed yet are asked for
/// ([`vio::populate_missing`]): memory already backed (a destination VMM
/// that preallocates its guest memory, pages landing again in a later
/// round) costs one scan of its page tables per run.
/// Contents do not change (a missing page reads as zero either way) and
/// only pages data is about to land in are populated, so memory still
/// costs only where data lands. Kernels before 5.14 refuse the advice:
/// pages then fault as they land, as before (and `first_touch_ns` does
/// not see them). Returns the CPU time it took (this thread's).
fn prefault<M: GuestMem>(mem: &M, runs: &[PageRun], present: &mut Vec<u8>) -> Duration {
    let before = ferry_ffi::cpu::thread_times().ok();
    for r in runs.iter().filter(|r| !r.zero) {
        if let Ok(slice) = crate::guest::run_slice(mem, r) {
            let _ = vio::populate_missing(&slice, present);
        }
    }
    match (before, ferry_ffi::cpu::thread_times()) {
        (Some(b), Ok(a)) => a.since(&b).total(),
        _ => Duration::ZERO,
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
/// every completed page is hashed into `tally` right after it lands.
async fn read_pages<R: AsyncRead + Unpin, M: GuestMem>(
    r: &mut R,
    claim: &mut vio::Claim,
    mem: &M,
    runs: &[PageRun],
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
                        Pin::new(&mut *r)
                            .poll_read(cx, &mut buf)
                            .map(|r| r.map(|()| buf.filled().len()))
                    })
                    .map_err(std::io::Error::other)?
            })
            .await
            .map_err(|e| TransportError::io("reading a chunk payload", "data channel", e))?;
            if n == 0 {
                // What landed is recorded (the partial page too): the
                // ledger describes destination memory whatever happens.
                let partial = (landed + done as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                hash_landed(claim, mem, &data, hashed, partial, tally)?;
                return Err(TransportError::Wire(WireError::Malformed {
                    what: "chunk frame",
                    detail: format!(
                        "truncated: connection closed after {} of {total} payload bytes",
                        landed + done as u64
                    ),
                }));
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
/// memory, hashing every completed page into `tally` right after it lands,
/// while it is still in cache.
async fn read_payload<M: GuestMem>(
    stream: &TcpStream,
    claim: &mut vio::Claim,
    mem: &M,
    runs: &[PageRun],
    total: usize,
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
            claim.readv(stream.as_fd(), &slices, done)
        });
        match r {
            Ok(0) => {
                let partial = (done as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                hash_landed(claim, mem, &data, hashed, partial, tally)?;
                return Err(TransportError::Wire(WireError::Malformed {
                    what: "chunk frame",
                    detail: format!(
                        "truncated: connection closed after {done} of {total} payload bytes"
                    ),
                }));
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

/// Reads bytes `from..need` of a message into `buf`, which grows only as
/// they arrive (booked on the migration's reservation). `what` names the
/// bytes in a truncation error.
async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut RecvBuf,
    from: usize,
    need: usize,
    what: &str,
) -> Result<()> {
    let mut have = from;
    while have < need {
        let room = buf.room_for(have, need)?;
        let n = r
            .read(room)
            .await
            .map_err(|e| TransportError::io("reading a chunk frame", "data channel", e))?;
        if n == 0 {
            return Err(TransportError::Wire(WireError::Malformed {
                what: "chunk frame",
                detail: format!(
                    "truncated inside {what}: connection closed after {have} of {need} bytes"
                ),
            }));
        }
        have += n;
    }
    Ok(())
}

/// Reads and drops `need` bytes through `scratch` (a payload that may not
/// land).
async fn drain<R: AsyncRead + Unpin>(r: &mut R, scratch: &mut RecvBuf, need: usize) -> Result<()> {
    let mut left = need;
    while left > 0 {
        let room = scratch.room_for(0, left.min(RECV_STEP))?;
        let n = r
            .read(room)
            .await
            .map_err(|e| TransportError::io("reading a chunk payload", "data channel", e))?;
        if n == 0 {
            return Err(TransportError::Wire(WireError::Malformed {
                what: "chunk frame",
                detail: format!(
                    "truncated: connection closed {left} bytes before the end of a payload"
                ),
            }));
        }
        left -= n;
    }
    Ok(())
}

/// Reads a compressed payload of `payload_len` bytes one segment at a time
/// and lands each segment in its run (`data`: the non-zero runs) as soon as
/// it arrived, decompressing straight into claimed guest memory. The outer
/// error is the channel's (reading failed, a buffer did not fit); the inner
/// one a payload that does not decode, after which the rest of the payload
/// is read and dropped, so the channel stays in step with the frames (the
/// payload length is the source's: the header tag covers it).
#[allow(clippy::too_many_arguments)]
async fn land_streamed<M: GuestMem>(
    stream: &mut Stream,
    bufs: &mut Buffers,
    mem: &M,
    claim: &mut vio::Claim,
    seq: u64,
    data: &[PageRun],
    payload_len: usize,
    codec: Codec,
    tally: &mut Tally<'_>,
) -> Result<std::result::Result<(), TransportError>> {
    let head = 16.min(payload_len);
    read_into(
        stream,
        &mut bufs.segtable,
        0,
        head,
        "the compressed sub-header",
    )
    .await?;
    let prefix = match CompressedHeader::prefix_len(bufs.segtable.get(head)) {
        Ok(p) if p <= payload_len => p,
        Ok(p) => {
            drain(stream, &mut bufs.scratch, payload_len - head).await?;
            return Ok(Err(TransportError::Wire(WireError::Malformed {
                what: "compressed payload",
                detail: format!(
                    "chunk {seq}: a {p}-byte segment table in a {payload_len}-byte payload"
                ),
            })));
        }
        Err(e) => {
            drain(stream, &mut bufs.scratch, payload_len - head).await?;
            return Ok(Err(e.into()));
        }
    };
    read_into(
        stream,
        &mut bufs.segtable,
        head,
        prefix,
        "the segment table",
    )
    .await?;
    let lens: Vec<u64> = data.iter().map(PageRun::bytes).collect();
    let p = match CompressedHeader::decode_prefix(
        bufs.segtable.get(prefix),
        payload_len,
        &lens,
        Some(codec),
    ) {
        Ok(p) => p,
        Err(e) => {
            drain(stream, &mut bufs.scratch, payload_len - prefix).await?;
            return Ok(Err(e.into()));
        }
    };
    let mut failed = None;
    for (run, seg) in data.iter().zip(&p.segments) {
        read_into(
            stream,
            &mut bufs.segment,
            0,
            seg.len,
            "a compressed segment",
        )
        .await?;
        if failed.is_some() {
            continue;
        }
        let src = bufs.segment.get(seg.len);
        let decoder = &mut bufs.decoder;
        let mut land = || {
            land_segment(
                decoder, claim, mem, seq, run, p.codec, src, seg.stored, tally,
            )
        };
        // Decompression is CPU work: keep it off the runtime's other tasks
        // where the runtime allows.
        let r = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(land),
            _ => land(),
        };
        if let Err(e) = r {
            failed = Some(e);
        }
    }
    Ok(failed.map_or(Ok(()), Err))
}

/// What one frame was.
enum Received {
    /// The source's end frame.
    End,
    /// A chunk, answered with this ack.
    Chunk(u64, AckStatus),
}

/// One channel's buffers, all growing as bytes arrive and booked on the
/// migration's reservation, each bounded (see [`channel_buffers`]).
struct Buffers {
    /// A run table: at most [`wire::MAX_RUNS`] runs.
    table: RecvBuf,
    /// A compressed payload's sub-header and segment table.
    segtable: RecvBuf,
    /// One compressed segment: at most [`wire::MAX_SEGMENT`] bytes.
    segment: RecvBuf,
    /// Drains a payload that may not land, a step at a time.
    scratch: RecvBuf,
    decoder: Decoder,
    /// Which pages of a run are backed already (one byte per page).
    present: Vec<u8>,
}

/// Destination side of one TCP data channel: reads chunk frames until the
/// source's end frame and answers each with a tagged ack.
///
/// For each frame: the header's plain fields are checked, the run table
/// read, and the **header tag checked before any byte lands** (a frame
/// whose header or run table was changed on the way is refused and the
/// channel closed: its lengths can no longer be trusted). The round must
/// not be older than any channel of the migration has seen
/// ([`Inbound::rounds`]). Every page the chunk names is then claimed
/// ([`vio::claim`]): if another chunk is landing on some of them, the
/// payload is read and dropped and the chunk answered [`AckStatus::Busy`].
/// Otherwise zero runs are zeroed and the payload lands straight in guest
/// memory (`readv`, the TLS session decrypting into it, or decompression
/// from the channel's buffer); every landed page is hashed into the
/// migration's ledger while still in cache, and the sum of their
/// contributions checked against the payload tag: [`AckStatus::Landed`] or
/// [`AckStatus::Mismatch`] (the source sends the pages again).
///
/// Once a frame's first byte arrived, the whole frame must arrive within
/// [`Inbound::deadline`].
pub async fn receive_channel<M: GuestMem>(
    stream: impl Into<Stream>,
    inbound: &Inbound,
    mem: &M,
    counters: &RecvCounters,
) -> Result<()> {
    let mut stream = stream.into();
    let _ = stream.tcp().set_nodelay(true);
    // The channel's buffers are booked (a channel that does not fit within
    // --memory-limit is refused) and grow within the booking.
    let booking = inbound.buffers.as_ref().map(|b| b.book()).transpose()?;
    let budget = booking.as_ref().map(|b| b.buffers.clone());
    let mut bufs = Buffers {
        table: RecvBuf::new(budget.clone(), "receive buffers (run table)"),
        segtable: RecvBuf::new(budget.clone(), "receive buffers (segment table)"),
        segment: RecvBuf::new(budget.clone(), "receive buffers (compressed segment)"),
        scratch: RecvBuf::new(budget, "receive buffers (scratch)"),
        decoder: Decoder::default(),
        present: Vec::new(),
    };
    loop {
        let mut head = [0u8; wire::HEADER_LEN];
        // A channel may idle between frames as long as it likes (the
        // migration's own stall timer covers a source that stops
        // altogether); once a frame has begun, it has its deadline.
        let first = stream
            .read(&mut head)
            .await
            .map_err(|e| TransportError::io("reading a chunk header", "data channel", e))?;
        if first == 0 {
            return Err(TransportError::PeerClosed {
                what: "data channel",
            });
        }
        let frame = receive_frame(
            &mut stream,
            &mut head,
            first,
            inbound,
            mem,
            counters,
            &mut bufs,
        );
        let received = match tokio::time::timeout(inbound.deadline, frame).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(TransportError::Timeout {
                    what: "the rest of a chunk frame on this data channel (per-frame deadline)",
                    after: inbound.deadline,
                })
            }
        };
        let (seq, status) = match received {
            Received::End => return Ok(()),
            Received::Chunk(seq, status) => (seq, status),
        };
        // The flush sends a TLS session's record; a plain socket's does nothing.
        let ack = async {
            stream
                .write_all(inbound.ack(seq, status).as_bytes())
                .await?;
            stream.flush().await
        };
        ack.await
            .map_err(|e| TransportError::io("sending an ack", "data channel", e))?;
    }
}

/// [`receive_channel`] on a thread of its own (with a single-threaded
/// runtime), plain or TLS (the TLS session moves to the thread with its
/// state; only its socket changes runtimes).
///
/// Why: a socket registered with the daemon's multi-threaded runtime has
/// its readiness delivered by whichever worker is parked on the runtime's
/// event loop. While the channel's task is busy landing what it read
/// (populating, copying out of the socket, hashing), every arrival of a
/// segment wakes that other worker, which finds nothing to run and parks
/// again: 1,000 to 5,000 wake-ups and context switches per GiB, each
/// taking CPU from the source or the receiver itself on a 2-core host
/// (docs/performance.md). On its own runtime the socket's readiness is
/// only looked at when its thread has nothing else to do.
///
/// The thread holds `inbound`, `mem` and `counters` until the receive loop
/// has ended, before it reports how it ended. If this
/// future is dropped before the channel ended (the migration aborts it),
/// the socket is shut down, which ends the receive loop at its next read
/// or write, and the drop waits for the thread, so the migration's memory
/// and buffer booking are released when the task is gone, as before.
pub async fn receive_channel_on_own_thread<M: GuestMem>(
    stream: Stream,
    inbound: Arc<Inbound>,
    mem: Arc<M>,
    counters: Arc<RecvCounters>,
) -> Result<()> {
    let io = |what, e| TransportError::io(what, "data channel", e);
    // A TLS session moves whole (its state and the bytes it buffered), its
    // socket taken out to change runtimes and put back on the thread.
    let (tcp, tls) = match stream {
        Stream::Plain(tcp) => (tcp, None),
        Stream::Tls(mut tls) => match tls.get_mut().0.take_tcp() {
            Some(tcp) => (tcp, Some(tls)),
            None => {
                return Err(io(
                    "moving the channel to its own thread",
                    std::io::Error::other("the TLS session has no socket"),
                ))
            }
        },
    };
    // Deregistered from this runtime; registered with the thread's.
    let tcp = tcp
        .into_std()
        .map_err(|e| io("moving the channel to its own thread", e))?;
    let stopper = tcp
        .try_clone()
        .map_err(|e| io("moving the channel to its own thread", e))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new()
        .name("ferry-recv".into())
        .spawn(move || {
            let _entered = span.enter();
            // The runtime and everything the receive loop held (the
            // migration's memory, its booking) are gone before the result
            // is sent.
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| io("starting the channel's runtime", e))
                .and_then(|rt| {
                    rt.block_on(async move {
                        let tcp = TcpStream::from_std(tcp)
                            .map_err(|e| io("moving the channel to its own thread", e))?;
                        let stream = match tls {
                            None => Stream::Plain(tcp),
                            Some(mut tls) => {
                                tls.get_mut().0.put_tcp(tcp);
                                Stream::Tls(tls)
                            }
                        };
                        receive_channel(stream, &inbound, &*mem, &counters).await
                    })
                });
            let _ = done_tx.send(r);
        })
        .map_err(|e| io("starting the channel's thread", e))?;
    let mut running = OwnThread {
        stopper,
        thread: Some(thread),
    };
    let r = done_rx.await.unwrap_or_else(|_| {
        Err(TransportError::io(
            "receiving",
            "data channel",
            std::io::Error::other("the channel's thread ended without a result"),
        ))
    });
    // Ended by itself: it holds nothing of the migration any more.
    running.thread = None;
    r
}

/// The thread of [`receive_channel_on_own_thread`] while its future is
/// alive: dropped early, it shuts the socket down and waits for the thread.
struct OwnThread {
    stopper: std::net::TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for OwnThread {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stopper.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
    }
}

/// Reads, checks and lands one frame whose first `first` header bytes are
/// in `head`.
async fn receive_frame<M: GuestMem>(
    stream: &mut Stream,
    head: &mut [u8; wire::HEADER_LEN],
    first: usize,
    inbound: &Inbound,
    mem: &M,
    counters: &RecvCounters,
    bufs: &mut Buffers,
) -> Result<Received> {
    stream
        .read_exact(&mut head[first..])
        .await
        .map_err(|e| TransportError::io("reading a chunk header", "data channel", e))?;
    let (h, kind) = ChunkHeader::decode(head)?;
    let table_len = h.run_count.get() as usize * std::mem::size_of::<RunDesc>();
    read_into(stream, &mut bufs.table, 0, table_len, "the run table").await?;
    let table = bufs.table.get(table_len);
    // Nothing lands before the header and run table are known to be the
    // source's and pass the checks every backend makes.
    let f = match inbound.admit(&h, kind, table, counters)? {
        Checked::End(_) => return Ok(Received::End),
        Checked::Pages(f) => f,
    };
    let (seq, round, payload_len, runs) = (f.seq, f.round, f.payload_len, &f.runs);
    // Nothing lands before every page the chunk names is claimed: no other
    // chunk lands on them meanwhile.
    let mut claim = match claim_runs(mem, runs)? {
        Ok(c) => c,
        Err(busy) => {
            drain(stream, &mut bufs.scratch, payload_len as usize).await?;
            return Ok(Received::Chunk(seq, inbound.busy(&f, busy, counters)));
        }
    };
    let mut tally = Tally::new(&inbound.ledger);
    for r in runs.iter().filter(|r| r.zero) {
        land_zero_run(&mut claim, mem, r, &mut tally)?;
    }
    let touched = prefault(mem, runs, &mut bufs.present);
    counters
        .first_touch_ns
        .fetch_add(touched.as_nanos() as u64, Ordering::Relaxed);
    let decoded = match f.codec {
        None => {
            match stream {
                Stream::Plain(s) => {
                    read_payload(s, &mut claim, mem, runs, payload_len as usize, &mut tally).await?
                }
                Stream::Tls(t) => read_pages(&mut **t, &mut claim, mem, runs, &mut tally).await?,
            }
            true
        }
        Some(codec) => {
            counters.compressed_chunks.fetch_add(1, Ordering::Relaxed);
            let data: Vec<PageRun> = runs.iter().filter(|r| !r.zero).copied().collect();
            let landed = land_streamed(
                stream,
                bufs,
                mem,
                &mut claim,
                seq,
                &data,
                payload_len as usize,
                codec,
                &mut tally,
            )
            .await?;
            match landed {
                Ok(()) => true,
                Err(e) => {
                    // The frame is the source's (its header tag held) but its
                    // payload does not decode: damaged on the way. What
                    // landed is recorded; the pages are asked for again.
                    tracing::warn!(seq, round, "{e}; asking for the chunk again");
                    false
                }
            }
        }
    };
    let sum = tally.sum;
    drop(tally);
    drop(claim);
    let status = inbound.landed(&f, decoded, sum, counters);
    Ok(Received::Chunk(seq, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::MemoryPool;
    use crate::wire::{HEADER_LEN, MAX_CHUNK_PAYLOAD};
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

    const PAGES: u64 = 64;

    fn mem() -> GuestMemoryMmap {
        test_mem(PAGES)
    }

    fn layout() -> MemoryLayout {
        test_layout(PAGES)
    }

    /// Every page a different pattern, pages 8..12 zero.
    fn filled() -> GuestMemoryMmap {
        let m = mem();
        for p in (0..PAGES).filter(|p| !(8..12).contains(p)) {
            let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + p * 13) as u8).collect();
            m.write_slice(&page, GuestAddress(p * PAGE_SIZE)).unwrap();
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

    fn read(src: &GuestMemoryMmap, seq: u64, round: u32, runs: Vec<PageRun>, copy: bool) -> Chunk {
        Chunk::read(
            src,
            &test_page_key(),
            &test_frame_key(),
            seq,
            round,
            runs,
            copy,
        )
        .unwrap()
    }

    /// The frame a plain sender writes for `c`.
    fn frame(c: &Chunk, src: &GuestMemoryMmap) -> Vec<u8> {
        let table = wire::run_table(&c.runs);
        let mut payload = Vec::new();
        copy_runs(src, &c.runs, &mut payload).unwrap();
        let h = ChunkHeader::pages(
            &test_frame_key(),
            c.seq,
            c.round,
            &table,
            payload.len() as u32,
            0,
            c.tag,
        );
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&table);
        out.extend_from_slice(&payload);
        out
    }

    async fn pair(tls: bool) -> (Stream, Stream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        if !tls {
            return (a.into(), b.into());
        }
        let key = crate::auth::AuthKey::new(vec![5; 32]).unwrap();
        let t = crate::tls::TlsConfig::from_psk(&key).unwrap();
        let d = Duration::from_secs(10);
        let (a, b) = tokio::join!(t.connect(a, d), t.accept(b, d));
        (a.unwrap(), b.unwrap())
    }

    /// Writes `frames` (then an end frame) to a receiving channel of
    /// `inbound` over `dst`; returns its result and the acks it sent.
    async fn receive(
        frames: Vec<Vec<u8>>,
        inbound: Arc<Inbound>,
        dst: Arc<GuestMemoryMmap>,
    ) -> (Result<()>, Vec<AckStatus>) {
        let (mut a, b) = pair(false).await;
        let rx = tokio::spawn(async move {
            receive_channel(b, &inbound, &*dst, &RecvCounters::default()).await
        });
        let n = frames.len();
        for f in frames {
            let _ = a.write_all(&f).await;
        }
        let end = ChunkHeader::end(&test_frame_key(), u64::MAX);
        let _ = a.write_all(end.as_bytes()).await;
        let mut acks = Vec::new();
        let mut buf = [0u8; wire::ACK_LEN];
        for _ in 0..n {
            if a.read_exact(&mut buf).await.is_err() {
                break;
            }
            acks.push(AckFrame::decode(&test_frame_key(), &buf).unwrap().1);
        }
        (rx.await.unwrap(), acks)
    }

    fn pages_of(m: &GuestMemoryMmap, first: u64, n: u64) -> Vec<u8> {
        let mut v = vec![0u8; (n * PAGE_SIZE) as usize];
        m.read_slice(&mut v, GuestAddress(first * PAGE_SIZE))
            .unwrap();
        v
    }

    #[test]
    fn prefaulting_the_landing_runs_changes_no_byte() {
        // Pages already landed keep their bytes; untouched pages (zero
        // runs, pages outside every run) stay zero.
        let dst = mem();
        let src = filled();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..4 {
            src.read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            dst.write_slice(&page, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        prefault(
            &dst,
            &[run(0, 16, false), run(20, 2, true), run(30, 4, false)],
            &mut Vec::new(),
        );
        for p in 0..PAGES {
            dst.read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            if p < 4 {
                let mut want = vec![0u8; PAGE_SIZE as usize];
                src.read_slice(&mut want, GuestAddress(p * PAGE_SIZE))
                    .unwrap();
                assert_eq!(page, want, "page {p}");
            } else {
                assert!(page.iter().all(|&b| b == 0), "page {p}");
            }
        }
    }

    /// Sends one chunk per entry of `runs` (chunk `i` with the page pass's
    /// private copy when `copy(i)`), then flushes and ends the channel.
    async fn send_all(
        tx: &mut TcpSender<GuestMemoryMmap>,
        src: &GuestMemoryMmap,
        runs: &[Vec<PageRun>],
        copy: impl Fn(usize) -> bool,
    ) {
        for (i, r) in runs.iter().enumerate() {
            tx.send(read(src, i as u64, 0, r.clone(), copy(i)))
                .await
                .unwrap();
        }
        assert!(tx.flush().await.unwrap().resend.is_empty());
        tx.finish().await.unwrap();
    }

    /// Every page of `runs` is the same on both sides.
    fn assert_same_pages(
        dst: &GuestMemoryMmap,
        src: &GuestMemoryMmap,
        runs: &[Vec<PageRun>],
        tls: bool,
    ) {
        for r in runs.iter().flatten() {
            let (first, n) = (r.gpa / PAGE_SIZE, u64::from(r.pages));
            assert!(
                pages_of(dst, first, n) == pages_of(src, first, n),
                "tls {tls}: pages {first}..+{n} differ"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_and_tls_channels_land_the_same_pages_with_the_source_s_evidence() {
        let src = Arc::new(filled());
        let runs = [
            vec![run(0, 8, false), run(8, 4, true), run(12, 4, false)],
            vec![run(16, 16, false)],
            vec![run(32, 1, false), run(40, 24, false)],
        ];
        let mut evidence = Vec::new();
        for tls in [false, true] {
            let (a, b) = pair(tls).await;
            let dst = Arc::new(mem());
            let inbound = Arc::new(test_inbound(layout(), None));
            let (d, i) = (dst.clone(), inbound.clone());
            let rx =
                tokio::spawn(
                    async move { receive_channel(b, &i, &*d, &RecvCounters::default()).await },
                );
            let mut tx =
                TcpSender::new(a, src.clone(), 0, Duration::from_secs(10), test_frame_key());
            assert_eq!(tx.capabilities().zero_copy, !tls);
            // With the page pass's private copy and without it.
            send_all(&mut tx, &src, &runs, |i| i % 2 == 0).await;
            rx.await.unwrap().unwrap();
            assert_same_pages(&dst, &src, &runs, tls);
            let want = evidence_of(&*src, &runs.concat());
            assert_eq!(inbound.ledger.evidence(), want, "tls {tls}");
            evidence.push(inbound.ledger.evidence());
        }
        assert_eq!(
            evidence[0], evidence[1],
            "the same content, the same evidence"
        );
        assert_ne!(evidence[0], ferry_proto::Evidence::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_on_its_own_thread_lands_pages_and_ends_with_its_task() {
        let src = Arc::new(filled());
        let runs = [
            vec![run(0, 8, false), run(8, 4, true)],
            vec![run(16, 16, false)],
        ];
        for tls in [false, true] {
            let (a, b) = pair(tls).await;
            let dst = Arc::new(mem());
            let inbound = Arc::new(test_inbound(layout(), None));
            let counters = Arc::new(RecvCounters::default());
            let rx = tokio::spawn(receive_channel_on_own_thread(
                b,
                inbound.clone(),
                dst.clone(),
                counters.clone(),
            ));
            let mut tx =
                TcpSender::new(a, src.clone(), 0, Duration::from_secs(10), test_frame_key());
            send_all(&mut tx, &src, &runs, |_| false).await;
            rx.await.unwrap().unwrap();
            assert_same_pages(&dst, &src, &runs, tls);
            assert_eq!(
                inbound.ledger.evidence(),
                evidence_of(&*src, &runs.concat()),
                "tls {tls}"
            );
            // Ended: the thread holds nothing of the migration.
            assert_eq!(Arc::strong_count(&dst), 1, "tls {tls}");
            assert_eq!(Arc::strong_count(&inbound), 1, "tls {tls}");
        }
        // A channel idle between frames, its task aborted (the migration
        // ended otherwise): the socket is shut down and, once the task is
        // gone, so is the thread with the memory and buffers it held. A TLS
        // channel's session is on the thread too (its socket shut down
        // there).
        for tls in [false, true] {
            let (mut a, b) = pair(tls).await;
            let dst = Arc::new(mem());
            let inbound = Arc::new(test_inbound(layout(), None));
            let task = tokio::spawn(receive_channel_on_own_thread(
                b,
                inbound.clone(),
                dst.clone(),
                Arc::new(RecvCounters::default()),
            ));
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                Arc::strong_count(&dst),
                2,
                "tls {tls}: the thread holds the memory"
            );
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
            assert_eq!(Arc::strong_count(&dst), 1, "tls {tls}");
            assert_eq!(Arc::strong_count(&inbound), 1, "tls {tls}");
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(10), a.read(&mut byte))
                .await
                .expect("the peer sees the channel end");
            assert!(matches!(n, Ok(0) | Err(_)), "tls {tls}: {n:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_channel_is_received_on_its_own_thread_with_its_session() {
        // The session (handshake done on the calling runtime) moves to the
        // channel's thread, which then lands every frame.
        let src = Arc::new(filled());
        let runs = [vec![run(0, 8, false)], vec![run(16, 16, false)]];
        let (a, b) = pair(true).await;
        let dst = Arc::new(mem());
        let inbound = Arc::new(test_inbound(layout(), None));
        let mut tx = TcpSender::new(a, src.clone(), 0, Duration::from_secs(10), test_frame_key());
        let threads_before = recv_threads();
        let rx = tokio::spawn(receive_channel_on_own_thread(
            b,
            inbound.clone(),
            dst.clone(),
            Arc::new(RecvCounters::default()),
        ));
        let waited = std::time::Instant::now();
        while recv_threads() <= threads_before {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "no ferry-recv thread for the TLS channel"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send_all(&mut tx, &src, &runs, |_| false).await;
        rx.await.unwrap().unwrap();
        assert_same_pages(&dst, &src, &runs, true);
        assert_eq!(
            inbound.ledger.evidence(),
            evidence_of(&*src, &runs.concat())
        );
        assert_eq!(Arc::strong_count(&dst), 1);
    }

    /// Threads of this process named `ferry-recv`.
    fn recv_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "ferry-recv")
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tampered_header_or_run_table_is_refused_before_anything_lands() {
        let src = filled();
        let c = read(&src, 3, 1, vec![run(4, 2, false), run(20, 1, false)], false);
        let good = frame(&c, &src);
        let tampered: Vec<(&str, Vec<u8>)> = vec![
            ("run address", {
                let mut f = good.clone();
                f[HEADER_LEN + 1] ^= 0x10;
                f
            }),
            ("round", {
                let mut f = good.clone();
                f[16] ^= 0x01;
                f
            }),
            ("payload tag", {
                let mut f = good.clone();
                f[40] ^= 0x01;
                f
            }),
            ("a tag under another key", {
                let (mut h, _) = ChunkHeader::decode(&good).unwrap();
                h.seal(
                    &MacKey::from_bytes([1; 32]),
                    &good[HEADER_LEN..HEADER_LEN + 32],
                );
                let mut f = good.clone();
                f[..HEADER_LEN].copy_from_slice(h.as_bytes());
                f
            }),
        ];
        for (what, f) in tampered {
            let dst = Arc::new(mem());
            let inbound = Arc::new(test_inbound(layout(), None));
            let (r, acks) = receive(vec![f], inbound.clone(), dst.clone()).await;
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("chunk header tag") && e.contains("chunk 3"),
                "{what}: {e}"
            );
            assert!(acks.is_empty(), "{what}");
            assert!(
                pages_of(&dst, 0, PAGES).iter().all(|&b| b == 0),
                "{what}: nothing landed"
            );
            assert_eq!(inbound.ledger.evidence(), ferry_proto::Evidence::default());
        }
        // The untouched frame lands.
        let dst = Arc::new(mem());
        let (r, acks) = receive(
            vec![good],
            Arc::new(test_inbound(layout(), None)),
            dst.clone(),
        )
        .await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Landed]);
        assert!(pages_of(&dst, 4, 2) == pages_of(&src, 4, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tampered_payload_lands_is_recorded_and_answered_mismatch() {
        let src = filled();
        let runs = vec![run(4, 2, false)];
        let c = read(&src, 3, 1, runs.clone(), false);
        let good = frame(&c, &src);
        let mut bad = good.clone();
        bad[HEADER_LEN + 16 + 5000] ^= 0x04;
        let dst = Arc::new(mem());
        let inbound = Arc::new(test_inbound(layout(), None));
        let want = evidence_of(&src, &runs);
        let (r, acks) = receive(vec![bad], inbound.clone(), dst.clone()).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Mismatch], "asked for again");
        // What landed is what the ledger describes: not the source's pages.
        assert_ne!(inbound.ledger.evidence(), want);
        assert_eq!(inbound.ledger.evidence(), evidence_of(&*dst, &runs));
        // The resend lands over it, and the evidence is the source's.
        let (r, acks) = receive(vec![good], inbound.clone(), dst.clone()).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Landed]);
        assert_eq!(inbound.ledger.evidence(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_on_pages_another_landing_holds_is_answered_busy() {
        let src = filled();
        let c = read(&src, 1, 0, vec![run(4, 4, false)], false);
        let dst = Arc::new(mem());
        let inbound = Arc::new(test_inbound(layout(), None));
        let held = dst.get_slice(GuestAddress(6 * PAGE_SIZE), 4096).unwrap();
        let claim = vio::claim(&[held]).unwrap();
        let (r, acks) = receive(vec![frame(&c, &src)], inbound.clone(), dst.clone()).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Busy]);
        assert!(
            pages_of(&dst, 4, 4).iter().all(|&b| b == 0),
            "nothing landed"
        );
        drop(claim);
        let (r, acks) = receive(vec![frame(&c, &src)], inbound, dst.clone()).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Landed]);
        assert!(pages_of(&dst, 4, 4) == pages_of(&src, 4, 4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trickling_frame_is_timed_out_on_its_own_channel_an_idle_one_is_not() {
        let src = filled();
        let c = read(&src, 1, 0, vec![run(0, 1, false)], false);
        let f = frame(&c, &src);
        let deadline = Duration::from_millis(400);
        // Idle before a frame: allowed (longer than the deadline).
        let (mut a, b) = pair(false).await;
        let dst = Arc::new(mem());
        let inbound = Arc::new(test_inbound(layout(), None).with_deadline(deadline));
        let (d, i) = (dst.clone(), inbound.clone());
        let rx =
            tokio::spawn(
                async move { receive_channel(b, &i, &*d, &RecvCounters::default()).await },
            );
        tokio::time::sleep(2 * deadline).await;
        a.write_all(&f).await.unwrap();
        let mut ack = [0u8; wire::ACK_LEN];
        a.read_exact(&mut ack).await.unwrap();
        assert_eq!(
            AckFrame::decode(&test_frame_key(), &ack).unwrap(),
            (1, AckStatus::Landed)
        );
        // A frame that has begun and then trickles: closed at its deadline.
        let started = std::time::Instant::now();
        let trickle = async {
            for b in &f[..200] {
                if a.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (r, ()) = tokio::join!(rx, trickle);
        let e = r.unwrap().unwrap_err().to_string();
        assert!(e.contains("per-frame deadline"), "{e}");
        assert!(
            started.elapsed() < 200 * Duration::from_millis(50),
            "closed before the trickle ended"
        );
    }

    /// A channel whose buffers are booked on a pool of `limit` bytes beyond
    /// the guest's, receiving `frames` (bytes written as they are); returns
    /// the pool, the channel's result and its acks.
    async fn budgeted(
        extra: u64,
        writes: Vec<(Vec<u8>, Duration)>,
    ) -> (Arc<MemoryPool>, Result<()>, Vec<AckStatus>, u64) {
        let base = PAGES * PAGE_SIZE;
        let pool = MemoryPool::new(base + extra);
        let reservation = Arc::new(pool.reserve(base + extra).unwrap());
        let budgets = crate::reservation::ChannelBudgets::new(reservation, extra, 1);
        let inbound = Arc::new(
            test_inbound(layout(), Some(Codec::Zstd))
                .with_buffers(budgets.clone())
                .with_deadline(Duration::from_secs(20)),
        );
        let (mut a, b) = pair(false).await;
        let dst = Arc::new(mem());
        let rx = tokio::spawn(async move {
            receive_channel(b, &inbound, &*dst, &RecvCounters::default()).await
        });
        let mut peak = 0;
        for (w, pause) in writes {
            if a.write_all(&w).await.is_err() {
                break;
            }
            tokio::time::sleep(pause).await;
            peak = peak.max(budgets.buffered());
        }
        let _ = a
            .write_all(ChunkHeader::end(&test_frame_key(), u64::MAX).as_bytes())
            .await;
        let mut acks = Vec::new();
        let mut buf = [0u8; wire::ACK_LEN];
        while a.read_exact(&mut buf).await.is_ok() {
            acks.push(AckFrame::decode(&test_frame_key(), &buf).unwrap().1);
        }
        let r = rx.await.unwrap();
        drop(budgets);
        (pool, r, acks, peak)
    }

    /// Header and run table of a compressed frame announcing `payload` bytes
    /// for the whole guest (64 pages).
    fn announcing(payload: u32) -> Vec<u8> {
        let table = wire::run_table(&[run(0, PAGES as u32, false)]);
        let h = ChunkHeader::pages(
            &test_frame_key(),
            1,
            0,
            &table,
            payload,
            wire::FLAG_COMPRESSED,
            [0; 16],
        );
        let mut f = h.as_bytes().to_vec();
        f.extend_from_slice(&table);
        f
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receive_buffers_grow_as_bytes_arrive_and_stay_within_the_reservation() {
        let limit = channel_buffers(true);
        // A frame announcing a 16 MiB compressed payload, then trickling:
        // nothing near 16 MiB is allocated, only what arrived needs.
        let mut writes = vec![(announcing(MAX_CHUNK_PAYLOAD), Duration::ZERO)];
        writes.extend((0..5).map(|_| (vec![0u8; 100], Duration::from_millis(40))));
        // Then the 16 MiB really arrive (junk: the sub-header does not
        // decode): read and dropped a step at a time, answered Mismatch.
        writes.push((
            vec![0u8; MAX_CHUNK_PAYLOAD as usize - 500],
            Duration::from_millis(50),
        ));
        let (pool, r, acks, peak) = budgeted(limit, writes).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Mismatch]);
        assert!(peak <= limit, "{peak} bytes booked, at most {limit}");
        assert!(
            peak <= 2 * RECV_STEP as u64,
            "only what the junk needed: {peak}"
        );
        assert_eq!(
            pool.used(),
            0,
            "given back when the channel (and its migration) ended"
        );

        // A real compressed frame lands through one segment buffer.
        let src = filled();
        let c = read(&src, 2, 0, vec![run(0, PAGES as u32, false)], true);
        let mut enc = crate::codec::Encoder::new(crate::wire::CompressionSpec {
            codec: Codec::Zstd,
            level: 1,
        })
        .unwrap();
        let mut buf = Vec::new();
        let n = crate::codec::encode_frame(
            &mut enc,
            &test_frame_key(),
            &c,
            c.data.as_ref().unwrap(),
            &mut buf,
        )
        .unwrap()
        .expect("patterned pages compress");
        buf.truncate(n);
        let (_, r, acks, peak) =
            budgeted(limit, vec![(buf.clone(), Duration::from_millis(50))]).await;
        r.unwrap();
        assert_eq!(acks, [AckStatus::Landed]);
        assert!(peak <= limit, "{peak}");

        // A reservation too small for the buffers: refused, naming them.
        let (pool, r, acks, _) = budgeted(8, vec![(buf, Duration::ZERO)]).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("receive buffers"), "{e}");
        assert!(acks.is_empty());
        assert_eq!(pool.used(), 0);
    }
}
