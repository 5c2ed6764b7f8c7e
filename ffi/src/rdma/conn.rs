//! rdma_cm connection setup and the connected RC queue pair.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys::ibv_sge;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard as _, QueuePair as _, QueuePairState, SetScatterGatherEntry as _,
    WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use super::cm::{CmChannel, CmEventKind, CmId, ConnectRequest};
use super::cq::{Cq, RawWc, WcStatus};
use super::device::{context_for, io_source, Domains, ProtectionDomain};
use super::error::{RdmaError, Result};
use super::memory::{Access, MemoryRegion, RdmaMemory, RemoteRegion, Segment};

/// Sizes and timeouts of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Send queue depth: work requests in flight at once.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Scatter-gather entries per send work request.
    pub max_send_sge: u32,
    /// Scatter-gather entries per receive work request.
    pub max_recv_sge: u32,
    /// Timeout of each rdma_cm step (address, route, connect).
    pub cm_timeout: Duration,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_send_wr: 256,
            max_recv_wr: 64,
            max_send_sge: 16,
            max_recv_sge: 1,
            cm_timeout: Duration::from_secs(5),
        }
    }
}

/// What a listener knows of a connection request when deciding whether to
/// accept it: the source address rdma_cm reports and the private data the
/// peer sent (up to [`super::MAX_PRIVATE_DATA`] bytes, zero-padded by the
/// connection manager on InfiniBand and RoCE).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Where the request came from (`None` if rdma_cm did not say).
    pub peer: Option<SocketAddr>,
    /// The request's private data.
    pub private_data: &'a [u8],
}

/// A passive rdma_cm endpoint: accepts one [`RdmaConnection`] per incoming
/// connection request that passes the caller's check, and rejects the
/// others (with [`super::REFUSAL`] in the rejection's private data) without
/// creating anything for them.
///
/// Every accepted connection's queue pair lives in the listener's protection
/// domain (from the [`Domains`] given to [`bind`](Self::bind)), so it can
/// reach the memory registered there and nothing else.
pub struct RdmaListener {
    // Requests received while a handshake was under way (their events are
    // acknowledged; the ids are owned here until accepted or rejected).
    pending: VecDeque<ConnectRequest>,
    // The listening id (kept alive; destroyed after the pending requests).
    _id: CmId,
    chan: CmChannel,
    addr: SocketAddr,
    pd: ProtectionDomain,
    opts: ConnectionOptions,
    refused: u64,
}

impl std::fmt::Debug for RdmaListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaListener")
            .field("addr", &self.addr)
            .field("device", &self.pd.device_name())
            .field("refused", &self.refused)
            .finish()
    }
}

impl RdmaListener {
    /// Listens on `addr` (an IP of an RDMA NIC; not the unspecified
    /// address: the listener's device must be known), with its protection
    /// domain taken from `domains`.
    ///
    /// # Errors
    /// [`RdmaError::LibraryMissing`] / [`RdmaError::NoDevice`] without RDMA,
    /// [`RdmaError::Verbs`] when binding fails (e.g. no RDMA device has that
    /// address: `EADDRNOTAVAIL`/`ENODEV`).
    ///
    /// # Panics
    /// Outside a tokio runtime with IO enabled.
    pub fn bind(
        addr: SocketAddr,
        opts: ConnectionOptions,
        domains: &Domains,
    ) -> Result<RdmaListener> {
        let chan = CmChannel::new()?;
        if addr.ip().is_unspecified() {
            return Err(RdmaError::InvalidRequest {
                reason:
                    "an RDMA listener needs the address of an RDMA NIC, not the unspecified address",
            });
        }
        let id = chan.create_id()?;
        id.bind(addr)?;
        let verbs = id.verbs().ok_or(RdmaError::NoDevice)?;
        let ctx = context_for(verbs, addr.ip())?;
        let pd = domains.for_context(&ctx)?;
        id.listen(16)?;
        Ok(RdmaListener {
            pending: VecDeque::new(),
            _id: id,
            chan,
            addr,
            pd,
            opts,
            refused: 0,
        })
    }

