//! `ferry relay` (issue 13): a hypervisor's own migration connections
//! (QEMU's main channel and each multifd channel) carried as ordered byte
//! streams over Ferry's data channels, striped over every NIC pair,
//! compressed per chunk when that is on, TLS unless `--plaintext`, resent on
//! a surviving channel when one fails. See `docs/relay.md`.
//!
//! The rules (windows, reassembly, the open order, the end) are the pure
//! state machines of [`ferry_proto::relay`]; this module is the IO around
//! them, one [`Engine`] for either side:
//!
//! * per hypervisor connection, a reader that reads only while its
//!   direction has credit and cuts chunks, and a writer that writes the
//!   reassembled prefix and reports credit;
//! * per data channel, a writer that takes the next chunk of any stream
//!   from one shared queue (so a faster channel takes more) and a reader
//!   that checks each chunk (header tag, then the payload's keyed digest)
//!   before placing it, and acks it;
//! * the control loop: `Open`/`Opened`, `Credit`, `Fin`, `RelayEnd`, `Abort`.
//!
//! On any failure every hypervisor connection is reset (`SO_LINGER` 0), so
//! neither hypervisor can take a cut stream for a finished one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::control::{Msg, PerformanceOption, RejectReason};
use ferry_proto::relay::{
    Dir, Placed, Reassembly, RelayAck, RelayError, RelayKeys, RelayOffer, SendWindow, StreamChunk,
    StreamDigest, Streams, ACK_LEN, ACK_MAGIC, CHUNK_HEADER_LEN, CHUNK_MAGIC,
};
use ferry_proto::wire::{Codec, CompressionSpec};
use ferry_transport::codec::{compress_pieces, Decoder, Encoder};
use ferry_transport::compress::{
    probe_incompressible, Backoff, LinkProbe, MIN_SAVING_DIVISOR, WORKER_NICE,
};
use ferry_transport::conn::{Conn, ConnWriter};
use ferry_transport::ratelimit::RateLimiter;
use ferry_transport::reservation::Reservation;
use ferry_transport::stream::Stream;
use ferry_transport::TransportError;
use serde::Serialize;
use std::io::IoSlice;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

pub use ferry_proto::relay::{DEFAULT_MAX_STREAMS, DEFAULT_WINDOW, MAX_STREAM_CHUNK};

/// Why a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayFailure {
    /// Setting up: flags, connecting, the handshake, the offer.
    #[error(transparent)]
    Setup(#[from] crate::error::MigrationError),
    /// The control connection or the transport.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer broke the relay's rules, a digest did not match, or a
    /// stream did not fit the destination's memory limit.
    #[error("{}", match .0 {
        RelayError::MemoryLimit { .. } => .0.to_string(),
        e => format!("relay protocol: {e}"),
    })]
    Protocol(#[from] RelayError),
    /// A hypervisor connection failed (reset, or closed with bytes left).
    #[error("{0}")]
    Hypervisor(String),
    /// The other relay side gave up.
    #[error("the other side aborted the relay: {0}")]
    PeerAborted(String),
}

impl RelayFailure {
    /// A short label (metrics, `--json`).
    pub fn reason(&self) -> String {
        match self {
            RelayFailure::Setup(e) => return e.reason(),
            RelayFailure::Transport(TransportError::NoChannelLeft { .. }) => "channels_lost",
            RelayFailure::Transport(TransportError::Rejected {
                reason: RejectReason::RelayNotAllowed,
                ..
            }) => "relay_not_allowed",
            RelayFailure::Transport(TransportError::Rejected { .. }) => "rejected",
            RelayFailure::Transport(_) => "transport",
            RelayFailure::Protocol(RelayError::Mismatch { .. }) => "digest",
            RelayFailure::Protocol(RelayError::MemoryLimit { .. }) => "memory_limit",
            RelayFailure::Protocol(_) => "protocol",
            RelayFailure::Hypervisor(_) => "hypervisor",
            RelayFailure::PeerAborted(_) => "peer_aborted",
        }
        .into()
    }

    /// As the destination daemon reports failures.
    pub fn into_migration_error(self) -> crate::error::MigrationError {
        use crate::error::MigrationError;
        match self {
            RelayFailure::Setup(e) => e,
            RelayFailure::Transport(t) => t.into(),
            RelayFailure::Protocol(RelayError::Wire(w)) => TransportError::from(w).into(),
            RelayFailure::Protocol(e @ RelayError::MemoryLimit { .. }) => {
                TransportError::Rejected {
                    reason: RejectReason::MemoryLimit,
                    message: e.to_string(),
                }
                .into()
            }
            RelayFailure::PeerAborted(why) => TransportError::PeerAborted(why).into(),
            e => MigrationError::Guest(format!("relay: {e}")),
        }
    }
}

/// Result of the relay's functions.
pub type Result<T, E = RelayFailure> = std::result::Result<T, E>;

/// Which end of the relay this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// `ferry relay`: accepts the hypervisor's connections.
    Source,
    /// `ferry listen`: opens them to `--deliver-to`.
    Destination,
}

impl Side {
    fn out_dir(self) -> Dir {
        match self {
            Side::Source => Dir::Forward,
            Side::Destination => Dir::Back,
        }
    }
    fn in_dir(self) -> Dir {
        match self {
            Side::Source => Dir::Back,
            Side::Destination => Dir::Forward,
        }
    }
}

/// One stream as reported at the end.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    /// Stream id (accept order at the source).
    pub stream: u32,
    /// What the first bytes say it is (`main`, `multifd N`, `other`).
    pub label: String,
    /// Bytes source -> destination.
    pub forward_bytes: u64,
    /// Bytes destination -> source.
    pub back_bytes: u64,
    /// Chunks this side cut from its hypervisor's bytes and sent.
    pub chunks_sent: u64,
    /// Chunks this side received and placed (duplicates not counted).
    pub chunks_received: u64,
    /// Chunks received twice (a resend after a failover) and dropped.
    pub duplicates_dropped: u64,
    /// Chunks of this stream sent again after their data channel failed.
    pub chunks_resent: u64,
    /// Seconds the reader waited for its hypervisor to write (the
    /// hypervisor is what sets the pace).
    pub waited_for_hypervisor_s: f64,
    /// Seconds the reader waited for credit: the window was full (the
    /// peer, the links or its hypervisor set the pace; a larger `--window`
    /// may help when the links are idle meanwhile).
    pub waited_for_window_s: f64,
    /// Seconds the writer waited for its hypervisor to take bytes (the
    /// receiving hypervisor sets the pace).
    pub waited_to_deliver_s: f64,
    /// With compression: chunks sent compressed.
    pub chunks_compressed: u64,
    /// With compression: chunks tried that did not shrink by an eighth.
    pub chunks_raw_incompressible: u64,
    /// With compression: chunks sent raw untried after one of the stream's
    /// did not shrink.
    pub chunks_raw_skipped: u64,
    /// With compression: chunks sent raw untried because their channel was
    /// about to go idle (compressing would have cost CPU, not saved time).
    pub chunks_raw_link_idle: u64,
    /// With compression, while the host's CPUs were busy: chunks sent raw
    /// because a sample of them shrank, but less than 2.5 times (the CPU
    /// they would cost was worth more than the link time they would save).
    pub chunks_raw_low_yield: u64,
}

/// Counters of one stream, kept by its pumps and data channels.
#[derive(Debug, Default)]
struct StreamMetrics {
    /// Stream id.
    id: u32,
    /// Bytes read from this side's hypervisor or delivered to it, by
    /// direction (forward, back).
    bytes: [AtomicU64; 2],
    /// Both directions done (its buffers given back).
    done: AtomicBool,
    chunks_sent: AtomicU64,
    chunks_received: AtomicU64,
    duplicates: AtomicU64,
    resent: AtomicU64,
    wait_hypervisor_ns: AtomicU64,
    wait_window_ns: AtomicU64,
    wait_deliver_ns: AtomicU64,
    compressed: AtomicU64,
    raw_incompressible: AtomicU64,
    raw_skipped: AtomicU64,
    raw_link_idle: AtomicU64,
    raw_low_yield: AtomicU64,
    /// The stream's chunks that did not shrink: how many to send raw
    /// untried, whether to sample first (the page path's back-off).
    backoff: Mutex<Backoff>,
}

impl StreamMetrics {
    fn bytes(&self, dir: Dir) -> &AtomicU64 {
        &self.bytes[usize::from(dir.id())]
    }
}

/// A relay's streams as they go, for the destination daemon's `--metrics`
/// ([`crate::metrics::Metrics::track_relay`]): shared with the engine,
/// which adds each stream as it opens.
#[derive(Debug, Default)]
pub struct RelayLive {
    streams: Mutex<Vec<Arc<StreamMetrics>>>,
}

/// One stream's figures so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamSample {
    /// Stream id (0: the hypervisor's first connection, QEMU's main channel).
    pub stream: u32,
    /// Bytes source -> destination this side read or delivered.
    pub forward_bytes: u64,
    /// Bytes destination -> source this side read or delivered.
    pub back_bytes: u64,
    /// Seconds this side waited for its hypervisor to write.
    pub waited_for_hypervisor_s: f64,
    /// Seconds this side waited for the peer's credit (window full).
    pub waited_for_window_s: f64,
    /// Seconds this side waited for its hypervisor to read.
    pub waited_to_deliver_s: f64,
    /// Not done yet (its buffers booked).
    pub open: bool,
}

impl RelayLive {
    /// Every stream opened so far.
    pub fn streams(&self) -> Vec<StreamSample> {
        self.streams
            .lock()
            .expect("streams")
            .iter()
            .map(|m| StreamSample {
                stream: m.id,
                forward_bytes: m.bytes(Dir::Forward).load(Ordering::Relaxed),
                back_bytes: m.bytes(Dir::Back).load(Ordering::Relaxed),
                waited_for_hypervisor_s: secs(&m.wait_hypervisor_ns),
                waited_for_window_s: secs(&m.wait_window_ns),
                waited_to_deliver_s: secs(&m.wait_deliver_ns),
                open: !m.done.load(Ordering::Relaxed),
            })
            .collect()
    }
}

