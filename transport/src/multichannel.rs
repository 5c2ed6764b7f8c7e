//! Multichannel: one migration striped over several data channels, with
//! failover.
//!
//! * [`NetInterface`] is what the destination advertises in its `Accept`;
//!   [`pair_interfaces`] pairs the source's interfaces with those on the
//!   same subnet, and [`plan_channels`] spreads the channels over the pairs.
//! * [`Multichannel`] is a [`Transport`] over N per-channel senders (TCP or
//!   compression). The engine's chunks go into one bounded queue; one task
//!   per channel pulls the next chunk whenever its own sender has window
//!   space. That is work stealing with backpressure: a faster link pulls more
//!   often and so carries more, and the engine waits when every channel is
//!   full.
//! * Failover: a channel whose send, flush or acknowledgements fail, or that
//!   makes no progress for the stall timeout, is closed; the chunks it had
//!   not had acknowledged go back to the front of the queue for the others,
//!   and the runs its peer refused (CRC) are returned by the next flush. The
//!   transport fails only when no channel is left.
//!
//! # Stale copies
//! `flush` is still the round barrier: it returns once the queue is empty and
//! every live channel has had every chunk it sent acknowledged. Chunks of
//! round k are requeued only before round k's barrier completes, so every
//! channel still sees rounds in order. A failed channel, though, may still
//! hold bytes in the network (a link that comes back and retransmits): a
//! copy read before the one that was resent. Within round k that is
//! harmless — if the page changed in between, the guest write marked it
//! dirty and round k+1 sends it again — but it must not land once round k+1
//! has begun. So the engine asks the destination to *fence* every channel in
//! [`Transport::lost_channels`] (close it and wait until its receiver has
//! stopped) before it starts the next round; see docs/protocol.md.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::Instrument;

use crate::compress::CompressSender;
use crate::error::{Result, TransportError};
use crate::layout::PageRun;
use crate::tcp::{GuestMem, TcpSender};
use crate::wire;
use crate::{Caps, ChannelState, ChannelStats, Chunk, Flushed, Transport};
use ferry_proto::WireError;

pub use ferry_proto::net::{
    pair_interfaces, plan_channels, routable, ChannelCount, Cidr, NetInterface, Pair, MAX_CHANNELS,
};

/// Where a channel runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPath {
    /// Local address of the socket (how the destination knows the channel).
    pub local: SocketAddr,
    /// Destination address.
    pub remote: SocketAddr,
    /// Device the socket is bound to, if it is.
    pub device: Option<String>,
}

/// A channel that failed during the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostChannel {
    /// Channel index.
    pub channel: u16,
    /// Its path.
    pub path: ChannelPath,
    /// Why it failed.
    pub error: String,
}

/// What a failed channel had not had acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlanded {
    /// Not known: every chunk sent since the channel's last flush is sent
    /// again (some twice, which is harmless within a round).
    Unknown,
    /// Exactly these.
    Known {
        /// Sequence numbers of the chunks sent and not acknowledged.
        in_flight: Vec<u64>,
        /// Runs the destination refused (CRC) since the last flush.
        resend: Vec<PageRun>,
    },
}

/// A per-channel sender that [`Multichannel`] drives from its own task.
pub trait ChannelSender: Transport + 'static {
    /// After an error: what this channel had not had acknowledged. The
    /// channel is not used again.
    fn unlanded(&mut self) -> Unlanded {
        Unlanded::Unknown
    }
}

impl<M: GuestMem> ChannelSender for TcpSender<M> {
    fn unlanded(&mut self) -> Unlanded {
        let (in_flight, resend) = self.take_unlanded();
        Unlanded::Known { in_flight, resend }
    }
}

/// The compression sender keeps chunks in its worker pool before they are
/// written, so nothing precise is known: everything since its last flush
/// goes again.
impl<M: GuestMem> ChannelSender for CompressSender<M> {}

/// Settings of a [`Multichannel`] transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultichannelConfig {
    /// A channel that makes no progress (no write completes, no ack comes)
    /// for this long is declared failed. Give the per-channel senders the
    /// same value as their ack timeout.
    pub stall_timeout: Duration,
    /// Chunks queued per channel before `send` waits.
    pub queue_per_channel: usize,
}