    /// Address the listener was bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The protection domain accepted connections use: register the memory
    /// they may write here **before** the peer connects.
    pub fn protection_domain(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// Connection requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Accepts every connection request (no check): tests and tools.
    pub async fn accept(&mut self) -> Result<RdmaConnection> {
        self.accept_checked(|_| Ok(())).await
    }

    /// Waits for a connection request that `check` accepts and accepts it.
    /// Every request `check` refuses (`Err(reason)`) is rejected at once
    /// (no queue pair is created for it) and waiting goes on: a stranger's
    /// requests never take the place of the expected one.
    ///
    /// Cancel safety: cancel safe while waiting for a request (requests are
    /// taken from the channel only synchronously); not while a handshake is
    /// under way (the half-accepted connection is dropped, which the peer
    /// sees as an error). Requests that arrive meanwhile are kept for later
    /// calls.
    pub async fn accept_checked(
        &mut self,
        mut check: impl FnMut(&Request<'_>) -> std::result::Result<(), String>,
    ) -> Result<RdmaConnection> {
        loop {
            let req = match self.pending.pop_front() {
                Some(r) => r,
                None => match self.chan.next().await?.into_request() {
                    Some(r) => r,
                    // Established/Disconnected/TimewaitExit of an earlier
                    // connection: dropping the event acknowledged it.
                    None => continue,
                },
            };
            let verdict = check(&Request {
                peer: req.peer,
                private_data: &req.private_data,
            });
            if verdict.is_err() {
                self.refused += 1;
                // Rejecting can fail if the peer gave up already; either
                // way the id is destroyed here.
                let _ = req.id.reject();
                continue;
            }
            let peer = req.peer.unwrap_or(self.addr);
            let id = req.id;
            let mut conn = RdmaConnection::create(&self.pd, &self.opts, peer)?;
            // The source may RDMA WRITE into this side (and do nothing else).
            conn.modify(&id, QueuePairState::Init, Some(AccessFlags::RemoteWrite))?;
            conn.modify(&id, QueuePairState::ReadyToReceive, None)?;
            conn.modify(&id, QueuePairState::ReadyToSend, None)?;
            id.accept(conn.qp.qp_number())?;
            // Wait for the RTU (Established) of *this* id; keep other
            // connection requests for later accepts.
            let deadline = tokio::time::Instant::now() + self.opts.cm_timeout;
            loop {
                let ev = tokio::time::timeout_at(deadline, self.chan.next())
                    .await
                    .map_err(|_| RdmaError::Connect {
                        peer,
                        event: "timeout".into(),
                        status: -libc::ETIMEDOUT,
                        expected: "Established",
                    })??;
                if ev.kind() == CmEventKind::ConnectRequest {
                    if let Some(r) = ev.into_request() {
                        self.pending.push_back(r);
                    }
                    continue;
                }
                if !id.is(ev.id()) {
                    continue;
                }
                let (kind, status) = (ev.kind(), ev.status());
                // Acknowledge before `id` can be dropped.
                drop(ev);
                if kind == CmEventKind::Established {
                    conn.id = Some(id);
                    return Ok(conn);
                }
                return Err(RdmaError::Connect {
                    peer,
                    event: kind.name(),
                    status,
                    expected: "Established",
                });
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Send,
    Recv,
}

/// What a completed work request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkKind {
    /// RDMA WRITE posted here.
    Write,
    /// RDMA WRITE_WITH_IMM posted here.
    WriteImm,
    /// SEND posted here.
    Send,
    /// A posted receive consumed by the peer's SEND.
    Recv,
    /// A posted receive consumed by the peer's WRITE_WITH_IMM (no payload
    /// in the receive buffer; the data went where the peer wrote it).
    RecvImm,
}

/// A reaped work completion.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The caller's `wr_id` given when posting.
    pub wr_id: u64,
    /// What the request was.
    pub kind: WorkKind,
    /// Outcome.
    pub status: WcStatus,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// Immediate data (for [`WorkKind::RecvImm`]).
    pub imm: Option<u32>,
    /// Vendor error code (diagnostics, on failure).
    pub vendor_err: u32,
}

impl Completion {
    /// `Ok(self)` on success, an error naming the status otherwise.
    pub fn ok(self) -> Result<Completion> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(RdmaError::WorkRequestFailed {
                wr_id: self.wr_id,
                kind: format!("{:?}", self.kind),
                status: self.status.name(),
                vendor_err: self.vendor_err,
            })
        }
    }
}

/// One RDMA WRITE (or WRITE_WITH_IMM) for [`RdmaConnection::post_writes`].
#[derive(Debug, Clone)]
pub struct WriteOp<'a> {
    /// Local bytes, gathered in order (one or more segments).
    pub segments: &'a [Segment],
    /// Where they land.
    pub remote: &'a RemoteRegion,
    /// Offset in `remote` of the first byte.
    pub remote_offset: u64,
    /// `Some(imm)` for WRITE_WITH_IMM (consumes a receive at the peer).
    pub imm: Option<u32>,
    /// Returned in the [`Completion`].
    pub wr_id: u64,
}

