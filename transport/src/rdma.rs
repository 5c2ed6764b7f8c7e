//! The RDMA performance option's data path (feature `rdma`).
//!
//! Zero-copy page registration: every guest memory region is registered
//! once per RDMA device on each side (no per-page or per-round
//! registration, no bounce buffers). The destination registers its regions
//! for remote write before it answers the offer, zero-based (writes address
//! offsets, never host addresses), and sends their lengths and rkeys in
//! [`RdmaAccept`] on the (TLS) control connection; the source registers its
//! regions for local read on each device it connects from.
//!
//! Exposure (see [`Admission`]): everything one migration registers, and
//! every queue pair it creates or accepts, lives in protection domains of
//! that migration only ([`Domains`]); a destination listener accepts a
//! channel's connection only with that channel's token in the request's
//! private data, from an address the source offered, once, and rejects
//! every other request without giving it a queue pair. The remote-write
//! registrations are dropped (the NIC then refuses their rkeys) at the
//! source's switchover, before the destination computes its evidence, when
//! the migration fails or aborts ([`RdmaExposure`]'s owner revokes it), and
//! when every channel has ended or failed; a failed channel's queue pair is
//! destroyed at once.
//!
//! One RC queue pair per device pair ("channel"). For each chunk the source
//! posts one RDMA WRITE per non-zero run, straight from its guest memory
//! into the destination's, many in flight, then a SEND carrying the chunk's
//! descriptor: the 32-byte chunk header of [`crate::wire`] and its run table
//! (zero runs included, so zero pages never travel as data). An RC queue
//! pair executes requests in order, so when the descriptor's receive
//! completes at the destination, every write before it has landed. The
//! destination checks the runs against the layout, zeroes the zero runs
//! and answers with a SEND of a 16-byte ack frame. Completions on both
//! sides come through tokio's `AsyncFd` on the completion channel (see
//! `ferry_ffi::rdma`); nothing busy-polls.
//!
//! Channels: every device pair is a [`RdmaChannelSender`], and the
//! multichannel scheduler ([`crate::multichannel::Multichannel`]) stripes
//! chunks over them. A channel that fails (error completion, peer gone, no
//! completion for its timeout) has its queue pair destroyed at once (in
//! [`ChannelSender::unlanded`]), so nothing more of it can land, and its
//! unacknowledged chunks are sent again on the others. Each channel ends
//! with an end frame (`seq` = a mask of channels the source lost, 0 when
//! sent per channel); the destination also stops waiting for all channels
//! at the source's switchover, which comes only after every chunk was
//! acknowledged.
//!
//! RDMA data is not encrypted and carries no CRC (the NIC's ICRC covers
//! the wire; the whole-memory digest before commit covers the rest).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use ferry_ffi::rdma::{
    anon_buffer, list_devices, Access, AnonBuffer, Completion, ConnectionOptions, Domains,
    GuestRegion, MemoryRegion, RdmaConnection, RdmaError, RdmaListener, RemoteRegion, Segment,
    WorkKind, WriteOp,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::error::{Result, TransportError};
use crate::inbound::{Checked, Inbound, RecvCounters};
use crate::inflight::InFlight;
use crate::layout::PAGE_SIZE;
use crate::layout::{MemoryLayout, PageRun};
use crate::multichannel::{ChannelPath, ChannelSender, Unlanded};
use crate::rdma_wire::{
    check_accept, cm_private_data, pair_channels, Admission, RdmaAccept, RdmaChannel, RdmaEndpoint,
    RdmaRegionKey, RevokeReason, MAX_RDMA_CHANNELS,
};
use crate::tcp::{claim_runs, land_zero_run, Tally};
use crate::wire::{self, AckFrame, AckStatus, ChunkHeader, HEADER_LEN, MAX_RUNS};
use crate::{Caps, ChannelStats, Chunk, Flushed, PageData, Transport};
use ferry_proto::MacKey;
use ferry_proto::WireError;

/// Largest descriptor: chunk header and a full run table.
pub const DESC_BYTES: usize = HEADER_LEN + MAX_RUNS as usize * 16;
/// Chunks in flight per channel (their descriptors not yet acknowledged).
pub const DESC_SLOTS: usize = 16;
/// Receives the destination keeps posted per channel.
const RECV_SLOTS: usize = 2 * DESC_SLOTS;
/// Ack sends the destination may have in flight per channel.
const ACK_SLOTS: usize = RECV_SLOTS;
const ACK_BYTES: usize = wire::ACK_LEN;
const _: () = assert!(
    (RECV_SLOTS * DESC_BYTES + ACK_SLOTS * ACK_BYTES) as u64
        == crate::rdma_wire::RDMA_CHANNEL_BUFFERS,
    "rdma_wire's count of a channel's receive buffers matches the data path"
);
/// First rdma_cm port a destination listener tries; it takes the first free
/// one of [`PORT_TRIES`].
pub const PORT_BASE: u16 = 6601;
const PORT_TRIES: u16 = 64;
/// `seq` of the ack that answers an end frame.
const END_ACK: u64 = u64::MAX;

const WR_WRITE: u64 = 0;
const WR_DESC: u64 = 1 << 62;
const WR_ACK: u64 = 2 << 62;
const WR_KIND: u64 = 3 << 62;
const WR_SLOT: u64 = (1 << 32) - 1;

fn conn_options() -> ConnectionOptions {
    ConnectionOptions {
        max_send_wr: 256,
        max_recv_wr: 64,
        max_send_sge: 1,
        max_recv_sge: 1,
        cm_timeout: Duration::from_secs(5),
    }
}

fn rdma_err(context: impl Into<String>, e: RdmaError) -> TransportError {
    TransportError::Io {
        context: context.into(),
        source: io::Error::other(e),
    }
}

/// This host's RDMA endpoints: for every RDMA device, each IPv4 address in
/// its RoCE GID table, with the prefix of the connected route of the
/// device's netdev (`/proc/net/route`).
///
/// # Errors
/// The [`RdmaError`] of [`list_devices`] when this host has no usable RDMA
/// (its [`RdmaError::is_unavailable`] is true), so callers can say why.
pub fn local_endpoints() -> std::result::Result<Vec<RdmaEndpoint>, RdmaError> {
    let names: Vec<String> = list_devices()?.into_iter().map(|d| d.name).collect();
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    Ok(endpoints_from_sysfs(
        Path::new("/sys/class/infiniband"),
        &routes,
        &names,
    ))
}