fn add_elapsed(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

fn secs(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64 / 1e9
}

/// One data channel as reported at the end.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelReport {
    /// The channel's path (local -> remote).
    pub path: String,
    /// Chunks sent on it (first sends and resends).
    pub chunks_sent: u64,
    /// Bytes sent on it (headers and payload).
    pub bytes_sent: u64,
    /// Why it failed, if it did.
    pub failed: Option<String>,
}

/// What a relay did.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    /// Which side.
    pub side: Side,
    /// Every stream.
    pub streams: Vec<StreamReport>,
    /// Every data channel.
    pub channels: Vec<ChannelReport>,
    /// Stream bytes carried each way together.
    pub stream_bytes: u64,
    /// Bytes written on the data channels (headers, payload, acks).
    pub wire_bytes: u64,
    /// Chunks sent again after a channel failed.
    pub resent_chunks: u64,
    /// From the first stream to the end, seconds.
    pub seconds: f64,
    /// Transport.
    pub option: String,
    /// Whether the data channels are TLS.
    pub encrypted: bool,
}

/// Settings of the relay engine shared by both sides.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Which side.
    pub side: Side,
    /// Window of each stream direction.
    pub window: u32,
    /// Largest chunk.
    pub chunk: u32,
    /// Most streams.
    pub max_streams: u32,
    /// Per-chunk compression, when on.
    pub compression: Option<CompressionSpec>,
    /// `--bandwidth-limit`, bytes per second of the data channels together.
    pub bandwidth_limit: Option<u64>,
    /// A data channel with chunks in flight and no ack for this long fails over.
    pub channel_timeout: Duration,
    /// No message on the control connection for this long fails the relay
    /// (the source pings, the destination answers, at least every second).
    pub peer_timeout: Duration,
    /// Whether the data channels are TLS.
    pub encrypted: bool,
}

impl EngineConfig {
    /// From a relay offer (the destination's view); the peer timeout starts
    /// as `channel_timeout` (the daemon's `--peer-timeout` is both).
    pub fn from_offer(
        o: &RelayOffer,
        side: Side,
        encrypted: bool,
        channel_timeout: Duration,
    ) -> Self {
        EngineConfig {
            side,
            window: o.window,
            chunk: o.chunk,
            max_streams: o.max_streams,
            compression: match o.option {
                PerformanceOption::Compression { codec, level } => Codec::from_id(codec)
                    .ok()
                    .map(|codec| CompressionSpec { codec, level }),
                _ => None,
            },
            bandwidth_limit: None,
            channel_timeout,
            peer_timeout: channel_timeout,
            encrypted,
        }
    }
}

/// Something a task tells the control loop.
#[derive(Debug)]
enum Event {
    /// The relay cannot go on.
    Fail(RelayFailure),
    /// A direction of a stream was delivered to our hypervisor and checked:
    /// `delivered` bytes in all. The control loop records it, and only
    /// then tells the peer (the final `Credit`), so that no message the
    /// peer sends on learning it (`RelayEnd`) can reach a control loop
    /// that does not know it yet.
    InDone { stream: u32, delivered: u64 },
    /// A destination connect finished.
    Connected(u32, std::io::Result<TcpStream>),
}

/// A chunk of stream bytes waiting for a data channel (kept until acked).
#[derive(Debug)]
struct OutChunk {
    stream: u32,
    dir: Dir,
    offset: u64,
    seq: u64,
    data: Vec<u8>,
    /// Where `data` goes back once the last copy is dropped (acked).
    pool: Option<Arc<ChunkBufs>>,
}

impl Drop for OutChunk {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.give(std::mem::take(&mut self.data));
        }
    }
}

/// Chunk buffers given back once their bytes were acked (sender) or
/// written into the hypervisor (receiver), for the next chunk's socket
/// read. A new chunk-sized buffer per chunk costs the kernel a page fault
/// and a page zeroed for every page the read lands in (about a tenth of
/// the relay's CPU under `perf`). It keeps at most `max` buffers, and as
/// it hands them out before it allocates, the relay never holds more
/// buffers than it had in use at once: the windows bound it as before.
#[derive(Debug)]
struct ChunkBufs {
    /// The capacity of every buffer kept (one chunk).
    chunk: usize,
    /// At most a window of chunks (and 8), idle.
    bufs: Arc<ferry_transport::BufPool>,
}

impl ChunkBufs {
    fn new(chunk: u32, window: u32) -> Self {
        ChunkBufs {
            chunk: chunk as usize,
            bufs: ferry_transport::BufPool::new((window / chunk.max(1)).max(8) as usize),
        }
    }

    /// An empty buffer with room for exactly one chunk.
    fn take(&self) -> Vec<u8> {
        self.bufs.take_vec(self.chunk)
    }

    /// Keeps a chunk's buffer (other sizes are dropped).
    fn give(&self, b: Vec<u8>) {
        if b.capacity() == self.chunk {
            self.bufs.give(b);
        }
    }
}

/// One direction pair of one stream.
struct StreamSlot {
    id: u32,
    inner: Mutex<StreamInner>,
    /// The reader waits here for credit.
    credit: Notify,
    /// The writer waits here for bytes.
    data: Notify,
    /// The hypervisor connection, once there (reset on failure).
    sock: Mutex<Option<Arc<TcpStream>>>,
    metrics: Arc<StreamMetrics>,
    /// The destination's booking of this stream's buffers, given back when
    /// both directions are done.
    booking: Mutex<Option<StreamBooking>>,
}

/// The destination's buffers of a relay's streams, booked against its
/// `--memory-limit` as streams open (two windows each) and given back as
/// they end. The relay's admission booked the first stream's already.
#[derive(Debug)]
pub struct StreamBudget {
    reservation: Arc<Reservation>,
    per_stream: u64,
    prebooked: AtomicU32,
}

impl StreamBudget {
    /// Streams of `per_stream` bytes each on `reservation`, of which the
    /// first `prebooked` are part of it already.
    pub fn new(reservation: Arc<Reservation>, per_stream: u64, prebooked: u32) -> Self {
        StreamBudget {
            reservation,
            per_stream,
            prebooked: AtomicU32::new(prebooked),
        }
    }

    /// Books one stream's buffers, or refuses it naming the limit.
    fn book(&self, stream: u32) -> std::result::Result<StreamBooking, RelayError> {
        let prebooked = self
            .prebooked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !prebooked {
            self.reservation
                .grow(self.per_stream, "relay stream buffers")
                .map_err(|e| match e {
                    TransportError::Wire(ferry_proto::WireError::TooLarge {
                        len, limit, ..
                    }) => RelayError::MemoryLimit {
                        stream,
                        needs: self.per_stream,
                        used: len.saturating_sub(self.per_stream),
                        limit,
                    },
                    e => RelayError::Wire(ferry_proto::WireError::Invalid {
                        field: "relay stream buffers",
                        detail: e.to_string(),
                    }),
                })?;
        }
        Ok(StreamBooking {
            reservation: self.reservation.clone(),
            bytes: self.per_stream,
        })
    }
}

/// One stream's booked buffers; given back when dropped.
#[derive(Debug)]
struct StreamBooking {
    reservation: Arc<Reservation>,
    bytes: u64,
}

impl Drop for StreamBooking {
    fn drop(&mut self) {
        self.reservation.shrink(self.bytes);
    }
}

struct StreamInner {
    send: SendWindow,
    digest: StreamDigest,
    recv: Reassembly,
    label: Option<String>,
}

struct Channel {
    path: String,
    unacked: Mutex<HashMap<u64, Arc<OutChunk>>>,
    last_progress: Mutex<Instant>,
    chunks_sent: AtomicU64,
    bytes_sent: AtomicU64,
    failed: Mutex<Option<String>>,
}

struct Shared {
    cfg: EngineConfig,
    keys: RelayKeys,
    /// The destination's bookings of stream buffers (`None` at the source).
    budget: Option<StreamBudget>,
    /// The streams' counters as they go (`--metrics`).
    live: Arc<RelayLive>,
    /// Compression workers, when compression is on.
    squeezers: Option<Squeezers>,
    /// The host's CPUs were busy when last sampled (see [`watch_host_cpu`]):
    /// compress only what pays most for its CPU.
    cpu_busy: AtomicBool,
    /// Chunk buffers for reuse.
    pool: Arc<ChunkBufs>,
    streams: Mutex<Vec<Arc<StreamSlot>>>,
    queue_tx: mpsc::UnboundedSender<Arc<OutChunk>>,
    queue_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Arc<OutChunk>>>,
    ctl: mpsc::UnboundedSender<Msg>,
    events: mpsc::UnboundedSender<Event>,
    seq: AtomicU64,
    limiter: Option<RateLimiter>,
    channels_alive: AtomicUsize,
    wire_bytes: AtomicU64,
    resent: AtomicU64,
    failed: AtomicBool,
    /// Every stream is done: `RelayEnd` sent or received.
    ending: AtomicBool,
    /// Tests: holds each delivered end before the control loop hears of it.
    #[cfg(test)]
    in_done_gate: Option<Arc<tests::Gate>>,
}

impl Shared {
    fn fail(&self, f: RelayFailure) {
        let _ = self.events.send(Event::Fail(f));
    }

    /// Both directions of `stream` are done: its buffers go back.
    fn release(&self, stream: u32) {
        let slot = self
            .streams
            .lock()
            .expect("streams")
            .get(stream as usize)
            .cloned();
        let Some(slot) = slot else { return };
        slot.metrics.done.store(true, Ordering::Relaxed);
        let booking = slot.booking.lock().expect("booking").take();
        if let Some(b) = booking {
            tracing::debug!(
                stream,
                bytes = b.bytes,
                "stream done: its buffers given back"
            );
        }
    }

    /// The slot of `stream`, created on first use (a chunk may arrive
    /// before its `Open`; streams open in order, so the ones below it are
    /// created too). At the destination, creating a slot books the
    /// stream's buffers: refused when they do not fit `--memory-limit`.
    fn slot(&self, stream: u32) -> std::result::Result<Arc<StreamSlot>, RelayError> {
        let mut all = self.streams.lock().expect("streams");
        if stream >= self.cfg.max_streams {
            return Err(RelayError::TooManyStreams {
                stream,
                max: self.cfg.max_streams,
            });
        }
        while all.len() <= stream as usize {
            let id = all.len() as u32;
            let booking = match &self.budget {
                Some(b) => Some(b.book(id)?),
                None => None,
            };
            let metrics = Arc::new(StreamMetrics {
                id,
                ..Default::default()
            });
            self.live
                .streams
                .lock()
                .expect("streams")
                .push(metrics.clone());
            all.push(Arc::new(StreamSlot {
                id,
                inner: Mutex::new(StreamInner {
                    send: SendWindow::new(self.cfg.window),
                    digest: self.keys.stream_digest(id, self.cfg.side.out_dir()),
                    recv: Reassembly::new(
                        self.cfg.window,
                        self.keys.stream_digest(id, self.cfg.side.in_dir()),
                    ),
                    label: None,
                }),
                credit: Notify::new(),
                data: Notify::new(),
                sock: Mutex::new(None),
                metrics: metrics.clone(),
                booking: Mutex::new(booking),
            }));
        }
        Ok(all[stream as usize].clone())
    }
}