impl Default for MultichannelConfig {
    fn default() -> Self {
        MultichannelConfig {
            stall_timeout: Duration::from_secs(10),
            queue_per_channel: 2,
        }
    }
}

struct Slot {
    path: ChannelPath,
    state: ChannelState,
    /// Holds a chunk or runs a flush right now.
    busy: bool,
    /// Sent something since its last successful flush.
    dirty: bool,
    /// Wrote its end frame.
    finished: bool,
    stats: ChannelStats,
    started: Instant,
    stopped: Option<Instant>,
}

struct State {
    queue: VecDeque<Chunk>,
    cap: usize,
    slots: Vec<Slot>,
    flushing: bool,
    finishing: bool,
    resend: Vec<PageRun>,
    lost: Vec<LostChannel>,
    /// Set once no channel is left.
    fatal: Option<String>,
}

impl State {
    fn live(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state == ChannelState::Active)
            .count()
    }
    fn barrier_done(&self) -> bool {
        self.queue.is_empty()
            && self
                .slots
                .iter()
                .filter(|s| s.state == ChannelState::Active)
                .all(|s| !s.busy && !s.dirty)
    }
}

struct Shared {
    st: Mutex<State>,
    /// Wakes channel tasks: a chunk was queued, a flush or finish asked for.
    work: Notify,
    /// Wakes the engine: queue space, a channel idle, failed or finished.
    progress: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`Transport`] over several channels; see the module docs.
pub struct Multichannel {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    max_chunk: u32,
    zero_copy: bool,
}