/// [`local_endpoints`] over a given sysfs root and route table (tests).
pub fn endpoints_from_sysfs(root: &Path, routes: &str, devices: &[String]) -> Vec<RdmaEndpoint> {
    let mut out: Vec<RdmaEndpoint> = Vec::new();
    for dev in devices {
        let Ok(ports) = std::fs::read_dir(root.join(dev).join("ports")) else {
            continue;
        };
        let mut ports: Vec<_> = ports.flatten().map(|p| p.path()).collect();
        ports.sort();
        for port in ports {
            let Ok(gids) = std::fs::read_dir(port.join("gids")) else {
                continue;
            };
            let mut gids: Vec<_> = gids.flatten().map(|g| g.file_name()).collect();
            gids.sort();
            for g in gids {
                let Ok(text) = std::fs::read_to_string(port.join("gids").join(&g)) else {
                    continue;
                };
                let Ok(gid) = text.trim().parse::<Ipv6Addr>() else {
                    continue;
                };
                let Some(v4) = gid.to_ipv4_mapped() else {
                    continue;
                };
                if v4.is_unspecified() || out.iter().any(|e| e.addr == IpAddr::V4(v4)) {
                    continue;
                }
                let ndev = std::fs::read_to_string(port.join("gid_attrs/ndevs").join(&g))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                out.push(RdmaEndpoint {
                    addr: IpAddr::V4(v4),
                    prefix: route_prefix(routes, &ndev, v4),
                    device: dev.clone(),
                    port: 0,
                });
            }
        }
    }
    out
}

/// Prefix of the longest connected (gateway 0) route of `iface` that holds
/// `addr`, from `/proc/net/route` text (hex fields in host byte order, as
/// the kernel prints them on little-endian hosts); 0 when there is none.
fn route_prefix(routes: &str, iface: &str, addr: Ipv4Addr) -> u8 {
    let a = u32::from_le_bytes(addr.octets());
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[0] != iface {
                return None;
            }
            let dst = u32::from_str_radix(f[1], 16).ok()?;
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            let mask = u32::from_str_radix(f[7], 16).ok()?;
            (gw == 0 && mask != 0 && a & mask == dst).then(|| mask.count_ones() as u8)
        })
        .max()
        .unwrap_or(0)
}

/// Guest regions in layout order (the layout is sorted by address; the
/// memory's own order need not be).
fn regions_in_layout_order<B: Bitmap + Send + Sync + 'static>(
    mem: &Arc<GuestMemoryMmap<B>>,
    layout: &MemoryLayout,
) -> Result<Vec<GuestRegion<B>>> {
    let mut all: Vec<Option<GuestRegion<B>>> =
        GuestRegion::all(mem).into_iter().map(Some).collect();
    layout
        .regions
        .iter()
        .map(|r| {
            all.iter_mut()
                .find(|g| g.as_ref().is_some_and(|g| g.gpa() == r.gpa))
                .and_then(Option::take)
                .ok_or(TransportError::Local(WireError::Invalid {
                    field: "memory layout",
                    detail: format!("no guest region at {:#x}", r.gpa),
                }))
        })
        .collect()
}

/// Index of the layout region holding `gpa` and the offset into it.
fn locate(layout: &MemoryLayout, gpa: u64) -> Option<(usize, u64)> {
    let i = layout
        .regions
        .partition_point(|r| r.gpa <= gpa)
        .checked_sub(1)?;
    let r = &layout.regions[i];
    (gpa - r.gpa < r.size).then_some((i, gpa - r.gpa))
}