struct InFlight {
    wr_id: u64,
    kind: WorkKind,
    queue: Queue,
    // Keeps the memory regions of the request registered and mapped until
    // the completion is reaped (or the QP is destroyed).
    _keep: Vec<Segment>,
}

/// A connected RC queue pair with its own completion queue.
///
/// * Posting is synchronous and never waits: a full queue is an error
///   ([`RdmaError::QueueFull`]); reap completions with
///   [`poll_completions`](Self::poll_completions) to make room.
/// * Every work request is signalled; each keeps `Arc`s of its memory
///   regions until its completion is reaped, so memory that the NIC may
///   still read or write can never be deregistered or unmapped.
/// * Dropping the connection disconnects, destroys the QP (after which the
///   NIC no longer touches any memory), then releases in-flight regions.
pub struct RdmaConnection {
    // Field order is drop order (after Drop::drop disconnected):
    // QP first, then CQ, then the cm id, then in-flight keep-alives.
    qp: BasicQueuePair,
    cq: Cq,
    id: Option<CmId>,
    chan: Option<CmChannel>,
    pd: ProtectionDomain,
    inflight: HashMap<u64, InFlight>,
    next_seq: u64,
    send_used: u32,
    recv_used: u32,
    opts: ConnectionOptions,
    peer: SocketAddr,
    broken: bool,
    scratch: Vec<RawWc>,
}

impl std::fmt::Debug for RdmaConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConnection")
            .field("device", &self.pd.device_name())
            .field("peer", &self.peer)
            .field("qp_num", &self.qp.qp_number())
            .field("send_in_flight", &self.send_used)
            .field("recv_in_flight", &self.recv_used)
            .finish()
    }
}

impl Drop for RdmaConnection {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            // Moves the QP to the error state and tells the peer; errors are
            // irrelevant here (the peer may be gone already).
            let _ = id.disconnect();
        }
    }
}

impl RdmaConnection {
    /// Connects to a listener at `dst`, from the RDMA device owning `src`,
    /// in a protection domain of its own and without private data (tests
    /// and tools; Ferry's data path uses [`connect_with`](Self::connect_with)).
    ///
    /// # Errors
    /// As [`connect_with`](Self::connect_with).
    ///
    /// # Panics
    /// Outside a tokio runtime with IO and time enabled.
    pub async fn connect(
        src: Option<SocketAddr>,
        dst: SocketAddr,
        opts: ConnectionOptions,
    ) -> Result<RdmaConnection> {
        Self::connect_with(src, dst, opts, &Domains::new(), &[]).await
    }