/// What the first bytes of a QEMU migration connection say it is.
fn label(first: &[u8]) -> String {
    if first.starts_with(b"QEVM") {
        "main".into()
    } else if first.len() >= 25 && first[..4] == [0x11, 0x22, 0x33, 0x44] {
        format!("multifd {}", first[24])
    } else {
        "other".into()
    }
}

/// Reads the hypervisor's bytes of one stream while there is credit.
async fn pump_out(sh: Arc<Shared>, slot: Arc<StreamSlot>, sock: Arc<TcpStream>) {
    let dir = sh.cfg.side.out_dir();
    let m = &slot.metrics;
    loop {
        let credit = loop {
            let c = slot.inner.lock().expect("stream").send.credit();
            if c > 0 {
                break c;
            }
            let since = Instant::now();
            slot.credit.notified().await;
            add_elapsed(&m.wait_window_ns, since);
        };
        // The chunk's own buffer, read into straight from the socket: it is
        // what travels and what is kept for a resend until the ack.
        let chunk = sh.cfg.chunk as usize;
        let mut data = if credit as usize >= chunk {
            sh.pool.take()
        } else {
            Vec::with_capacity(credit as usize)
        };
        let since = Instant::now();
        let n = loop {
            if let Err(e) = sock.readable().await {
                return sh.fail(RelayFailure::Hypervisor(format!(
                    "stream {}: reading from the hypervisor: {e}",
                    slot.id
                )));
            }
            match sock.try_read_buf(&mut data) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return sh.fail(RelayFailure::Hypervisor(format!(
                        "stream {} ({dir}): the hypervisor's connection failed: {e}",
                        slot.id
                    )))
                }
            }
        };
        add_elapsed(&m.wait_hypervisor_ns, since);
        if n == 0 {
            let (length, digest) = {
                let mut i = slot.inner.lock().expect("stream");
                (i.send.on_eof(), i.digest.finish(&sh.keys))
            };
            tracing::debug!(stream = slot.id, %dir, length, "hypervisor closed its side: Fin");
            let _ = sh.ctl.send(Msg::Fin {
                stream: slot.id,
                dir,
                length,
                digest,
            });
            return;
        }
        if data.capacity() > 2 * n {
            // A short read (the return path's 8-byte messages) keeps only
            // what it holds while it waits for its ack.
            let short = data[..n].to_vec();
            sh.pool.give(std::mem::replace(&mut data, short));
        }
        m.bytes(dir).fetch_add(n as u64, Ordering::Relaxed);
        let offset = {
            let mut i = slot.inner.lock().expect("stream");
            i.digest.update(&data);
            if i.label.is_none() && sh.cfg.side == Side::Source {
                i.label = Some(label(&data));
            }
            i.send.on_read(n)
        };
        let seq = sh.seq.fetch_add(1, Ordering::Relaxed);
        m.chunks_sent.fetch_add(1, Ordering::Relaxed);
        let _ = sh.queue_tx.send(Arc::new(OutChunk {
            stream: slot.id,
            dir,
            offset,
            seq,
            data,
            pool: Some(sh.pool.clone()),
        }));
    }
}

enum Step {
    Write(Vec<u8>),
    End,
    Wait,
}

/// Writes the reassembled bytes of one stream into the hypervisor's
/// connection, reports credit, and passes the end on once it checked.
async fn pump_in(
    sh: Arc<Shared>,
    slot: Arc<StreamSlot>,
    sock: Arc<TcpStream>,
    shut: std::net::TcpStream,
) {
    let dir = sh.cfg.side.in_dir();
    loop {
        let step = {
            let mut i = slot.inner.lock().expect("stream");
            match i.recv.pop() {
                Some(b) => Step::Write(b),
                None => match i.recv.end(&sh.keys, slot.id, dir) {
                    Ok(true) => Step::End,
                    Ok(false) => Step::Wait,
                    Err(e) => return sh.fail(e.into()),
                },
            }
        };
        match step {
            Step::Wait => slot.data.notified().await,
            Step::Write(b) => {
                let mut done = 0;
                while done < b.len() {
                    let r = match sock.try_write(&b[done..]) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            let since = Instant::now();
                            let w = sock.writable().await;
                            add_elapsed(&slot.metrics.wait_deliver_ns, since);
                            match w {
                                Ok(()) => continue,
                                Err(e) => Err(e),
                            }
                        }
                        r => r,
                    };
                    match r {
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            return sh.fail(RelayFailure::Hypervisor(format!(
                                "stream {} ({dir}): writing to the hypervisor failed with bytes undelivered: {e}",
                                slot.id
                            )));
                        }
                    }
                }
                slot.metrics
                    .bytes(dir)
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                let credit = {
                    let mut i = slot.inner.lock().expect("stream");
                    i.recv.on_written(b.len());
                    if i.label.is_none() && sh.cfg.side == Side::Destination {
                        i.label = Some(label(&b));
                    }
                    i.recv.credit_due()
                };
                sh.pool.give(b);
                if let Some(delivered) = credit {
                    let _ = sh.ctl.send(Msg::Credit {
                        stream: slot.id,
                        dir,
                        delivered,
                        finished: false,
                    });
                }
            }
            Step::End => {
                // Nothing left to deliver: a hypervisor that already closed
                // its socket is not an error here.
                let _ = shut.shutdown(std::net::Shutdown::Write);
                let delivered = slot.inner.lock().expect("stream").recv.delivered();
                tracing::debug!(stream = slot.id, %dir, delivered, "end delivered and checked");
                #[cfg(test)]
                if let Some(g) = &sh.in_done_gate {
                    g.pass().await;
                }
                // The final credit goes from the control loop, after it
                // recorded the end (see `Event::InDone`).
                let _ = sh.events.send(Event::InDone {
                    stream: slot.id,
                    delivered,
                });
                return;
            }
        }
    }
}

/// Takes the next chunk of any stream.
async fn next_chunk(sh: &Shared) -> Option<Arc<OutChunk>> {
    sh.queue_rx.lock().await.recv().await
}

async fn channel_writer(
    sh: Arc<Shared>,
    ch: Arc<Channel>,
    mut wr: WriteHalf<Stream>,
    mut acks: mpsc::UnboundedReceiver<u64>,
    fd: Option<OwnedFd>,
) -> std::result::Result<(), String> {
    let mut scratch = Vec::new();
    let mut ack_buf = Vec::new();
    // The page path's probe: is this link about to go idle?
    let mut link = LinkProbe::new(fd);
    loop {
        tokio::select! {
            biased;
            a = acks.recv() => {
                let Some(seq) = a else { return Ok(()) };
                ack_buf.clear();
                ack_buf.extend_from_slice(&RelayAck { seq }.encode(&sh.keys));
                while let Ok(seq) = acks.try_recv() {
                    ack_buf.extend_from_slice(&RelayAck { seq }.encode(&sh.keys));
                }
                wr.write_all(&ack_buf).await.map_err(|e| format!("sending acks: {e}"))?;
                wr.flush().await.map_err(|e| format!("sending acks: {e}"))?;
                link.wrote(ack_buf.len() as u64);
                sh.wire_bytes.fetch_add(ack_buf.len() as u64, Ordering::Relaxed);
            }
            c = next_chunk(&sh) => {
                let Some(c) = c else { return Ok(()) };
                {
                    let mut u = ch.unacked.lock().expect("unacked");
                    if u.is_empty() {
                        *ch.last_progress.lock().expect("progress") = Instant::now();
                    }
                    u.insert(c.seq, c.clone());
                }
                let raw_len = c.data.len() as u32;
                let mut codec = 0u8;
                let mut payload: &[u8] = &c.data;
                let mut compressed = None;
                if let (Some(workers), Some(spec)) = (&sh.squeezers, sh.cfg.compression) {
                    let m = sh.slot(c.stream).ok();
                    let m = m.as_ref().map(|s| &s.metrics);
                    let count = |f: fn(&StreamMetrics) -> &AtomicU64| {
                        if let Some(m) = m {
                            f(m).fetch_add(1, Ordering::Relaxed);
                        }
                    };
                    let backoff = |f: fn(&mut Backoff) -> bool, or: bool| {
                        m.map_or(or, |m| f(&mut m.backoff.lock().expect("backoff")))
                    };
                    let learned = |shrank: bool| {
                        if let Some(m) = m {
                            m.backoff.lock().expect("backoff").learned(shrank);
                        }
                    };
                    if link.about_to_idle(sh.limiter.as_ref()) {
                        count(|m| &m.raw_link_idle);
                    } else if !backoff(Backoff::try_next, true) {
                        count(|m| &m.raw_skipped);
                    } else {
                        // On a niced worker: the link has a backlog, so the
                        // wait costs no link time, and the hypervisors and
                        // this runtime's IO win the CPU meanwhile.
                        let sample_first = backoff(|b| b.sample_first(), false);
                        let gate = sh.cpu_busy.load(Ordering::Relaxed);
                        let buf = std::mem::take(&mut scratch);
                        match workers.squeeze(c.clone(), sample_first, gate, buf).await {
                            Some((buf, Squeezed::Shrank(n))) => {
                                scratch = buf;
                                codec = spec.codec.id();
                                compressed = Some(n);
                                count(|m| &m.compressed);
                                learned(true);
                            }
                            Some((buf, Squeezed::NoGain)) => {
                                scratch = buf;
                                count(|m| &m.raw_incompressible);
                                learned(false);
                            }
                            // It shrinks: no back-off, only not worth the
                            // CPU while the host has none to spare.
                            Some((buf, Squeezed::LowYield)) => {
                                scratch = buf;
                                count(|m| &m.raw_low_yield);
                            }
                            // The workers are gone: the relay is ending.
                            None => count(|m| &m.raw_incompressible),
                        }
                    }
                }
                if let Some(n) = compressed {
                    payload = &scratch[..n];
                }
                let header = StreamChunk {
                    stream: c.stream,
                    dir: c.dir,
                    offset: c.offset,
                    raw_len,
                    wire_len: payload.len() as u32,
                    codec,
                    seq: c.seq,
                    digest: sh.keys.chunk_digest(&c.data),
                }
                .encode(&sh.keys);
                let total = (header.len() + payload.len()) as u64;
                if let Some(l) = &sh.limiter {
                    l.acquire(total).await;
                }
                write_both(&mut wr, &header, payload).await.map_err(|e| format!("sending a chunk: {e}"))?;
                wr.flush().await.map_err(|e| format!("sending a chunk: {e}"))?;
                link.wrote(total);
                ch.chunks_sent.fetch_add(1, Ordering::Relaxed);
                ch.bytes_sent.fetch_add(total, Ordering::Relaxed);
                sh.wire_bytes.fetch_add(total, Ordering::Relaxed);
            }
        }
    }
}