/// Registers every region once on the device of `pd_of` (cached by device
/// name in `cache`).
fn register_all<B: Bitmap + Send + Sync + 'static>(
    mem: &Arc<GuestMemoryMmap<B>>,
    layout: &MemoryLayout,
    device: &str,
    register: impl Fn(
        GuestRegion<B>,
    ) -> std::result::Result<Arc<MemoryRegion<GuestRegion<B>>>, RdmaError>,
) -> Result<Vec<Arc<MemoryRegion<GuestRegion<B>>>>> {
    regions_in_layout_order(mem, layout)?
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let len = layout.regions[i].size;
            register(g).map_err(|e| {
                rdma_err(
                    format!("cannot register guest memory region {i} ({len} bytes) on RDMA device {device}"),
                    e,
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------- source

type GuestMr<B> = Arc<MemoryRegion<GuestRegion<B>>>;

struct Pair<B: Bitmap + 'static> {
    name: String,
    conn: Option<RdmaConnection>,
    local: Arc<Vec<GuestMr<B>>>,
    remote: Vec<RemoteRegion>,
    desc: Arc<MemoryRegion<AnonBuffer>>,
    acks: Arc<MemoryRegion<AnonBuffer>>,
    free: Vec<usize>,
    /// Chunks posted, not yet acknowledged, with their descriptor slot and
    /// the bytes the WRITEs read (kept until the ack).
    unacked: InFlight<(usize, Option<PageData>)>,
    end_sent: bool,
    end_acked: bool,
    wcs: Vec<Completion>,
    stats: ChannelStats,
    /// The session's frame key: descriptors' header tags, acks' tags.
    frame: MacKey,
}

impl<B: Bitmap + Send + Sync + 'static> Pair<B> {
    /// Waits for this pair's next completions (bounded by `timeout`) and
    /// handles them.
    async fn reap(&mut self, timeout: Duration) -> std::result::Result<(), String> {
        let conn = self.conn.as_mut().ok_or("closed")?;
        match tokio::time::timeout(timeout, conn.poll_completions(&mut self.wcs)).await {
            Ok(Ok(_)) => self.process(),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no completion for {timeout:?}")),
        }
    }

    /// Handles the completions in `self.wcs`: frees the descriptor slot of
    /// every acknowledged chunk and posts the ack's receive again.
    fn process(&mut self) -> std::result::Result<(), String> {
        for c in std::mem::take(&mut self.wcs) {
            if let Err(e) = c.ok() {
                return Err(e.to_string());
            }
            if c.wr_id & WR_KIND != WR_ACK || c.kind != WorkKind::Recv {
                continue;
            }
            let slot = (c.wr_id & WR_SLOT) as usize;
            let mut buf = [0u8; ACK_BYTES];
            self.acks
                .as_volatile_slice()
                .read_slice(&mut buf, slot * ACK_BYTES)
                .map_err(|e| format!("reading ack slot {slot}: {e}"))?;
            let (seq, status) =
                AckFrame::decode(&self.frame, &buf[..(c.byte_len as usize).min(ACK_BYTES)])
                    .map_err(|e| e.to_string())?;
            if seq == END_ACK {
                if status != AckStatus::Landed {
                    return Err(format!("destination refused the end frame: {status:?}"));
                }
                self.end_acked = true;
            } else if let Some((dslot, _data)) = self.unacked.acked(seq, status, &mut self.stats) {
                // Not landed (a guest write raced the RDMA WRITE, or the
                // pages were damaged, or busy): its runs are sent again.
                self.free.push(dslot);
            } else {
                return Err(format!("ack for chunk {seq}, which is not in flight here"));
            }
            let seg =
                Segment::new(&self.acks, slot * ACK_BYTES, ACK_BYTES).map_err(|e| e.to_string())?;
            self.conn
                .as_mut()
                .ok_or("closed")?
                .post_recv(&[seg], WR_ACK | slot as u64)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Writes a descriptor into a free slot and posts its SEND.
    fn post_descriptor(&mut self, slot: usize, bytes: &[u8]) -> std::result::Result<(), String> {
        let off = slot * DESC_BYTES;
        self.desc
            .as_volatile_slice()
            .write_slice(bytes, off)
            .map_err(|e| format!("writing descriptor slot {slot}: {e}"))?;
        let seg = Segment::new(&self.desc, off, bytes.len()).map_err(|e| e.to_string())?;
        self.conn
            .as_mut()
            .ok_or("closed")?
            .post_send(&[seg], WR_DESC | slot as u64)
            .map_err(|e| e.to_string())?;
        self.stats.bytes_on_wire += bytes.len() as u64;
        Ok(())
    }

    /// Posts a chunk: one WRITE per non-zero run, then its descriptor.
    async fn post_chunk(
        &mut self,
        chunk: Chunk,
        layout: &MemoryLayout,
        timeout: Duration,
    ) -> std::result::Result<(), (Chunk, String)> {
        let Some(slot) = self.free.pop() else {
            return Err((chunk, "no free descriptor slot".into()));
        };
        match self.post_chunk_in(&chunk, slot, layout, timeout).await {
            Ok(()) => {
                let Chunk {
                    seq, runs, data, ..
                } = chunk;
                self.unacked.sent(seq, runs, (slot, data));
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                Err((chunk, e))
            }
        }
    }

    async fn post_chunk_in(
        &mut self,
        chunk: &Chunk,
        slot: usize,
        layout: &MemoryLayout,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let data: Vec<&PageRun> = chunk.runs.iter().filter(|r| !r.zero).collect();
        let mut i = 0;
        while i < data.len() {
            // Keep one send slot for the descriptor.
            let room = self
                .conn
                .as_ref()
                .ok_or("closed")?
                .send_capacity()
                .saturating_sub(1) as usize;
            if room == 0 {
                self.reap(timeout).await?;
                continue;
            }
            let batch = &data[i..data.len().min(i + room.min(64))];
            let mut segs = Vec::with_capacity(batch.len());
            let mut targets = Vec::with_capacity(batch.len());
            for r in batch {
                let (ri, off) = locate(layout, r.gpa)
                    .ok_or_else(|| format!("run at {:#x} outside the layout", r.gpa))?;
                let seg = Segment::new(&self.local[ri], off as usize, r.bytes() as usize)
                    .map_err(|e| e.to_string())?;
                segs.push([seg]);
                targets.push((ri, off));
            }
            let ops: Vec<WriteOp<'_>> = segs
                .iter()
                .zip(&targets)
                .map(|(s, &(ri, off))| WriteOp {
                    segments: s,
                    remote: &self.remote[ri],
                    remote_offset: off,
                    imm: None,
                    wr_id: WR_WRITE,
                })
                .collect();
            self.conn
                .as_mut()
                .ok_or("closed")?
                .post_writes(&ops)
                .map_err(|e| e.to_string())?;
            i += batch.len();
        }
        if self.conn.as_ref().ok_or("closed")?.send_capacity() == 0 {
            self.reap(timeout).await?;
        }
        let payload = chunk.payload_bytes();
        let head = wire::encode_head(
            &self.frame,
            chunk.seq,
            chunk.round,
            &chunk.runs,
            payload as u32,
            0,
            chunk.tag,
        );
        self.post_descriptor(slot, &head)?;
        self.stats.bytes_on_wire += payload;
        self.stats.payload_bytes += payload;
        Ok(())
    }
}

/// One RDMA channel (a device pair, one RC queue pair) as a [`Transport`]:
/// the multichannel scheduler ([`crate::multichannel::Multichannel`])
/// stripes chunks over these and fails a channel over to the others.
///
/// `send` returns once the chunk's writes and descriptor are posted,
/// waiting while all [`DESC_SLOTS`] descriptors are unacknowledged; `flush`
/// waits for every ack; `finish` sends the end frame. No completion for
/// the channel's timeout while work is outstanding is an error.
pub struct RdmaChannelSender<B: Bitmap + 'static> {
    pair: Pair<B>,
    layout: MemoryLayout,
    timeout: Duration,
}

impl<B: Bitmap + 'static> std::fmt::Debug for RdmaChannelSender<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaChannelSender")
            .field("channel", &self.pair.name)
            .field("unacked", &self.pair.unacked.len())
            .finish_non_exhaustive()
    }
}

impl<B: Bitmap + Send + Sync + 'static> RdmaChannelSender<B> {
    /// Connects to the channels of `accept` (checked against `layout`
    /// first: a region key the destination did not register whole is
    /// refused), one queue pair per channel from the local endpoint on its
    /// subnet, and registers `mem` once per local device. `timeout`: how
    /// long a channel with work outstanding may go without a completion.
    ///
    /// Each connection request carries the channel's token (made with
    /// `data_channel`, the session's data-channel key, for migration
    /// `migration_id`: see [`crate::rdma_wire`]); every queue pair and
    /// registration is in protection domains of this migration only.
    ///
    /// A channel that cannot be connected is left out (named in the log);
    /// the call fails when none connects, or on a registration failure
    /// (e.g. the memlock limit).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect_all(
        mem: &Arc<GuestMemoryMmap<B>>,
        layout: &MemoryLayout,
        local: &[RdmaEndpoint],
        accept: &RdmaAccept,
        timeout: Duration,
        frame: MacKey,
        data_channel: &MacKey,
        migration_id: u64,
    ) -> Result<Vec<(Self, ChannelPath)>> {
        check_accept(accept, layout)?;
        let plan = pair_channels(local, &accept.channels);
        let domains = Domains::new();
        let mut registered: HashMap<String, Arc<Vec<GuestMr<B>>>> = HashMap::new();
        let mut pairs = Vec::new();
        let mut failures = Vec::new();
        for (index, (ch, from)) in accept.channels.iter().zip(plan).enumerate() {
            let dst = SocketAddr::new(ch.endpoint.addr, ch.endpoint.port);
            let Some(from) = from else {
                failures.push(format!("{}: no local RDMA NIC on its subnet", ch.endpoint));
                continue;
            };
            let name = format!(
                "{} {} -> {} {dst}",
                from.device, from.addr, ch.endpoint.device
            );
            let token = cm_private_data(data_channel, migration_id, index as u16);
            let src = SocketAddr::new(from.addr, 0);
            let conn = match connect_retrying(src, dst, timeout, &domains, &token).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(channel = index, "RDMA channel {name} not connected: {e}");
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let device = conn.device_name().to_string();
            let local_mrs = match registered.get(&device) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(register_all(mem, layout, &device, |g| {
                        conn.register(g, Access::LocalRead)
                    })?);
                    registered.insert(device.clone(), m.clone());
                    m
                }
            };
            let buf = |len: usize, access: Access| {
                anon_buffer(len)
                    .and_then(|b| conn.register(b, access))
                    .map_err(|e| rdma_err(format!("cannot set up RDMA channel {name}"), e))
            };
            let desc = buf(DESC_SLOTS * DESC_BYTES, Access::LocalRead)?;
            let acks = buf(DESC_SLOTS * ACK_BYTES, Access::LocalWrite)?;
            let mut pair = Pair {
                name,
                conn: Some(conn),
                local: local_mrs,
                remote: ch
                    .regions
                    .iter()
                    .map(|k| RemoteRegion::zero_based(k.len, k.rkey))
                    .collect(),
                desc,
                acks,
                free: (0..DESC_SLOTS).rev().collect(),
                unacked: InFlight::default(),
                end_sent: false,
                end_acked: false,
                wcs: Vec::new(),
                stats: ChannelStats {
                    channel: index as u16,
                    ..Default::default()
                },
                frame: frame.clone(),
            };
            for s in 0..DESC_SLOTS {
                let seg = Segment::new(&pair.acks, s * ACK_BYTES, ACK_BYTES)
                    .map_err(|e| rdma_err("ack buffer", e))?;
                pair.conn
                    .as_mut()
                    .expect("just connected")
                    .post_recv(&[seg], WR_ACK | s as u64)
                    .map_err(|e| rdma_err(format!("cannot post receives on {}", pair.name), e))?;
            }
            tracing::info!(channel = index, "RDMA channel {} connected", pair.name);
            let path = ChannelPath {
                local: SocketAddr::new(from.addr, 0),
                remote: dst,
                device: Some(device.clone()),
            };
            pairs.push((
                RdmaChannelSender {
                    pair,
                    layout: layout.clone(),
                    timeout,
                },
                path,
            ));
        }
        if pairs.is_empty() {
            return Err(TransportError::Channel {
                what: "RDMA channels",
                detail: format!("none could be connected: {}", failures.join("; ")),
            });
        }
        Ok(pairs)
    }

    /// The channel's name: local device and address, remote device and address.
    pub fn name(&self) -> &str {
        &self.pair.name
    }

    fn failed(&self, e: String) -> TransportError {
        TransportError::Channel {
            what: "RDMA channel",
            detail: format!("{}: {e}", self.pair.name),
        }
    }

    async fn reap(&mut self) -> Result<()> {
        match self.pair.reap(self.timeout).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }
}