    /// Connects to a listener at `dst`, from the RDMA device owning `src`
    /// (use the NIC's IP, port 0; with `None` the route decides), with the
    /// queue pair in `domains`' protection domain of that device, sending
    /// `private_data` (at most [`super::MAX_PRIVATE_DATA`] bytes) with the
    /// request. The queue pair accepts no remote access: nothing the peer
    /// sends can read or write this side's memory.
    ///
    /// # Errors
    /// [`RdmaError::LibraryMissing`]/[`RdmaError::NoDevice`] without RDMA,
    /// [`RdmaError::Refused`] when a Ferry listener refused the request (its
    /// check failed), [`RdmaError::Connect`] when the peer rejects or does
    /// not answer otherwise (e.g. `Rejected` while it is not listening yet:
    /// callers may retry).
    ///
    /// # Panics
    /// Outside a tokio runtime with IO and time enabled.
    pub async fn connect_with(
        src: Option<SocketAddr>,
        dst: SocketAddr,
        opts: ConnectionOptions,
        domains: &Domains,
        private_data: &[u8],
    ) -> Result<RdmaConnection> {
        if private_data.len() > super::MAX_PRIVATE_DATA {
            return Err(RdmaError::InvalidRequest {
                reason: "rdma_cm private data is limited to 56 bytes",
            });
        }
        let chan = CmChannel::new()?;
        let id = chan.create_id()?;
        if let Some(src) = src {
            id.bind(src)?;
        }
        let t = opts.cm_timeout;
        id.resolve_addr(dst, t)?;
        drop(
            chan.expect(CmEventKind::AddrResolved, dst, t + Duration::from_secs(1))
                .await?,
        );
        id.resolve_route(t)?;
        drop(
            chan.expect(CmEventKind::RouteResolved, dst, t + Duration::from_secs(1))
                .await?,
        );
        let verbs = id.verbs().ok_or(RdmaError::NoDevice)?;
        let local = match src {
            Some(s) => s.ip(),
            None => id.local_addr().map(|a| a.ip()).ok_or(RdmaError::NoDevice)?,
        };
        let ctx = context_for(verbs, local)?;
        let pd = domains.for_context(&ctx)?;
        let mut conn = RdmaConnection::create(&pd, &opts, dst)?;
        conn.modify(&id, QueuePairState::Init, Some(AccessFlags::none()))?;
        id.connect(conn.qp.qp_number(), private_data)?;
        drop(chan.expect(CmEventKind::ConnectResponse, dst, t).await?);
        conn.modify(&id, QueuePairState::ReadyToReceive, None)?;
        conn.modify(&id, QueuePairState::ReadyToSend, None)?;
        id.establish()?;
        conn.id = Some(id);
        conn.chan = Some(chan);
        Ok(conn)
    }

    /// Creates CQ and QP in `pd`.
    fn create(
        pd: &ProtectionDomain,
        opts: &ConnectionOptions,
        peer: SocketAddr,
    ) -> Result<RdmaConnection> {
        let cq = Cq::new(&pd.ctx, opts.max_send_wr + opts.max_recv_wr)?;
        let qp = pd
            .pd
            .create_qp_builder()
            .setup_max_send_wr(opts.max_send_wr)
            .setup_max_recv_wr(opts.max_recv_wr)
            .setup_max_send_sge(opts.max_send_sge)
            .setup_max_recv_sge(opts.max_recv_sge)
            .setup_send_cq(Arc::clone(&cq.cq))
            .setup_recv_cq(Arc::clone(&cq.cq))
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_qp", io_source(&e)))?;
        Ok(RdmaConnection {
            qp,
            cq,
            id: None,
            chan: None,
            pd: pd.clone(),
            inflight: HashMap::new(),
            next_seq: 1,
            send_used: 0,
            recv_used: 0,
            opts: opts.clone(),
            peer,
            broken: false,
            scratch: Vec::new(),
        })
    }

    /// Moves the QP to `state` with the attributes rdma_cm gives for `id`;
    /// `access` (INIT only) sets what the peer may do to this side.
    fn modify(
        &mut self,
        id: &CmId,
        state: QueuePairState,
        access: Option<AccessFlags>,
    ) -> Result<()> {
        let mut attr = id.qp_attr(state)?;
        if let Some(a) = access {
            attr.setup_access_flags(a);
        }
        self.qp
            .modify(&attr)
            .map_err(|e| RdmaError::verbs("ibv_modify_qp", io_source(&e)))
    }

    /// The protection domain of this connection's device: register memory
    /// here (or through [`register`](Self::register)).
    pub fn protection_domain(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// Registers `owner` in this connection's protection domain (shared by
    /// the connections of the same [`Domains`] on the same device).
    pub fn register<O: RdmaMemory>(
        &self,
        owner: O,
        access: Access,
    ) -> Result<Arc<MemoryRegion<O>>> {
        self.pd.register(owner, access)
    }

    /// Name of the local RDMA device.
    pub fn device_name(&self) -> &str {
        self.pd.device_name()
    }

    /// Peer address this connection was made to (or the listener address on
    /// the passive side).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Free slots in the send queue.
    pub fn send_capacity(&self) -> u32 {
        self.opts.max_send_wr - self.send_used
    }

    /// Free slots in the receive queue.
    pub fn recv_capacity(&self) -> u32 {
        self.opts.max_recv_wr - self.recv_used
    }

    /// Work requests posted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// One RDMA WRITE of `len` bytes at `offset` of `local` to
    /// `remote_offset` of `remote`.
    pub fn post_write<O: Send + Sync + 'static>(
        &mut self,
        local: &Arc<MemoryRegion<O>>,
        offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        wr_id: u64,
    ) -> Result<()> {
        let seg = [Segment::new(local, offset, len)?];
        self.post_writes(&[WriteOp {
            segments: &seg,
            remote,
            remote_offset,
            imm: None,
            wr_id,
        }])
    }