/// Appends exactly `n` bytes from `rd` to `buf`, read into its spare
/// capacity (no zero-fill of a buffer about to be overwritten).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> std::io::Result<()> {
    buf.reserve_exact(n);
    let want = buf.len() + n;
    while buf.len() < want {
        let left = (want - buf.len()) as u64;
        if (&mut *rd).take(left).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Writes `head` then `body` with as few `writev` calls as the socket takes.
async fn write_both<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut head: &[u8],
    mut body: &[u8],
) -> std::io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        let n = wr
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let h = n.min(head.len());
        head = &head[h..];
        body = &body[n - h..];
    }
    Ok(())
}

/// A chunk for a compression worker, the buffer to compress into, and
/// where the answer goes: the buffer back, with the verdict.
struct SqueezeJob {
    chunk: Arc<OutChunk>,
    sample_first: bool,
    /// The host's CPUs are busy: compress only a chunk whose sample shrinks
    /// [`YIELD_RATIO`] times.
    yield_gate: bool,
    buf: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<(Vec<u8>, Squeezed)>,
}

/// A compression worker's verdict on a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Squeezed {
    /// Compressed into this many bytes of the buffer (it shrank by at least
    /// an eighth).
    Shrank(usize),
    /// It (or its sample) did not shrink by an eighth: the stream's back-off
    /// learns of it.
    NoGain,
    /// Its sample shrank, but less than [`YIELD_RATIO`] times, while the
    /// host's CPUs were busy: sent raw, not a failure.
    LowYield,
}

/// While the host's CPUs are busy, a chunk is compressed only when its
/// sample shrinks at least this many times (numerator, denominator: 2.5).
/// On the realistic mix (ci/memimage.py) a quarter of the chunks pass and
/// save a third of what compressing every chunk would, for a quarter of the
/// CPU (docs/relay.md, session 8).
const YIELD_RATIO: (usize, usize) = (5, 2);

/// The yield sample: this many bytes at a quarter and at three quarters of
/// a chunk; chunks shorter than [`YIELD_MIN_CHUNK`] are not gated.
const YIELD_PIECE: usize = 4 << 10;
const YIELD_MIN_CHUNK: usize = 64 << 10;

/// Below this share of idle CPU time (all CPUs, over [`CPU_SAMPLE`]) the
/// host's CPUs count as busy for the yield gate.
const CPU_IDLE_BUSY: (u64, u64) = (1, 4);
const CPU_SAMPLE: Duration = Duration::from_millis(50);

/// Compresses two pieces of `data` and says whether it is worth compressing:
/// `NoGain` when they did not shrink by an eighth, `LowYield` when they
/// shrank less than [`YIELD_RATIO`] times, else `None` (compress it).
fn yield_sample(enc: &mut Encoder, data: &[u8], scratch: &mut Vec<u8>) -> Option<Squeezed> {
    let starts = [data.len() / 4, 3 * data.len() / 4];
    let (inp, out) = compress_pieces(enc, data, starts, YIELD_PIECE, scratch);
    if out * MIN_SAVING_DIVISOR >= inp * (MIN_SAVING_DIVISOR - 1) {
        Some(Squeezed::NoGain)
    } else if out * YIELD_RATIO.0 > inp * YIELD_RATIO.1 {
        Some(Squeezed::LowYield)
    } else {
        None
    }
}

/// Idle and total CPU time of the host so far (`/proc/stat`'s first line,
/// in clock ticks), or `None` where it cannot be read.
fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user).
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total = v.iter().take(8).sum();
    Some((idle, total))
}

/// Samples the host's CPU every [`CPU_SAMPLE`] while the relay lives and
/// keeps [`Shared::cpu_busy`]: on a host whose cores the hypervisors and
/// the relay already fill, lz4 on every chunk that shrinks takes more time
/// from them than it saves on the links, so only the chunks that shrink
/// most are compressed then. Where `/proc/stat` cannot be read the host
/// counts as idle (compress what shrinks, as before).
async fn watch_host_cpu(sh: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(CPU_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = host_cpu_ticks();
    loop {
        tick.tick().await;
        let Some(sh) = sh.upgrade() else { return };
        let now = host_cpu_ticks();
        if let (Some((i0, t0)), Some((i1, t1))) = (last, now) {
            let (idle, total) = (i1.saturating_sub(i0), t1.saturating_sub(t0));
            if total > 0 {
                let busy = idle * CPU_IDLE_BUSY.1 < total * CPU_IDLE_BUSY.0;
                sh.cpu_busy.store(busy, Ordering::Relaxed);
            }
        }
        last = now;
    }
}

/// The relay's compression workers: threads at nice 10, as the page path's
/// pool, so that on a host whose cores the hypervisors need, lz4 takes
/// only what moving bytes leaves, and a chunk being compressed does not
/// hold up the IO of the other channels and streams on the relay's
/// runtime threads. A channel writer asks them only while its link has a
/// backlog (so waiting for one costs no link time). Decompression (about
/// four times faster than compression with lz4) stays on the data
/// channel's reader. The threads end when the relay drops this.
struct Squeezers {
    jobs: std::sync::mpsc::Sender<SqueezeJob>,
}

impl Squeezers {
    fn start(spec: CompressionSpec, workers: usize) -> std::result::Result<Self, String> {
        let (jobs, rx) = std::sync::mpsc::channel::<SqueezeJob>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let mut enc = Encoder::new(spec).map_err(|e| e.to_string())?;
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("relay-zip-{i}"))
                .spawn(move || {
                    if let Err(e) = ferry_ffi::net::set_current_thread_nice(WORKER_NICE) {
                        tracing::debug!("relay compression worker runs un-niced: {e}");
                    }
                    let mut sample = Vec::new();
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(SqueezeJob {
                            chunk,
                            sample_first,
                            yield_gate,
                            mut buf,
                            reply,
                        }) = job
                        else {
                            return;
                        };
                        let data = &chunk.data;
                        // After a failure, a sample first: random bytes
                        // cost a quarter of a chunk's compression. While
                        // the host is busy, a smaller sample asks whether
                        // the chunk shrinks enough to be worth its CPU.
                        let early =
                            if sample_first && probe_incompressible(&mut enc, data, &mut sample) {
                                Some(Squeezed::NoGain)
                            } else if yield_gate && data.len() >= YIELD_MIN_CHUNK {
                                yield_sample(&mut enc, data, &mut sample)
                            } else {
                                None
                            };
                        let verdict = early.unwrap_or_else(|| {
                            buf.resize(enc.bound(data.len()), 0);
                            match enc.compress(data, &mut buf) {
                                Ok(n)
                                    if n * MIN_SAVING_DIVISOR
                                        < data.len() * (MIN_SAVING_DIVISOR - 1) =>
                                {
                                    Squeezed::Shrank(n)
                                }
                                _ => Squeezed::NoGain,
                            }
                        });
                        let _ = reply.send((buf, verdict));
                    }
                })
                .map_err(|e| format!("starting a compression worker: {e}"))?;
        }
        Ok(Squeezers { jobs })
    }

    /// Compresses `chunk` on a worker into `buf`; `None` when the workers
    /// are gone.
    async fn squeeze(
        &self,
        chunk: Arc<OutChunk>,
        sample_first: bool,
        yield_gate: bool,
        buf: Vec<u8>,
    ) -> Option<(Vec<u8>, Squeezed)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(SqueezeJob {
                chunk,
                sample_first,
                yield_gate,
                buf,
                reply,
            })
            .ok()?;
        answer.await.ok()
    }
}

/// Bytes a data channel's reader buffers: the next headers (and acks)
/// come with the payload before them in one read.
const CHANNEL_READ_BUFFER: usize = ferry_proto::relay::CHANNEL_READ_BUFFER as usize;