impl<B: Bitmap + Send + Sync + 'static> Transport for RdmaChannelSender<B> {
    fn capabilities(&self) -> Caps {
        Caps {
            max_chunk: wire::MAX_CHUNK_PAYLOAD,
            zero_copy: true,
        }
    }

    async fn send(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.runs.len() > MAX_RUNS as usize
            || chunk.payload_bytes() > u64::from(wire::MAX_CHUNK_PAYLOAD)
        {
            return Err(TransportError::Local(WireError::TooLarge {
                field: "chunk",
                len: chunk.payload_bytes(),
                limit: wire::MAX_CHUNK_PAYLOAD.into(),
            }));
        }
        for r in &chunk.runs {
            self.layout.check_run(r.gpa, r.pages.into())?;
        }
        while self.pair.free.is_empty() {
            self.reap().await?;
        }
        let (layout, timeout) = (&self.layout, self.timeout);
        match self.pair.post_chunk(chunk, layout, timeout).await {
            Ok(()) => Ok(()),
            Err((_, e)) => Err(self.failed(e)),
        }
    }

    async fn flush(&mut self) -> Result<Flushed> {
        while !self.pair.unacked.is_empty() {
            self.reap().await?;
        }
        Ok(Flushed {
            resend: self.pair.unacked.take_resend(),
        })
    }

    async fn finish(&mut self) -> Result<()> {
        self.flush().await?;
        let slot = self.pair.free.last().copied().unwrap_or(0);
        self.pair.end_sent = true;
        let end = ChunkHeader::end(&self.pair.frame, 0);
        if let Err(e) = self.pair.post_descriptor(slot, end.as_bytes()) {
            return Err(self.failed(e));
        }
        while !self.pair.end_acked {
            self.reap().await?;
        }
        Ok(())
    }

    fn stats(&self) -> Vec<ChannelStats> {
        vec![self.pair.stats.clone()]
    }
}

impl<B: Bitmap + Send + Sync + 'static> ChannelSender for RdmaChannelSender<B> {
    /// Destroys the queue pair first (so nothing more of this channel can
    /// land: the RDMA form of the fence), then names the chunks whose
    /// descriptors were not acknowledged.
    fn unlanded(&mut self) -> Unlanded {
        drop(self.pair.conn.take());
        let (in_flight, resend) = self.pair.unacked.take_unlanded();
        Unlanded::Known { in_flight, resend }
    }
}