impl fmt::Debug for Multichannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Multichannel")
            .field("channels", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Multichannel {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum Action {
    Send(Chunk),
    Flush,
    Finish,
}

impl Multichannel {
    /// Starts one task per channel. Channel `i` of `channels` gets index `i`
    /// in stats and errors.
    ///
    /// # Panics
    /// If `channels` is empty or longer than [`MAX_CHANNELS`].
    pub fn new<S: ChannelSender>(channels: Vec<(S, ChannelPath)>, cfg: MultichannelConfig) -> Self {
        assert!(
            !channels.is_empty() && channels.len() <= usize::from(MAX_CHANNELS),
            "1 to {MAX_CHANNELS} channels"
        );
        let caps: Vec<Caps> = channels.iter().map(|(s, _)| s.capabilities()).collect();
        let now = Instant::now();
        let slots = channels
            .iter()
            .enumerate()
            .map(|(i, (_, path))| Slot {
                path: path.clone(),
                state: ChannelState::Active,
                busy: false,
                dirty: false,
                finished: false,
                stats: ChannelStats {
                    channel: i as u16,
                    ..Default::default()
                },
                started: now,
                stopped: None,
            })
            .collect();
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                cap: cfg.queue_per_channel.max(1) * channels.len(),
                slots,
                flushing: false,
                finishing: false,
                resend: Vec::new(),
                lost: Vec::new(),
                fatal: None,
            }),
            work: Notify::new(),
            progress: Notify::new(),
        });
        let tasks = channels
            .into_iter()
            .enumerate()
            .map(|(i, (s, path))| {
                let span = tracing::debug_span!("channel", index = i, local = %path.local, remote = %path.remote);
                tokio::spawn(channel_task(shared.clone(), i, s, cfg.stall_timeout).instrument(span))
            })
            .collect();
        Multichannel {
            shared,
            tasks,
            max_chunk: caps
                .iter()
                .map(|c| c.max_chunk)
                .min()
                .unwrap_or(wire::MAX_CHUNK_PAYLOAD),
            zero_copy: caps.iter().all(|c| c.zero_copy),
        }
    }

    /// Waits until `ready` holds or no channel is left.
    async fn wait_until(&self, mut ready: impl FnMut(&mut State) -> bool) -> Result<()> {
        loop {
            let notified = self.shared.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if let Some(e) = &st.fatal {
                    return Err(no_channel_left(e));
                }
                if ready(&mut st) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

fn no_channel_left(last: &str) -> TransportError {
    TransportError::NoChannelLeft { last: last.into() }
}

impl Transport for Multichannel {
    fn capabilities(&self) -> Caps {
        Caps {
            max_chunk: self.max_chunk,
            zero_copy: self.zero_copy,
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        // Refuse what no channel would take here: a channel must only fail
        // for reasons of its own.
        let payload = chunk.payload_bytes();
        if payload > u64::from(self.max_chunk) || chunk.runs.len() > wire::MAX_RUNS as usize {
            return Err(TransportError::Local(WireError::TooLarge {
                field: "chunk",
                len: payload,
                limit: self.max_chunk.into(),
            }));
        }
        let mut chunk = Some(chunk);
        self.wait_until(|st| {
            if st.queue.len() < st.cap {
                st.queue.push_back(chunk.take().expect("queued once"));
                true
            } else {
                false
            }
        })
        .await?;
        self.shared.work.notify_waiters();
        Ok(())
    }

    async fn flush(&mut self) -> Result<Flushed> {
        self.shared.lock().flushing = true;
        self.shared.work.notify_waiters();
        let r = self.wait_until(|st| st.barrier_done()).await;
        let mut st = self.shared.lock();
        st.flushing = false;
        r?;
        Ok(Flushed {
            resend: std::mem::take(&mut st.resend),
        })
    }

    async fn finish(&mut self) -> Result<()> {
        self.shared.lock().finishing = true;
        self.shared.work.notify_waiters();
        self.wait_until(|st| {
            st.slots
                .iter()
                .all(|s| s.state != ChannelState::Active || s.finished)
        })
        .await?;
        let st = self.shared.lock();
        if st.slots.iter().any(|s| s.finished) {
            Ok(())
        } else {
            Err(no_channel_left(
                st.lost.last().map_or("", |l| l.error.as_str()),
            ))
        }
    }

    fn stats(&self) -> Vec<ChannelStats> {
        let st = self.shared.lock();
        st.slots
            .iter()
            .map(|s| {
                let mut c = s.stats.clone();
                let active = s.stopped.unwrap_or_else(Instant::now) - s.started;
                c.local = Some(s.path.local.to_string());
                c.remote = Some(s.path.remote.to_string());
                c.device.clone_from(&s.path.device);
                c.state = s.state;
                c.active_ms = active.as_millis() as u64;
                c.rate_bytes_per_sec =
                    (c.payload_bytes as f64 / active.as_secs_f64().max(1e-3)) as u64;
                c
            })
            .collect()
    }

    fn lost_channels(&mut self) -> Vec<LostChannel> {
        std::mem::take(&mut self.shared.lock().lost)
    }
}

/// Takes the next thing to do for channel `i`, or `None` when it should stop.
async fn next_action(shared: &Shared, i: usize) -> Option<Action> {
    loop {
        let notified = shared.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = shared.lock();
            if st.slots[i].state != ChannelState::Active || st.slots[i].finished {
                return None;
            }
            if let Some(c) = st.queue.pop_front() {
                let s = &mut st.slots[i];
                s.busy = true;
                s.dirty = true;
                drop(st);
                shared.progress.notify_waiters();
                return Some(Action::Send(c));
            }
            if st.flushing && st.slots[i].dirty {
                st.slots[i].busy = true;
                return Some(Action::Flush);
            }
            if st.finishing {
                st.slots[i].busy = true;
                return Some(Action::Finish);
            }
        }
        notified.await;
    }
}

async fn channel_task<S: ChannelSender>(shared: Arc<Shared>, i: usize, mut s: S, stall: Duration) {
    // Chunks sent since the last successful flush, by sequence number.
    let mut since_flush: HashMap<u64, Chunk> = HashMap::new();
    // Bound on one operation: the sender's own ack timeout (`stall`) fires
    // first when acks stop; this catches a write that never completes.
    let limit = stall * 2;
    let stalled = |what: &'static str| TransportError::Timeout { what, after: limit };
    while let Some(action) = next_action(&shared, i).await {
        let mut current = None;
        let mut flushed = None;
        let mut finished = false;
        let r = match action {
            Action::Send(chunk) => {
                current = Some(chunk.seq);
                // Kept to send it again should this channel fail, without
                // its private copy of the pages (not held for a whole
                // round): a resent chunk is read from guest memory again.
                since_flush.insert(chunk.seq, chunk.without_data());
                match tokio::time::timeout(limit, s.send(chunk)).await {
                    Ok(r) => r,
                    Err(_) => Err(stalled("a chunk write on the data channel")),
                }
            }
            Action::Flush => match tokio::time::timeout(limit, s.flush()).await {
                Ok(Ok(f)) => {
                    since_flush.clear();
                    flushed = Some(f);
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(stalled("chunk acknowledgements")),
            },
            Action::Finish => match tokio::time::timeout(limit, s.finish()).await {
                Ok(r) => {
                    finished = r.is_ok();
                    r
                }
                Err(_) => Err(stalled("the end of the data channel")),
            },
        };
        let stats = s.stats().into_iter().next().unwrap_or_default();
        let mut st = shared.lock();
        merge_stats(&mut st.slots[i].stats, &stats);
        match r {
            Ok(()) => {
                let slot = &mut st.slots[i];
                slot.busy = false;
                if finished {
                    slot.finished = true;
                    slot.state = ChannelState::Ended;
                    slot.stopped = Some(Instant::now());
                }
                if let Some(f) = flushed {
                    slot.dirty = false;
                    st.resend.extend(f.resend);
                }
            }
            Err(e) => fail(&mut st, i, &mut s, &mut since_flush, current, e),
        }
        drop(st);
        shared.progress.notify_waiters();
        shared.work.notify_waiters();
    }
}

fn merge_stats(into: &mut ChannelStats, from: &ChannelStats) {
    let channel = into.channel;
    let requeued = into.requeued_chunks;
    let error = into.error.take();
    *into = ChannelStats {
        channel,
        requeued_chunks: requeued,
        error,
        ..from.clone()
    };
}

/// Declares channel `i` failed and requeues what it had not had acknowledged.
fn fail<S: ChannelSender>(
    st: &mut State,
    i: usize,
    s: &mut S,
    since_flush: &mut HashMap<u64, Chunk>,
    current: Option<u64>,
    e: TransportError,
) {
    let mut again: Vec<Chunk> = match s.unlanded() {
        Unlanded::Known { in_flight, resend } => {
            st.resend.extend(resend);
            // The chunk being written when the error came is not in flight
            // (it is recorded only once written): add it.
            in_flight
                .iter()
                .chain(current.as_ref())
                .filter_map(|seq| since_flush.remove(seq))
                .collect()
        }
        Unlanded::Unknown => since_flush.values().cloned().collect(),
    };
    since_flush.clear();
    again.sort_by_key(|c| c.seq);
    let error = e.to_string();
    let slot = &mut st.slots[i];
    tracing::warn!(
        channel = i,
        local = %slot.path.local,
        remote = %slot.path.remote,
        requeued = again.len(),
        "data channel failed, its unacknowledged chunks go to the other channels: {error}"
    );
    slot.state = ChannelState::Failed;
    slot.busy = false;
    slot.dirty = false;
    slot.stopped = Some(Instant::now());
    slot.stats.requeued_chunks += again.len() as u64;
    slot.stats.error = Some(error.clone());
    st.lost.push(LostChannel {
        channel: i as u16,
        path: slot.path.clone(),
        error: error.clone(),
    });
    for c in again.into_iter().rev() {
        st.queue.push_front(c);
    }
    if st.live() == 0 {
        st.fatal = Some(format!(
            "channel {i} ({}): {error}",
            st.slots[i].path.remote
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MemoryLayout, PAGE_SIZE};
    use crate::tcp::{receive_channel, test_layout, RecvCounters};
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const PAGES: u64 = 4096;
    const CHUNK_PAGES: u32 = 64;

    fn iface(name: &str, addr: &str, prefix: u8) -> NetInterface {
        NetInterface {
            name: name.into(),
            addr: addr.parse().unwrap(),
            prefix,
            speed_mbps: None,
            rdma: None,
        }
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.200.1.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.200.1.0/24");
        assert!(c.contains("10.200.1.2".parse().unwrap()));
        assert!(!c.contains("10.200.2.2".parse().unwrap()));
        assert!(
            !c.contains("::ffff:10.200.1.2".parse().unwrap()),
            "no family crossing"
        );
        let h: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(h.prefix, 128);
        assert!(h.contains("fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn channel_counts_parse() {
        assert_eq!("auto".parse(), Ok(ChannelCount::Auto));
        assert_eq!("4".parse(), Ok(ChannelCount::Fixed(4)));
        assert!("0".parse::<ChannelCount>().is_err());
        assert!("65".parse::<ChannelCount>().is_err());
        assert_eq!(
            plan_channels(0, ChannelCount::Fixed(3)),
            Vec::<usize>::new()
        );
        assert_eq!(plan_channels(4, ChannelCount::Auto), [0, 1, 2, 3]);
        assert_eq!(plan_channels(2, ChannelCount::Fixed(5)), [0, 1, 0, 1, 0]);
    }

    #[test]
    fn interfaces_pair_on_shared_subnets_only() {
        let local = vec![
            iface("lo", "127.0.0.1", 8),
            iface("a", "10.1.0.1", 24),
            iface("b", "10.2.0.1", 24),
            iface("ll", "fe80::1", 64),
            iface("v6", "fd00:1::1", 64),
        ];
        let remote = vec![
            iface("x", "10.1.0.2", 24),
            iface("x2", "10.1.0.2", 24),
            iface("y", "10.3.0.2", 24),
            iface("z", "127.0.0.1", 8),
            iface("w", "fd00:1::2", 64),
            iface("ll", "fe80::2", 64),
        ];
        let p = pair_interfaces(&local, &remote);
        let got: Vec<(&str, &str, bool)> = p
            .iter()
            .map(|p| (p.local.name.as_str(), p.remote.name.as_str(), p.bind_device))
            .collect();
        assert_eq!(got, [("a", "x", false), ("v6", "w", false)]);
        // Subnets must agree from both sides: a /16 on one side and a /24
        // on the other that does not hold the peer do not pair.
        let p = pair_interfaces(&[iface("a", "10.1.0.1", 24)], &[iface("x", "10.1.9.2", 16)]);
        assert!(p.is_empty());
    }

    fn guest(pattern: bool) -> Arc<GuestMemoryMmap> {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        if pattern {
            for p in 0..PAGES {
                let v = (p * 2654435761).to_le_bytes();
                let page: Vec<u8> = v.iter().cycle().take(PAGE_SIZE as usize).copied().collect();
                m.write_slice(&page, GuestAddress(p * PAGE_SIZE)).unwrap();
            }
        }
        Arc::new(m)
    }

    fn layout() -> MemoryLayout {
        test_layout(PAGES)
    }

    /// The chunks of one round over the whole (patterned) source guest,
    /// tagged as the page pass tags them.
    fn chunks(round: u32, first_seq: u64) -> Vec<Chunk> {
        let src = guest(true);
        (0..PAGES / u64::from(CHUNK_PAGES))
            .map(|i| {
                let runs = vec![PageRun {
                    gpa: i * u64::from(CHUNK_PAGES) * PAGE_SIZE,
                    pages: CHUNK_PAGES,
                    zero: false,
                }];
                Chunk::read(
                    &*src,
                    &crate::tcp::test_page_key(),
                    &crate::tcp::test_frame_key(),
                    first_seq + i,
                    round,
                    runs,
                    false,
                )
                .unwrap()
            })
            .collect()
    }

    fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
        let (mut x, mut y) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        (0..PAGES).all(|p| {
            a.read_slice(&mut x, GuestAddress(p * PAGE_SIZE)).unwrap();
            b.read_slice(&mut y, GuestAddress(p * PAGE_SIZE)).unwrap();
            x == y
        })
    }

    /// How the destination end of a test channel behaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Peer {
        /// Lands and acknowledges everything.
        Good,
        /// Lands `n` chunks, then drops the connection.
        DiesAfter(u64),
        /// Reads everything, acknowledges nothing.
        Silent,
    }

    struct Rig {
        src: Arc<GuestMemoryMmap>,
        dst: Arc<GuestMemoryMmap>,
        counters: Vec<Arc<RecvCounters>>,
        tx: Multichannel,
    }

    async fn rig(peers: &[Peer], stall: Duration) -> Rig {
        let src = guest(true);
        let dst = guest(false);
        let mut senders = Vec::new();
        let mut counters = Vec::new();
        for (i, &peer) in peers.iter().enumerate() {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let remote = l.local_addr().unwrap();
            let a = tokio::net::TcpStream::connect(remote).await.unwrap();
            let (mut b, _) = l.accept().await.unwrap();
            let path = ChannelPath {
                local: a.local_addr().unwrap(),
                remote,
                device: None,
            };
            let c = Arc::new(RecvCounters::default());
            counters.push(c.clone());
            let d = dst.clone();
            match peer {
                Peer::Good => {
                    tokio::spawn(async move {
                        receive_channel(b, &crate::tcp::test_inbound(layout(), None), &*d, &c).await
                    });
                }
                Peer::DiesAfter(n) => {
                    // A relay lets exactly `n` chunk frames through to a
                    // real receiver, passes their acks back and closes: the
                    // channel dies after n landed chunks whatever the timing
                    // (polling the counters raced a fast receiver).
                    let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let mut relay = tokio::net::TcpStream::connect(l2.local_addr().unwrap())
                        .await
                        .unwrap();
                    let (inner, _) = l2.accept().await.unwrap();
                    let h = tokio::spawn(async move {
                        receive_channel(inner, &crate::tcp::test_inbound(layout(), None), &*d, &c)
                            .await
                    });
                    tokio::spawn(async move {
                        let mut frame = vec![
                            0u8;
                            wire::HEADER_LEN
                                + 16
                                + (u64::from(CHUNK_PAGES) * PAGE_SIZE) as usize
                        ];
                        let mut ack = [0u8; wire::ACK_LEN];
                        for _ in 0..n {
                            let through = b.read_exact(&mut frame).await.is_ok()
                                && relay.write_all(&frame).await.is_ok()
                                && relay.read_exact(&mut ack).await.is_ok()
                                && b.write_all(&ack).await.is_ok();
                            if !through {
                                break;
                            }
                        }
                        h.abort();
                    });
                }
                Peer::Silent => {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 1 << 20];
                        while matches!(b.read(&mut buf).await, Ok(n) if n > 0) {}
                    });
                }
            }
            // One chunk in flight per channel: a channel waiting for its ack
            // leaves the next chunks to the others, so striping does not
            // depend on how fast this host's receivers run.
            let sender = TcpSender::new(
                a,
                src.clone(),
                i as u16,
                stall,
                crate::tcp::test_frame_key(),
            )
            .with_window(u64::from(CHUNK_PAGES) * PAGE_SIZE);
            senders.push((sender, path));
        }
        let tx = Multichannel::new(
            senders,
            MultichannelConfig {
                stall_timeout: stall,
                queue_per_channel: 2,
            },
        );
        Rig {
            src,
            dst,
            counters,
            tx,
        }
    }

    async fn send_all(tx: &mut Multichannel, round: u32, first_seq: u64) -> Result<Flushed> {
        for c in chunks(round, first_seq) {
            tx.send(c).await?;
        }
        tx.flush().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_stripe_over_every_channel_and_land() {
        let mut r = rig(
            &[Peer::Good, Peer::Good, Peer::Good],
            Duration::from_secs(10),
        )
        .await;
        let f = send_all(&mut r.tx, 0, 0).await.unwrap();
        assert!(f.resend.is_empty());
        r.tx.finish().await.unwrap();
        assert!(same(&r.src, &r.dst));
        let stats = r.tx.stats();
        assert_eq!(stats.len(), 3);
        assert_eq!(
            stats.iter().map(|s| s.chunks).sum::<u64>(),
            PAGES / u64::from(CHUNK_PAGES)
        );
        assert!(
            stats
                .iter()
                .all(|s| s.chunks > 0 && s.state == ChannelState::Ended),
            "{stats:?}"
        );
        assert!(r.tx.lost_channels().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn encrypted_channels_stripe_and_land_every_page() {
        // Each channel its own TLS session: two rounds over three channels.
        let key = crate::auth::AuthKey::new(vec![9; 32]).unwrap();
        let tls = crate::tls::TlsConfig::from_psk(&key).unwrap();
        let t = Duration::from_secs(10);
        let (src, dst) = (guest(true), guest(false));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for i in 0..3u16 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let remote = l.local_addr().unwrap();
            let a = tokio::net::TcpStream::connect(remote).await.unwrap();
            let local = a.local_addr().unwrap();
            let (b, _) = l.accept().await.unwrap();
            let (a, b) = tokio::join!(tls.connect(a, t), tls.accept(b, t));
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!(a.is_encrypted() && b.is_encrypted());
            let d = dst.clone();
            receivers.push(tokio::spawn(async move {
                receive_channel(
                    b,
                    &crate::tcp::test_inbound(layout(), None),
                    &*d,
                    &RecvCounters::default(),
                )
                .await
            }));
            let path = ChannelPath {
                local,
                remote,
                device: None,
            };
            senders.push((
                TcpSender::new(a, src.clone(), i, t, crate::tcp::test_frame_key()),
                path,
            ));
        }
        let mut tx = Multichannel::new(senders, MultichannelConfig::default());
        assert!(!tx.capabilities().zero_copy, "TLS channels copy");
        send_all(&mut tx, 0, 0).await.unwrap();
        send_all(&mut tx, 1, 1000).await.unwrap();
        tx.finish().await.unwrap();
        for r in receivers {
            r.await.unwrap().unwrap();
        }
        assert!(same(&src, &dst));
        let stats = tx.stats();
        assert_eq!(
            stats.iter().map(|s| s.chunks).sum::<u64>(),
            2 * PAGES / u64::from(CHUNK_PAGES)
        );
        assert!(stats.iter().all(|s| s.state == ChannelState::Ended));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_dying_mid_round_has_its_unacknowledged_chunks_resent() {
        let mut r = rig(
            &[Peer::Good, Peer::DiesAfter(3), Peer::Good],
            Duration::from_secs(10),
        )
        .await;
        send_all(&mut r.tx, 0, 0).await.unwrap();
        // A second round goes over the two that are left.
        send_all(&mut r.tx, 1, 1000).await.unwrap();
        r.tx.finish().await.unwrap();
        assert!(same(&r.src, &r.dst), "every page landed");
        let lost = r.tx.lost_channels();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].channel, 1);
        let stats = r.tx.stats();
        assert_eq!(stats[1].state, ChannelState::Failed);
        assert!(stats[1].error.is_some());
        assert!(
            stats[1].chunks >= 3,
            "acknowledged before it died: {stats:?}"
        );
        assert!(r.counters[1].chunks.load(Ordering::Relaxed) >= 3);
        let total = 2 * PAGES / u64::from(CHUNK_PAGES);
        // Every chunk was acknowledged once, somewhere; the dead channel's
        // acknowledged chunks were not sent again.
        let landed: u64 = r
            .counters
            .iter()
            .map(|c| c.chunks.load(Ordering::Relaxed))
            .sum();
        assert!(landed >= total && landed <= total + stats[1].requeued_chunks);
        assert_eq!(stats[0].state, ChannelState::Ended);
        assert_eq!(stats[2].state, ChannelState::Ended);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_channel_fails_over_after_the_stall_timeout() {
        let mut r = rig(&[Peer::Silent, Peer::Good], Duration::from_millis(300)).await;
        let started = Instant::now();
        send_all(&mut r.tx, 0, 0).await.unwrap();
        r.tx.finish().await.unwrap();
        assert!(same(&r.src, &r.dst));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let stats = r.tx.stats();
        assert_eq!(stats[0].state, ChannelState::Failed, "{stats:?}");
        assert!(stats[0].requeued_chunks > 0, "{stats:?}");
        assert!(
            stats[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("did not respond"),
            "{stats:?}"
        );
        assert_eq!(r.tx.lost_channels().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_transport_fails_only_when_no_channel_is_left() {
        let mut r = rig(
            &[Peer::DiesAfter(1), Peer::DiesAfter(2)],
            Duration::from_secs(10),
        )
        .await;
        let e = send_all(&mut r.tx, 0, 0).await.unwrap_err().to_string();
        assert!(e.contains("no data channel left"), "{e}");
        assert!(r.tx.finish().await.is_err());
        assert_eq!(r.tx.lost_channels().len(), 2);
    }
}