async fn channel_reader(
    sh: Arc<Shared>,
    ch: Arc<Channel>,
    rd: ReadHalf<Stream>,
    acks: mpsc::UnboundedSender<u64>,
) -> std::result::Result<(), String> {
    let mut rd = BufReader::with_capacity(CHANNEL_READ_BUFFER, rd);
    let mut dec = Decoder::default();
    let in_dir = sh.cfg.side.in_dir();
    let mut wire = Vec::new();
    loop {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        rd.read_exact(&mut head[..4])
            .await
            .map_err(|e| format!("reading: {e}"))?;
        let magic: [u8; 4] = head[..4].try_into().expect("4 bytes");
        if magic == ACK_MAGIC {
            let mut a = [0u8; ACK_LEN];
            a[..4].copy_from_slice(&magic);
            rd.read_exact(&mut a[4..])
                .await
                .map_err(|e| format!("reading an ack: {e}"))?;
            let ack = RelayAck::decode(&a, &sh.keys).map_err(|e| e.to_string())?;
            let mut u = ch.unacked.lock().expect("unacked");
            if u.remove(&ack.seq).is_some() {
                *ch.last_progress.lock().expect("progress") = Instant::now();
            }
            continue;
        }
        if magic != CHUNK_MAGIC {
            return Err(format!("bad magic {magic:?}: not a stream chunk or ack"));
        }
        rd.read_exact(&mut head[4..])
            .await
            .map_err(|e| format!("reading a chunk header: {e}"))?;
        // The tag first: nothing of a changed header is used.
        let c = StreamChunk::decode(&head, &sh.keys, sh.cfg.chunk).map_err(|e| e.to_string())?;
        if c.dir != in_dir {
            sh.fail(RelayFailure::Protocol(RelayError::Wire(
                ferry_proto::WireError::Invalid {
                    field: "stream chunk direction",
                    detail: format!("{} chunks do not come this way", c.dir),
                },
            )));
            return Err("a chunk of the wrong direction".into());
        }
        // A raw payload is read straight into the buffer that is kept
        // and delivered; a compressed one into `wire`, then decompressed
        // into that buffer.
        let mut raw = sh.pool.take();
        let into = if c.codec == 0 { &mut raw } else { &mut wire };
        into.clear();
        read_payload(&mut rd, into, c.wire_len as usize)
            .await
            .map_err(|e| format!("reading a chunk payload: {e}"))?;
        if c.codec != 0 {
            let codec = Codec::from_id(c.codec).map_err(|e| e.to_string())?;
            raw.resize(c.raw_len as usize, 0);
            dec.decompress_exact(codec, &wire, &mut raw)
                .map_err(|e| format!("chunk {} does not decompress: {e}", c.seq))?;
        }
        c.check_payload(&sh.keys, &raw).map_err(|e| e.to_string())?;
        let slot = match sh.slot(c.stream) {
            Ok(s) => s,
            Err(e) => {
                let why = e.to_string();
                sh.fail(e.into());
                return Err(why);
            }
        };
        let placed = slot
            .inner
            .lock()
            .expect("stream")
            .recv
            .insert(c.offset, raw);
        match placed {
            Ok(Placed::New) => {
                slot.metrics.chunks_received.fetch_add(1, Ordering::Relaxed);
                slot.data.notify_one()
            }
            Ok(Placed::Duplicate) => {
                slot.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    stream = c.stream,
                    offset = c.offset,
                    "duplicate chunk dropped"
                )
            }
            Err(e) => {
                sh.fail(e.into());
                return Err("a chunk outside its window".into());
            }
        }
        let _ = acks.send(c.seq);
    }
}

/// Stops a failed channel's writer and reader, then takes the chunks they
/// left unacknowledged. An aborted task stops only at its next await: until
/// then the writer, running on another worker, may still take chunks from
/// the shared queue (the ones requeued after this among them) and record
/// them in `ch.unacked`; taken before it stopped, they would stay in a dead
/// channel's map where nothing sends them again, and the stream would wait
/// forever on the gap. So both tasks end first (at their next await).
async fn stop_and_take_unacked(
    tasks: &mut JoinSet<std::result::Result<(), String>>,
    ch: &Channel,
) -> Vec<Arc<OutChunk>> {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    ch.unacked
        .lock()
        .expect("unacked")
        .drain()
        .map(|(_, c)| c)
        .collect()
}

/// Runs one data channel until it fails; then its unacknowledged chunks go
/// back to the queue for the others.
async fn run_channel(sh: Arc<Shared>, ch: Arc<Channel>, stream: Stream) {
    // A second descriptor of the socket, to ask how much is unsent.
    let fd = stream.tcp().as_fd().try_clone_to_owned().ok();
    let (rd, wr) = tokio::io::split(stream);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    tasks.spawn(channel_writer(sh.clone(), ch.clone(), wr, ack_rx, fd));
    tasks.spawn(channel_reader(sh.clone(), ch.clone(), rd, ack_tx));
    let timeout = sh.cfg.channel_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let why = loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(Ok(Err(e))) => break e,
                Some(Ok(Ok(()))) => break "closed".to_string(),
                Some(Err(e)) => break format!("task failed: {e}"),
                None => break "closed".to_string(),
            },
            _ = tick.tick() => {
                let stalled = !ch.unacked.lock().expect("unacked").is_empty()
                    && ch.last_progress.lock().expect("progress").elapsed() > timeout;
                if stalled {
                    break format!("no ack for {timeout:?} (--channel-timeout)");
                }
            }
        }
    };
    let lost = stop_and_take_unacked(&mut tasks, &ch).await;
    // After the relay's end (or failure) channels close as they may.
    if sh.failed.load(Ordering::SeqCst) || sh.ending.load(Ordering::SeqCst) {
        return;
    }
    *ch.failed.lock().expect("failed") = Some(why.clone());
    let left = sh.channels_alive.fetch_sub(1, Ordering::SeqCst) - 1;
    tracing::warn!(
        channel = %ch.path,
        resent = lost.len(),
        channels_left = left,
        "data channel failed: {why}; its chunks go on the others"
    );
    if left == 0 {
        sh.fail(RelayFailure::Transport(TransportError::NoChannelLeft {
            last: format!("{}: {why}", ch.path),
        }));
        return;
    }
    sh.resent.fetch_add(lost.len() as u64, Ordering::Relaxed);
    for c in &lost {
        if let Ok(slot) = sh.slot(c.stream) {
            slot.metrics.resent.fetch_add(1, Ordering::Relaxed);
        }
    }
    for c in lost {
        let _ = sh.queue_tx.send(c);
    }
}

/// Sends the control messages the tasks queue, in order.
async fn control_writer(mut w: ConnWriter, mut rx: mpsc::UnboundedReceiver<Msg>) -> ConnWriter {
    while let Some(m) = rx.recv().await {
        if let Err(e) = w.send(&m).await {
            tracing::debug!("control connection: {e}");
            break;
        }
    }
    w
}

/// A hypervisor connection, split for the two pumps and kept for a reset.
fn attach(
    sh: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    slot: Arc<StreamSlot>,
    sock: TcpStream,
) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let std = sock.into_std()?;
    let shut = std.try_clone()?;
    std.set_nonblocking(true)?;
    let sock = Arc::new(TcpStream::from_std(std)?);
    *slot.sock.lock().expect("sock") = Some(sock.clone());
    tasks.spawn(pump_out(sh.clone(), slot.clone(), sock.clone()));
    tasks.spawn(pump_in(sh.clone(), slot, sock, shut));
    Ok(())
}

/// How long a side whose last data channel was lost waits for the peer's
/// `Abort` on the control connection (the reason, when the peer failed
/// first and closed its channels as it went).
const PEER_REASON_WAIT: Duration = Duration::from_millis(200);

/// How the engine gets its streams.
#[derive(Debug)]
pub enum Hypervisor {
    /// Source: the hypervisor connects here.
    Accept(TcpListener),
    /// Destination: connect each stream here, in order.
    Connect(SocketAddr),
}

/// The relay engine of one side, over an authenticated control connection
/// and the data channels of its session.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    keys: RelayKeys,
    budget: Option<StreamBudget>,
    live: Arc<RelayLive>,
    #[cfg(test)]
    in_done_gate: Option<Arc<tests::Gate>>,
}

impl Engine {
    /// An engine with these settings and the relay's keys.
    pub fn new(cfg: EngineConfig, keys: RelayKeys) -> Self {
        Engine {
            cfg,
            keys,
            budget: None,
            live: Arc::default(),
            #[cfg(test)]
            in_done_gate: None,
        }
    }

    /// Shares each stream's counters, as it opens, with `live` (the
    /// daemon's `--metrics`).
    pub fn with_live(mut self, live: Arc<RelayLive>) -> Self {
        self.live = live;
        self
    }