/// Connects, retrying for a few seconds while the peer's listener comes up
/// (rdma_cm answers `Rejected` until it listens). A refusal by the
/// listener (its token check failed) is final.
async fn connect_retrying(
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
    domains: &Domains,
    token: &[u8],
) -> std::result::Result<RdmaConnection, RdmaError> {
    let deadline = tokio::time::Instant::now() + timeout.min(Duration::from_secs(10));
    loop {
        match RdmaConnection::connect_with(Some(src), dst, conn_options(), domains, token).await {
            Ok(c) => return Ok(c),
            Err(e)
                if e.is_unavailable()
                    || matches!(e, RdmaError::Refused { .. })
                    || tokio::time::Instant::now() >= deadline =>
            {
                return Err(e)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

// ----------------------------------------------------------- destination

struct Listening {
    index: u16,
    listener: RdmaListener,
    endpoint: RdmaEndpoint,
}

struct ExposureInner<B: Bitmap + 'static> {
    admission: Admission,
    // Every remote-write registration of the migration, by device; `None`
    // once revoked (dropping them deregisters: the NIC refuses their rkeys).
    regions: Option<HashMap<String, Vec<GuestMr<B>>>>,
}

/// The destination's remote-write exposure of one migration: its
/// registrations and who may connect to write into them ([`Admission`]).
///
/// Cloneable handle; [`revoke`](Self::revoke) deregisters every region at
/// once (any later RDMA WRITE naming their rkeys fails at this NIC with a
/// remote access error, and lands nothing) and refuses every later
/// connection request. Revoke at the switchover (before computing what
/// landed), and on every failure or abort; [`RdmaReceiver::receive`] also
/// revokes when all channels have ended.
pub struct RdmaExposure<B: Bitmap + 'static> {
    inner: Arc<Mutex<ExposureInner<B>>>,
}

impl<B: Bitmap + 'static> Clone for RdmaExposure<B> {
    fn clone(&self) -> Self {
        RdmaExposure {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Bitmap + 'static> std::fmt::Debug for RdmaExposure<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("RdmaExposure")
            .field("admission", &g.admission)
            .field("registered", &g.regions.is_some())
            .finish()
    }
}

impl<B: Bitmap + 'static> RdmaExposure<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExposureInner<B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deregisters every remote-write region of the migration and refuses
    /// every later connection; `true` for the call that did it.
    pub fn revoke(&self, reason: RevokeReason) -> bool {
        let (first, regions) = {
            let mut g = self.lock();
            let first = g.admission.revoke(reason);
            (first, g.regions.take())
        };
        // Deregistration happens here, outside the lock.
        let n: usize = regions
            .as_ref()
            .map_or(0, |r| r.values().map(Vec::len).sum());
        drop(regions);
        if first {
            let g = self.lock();
            tracing::info!(
                migration_id = g.admission.migration_id(),
                "RDMA remote write access revoked ({reason}): {n} region registration(s) dropped, \
                 {} connection request(s) refused",
                g.admission.refused()
            );
        }
        first
    }

    /// Why the exposure ended, once it has.
    pub fn revoked(&self) -> Option<RevokeReason> {
        self.lock().admission.revoked()
    }

    /// Whether any remote-write registration is still in place.
    pub fn is_registered(&self) -> bool {
        self.lock().regions.is_some()
    }

    /// Connection requests refused so far.
    pub fn refused(&self) -> u64 {
        self.lock().admission.refused()
    }

    fn admit(
        &self,
        channel: u16,
        r: &ferry_ffi::rdma::Request<'_>,
    ) -> std::result::Result<(), String> {
        let mut g = self.lock();
        match g
            .admission
            .admit(channel, r.peer.map(|p| p.ip()), r.private_data)
        {
            Ok(()) => Ok(()),
            Err(why) => {
                let n = g.admission.refused();
                let peer = r
                    .peer
                    .map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
                // An intruder may send many: the first few are warnings.
                if n <= 8 {
                    tracing::warn!(
                        channel,
                        "refused an RDMA connection request from {peer}: {why}"
                    );
                } else {
                    tracing::debug!(
                        channel,
                        "refused an RDMA connection request from {peer}: {why}"
                    );
                }
                Err(why.to_string())
            }
        }
    }
}

/// Destination side of the RDMA option, between validation and the data:
/// listeners bound on the shared NICs and guest memory registered on their
/// devices, in protection domains of this migration. Send
/// [`accept`](Self::accept) to the source, then [`receive`](Self::receive);
/// keep [`exposure`](Self::exposure) to revoke remote access.
pub struct RdmaReceiver<B: Bitmap + 'static> {
    listening: Vec<Listening>,
    exposure: RdmaExposure<B>,
    accept: RdmaAccept,
}

impl<B: Bitmap + 'static> std::fmt::Debug for RdmaReceiver<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaReceiver")
            .field("accept", &self.accept)
            .finish_non_exhaustive()
    }
}

enum ChannelEnd {
    /// End frame received; the mask of channels the source lost.
    Ended(u64),
    /// The channel failed (the source resends its chunks elsewhere).
    Lost(String),
}