    /// As [`post_write`](Self::post_write), as WRITE_WITH_IMM carrying `imm`
    /// (the peer must have a receive posted; it completes there as
    /// [`WorkKind::RecvImm`] once all earlier writes on this QP have landed).
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_imm<O: Send + Sync + 'static>(
        &mut self,
        local: &Arc<MemoryRegion<O>>,
        offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        wr_id: u64,
        imm: u32,
    ) -> Result<()> {
        let seg = [Segment::new(local, offset, len)?];
        self.post_writes(&[WriteOp {
            segments: &seg,
            remote,
            remote_offset,
            imm: Some(imm),
            wr_id,
        }])
    }

    /// Posts several WRITEs (scatter-gather each) with one doorbell.
    ///
    /// All requests are validated first (protection domain, segment count,
    /// remote range, queue room); nothing is posted if one is invalid.
    ///
    /// # Errors
    /// [`RdmaError::RemoteOutOfRange`], [`RdmaError::WrongProtectionDomain`],
    /// [`RdmaError::InvalidRequest`], [`RdmaError::QueueFull`], or
    /// [`RdmaError::Verbs`] from `ibv_post_send` (the connection is then
    /// unusable).
    pub fn post_writes(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        let mut checked = Vec::with_capacity(ops.len());
        for op in ops {
            let len = self.check_segments(op.segments, self.opts.max_send_sge)?;
            let addr = op.remote.checked_addr(op.remote_offset, len)?;
            checked.push(addr);
        }
        self.check_room(Queue::Send, ops.len())?;
        let mut reqs = Vec::with_capacity(ops.len());
        for (op, addr) in ops.iter().zip(checked) {
            let kind = if op.imm.is_some() {
                WorkKind::WriteImm
            } else {
                WorkKind::Write
            };
            let seq = self.track(op.wr_id, kind, Queue::Send, op.segments);
            reqs.push((seq, op, addr));
        }
        let mut guard = self.qp.start_post_send();
        for (seq, op, addr) in &reqs {
            let wr = guard.construct_wr(*seq, WorkRequestFlags::Signaled);
            let wr = match op.imm {
                // Immediate data travels in network byte order.
                Some(imm) => wr.setup_write_imm(op.remote.rkey, *addr, imm.to_be()),
                None => wr.setup_write(op.remote.rkey, *addr),
            };
            let sges = to_sges(op.segments);
            // SAFETY: every segment lies inside a live memory region of this
            // connection's protection domain (checked above), and `track`
            // stored clones of the segments (holding their regions) until
            // the completion is reaped or the QP is destroyed.
            unsafe { wr.setup_sge_list(&sges) };
        }
        let r = guard
            .post()
            .map_err(|e| RdmaError::verbs("ibv_post_send", io_source(&e)));
        self.finish_post(r)
    }

    /// Posts a SEND of `segments` (small control messages; the peer needs a
    /// receive posted).
    pub fn post_send(&mut self, segments: &[Segment], wr_id: u64) -> Result<()> {
        self.check_segments(segments, self.opts.max_send_sge)?;
        self.check_room(Queue::Send, 1)?;
        let seq = self.track(wr_id, WorkKind::Send, Queue::Send, segments);
        let mut guard = self.qp.start_post_send();
        let wr = guard
            .construct_wr(seq, WorkRequestFlags::Signaled)
            .setup_send();
        let sges = to_sges(segments);
        // SAFETY: as in `post_writes`: checked segments, kept alive by `track`.
        unsafe { wr.setup_sge_list(&sges) };
        let r = guard
            .post()
            .map_err(|e| RdmaError::verbs("ibv_post_send", io_source(&e)));
        self.finish_post(r)
    }

    /// Posts a receive into `segments` (may be empty: enough for the
    /// peer's WRITE_WITH_IMM, whose data lands where it was written).
    pub fn post_recv(&mut self, segments: &[Segment], wr_id: u64) -> Result<()> {
        self.check_segments(segments, self.opts.max_recv_sge)?;
        self.check_room(Queue::Recv, 1)?;
        let seq = self.track(wr_id, WorkKind::Recv, Queue::Recv, segments);
        let mut guard = self.qp.start_post_recv();
        let wr = guard.construct_wr(seq);
        let sges = to_sges(segments);
        // SAFETY: as in `post_writes`: checked segments, kept alive by `track`.
        unsafe { wr.setup_sge_list(&sges) };
        let r = guard
            .post()
            .map_err(|e| RdmaError::verbs("ibv_post_recv", io_source(&e)));
        self.finish_post(r)
    }

    fn check_segments(&self, segments: &[Segment], max: u32) -> Result<u64> {
        if segments.len() > max as usize {
            return Err(RdmaError::InvalidRequest {
                reason: "more scatter-gather entries than the queue pair allows",
            });
        }
        let mut total: u64 = 0;
        for s in segments {
            if !self.pd.same_as(&s.pd) {
                return Err(RdmaError::WrongProtectionDomain);
            }
            total += u64::from(s.len);
        }
        if total > (1 << 31) {
            return Err(RdmaError::InvalidRequest {
                reason: "an RC message is limited to 2 GiB",
            });
        }
        Ok(total)
    }

    fn check_room(&self, q: Queue, n: usize) -> Result<()> {
        if self.broken {
            return Err(RdmaError::Disconnected);
        }
        let (used, depth, name) = match q {
            Queue::Send => (self.send_used, self.opts.max_send_wr, "send"),
            Queue::Recv => (self.recv_used, self.opts.max_recv_wr, "receive"),
        };
        if used as usize + n > depth as usize {
            return Err(RdmaError::QueueFull { queue: name, depth });
        }
        Ok(())
    }

    fn track(&mut self, wr_id: u64, kind: WorkKind, queue: Queue, segments: &[Segment]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(
            seq,
            InFlight {
                wr_id,
                kind,
                queue,
                _keep: segments.to_vec(),
            },
        );
        match queue {
            Queue::Send => self.send_used += 1,
            Queue::Recv => self.recv_used += 1,
        }
        seq
    }

    fn finish_post(&mut self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            // Some requests of the chain may have been posted before the bad
            // one: keep every keep-alive (they are released when the QP is
            // destroyed) and refuse further posts.
            self.broken = true;
        }
        r
    }

    /// Moves every completion available now into `out`, without waiting.
    pub fn try_poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        let r = self.cq.drain(&mut raw);
        let n = self.reap(&raw, out);
        self.scratch = raw;
        r.map(|_| n)
    }

    /// Waits until at least one completion is available (completion channel
    /// and `AsyncFd`, no busy polling), then moves all available ones into
    /// `out`; returns how many.
    ///
    /// Failed requests are returned as completions with a non-success
    /// [`Completion::status`]; after one, the QP is in the error state and
    /// every outstanding request completes as [`WcStatus::FLUSHED`].
    ///
    /// Cancel safety: cancel safe. Completions are taken from the CQ and put
    /// into `out` synchronously, just before returning.
    pub async fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        let r = self.cq.wait(&mut raw).await;
        let n = self.reap(&raw, out);
        self.scratch = raw;
        r.map(|_| n)
    }

    fn reap(&mut self, raw: &[RawWc], out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        for wc in raw {
            let Some(f) = self.inflight.remove(&wc.wr_id) else {
                continue;
            };
            match f.queue {
                Queue::Send => self.send_used -= 1,
                Queue::Recv => self.recv_used -= 1,
            }
            // IBV_WC_RECV_RDMA_WITH_IMM = 129.
            let (kind, imm) =
                if f.queue == Queue::Recv && wc.status.is_success() && wc.opcode == 129 {
                    (WorkKind::RecvImm, Some(u32::from_be(wc.imm_be)))
                } else {
                    (f.kind, None)
                };
            if !wc.status.is_success() {
                self.broken = true;
            }
            out.push(Completion {
                wr_id: f.wr_id,
                kind,
                status: wc.status,
                byte_len: wc.byte_len,
                imm,
                vendor_err: wc.vendor_err,
            });
        }
        out.len() - before
    }
}

fn to_sges(segments: &[Segment]) -> Vec<ibv_sge> {
    segments
        .iter()
        .map(|s| ibv_sge {
            addr: s.addr,
            length: s.len,
            lkey: s.lkey,
        })
        .collect()
}