    /// Books each stream's buffers on `budget` as it opens (the
    /// destination's `--memory-limit`); a stream that does not fit fails
    /// the relay, naming the limit, before its hypervisor connection opens.
    pub fn with_budget(mut self, budget: StreamBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Runs the relay until every stream is done (`Ok`) or it fails; on
    /// failure every hypervisor connection is reset and the peer told.
    /// `channels`: the data channels as they open (the destination's keep
    /// arriving while it runs).
    pub async fn run(
        self,
        conn: Conn,
        mut channels: mpsc::Receiver<(Stream, String)>,
        streams: Hypervisor,
    ) -> Result<RelayReport> {
        let started = Instant::now();
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let squeezers = match self.cfg.compression {
            Some(spec) => Some(
                Squeezers::start(
                    spec,
                    ferry_transport::compress::CompressConfig::default_workers(),
                )
                .map_err(|e| crate::error::MigrationError::Config(format!("relay: {e}")))?,
            ),
            None => None,
        };
        let sh = Arc::new(Shared {
            squeezers,
            pool: Arc::new(ChunkBufs::new(self.cfg.chunk, self.cfg.window)),
            limiter: self.cfg.bandwidth_limit.map(RateLimiter::new),
            cfg: self.cfg.clone(),
            keys: self.keys,
            budget: self.budget,
            live: self.live,
            streams: Mutex::new(Vec::new()),
            queue_tx,
            queue_rx: tokio::sync::Mutex::new(queue_rx),
            ctl: ctl_tx,
            events: ev_tx,
            seq: AtomicU64::new(0),
            channels_alive: AtomicUsize::new(0),
            wire_bytes: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            #[cfg(test)]
            in_done_gate: self.in_done_gate.clone(),
            cpu_busy: AtomicBool::new(false),
        });
        if sh.squeezers.is_some() {
            tokio::spawn(watch_host_cpu(Arc::downgrade(&sh)));
        }
        let (writer, mut msgs) = conn.split();
        let ctl_task = tokio::spawn(control_writer(writer, ctl_rx));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut chan_tasks: JoinSet<()> = JoinSet::new();
        let mut all_channels: Vec<Arc<Channel>> = Vec::new();
        let mut rules = Streams::new(self.cfg.max_streams);
        let mut fifo = ferry_proto::relay::OpenFifo::new(self.cfg.max_streams);
        let mut ending = false;
        let (listener, deliver) = match streams {
            Hypervisor::Accept(l) => (Some(l), None),
            Hypervisor::Connect(a) => (None, Some(a)),
        };
        let mut channels_open = true;
        let side = self.cfg.side;
        // A peer that stops answering without closing (a host gone, a
        // link that drops everything) is found by its silence: the source
        // pings, the destination answers, and either side fails the relay
        // when it heard nothing for the peer timeout.
        let peer_timeout = self.cfg.peer_timeout;
        let mut heard = Instant::now();
        let mut beat = tokio::time::interval(
            (peer_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        );
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pings = 0u64;
        let result: Result<()> = loop {
            tokio::select! {
                _ = beat.tick() => {
                    if heard.elapsed() > peer_timeout {
                        break Err(TransportError::Timeout {
                            what: "any message on the relay's control connection (--peer-timeout)",
                            after: peer_timeout,
                        }
                        .into());
                    }
                    if side == Side::Source {
                        pings += 1;
                        let _ = sh.ctl.send(Msg::Ping { seq: pings });
                    }
                }
                c = channels.recv(), if channels_open => match c {
                    Some((stream, path)) => {
                        let ch = Arc::new(Channel {
                            path,
                            unacked: Mutex::new(HashMap::new()),
                            last_progress: Mutex::new(Instant::now()),
                            chunks_sent: AtomicU64::new(0),
                            bytes_sent: AtomicU64::new(0),
                            failed: Mutex::new(None),
                        });
                        sh.channels_alive.fetch_add(1, Ordering::SeqCst);
                        all_channels.push(ch.clone());
                        chan_tasks.spawn(run_channel(sh.clone(), ch, stream));
                    }
                    None => channels_open = false,
                },
                a = async { listener.as_ref().expect("source").accept().await }, if listener.is_some() && !ending => {
                    let (sock, peer) = match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::debug!("accepting a hypervisor connection: {e}");
                            continue;
                        }
                    };
                    let id = match rules.open() {
                        Ok(id) => id,
                        Err(e) => {
                            let _ = sock.set_zero_linger();
                            break Err(e.into());
                        }
                    };
                    tracing::info!(stream = id, %peer, "hypervisor connection accepted");
                    let _ = sh.ctl.send(Msg::Open { stream: id });
                    let slot = match sh.slot(id) {
                        Ok(s) => s,
                        Err(e) => break Err(e.into()),
                    };
                    if let Err(e) = attach(&sh, &mut tasks, slot, sock) {
                        break Err(RelayFailure::Hypervisor(format!("stream {id}: {e}")));
                    }
                },
                m = msgs.recv() => {
                    let m = match m {
                        Some(Ok(m)) => m,
                        // The control reader turns the peer's Abort into this.
                        Some(Err(TransportError::PeerAborted(why))) => {
                            break Err(RelayFailure::PeerAborted(why))
                        }
                        Some(Err(e)) => break Err(e.into()),
                        None => break Err(TransportError::PeerClosed { what: "control" }.into()),
                    };
                    heard = Instant::now();
                    match (side, m) {
                        (_, Msg::Abort { reason }) => break Err(RelayFailure::PeerAborted(reason)),
                        (Side::Destination, Msg::Ping { seq }) => {
                            let _ = sh.ctl.send(Msg::Pong { seq });
                        }
                        (Side::Source, Msg::Pong { .. }) => {}
                        (Side::Destination, Msg::Open { stream }) => {
                            // The slot books the stream's buffers: one that
                            // does not fit is refused before its connect.
                            if let Err(e) = fifo
                                .on_open(stream)
                                .and_then(|()| rules.open().map(|_| ()))
                                .and_then(|()| sh.slot(stream).map(|_| ()))
                            {
                                break Err(e.into());
                            }
                            if let Some(s) = fifo.next_connect() {
                                spawn_connect(&sh, deliver.expect("destination"), s);
                            }
                        }
                        (Side::Source, Msg::Opened { stream }) => {
                            tracing::debug!(stream, "the destination connected the stream");
                        }
                        (Side::Source, Msg::OpenFailed { stream, error }) => {
                            break Err(RelayFailure::Hypervisor(format!(
                                "the destination could not connect stream {stream}: {error}"
                            )));
                        }
                        (_, Msg::Credit { stream, dir, delivered, finished }) if dir == side.out_dir() => {
                            let slot = match sh.slot(stream) {
                                Ok(s) => s,
                                Err(e) => break Err(e.into()),
                            };
                            let r = slot.inner.lock().expect("stream").send.on_credit(delivered, finished);
                            if let Err(e) = r {
                                break Err(e.into());
                            }
                            slot.credit.notify_one();
                            if finished {
                                match rules.finish(stream, dir) {
                                    Ok(true) => sh.release(stream),
                                    Ok(false) => {}
                                    Err(e) => break Err(e.into()),
                                }
                            }
                        }
                        (_, Msg::Fin { stream, dir, length, digest }) if dir == side.in_dir() => {
                            let slot = match sh.slot(stream) {
                                Ok(s) => s,
                                Err(e) => break Err(e.into()),
                            };
                            let r = slot.inner.lock().expect("stream").recv.on_fin(length, digest, stream, dir);
                            if let Err(e) = r {
                                break Err(e.into());
                            }
                            slot.data.notify_one();
                        }
                        (Side::Destination, Msg::RelayEnd { streams }) => {
                            if let Err(e) = rules.on_end(streams) {
                                break Err(e.into());
                            }
                            sh.ending.store(true, Ordering::SeqCst);
                            let _ = sh.ctl.send(Msg::RelayEnd { streams });
                            break Ok(());
                        }
                        (Side::Source, Msg::RelayEnd { streams }) if ending && streams == rules.count() => {
                            break Ok(());
                        }
                        (_, m) => {
                            break Err(TransportError::Unexpected {
                                expected: "a relay message",
                                got: m.name().into(),
                            }
                            .into());
                        }
                    }
                }
                ev = ev_rx.recv() => match ev.expect("the engine holds a sender") {
                    Event::Fail(f @ RelayFailure::Transport(TransportError::NoChannelLeft { .. })) => {
                        // A peer that fails closes its data channels as it
                        // goes: its Abort, if it sent one, says why.
                        let why = tokio::time::timeout(PEER_REASON_WAIT, async {
                            loop {
                                match msgs.recv().await {
                                    Some(Ok(Msg::Abort { reason }))
                                    | Some(Err(TransportError::PeerAborted(reason))) => {
                                        return Some(reason)
                                    }
                                    Some(Ok(_)) => {}
                                    _ => return None,
                                }
                            }
                        })
                        .await;
                        break Err(match why {
                            Ok(Some(reason)) => RelayFailure::PeerAborted(reason),
                            _ => f,
                        });
                    }
                    Event::Fail(f) => break Err(f),
                    Event::InDone { stream, delivered } => {
                        let dir = side.in_dir();
                        match rules.finish(stream, dir) {
                            Ok(true) => sh.release(stream),
                            Ok(false) => {}
                            Err(e) => break Err(e.into()),
                        }
                        // Only now may the peer learn it: whatever it
                        // answers comes after this on the control
                        // connection.
                        let _ = sh.ctl.send(Msg::Credit {
                            stream,
                            dir,
                            delivered,
                            finished: true,
                        });
                    }
                    Event::Connected(stream, r) => {
                        fifo.on_connected(stream);
                        match r {
                            Ok(sock) => {
                                tracing::info!(stream, "stream connected to the hypervisor");
                                let _ = sh.ctl.send(Msg::Opened { stream });
                                let slot = match sh.slot(stream) {
                                    Ok(s) => s,
                                    Err(e) => break Err(e.into()),
                                };
                                if let Err(e) = attach(&sh, &mut tasks, slot, sock) {
                                    break Err(RelayFailure::Hypervisor(format!("stream {stream}: {e}")));
                                }
                                if let Some(s) = fifo.next_connect() {
                                    spawn_connect(&sh, deliver.expect("destination"), s);
                                }
                            }
                            Err(e) => {
                                let error = format!("connecting to {}: {e}", deliver.expect("destination"));
                                let _ = sh.ctl.send(Msg::OpenFailed { stream, error: error.clone() });
                                break Err(RelayFailure::Hypervisor(format!("stream {stream}: {error}")));
                            }
                        }
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
            if side == Side::Source && !ending && rules.all_done() {
                ending = true;
                sh.ending.store(true, Ordering::SeqCst);
                tracing::info!(
                    streams = rules.count(),
                    "every stream delivered and confirmed"
                );
                let _ = sh.ctl.send(Msg::RelayEnd {
                    streams: rules.count(),
                });
            }
        };
        let failed = result.is_err();
        if let Err(e) = &result {
            sh.failed.store(true, Ordering::SeqCst);
            // Both hypervisors must see a failed migration, never a clean end.
            for s in sh.streams.lock().expect("streams").iter() {
                if let Some(sock) = s.sock.lock().expect("sock").take() {
                    let _ = sock.set_zero_linger();
                }
            }
            if !matches!(e, RelayFailure::PeerAborted(_)) {
                let _ = sh.ctl.send(Msg::Abort {
                    reason: e.to_string(),
                });
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        chan_tasks.abort_all();
        while chan_tasks.join_next().await.is_some() {}
        let report = RelayReport {
            side,
            streams: sh
                .streams
                .lock()
                .expect("streams")
                .iter()
                .map(|s| {
                    let i = s.inner.lock().expect("stream");
                    let (out, inn) = (i.send.read_offset(), i.recv.delivered());
                    let (forward_bytes, back_bytes) = match side {
                        Side::Source => (out, inn),
                        Side::Destination => (inn, out),
                    };
                    let m = &s.metrics;
                    StreamReport {
                        stream: s.id,
                        label: i.label.clone().unwrap_or_else(|| "other".into()),
                        forward_bytes,
                        back_bytes,
                        chunks_sent: m.chunks_sent.load(Ordering::Relaxed),
                        chunks_received: m.chunks_received.load(Ordering::Relaxed),
                        duplicates_dropped: m.duplicates.load(Ordering::Relaxed),
                        chunks_resent: m.resent.load(Ordering::Relaxed),
                        waited_for_hypervisor_s: secs(&m.wait_hypervisor_ns),
                        waited_for_window_s: secs(&m.wait_window_ns),
                        waited_to_deliver_s: secs(&m.wait_deliver_ns),
                        chunks_compressed: m.compressed.load(Ordering::Relaxed),
                        chunks_raw_incompressible: m.raw_incompressible.load(Ordering::Relaxed),
                        chunks_raw_skipped: m.raw_skipped.load(Ordering::Relaxed),
                        chunks_raw_link_idle: m.raw_link_idle.load(Ordering::Relaxed),
                        chunks_raw_low_yield: m.raw_low_yield.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            channels: all_channels
                .iter()
                .map(|c| ChannelReport {
                    path: c.path.clone(),
                    chunks_sent: c.chunks_sent.load(Ordering::Relaxed),
                    bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
                    failed: c.failed.lock().expect("failed").clone(),
                })
                .collect(),
            stream_bytes: 0,
            wire_bytes: sh.wire_bytes.load(Ordering::Relaxed),
            resent_chunks: sh.resent.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs_f64(),
            option: match self.cfg.compression {
                Some(c) => format!("compression ({c})"),
                None => "tcp".into(),
            },
            encrypted: self.cfg.encrypted,
        };
        // Drop every stream (and its sockets: reset when failed, else the
        // ends were already passed on) before the control connection closes.
        sh.streams.lock().expect("streams").clear();
        drop(sh);
        // The last messages (RelayEnd or Abort) go out before we return.
        if let Ok(w) = tokio::time::timeout(Duration::from_secs(2), ctl_task).await {
            drop(w);
        }
        let mut report = report;
        report.stream_bytes = report
            .streams
            .iter()
            .map(|s| s.forward_bytes + s.back_bytes)
            .sum();
        match result {
            Ok(()) if !failed => Ok(report),
            Ok(()) => unreachable!("failed implies an error"),
            Err(e) => Err(e),
        }
    }
}

fn spawn_connect(sh: &Arc<Shared>, to: SocketAddr, stream: u32) {
    let events = sh.events.clone();
    tokio::spawn(async move {
        let r = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 10s",
            )),
        };
        let _ = events.send(Event::Connected(stream, r));
    });
}

/// `ferry relay`'s settings.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Where the hypervisor connects (`--listen`).
    pub listen: SocketAddr,
    /// The destination daemon (`--to`).
    pub to: String,
    /// Where the destination connects the streams (`--deliver-to`).
    pub deliver_to: String,
    /// Pre-shared key.
    pub key: ferry_transport::auth::AuthKey,
    /// Per-chunk compression (`--performance-option compression`).
    pub compression: Option<CompressionSpec>,
    /// Data channels (`--channels`, `--nic`, `--channel-timeout`).
    pub multichannel: crate::nics::MultichannelOptions,
    /// TLS (`None`: `--plaintext`).
    pub tls: Option<Arc<ferry_transport::tls::TlsConfig>>,
    /// `--bandwidth-limit`, bytes per second.
    pub bandwidth_limit: Option<u64>,
    /// Connect and peer timeout.
    pub timeout: Duration,
    /// Window of each stream direction.
    pub window: u32,
    /// Largest chunk.
    pub chunk: u32,
    /// Most streams.
    pub max_streams: u32,
}

/// The source side, set up: connected, authenticated, accepted, data
/// channels open, listening for the hypervisor.
#[derive(Debug)]
pub struct ReadySource {
    conn: Conn,
    channels: Vec<(Stream, String)>,
    listener: TcpListener,
    cfg: EngineConfig,
    keys: RelayKeys,
    /// Where the hypervisor should migrate to.
    pub listen: SocketAddr,
    /// The data channels' paths.
    pub paths: Vec<String>,
}

/// Sets up the source side: everything before the first hypervisor
/// connection (so a refused `--deliver-to` ends the relay before the
/// hypervisor connects at all).
pub async fn prepare_source(o: &SourceOptions) -> Result<ReadySource> {
    if !o.listen.ip().is_loopback() {
        return Err(crate::error::MigrationError::Config(format!(
            "--listen {}: not a loopback address (whoever connects first becomes the migration's main stream; the hypervisor runs on this host)",
            o.listen
        ))
        .into());
    }
    let offer = RelayOffer {
        deliver_to: o.deliver_to.clone(),
        max_streams: o.max_streams,
        window: o.window,
        chunk: o.chunk,
        option: match o.compression {
            Some(c) => PerformanceOption::Compression {
                codec: c.codec.id(),
                level: c.level,
            },
            None => PerformanceOption::Tcp,
        },
        channels: o.multichannel.max_channels(),
    };
    offer
        .validate()
        .map_err(|e| crate::error::MigrationError::Config(e.to_string()))?;
    let tcp = crate::engine::connect(&o.to, o.timeout).await?;
    let control = (
        tcp.local_addr()
            .map_err(|e| TransportError::io("local address", "control", e))?,
        tcp.peer_addr()
            .map_err(|e| TransportError::io("peer address", "control", e))?,
    );
    let stream = crate::engine::secure(tcp, o.tls.as_deref(), o.timeout).await?;
    let mut conn = Conn::new(stream, o.timeout);
    conn.client_handshake(&o.key).await?;
    conn.send(&Msg::RelayOffer(offer.clone())).await?;
    let accept = match conn.recv("the relay's acceptance").await? {
        Msg::Accept(a) => a,
        Msg::Reject { reason, message } => {
            return Err(TransportError::Rejected { reason, message }.into())
        }
        m => {
            return Err(TransportError::Unexpected {
                expected: "Accept",
                got: m.name().into(),
            }
            .into())
        }
    };
    let keys = conn.session_keys().ok_or(TransportError::AuthFailed(
        "no session keys after the handshake",
    ))?;
    let local = crate::nics::discover().unwrap_or_default();
    let planned = crate::nics::plan(&o.multichannel, &local, &accept.interfaces, control)?;
    let opened =
        crate::nics::open_channels(&planned, keys.clone(), o.timeout, o.tls.clone()).await?;
    let channels: Vec<(Stream, String)> = opened
        .into_iter()
        .map(|(s, p)| (s, format!("{} -> {}", p.local, p.remote)))
        .collect();
    let listener = TcpListener::bind(o.listen)
        .await
        .map_err(|e| crate::error::MigrationError::Config(format!("--listen {}: {e}", o.listen)))?;
    let listen = listener
        .local_addr()
        .map_err(|e| TransportError::io("listening address", "relay", e))?;
    let mut cfg = EngineConfig::from_offer(
        &offer,
        Side::Source,
        o.tls.is_some(),
        o.multichannel.channel_timeout,
    );
    cfg.bandwidth_limit = o.bandwidth_limit;
    cfg.peer_timeout = o.timeout;
    Ok(ReadySource {
        paths: channels.iter().map(|c| c.1.clone()).collect(),
        conn,
        channels,
        listener,
        cfg,
        keys: RelayKeys::derive(&keys),
        listen,
    })
}

impl ReadySource {
    /// Carries the hypervisor's connections until every stream is done.
    pub async fn run(self) -> Result<RelayReport> {
        let (tx, rx) = mpsc::channel(self.channels.len().max(1));
        for c in self.channels {
            let _ = tx.try_send(c);
        }
        drop(tx);
        Engine::new(self.cfg, self.keys)
            .run(self.conn, rx, Hypervisor::Accept(self.listener))
            .await
    }
}

/// The destination side of one relay, after its offer was accepted:
/// `channels` are its data channels as they arrive; `reservation` is the
/// relay's booking against `--memory-limit`, made at admission with
/// [`RelayOffer::admission_reservation`] (the first stream's buffers among
/// them); every further stream grows it as it opens and gives its share
/// back when it ends.
pub async fn serve_destination(
    conn: Conn,
    offer: &RelayOffer,
    deliver_to: SocketAddr,
    mut channels: mpsc::Receiver<Stream>,
    channel_timeout: Duration,
    reservation: Arc<Reservation>,
    live: Arc<RelayLive>,
) -> Result<RelayReport> {
    let keys = conn.session_keys().ok_or(TransportError::AuthFailed(
        "no session keys after the handshake",
    ))?;
    let cfg = EngineConfig::from_offer(
        offer,
        Side::Destination,
        conn.is_encrypted(),
        channel_timeout,
    );
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(s) = channels.recv().await {
            let path = match (s.peer_addr(), s.local_addr()) {
                (Ok(p), Ok(l)) => format!("{l} <- {p}"),
                _ => "?".into(),
            };
            if tx.send((s, path)).await.is_err() {
                return;
            }
        }
    });
    Engine::new(cfg, RelayKeys::derive(&keys))
        .with_budget(StreamBudget::new(
            reservation,
            offer.stream_reservation(),
            1,
        ))
        .with_live(live)
        .run(conn, rx, Hypervisor::Connect(deliver_to))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds a delivered end on its way to the control loop (as its
    /// `select!` taking the peer's messages first would) until the test
    /// opens it.
    #[derive(Debug)]
    pub(super) struct Gate {
        reached: tokio::sync::Semaphore,
        open: tokio::sync::Semaphore,
    }

    impl Gate {
        fn new() -> Self {
            Gate {
                reached: tokio::sync::Semaphore::new(0),
                open: tokio::sync::Semaphore::new(0),
            }
        }

        pub(super) async fn pass(&self) {
            self.reached.add_permits(1);
            self.open.acquire().await.expect("gate").forget();
        }
    }

    /// The destination's control messages up to the one `stop` picks.
    async fn recv_until(ctl: &mut Conn, stop: impl Fn(&Msg) -> bool) -> Vec<Msg> {
        let mut seen = Vec::new();
        loop {
            let m = ctl.recv("a relay message").await.expect("control");
            let last = stop(&m);
            seen.push(m);
            if last {
                return seen;
            }
        }
    }

    fn is_final_credit(m: &Msg, want: Dir) -> bool {
        matches!(m, Msg::Credit { stream: 0, dir, finished: true, .. } if *dir == want)
    }

    /// CI's g6: the source ends the relay as soon as it hears the last
    /// direction finished; a destination that said so before its own
    /// control loop knew it took that `RelayEnd` for one with a stream
    /// still open. Here the destination's delivered end is held before its
    /// control loop while the test plays the source: no final credit may
    /// come out meanwhile (a ping sent then is answered first), and once
    /// it passes, the end goes through.
    #[tokio::test]
    async fn the_peer_hears_a_stream_finished_only_after_the_control_loop_recorded_it() {
        let keys = || RelayKeys::from_frame_key(&ferry_proto::MacKey::from_bytes([7; 32]));
        let data = b"the guest's memory, in order; ".repeat(200);
        // The destination's hypervisor: sends nothing, reads the stream.
        let hv = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hv_addr = hv.local_addr().unwrap();
        let hypervisor = tokio::spawn(async move {
            let (mut s, _) = hv.accept().await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(a), l.accept());
        let timeout = Duration::from_secs(60);
        let mut ctl = Conn::new(ours.unwrap(), timeout);
        let dest_ctl = Conn::new(theirs.unwrap().0, timeout);
        let (data_ours, data_theirs) = tokio::join!(TcpStream::connect(a), l.accept());
        let mut data_ch = data_ours.unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.send((Stream::from(data_theirs.unwrap().0), "test".into()))
            .await
            .unwrap();
        let cfg = EngineConfig {
            side: Side::Destination,
            window: 1 << 20,
            chunk: 1 << 16,
            max_streams: 4,
            compression: None,
            bandwidth_limit: None,
            channel_timeout: timeout,
            peer_timeout: timeout,
            encrypted: false,
        };
        let gate = Arc::new(Gate::new());
        let mut engine = Engine::new(cfg, keys());
        engine.in_done_gate = Some(gate.clone());
        let dest = tokio::spawn(engine.run(dest_ctl, rx, Hypervisor::Connect(hv_addr)));

        // The source, by hand: stream 0 opens, carries one chunk, ends.
        let k = keys();
        ctl.send(&Msg::Open { stream: 0 }).await.unwrap();
        let head = StreamChunk {
            stream: 0,
            dir: Dir::Forward,
            offset: 0,
            raw_len: data.len() as u32,
            wire_len: data.len() as u32,
            codec: 0,
            seq: 0,
            digest: k.chunk_digest(&data),
        }
        .encode(&k);
        data_ch.write_all(&head).await.unwrap();
        data_ch.write_all(&data).await.unwrap();
        let mut digest = k.stream_digest(0, Dir::Forward);
        digest.update(&data);
        ctl.send(&Msg::Fin {
            stream: 0,
            dir: Dir::Forward,
            length: data.len() as u64,
            digest: digest.finish(&k),
        })
        .await
        .unwrap();
        assert!(
            hypervisor.await.unwrap() == data,
            "the stream arrived whole"
        );

        // Delivered and held before the control loop.
        gate.reached.acquire().await.unwrap().forget();
        ctl.send(&Msg::Ping { seq: 77 }).await.unwrap();
        let mut seen = recv_until(&mut ctl, |m| matches!(m, Msg::Pong { seq: 77 })).await;
        assert!(
            !seen.iter().any(|m| is_final_credit(m, Dir::Forward)),
            "the destination said the stream was finished before its control loop knew: {seen:?}"
        );
        gate.open.add_permits(1);
        seen.extend(recv_until(&mut ctl, |m| is_final_credit(m, Dir::Forward)).await);
        assert!(
            matches!(seen.last(), Some(Msg::Credit { delivered, .. }) if *delivered == data.len() as u64),
            "{seen:?}"
        );
        // The back direction ended empty: the source confirms it, then ends.
        if !seen
            .iter()
            .any(|m| matches!(m, Msg::Fin { dir: Dir::Back, .. }))
        {
            recv_until(&mut ctl, |m| matches!(m, Msg::Fin { dir: Dir::Back, .. })).await;
        }
        ctl.send(&Msg::Credit {
            stream: 0,
            dir: Dir::Back,
            delivered: 0,
            finished: true,
        })
        .await
        .unwrap();
        ctl.send(&Msg::RelayEnd { streams: 1 }).await.unwrap();
        recv_until(&mut ctl, |m| matches!(m, Msg::RelayEnd { streams: 1 })).await;
        let report = dest.await.unwrap().expect("the relay ends cleanly");
        assert_eq!(report.streams.len(), 1);
        drop((tx, data_ch));
    }

    fn chunk(data: Vec<u8>) -> Arc<OutChunk> {
        Arc::new(OutChunk {
            stream: 0,
            dir: Dir::Forward,
            offset: 0,
            seq: 0,
            data,
            pool: None,
        })
    }

    #[test]
    fn the_buffer_pool_hands_back_chunk_buffers_and_keeps_no_more_than_its_bound() {
        let pool = Arc::new(ChunkBufs::new(4096, 8 * 4096));
        let bufs: Vec<Vec<u8>> = (0..10).map(|_| pool.take()).collect();
        assert!(bufs.iter().all(|b| b.is_empty() && b.capacity() == 4096));
        let first = bufs[0].as_ptr();
        for mut b in bufs {
            b.extend_from_slice(b"bytes");
            pool.give(b);
        }
        assert_eq!(pool.bufs.idle(), 8, "at most a window of chunks");
        // Other sizes are not kept: a take always has room for a chunk.
        pool.give(Vec::with_capacity(100));
        pool.give(vec![0; 5000]);
        let again = pool.take();
        assert!(again.is_empty() && again.capacity() == 4096);
        // A chunk's buffer goes back when its last copy is dropped (acked).
        let c = Arc::new(OutChunk {
            stream: 0,
            dir: Dir::Forward,
            offset: 0,
            seq: 0,
            data: again,
            pool: Some(pool.clone()),
        });
        let queued = c.clone();
        drop(c);
        assert_eq!(pool.bufs.idle(), 7);
        drop(queued);
        assert_eq!(pool.bufs.idle(), 8);
        let kept: Vec<Vec<u8>> = (0..8).map(|_| pool.take()).collect();
        assert!(kept.iter().any(|b| b.as_ptr() == first));
    }

    /// The nice values of this process's relay compression workers.
    fn worker_nices() -> Vec<i64> {
        let mut out = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with("relay-zip-") {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // After the ")" that ends the name: state is field 3, nice 19.
                let rest = stat.rsplit_once(')').map_or("", |r| r.1);
                if let Some(n) = rest.split_whitespace().nth(16) {
                    out.push(n.parse().unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn the_hosts_cpu_time_is_read_and_grows() {
        let (i0, t0) = host_cpu_ticks().expect("/proc/stat's cpu line");
        assert!(i0 <= t0, "idle {i0} of {t0}");
        let until = Instant::now() + Duration::from_millis(80);
        while Instant::now() < until {
            std::hint::black_box(0u64);
        }
        let (i1, t1) = host_cpu_ticks().unwrap();
        assert!(t1 > t0 && i1 >= i0, "{t0} -> {t1}, idle {i0} -> {i1}");
    }

    #[tokio::test]
    async fn compression_workers_are_niced_and_compress_only_what_shrinks() {
        let w = Squeezers::start("lz4".parse().unwrap(), 2).unwrap();
        let text: Vec<u8> = b"QEMU RAM page 0123456789 "
            .iter()
            .cycle()
            .take(256 << 10)
            .copied()
            .collect();
        let (buf, verdict) = w
            .squeeze(chunk(text.clone()), false, false, Vec::new())
            .await
            .unwrap();
        let Squeezed::Shrank(n) = verdict else {
            panic!("text shrinks: {verdict:?}")
        };
        assert!(n < text.len() / 8, "{n}");
        let mut dec = Decoder::default();
        let mut back = vec![0u8; text.len()];
        dec.decompress_exact(Codec::Lz4, &buf[..n], &mut back)
            .unwrap();
        assert!(back == text);
        let mut x = 1u64;
        let random: Vec<u8> = (0..256 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (sample_first, gate) in [(false, false), (true, false), (false, true)] {
            let (_, verdict) = w
                .squeeze(chunk(random.clone()), sample_first, gate, buf.clone())
                .await
                .unwrap();
            assert_eq!(
                verdict,
                Squeezed::NoGain,
                "random bytes go raw and count as not shrinking (sample first: {sample_first}, busy host: {gate})"
            );
        }
        // Text passes the busy host's gate; bytes that shrink by less than
        // 2.5 times (each 16 random bytes twice: about half) only its
        // absence.
        let (_, verdict) = w
            .squeeze(chunk(text.clone()), false, true, buf.clone())
            .await
            .unwrap();
        assert!(matches!(verdict, Squeezed::Shrank(_)), "{verdict:?}");
        let halves: Vec<u8> = random
            .chunks(16)
            .flat_map(|c| c.iter().chain(c.iter()).copied())
            .take(256 << 10)
            .collect();
        let (_, verdict) = w
            .squeeze(chunk(halves.clone()), false, false, buf.clone())
            .await
            .unwrap();
        assert!(matches!(verdict, Squeezed::Shrank(_)), "{verdict:?}");
        let (_, verdict) = w
            .squeeze(chunk(halves), false, true, buf.clone())
            .await
            .unwrap();
        assert_eq!(verdict, Squeezed::LowYield);
        let nices = worker_nices();
        assert_eq!(nices.len(), 2, "{nices:?}");
        assert!(
            nices.iter().all(|&n| n == i64::from(WORKER_NICE)),
            "{nices:?}"
        );
        drop(w);
        for _ in 0..200 {
            if worker_nices().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the workers outlived their relay: {:?}", worker_nices());
    }

    /// The relay_streams hang (a corrupt chunk's channel failed; one
    /// stream never finished): a failed channel's writer, still inside one
    /// poll on another worker when it is aborted, records a chunk after
    /// the channel's unacknowledged chunks were taken for the others. Here
    /// a stand-in writer is inside such a poll (no await) when the channel
    /// is stopped, and records chunk 9 before its next await: the chunks
    /// taken back must include it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_channel_takes_back_what_its_writer_recorded_while_being_stopped() {
        let ch = Arc::new(Channel {
            path: "test".into(),
            unacked: Mutex::new(HashMap::new()),
            last_progress: Mutex::new(Instant::now()),
            chunks_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            failed: Mutex::new(None),
        });
        let started = Arc::new(AtomicBool::new(false));
        let returned = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        {
            let (ch, started, returned) = (ch.clone(), started.clone(), returned.clone());
            tasks.spawn(async move {
                started.store(true, Ordering::SeqCst);
                // Busy inside one poll until the stop returned, or for a
                // while (then the stop is waiting for this task).
                let t0 = Instant::now();
                while !returned.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_millis(300)
                {
                    std::hint::spin_loop();
                }
                let chunk = OutChunk {
                    stream: 0,
                    dir: Dir::Forward,
                    offset: 0,
                    seq: 9,
                    data: vec![1; 16],
                    pool: None,
                };
                ch.unacked
                    .lock()
                    .expect("unacked")
                    .insert(9, Arc::new(chunk));
                std::future::pending::<()>().await;
                Ok(())
            });
        }
        while !started.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let lost = stop_and_take_unacked(&mut tasks, &ch).await;
        returned.store(true, Ordering::SeqCst);
        assert_eq!(
            lost.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![9],
            "a chunk the writer recorded while it was being stopped was left in the dead channel"
        );
        assert!(ch.unacked.lock().expect("unacked").is_empty());
    }
}