impl<B: Bitmap + Send + Sync + 'static> RdmaReceiver<B> {
    /// Binds an rdma_cm listener on each of `endpoints` (ports from
    /// [`PORT_BASE`]) and registers every region of `mem` once per device
    /// for remote write (zero-based), all in protection domains of this
    /// migration only. `admission` decides which connection requests the
    /// listeners accept (one per channel, with its token; see
    /// [`crate::rdma_wire`]).
    ///
    /// # Errors
    /// A listener that cannot be bound, or a registration failure (the
    /// memlock limit: the message names it and the fix).
    pub fn prepare(
        mem: &Arc<GuestMemoryMmap<B>>,
        layout: &MemoryLayout,
        endpoints: &[RdmaEndpoint],
        admission: Admission,
    ) -> Result<Self> {
        let domains = Domains::new();
        let mut listening = Vec::new();
        let mut registered: HashMap<String, Vec<GuestMr<B>>> = HashMap::new();
        let mut channels = Vec::new();
        for (index, ep) in endpoints.iter().take(MAX_RDMA_CHANNELS).enumerate() {
            let (listener, port) = bind_listener(ep.addr, &domains)?;
            let pd = listener.protection_domain().clone();
            let device = pd.device_name().to_string();
            if !registered.contains_key(&device) {
                let mrs = register_all(mem, layout, &device, |g| {
                    pd.register(g, Access::RemoteWrite)
                })?;
                registered.insert(device.clone(), mrs);
            }
            let mut regions = Vec::new();
            for m in &registered[&device] {
                let r = m.remote_region();
                if r.addr != 0 {
                    // Never tell a host address.
                    return Err(TransportError::Local(WireError::Invalid {
                        field: "RDMA registration",
                        detail: format!("{device}: a remote-write region is not zero-based"),
                    }));
                }
                regions.push(RdmaRegionKey {
                    len: r.len,
                    rkey: r.rkey,
                });
            }
            let endpoint = RdmaEndpoint {
                device,
                port,
                ..ep.clone()
            };
            channels.push(RdmaChannel {
                endpoint: endpoint.clone(),
                regions,
            });
            listening.push(Listening {
                index: index as u16,
                listener,
                endpoint,
            });
        }
        Ok(RdmaReceiver {
            listening,
            exposure: RdmaExposure {
                inner: Arc::new(Mutex::new(ExposureInner {
                    admission,
                    regions: Some(registered),
                })),
            },
            accept: RdmaAccept { channels },
        })
    }

    /// What to send the source after `Accept`.
    pub fn accept(&self) -> &RdmaAccept {
        &self.accept
    }

    /// The migration's remote-write exposure: revoke it at the switchover
    /// and on any failure.
    pub fn exposure(&self) -> RdmaExposure<B> {
        self.exposure.clone()
    }

    /// Accepts each channel's connection (only with its token) and lands
    /// chunks until every channel has ended or was reported lost by the
    /// source (or failed here), then revokes the exposure. Counts into
    /// `counters` as the TCP receiver does.
    ///
    /// # Errors
    /// A descriptor that fails its checks (bad header, CRC, a run outside
    /// the layout, a stale round), or every channel failing.
    pub async fn receive(
        self,
        inbound: Arc<Inbound>,
        mem: Arc<GuestMemoryMmap<B>>,
        counters: Arc<RecvCounters>,
        timeout: Duration,
    ) -> Result<()> {
        let exposure = self.exposure.clone();
        let r = self.receive_all(inbound, mem, counters, timeout).await;
        exposure.revoke(if r.is_ok() {
            RevokeReason::ChannelsEnded
        } else {
            RevokeReason::Abort
        });
        r
    }

    async fn receive_all(
        self,
        inbound: Arc<Inbound>,
        mem: Arc<GuestMemoryMmap<B>>,
        counters: Arc<RecvCounters>,
        timeout: Duration,
    ) -> Result<()> {
        let n = self.listening.len();
        type Chan = Pin<Box<dyn Future<Output = (usize, Result<ChannelEnd>)> + Send>>;
        let exposure = self.exposure.clone();
        let mut chans: Vec<Option<Chan>> = self
            .listening
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let (inbound, mem, counters) = (inbound.clone(), mem.clone(), counters.clone());
                let exposure = exposure.clone();
                Some(Box::pin(async move {
                    (
                        i,
                        receive_channel(l, exposure, inbound, mem, counters, timeout).await,
                    )
                }) as Chan)
            })
            .collect();
        let (mut ended, mut lost, mut failed) = (0u64, 0u64, 0u64);
        let all: u64 = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let mut last_failure = String::new();
        while (ended | lost) & all != all {
            if chans.iter().all(Option::is_none) {
                break;
            }
            let (i, r) = std::future::poll_fn(|cx| {
                for c in chans.iter_mut() {
                    if let Some(f) = c {
                        if let Poll::Ready(v) = f.as_mut().poll(cx) {
                            *c = None;
                            return Poll::Ready(v);
                        }
                    }
                }
                Poll::Pending
            })
            .await;
            match r? {
                ChannelEnd::Ended(mask) => {
                    ended |= 1 << i;
                    lost |= mask;
                }
                ChannelEnd::Lost(e) => {
                    tracing::warn!(channel = i, "RDMA channel lost: {e}");
                    failed |= 1 << i;
                    last_failure = e;
                }
            }
        }
        // Dropping the rest closes their queue pairs: nothing more lands.
        drop(chans);
        if ended == 0 {
            return Err(TransportError::Channel {
                what: "RDMA channels",
                detail: format!(
                    "no channel ended cleanly ({} failed; last: {last_failure})",
                    failed.count_ones()
                ),
            });
        }
        Ok(())
    }
}

fn bind_listener(addr: IpAddr, domains: &Domains) -> Result<(RdmaListener, u16)> {
    let mut last = None;
    for port in PORT_BASE..PORT_BASE + PORT_TRIES {
        match RdmaListener::bind(SocketAddr::new(addr, port), conn_options(), domains) {
            Ok(l) => return Ok((l, port)),
            Err(e) if e.is_unavailable() => {
                return Err(rdma_err(format!("cannot listen for RDMA on {addr}"), e))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(rdma_err(
        format!(
            "cannot listen for RDMA on {addr}, ports {PORT_BASE}..{}",
            PORT_BASE + PORT_TRIES
        ),
        last.expect("tried at least one port"),
    ))
}

/// One channel at the destination: accept its connection (only with its
/// token), keep receives posted, land descriptors, ack them; meanwhile
/// refuse every further request on the listener.
async fn receive_channel<B: Bitmap + Send + Sync + 'static>(
    l: Listening,
    exposure: RdmaExposure<B>,
    inbound: Arc<Inbound>,
    mem: Arc<GuestMemoryMmap<B>>,
    counters: Arc<RecvCounters>,
    timeout: Duration,
) -> Result<ChannelEnd> {
    let name = l.endpoint.to_string();
    let index = l.index;
    let mut listener = l.listener;
    let admit = |r: &ferry_ffi::rdma::Request<'_>| exposure.admit(index, r);
    let mut conn = match tokio::time::timeout(timeout, listener.accept_checked(admit)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Ok(ChannelEnd::Lost(format!("{name}: accept failed: {e}"))),
        Err(_) => {
            return Ok(ChannelEnd::Lost(format!(
                "{name}: no connection within {timeout:?}"
            )))
        }
    };
    let mut listening = Some(listener);
    let lost = |e: RdmaError| Ok(ChannelEnd::Lost(format!("{name}: {e}")));
    let setup = |e: RdmaError| rdma_err(format!("cannot set up RDMA channel {name}"), e);
    let descs = anon_buffer(RECV_SLOTS * DESC_BYTES)
        .and_then(|b| conn.register(b, Access::LocalWrite))
        .map_err(setup)?;
    let acks = anon_buffer(ACK_SLOTS * ACK_BYTES)
        .and_then(|b| conn.register(b, Access::LocalRead))
        .map_err(setup)?;
    for s in 0..RECV_SLOTS {
        let seg = Segment::new(&descs, s * DESC_BYTES, DESC_BYTES).map_err(setup)?;
        if let Err(e) = conn.post_recv(&[seg], s as u64) {
            return lost(e);
        }
    }
    let mut free_acks: Vec<usize> = (0..ACK_SLOTS).rev().collect();
    let mut wcs = Vec::new();
    let mut end: Option<u64> = None;
    let mut buf = vec![0u8; DESC_BYTES];
    loop {
        if let Some(mask) = end {
            if free_acks.len() == ACK_SLOTS {
                // Every ack (the end frame's last) has left.
                return Ok(ChannelEnd::Ended(mask));
            }
        }
        let polled = match listening.as_mut() {
            // Requests that come while the channel runs are refused (the
            // admission says the channel is connected, or revoked).
            Some(lst) => tokio::select! {
                r = conn.poll_completions(&mut wcs) => r,
                other = lst.accept_checked(admit) => {
                    match other {
                        Ok(c) => {
                            drop(c);
                            tracing::error!(channel = index, "a second RDMA connection was admitted on {name}: closed");
                        }
                        Err(e) => {
                            tracing::debug!(channel = index, "RDMA listener {name} stopped: {e}");
                            listening = None;
                        }
                    }
                    continue;
                }
            },
            None => conn.poll_completions(&mut wcs).await,
        };
        if let Err(e) = polled {
            return lost(e);
        }
        for c in wcs.drain(..) {
            if let Err(e) = c.ok() {
                return lost(e);
            }
            if c.kind == WorkKind::Send {
                free_acks.push((c.wr_id & WR_SLOT) as usize);
                continue;
            }
            if c.kind != WorkKind::Recv {
                continue;
            }
            let slot = (c.wr_id & WR_SLOT) as usize;
            let len = (c.byte_len as usize).min(DESC_BYTES);
            descs
                .as_volatile_slice()
                .read_slice(&mut buf[..len], slot * DESC_BYTES)
                .map_err(|e| {
                    TransportError::Local(WireError::Malformed {
                        what: "RDMA descriptor",
                        detail: e.to_string(),
                    })
                })?;
            let (seq, status, mask) = land_descriptor(&buf[..len], &inbound, &*mem, &counters)?;
            if let Some(m) = mask {
                end = Some(m);
            }
            let ack_seq = if mask.is_some() { END_ACK } else { seq };
            let Some(a) = free_acks.pop() else {
                return Err(TransportError::Wire(WireError::Invalid {
                    field: "RDMA descriptors",
                    detail: "more descriptors in flight than the source may have".into(),
                }));
            };
            let frame = inbound.ack(ack_seq, status);
            acks.as_volatile_slice()
                .write_slice(frame.as_bytes(), a * ACK_BYTES)
                .map_err(|e| {
                    TransportError::Local(WireError::Malformed {
                        what: "RDMA ack",
                        detail: e.to_string(),
                    })
                })?;
            let seg = Segment::new(&acks, a * ACK_BYTES, ACK_BYTES).map_err(setup)?;
            // Receive again before acking, so the source's next descriptor
            // always finds one.
            let rseg = Segment::new(&descs, slot * DESC_BYTES, DESC_BYTES).map_err(setup)?;
            if let Err(e) = conn.post_recv(&[rseg], slot as u64) {
                return lost(e);
            }
            if let Err(e) = conn.post_send(&[seg], a as u64) {
                return lost(e);
            }
        }
    }
}

/// Checks one descriptor and applies it. Its header tag is checked first
/// (a descriptor changed on the way is refused and the channel lost), then
/// its runs are claimed (no other landing touches them meanwhile; if one
/// does, the answer is [`AckStatus::Busy`]), zero runs are zeroed here
/// (their pages never travel), and the non-zero runs, written by the peer's
/// NIC before the descriptor, are hashed into the migration's ledger and
/// their contributions checked against the payload tag ([`AckStatus::Landed`]
/// or [`AckStatus::Mismatch`]). The pages are read through an opaque copy
/// ([`ferry_ffi::vio::copy_out`]), never a reference: memory registered for
/// remote write can be written by the NIC at any time. Returns its `seq`,
/// the answer, and for an end frame the lost mask.
fn land_descriptor<B: Bitmap + Send + Sync + 'static>(
    bytes: &[u8],
    inbound: &Inbound,
    mem: &GuestMemoryMmap<B>,
    counters: &RecvCounters,
) -> Result<(u64, AckStatus, Option<u64>)> {
    let (h, kind) = ChunkHeader::decode(bytes)?;
    let table_len = h.run_count.get() as usize * 16;
    let table = bytes
        .get(HEADER_LEN..HEADER_LEN + table_len)
        .ok_or(TransportError::Wire(WireError::Malformed {
            what: "RDMA descriptor",
            detail: format!("{} bytes for {} runs", bytes.len(), h.run_count.get()),
        }))?;
    let f = match inbound.admit(&h, kind, table, counters)? {
        Checked::End(mask) => return Ok((END_ACK, AckStatus::Landed, Some(mask))),
        Checked::Pages(f) => f,
    };
    if f.codec.is_some() {
        return Err(TransportError::Wire(WireError::Invalid {
            field: "RDMA descriptor flags",
            detail: "compressed (RDMA chunks are never compressed)".into(),
        }));
    }
    let mut claim = match claim_runs(mem, &f.runs)? {
        Ok(c) => c,
        Err(busy) => return Ok((f.seq, inbound.busy(&f, busy, counters), None)),
    };
    let mut tally = Tally::new(&inbound.ledger);
    let mut page = [0u8; PAGE_SIZE as usize];
    for r in &f.runs {
        if r.zero {
            land_zero_run(&mut claim, mem, r, &mut tally)?;
        } else {
            for p in 0..u64::from(r.pages) {
                let gpa = r.gpa + p * PAGE_SIZE;
                let s = mem
                    .get_slice(vm_memory::GuestAddress(gpa), PAGE_SIZE as usize)
                    .map_err(|_| {
                        TransportError::Wire(WireError::OutsideLayout { gpa, pages: 1 })
                    })?;
                ferry_ffi::vio::copy_out(&s, &mut page);
                tally.page(gpa, &page);
            }
        }
    }
    let sum = tally.sum;
    drop(tally);
    drop(claim);
    Ok((f.seq, inbound.landed(&f, true, sum, counters), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionDesc, PAGE_SIZE};

    #[test]
    fn endpoints_come_from_roce_gids_and_routes() {
        let root = std::env::temp_dir().join(format!("ferry-rdma-sysfs-{}", std::process::id()));
        let port = root.join("rxe0/ports/1");
        std::fs::create_dir_all(port.join("gids")).unwrap();
        std::fs::create_dir_all(port.join("gid_attrs/ndevs")).unwrap();
        let gids = [
            ("0", "fe80:0000:0000:0000:5054:00ff:fe77:0001", "eth1"),
            ("1", "0000:0000:0000:0000:0000:ffff:0a4d:0a01", "eth1"),
            ("2", "0000:0000:0000:0000:0000:ffff:0a4d:0a01", "eth1"),
            ("3", "0000:0000:0000:0000:0000:0000:0000:0000", ""),
        ];
        for (i, g, nd) in gids {
            std::fs::write(port.join("gids").join(i), format!("{g}\n")).unwrap();
            std::fs::write(port.join("gid_attrs/ndevs").join(i), format!("{nd}\n")).unwrap();
        }
        // 10.77.10.0/24 on eth1, a default route via eth0.
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                      eth1\t000A4D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let eps = endpoints_from_sysfs(&root, routes, &["rxe0".into(), "missing0".into()]);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            eps,
            vec![RdmaEndpoint {
                addr: "10.77.10.1".parse().unwrap(),
                prefix: 24,
                device: "rxe0".into(),
                port: 0,
            }]
        );
        assert_eq!(
            route_prefix(routes, "eth0", "10.77.10.1".parse().unwrap()),
            0
        );
    }

    #[test]
    fn runs_are_located_in_their_region() {
        let l = MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![
                RegionDesc {
                    gpa: 0,
                    size: 3 << 30,
                },
                RegionDesc {
                    gpa: 4 << 30,
                    size: 1 << 30,
                },
            ],
        };
        assert_eq!(locate(&l, 0), Some((0, 0)));
        assert_eq!(locate(&l, (3 << 30) - 4096), Some((0, (3 << 30) - 4096)));
        assert_eq!(locate(&l, 3 << 30), None);
        assert_eq!(locate(&l, (4 << 30) + 8192), Some((1, 8192)));
        assert_eq!(locate(&l, 5 << 30), None);
    }

    #[test]
    fn descriptors_are_checked_before_anything_is_applied() {
        let layout = MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![RegionDesc {
                gpa: 0,
                size: 16 * PAGE_SIZE,
            }],
        };
        let ranges = [(vm_memory::GuestAddress(0), 16 * 4096)];
        // What the source read, and what its NIC wrote into the destination.
        let src: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        src.write_slice(&[0x5c; 4096], vm_memory::GuestAddress(0))
            .unwrap();
        mem.write_slice(&[0x5c; 4096], vm_memory::GuestAddress(0))
            .unwrap();
        mem.write_slice(&[0xaa; 4096], vm_memory::GuestAddress(4096))
            .unwrap();
        let counters = RecvCounters::default();
        let inbound = crate::tcp::test_inbound(layout.clone(), None);
        let key = crate::tcp::test_frame_key();
        let desc = |runs: &[PageRun], payload: u32, round: u32| {
            let c = Chunk::read(
                &src,
                &crate::tcp::test_page_key(),
                &key,
                7,
                round,
                runs.to_vec(),
                false,
            )
            .unwrap();
            let table = wire::run_table(runs);
            let h = ChunkHeader::pages(&key, 7, round, &table, payload, 0, c.tag);
            let mut b = h.as_bytes().to_vec();
            b.extend_from_slice(&table);
            b
        };
        let zero = PageRun {
            gpa: 4096,
            pages: 1,
            zero: true,
        };
        let data = PageRun {
            gpa: 0,
            pages: 1,
            zero: false,
        };
        let land = |d: &[u8]| land_descriptor(d, &inbound, &mem, &counters);
        // Good: a data run and a zero run; the zero run is applied here, the
        // data run (written by the NIC) hashed and its tag matched.
        let ok = desc(&[data, zero], 4096, 1);
        assert_eq!(land(&ok).unwrap(), (7, AckStatus::Landed, None));
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, vm_memory::GuestAddress(4096))
            .unwrap();
        assert!(page.iter().all(|&b| b == 0));
        assert_eq!(
            counters
                .payload_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            4096
        );
        // The destination's evidence is the source's for the same pages.
        let source = layout.ledger(crate::tcp::test_page_key()).unwrap();
        let k = source.key().clone();
        source.apply(source.record(0, k.hash(&[0x5c; 4096])).unwrap());
        assert_eq!(inbound.ledger.evidence(), source.evidence());
        // The NIC wrote something else than the source read: mismatch.
        mem.write_slice(&[0x5d], vm_memory::GuestAddress(100))
            .unwrap();
        assert_eq!(land(&ok).unwrap(), (7, AckStatus::Mismatch, None));
        mem.write_slice(&[0x5c], vm_memory::GuestAddress(100))
            .unwrap();
        // Pages another landing holds: busy, nothing applied.
        {
            let held = mem.get_slice(vm_memory::GuestAddress(4096), 4096).unwrap();
            let _claim = ferry_ffi::vio::claim(&[held]).unwrap();
            assert_eq!(land(&ok).unwrap(), (7, AckStatus::Busy, None));
        }
        // A changed run table or header: refused by the header tag.
        let mut forged = ok.clone();
        forged[HEADER_LEN] ^= 0x10;
        let e = land(&forged).unwrap_err().to_string();
        assert!(e.contains("chunk header tag"), "{e}");
        let mut forged = ok.clone();
        forged[16] ^= 1;
        assert!(land(&forged).is_err(), "round changed");
        // Payload length that does not match the runs.
        assert!(land(&desc(&[data], 8192, 1)).is_err());
        // A run outside the layout.
        let out = PageRun {
            gpa: 16 * 4096,
            pages: 1,
            zero: true,
        };
        let e = land(&desc(&[out], 0, 1)).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        // A stale round.
        let e = land(&desc(&[zero], 0, 0)).unwrap_err().to_string();
        assert!(e.contains("stale"), "{e}");
        // Truncated.
        assert!(land(&ok[..70]).is_err());
        // End frame: the lost mask comes back.
        let end = ChunkHeader::end(&key, 0b10);
        assert_eq!(
            land(end.as_bytes()).unwrap(),
            (END_ACK, AckStatus::Landed, Some(0b10))
        );
    }
}
