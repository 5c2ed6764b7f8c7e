//! rdma_cm (connection manager) behind owned handles, called through
//! `rdma-mummy-sys`.
//!
//! sideway 0.4.3 wraps rdma_cm too, but cannot carry private data in a
//! connection request, read it on the listening side, or reject a request;
//! Ferry's listener admits a connection only when its private data carries
//! the migration's token, so this module does the rdma_cm part itself and
//! leaves verbs (protection domains, queue pairs, completion queues) to
//! sideway.
//!
//! Ownership:
//! * [`EventChannel`] owns an `rdma_event_channel` (destroyed on drop);
//!   every [`CmId`] created on it, and every id librdmacm creates for a
//!   connection request arriving on it, holds an `Arc` of it.
//! * [`CmId`] owns an `rdma_cm_id` (destroyed on drop).
//! * [`CmEvent`] owns one `rdma_cm_event` (acknowledged on drop). An event
//!   is always acknowledged before the id it names is destroyed (otherwise
//!   `rdma_destroy_id` would wait for the acknowledgement forever): events
//!   are inspected and dropped at once, and the id of a connection request
//!   is taken out of its event ([`CmEvent::into_request`]) only after the
//!   event's data was copied and the event acknowledged.

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys::{
    ibv_context, ibv_qp_attr, rdma_accept, rdma_ack_cm_event, rdma_bind_addr, rdma_cm_event,
    rdma_cm_id, rdma_conn_param, rdma_connect, rdma_create_event_channel, rdma_create_id,
    rdma_destroy_event_channel, rdma_destroy_id, rdma_disconnect, rdma_establish,
    rdma_event_channel, rdma_get_cm_event, rdma_get_local_addr, rdma_get_peer_addr,
    rdma_init_qp_attr, rdma_listen, rdma_port_space, rdma_reject, rdma_resolve_addr,
    rdma_resolve_route,
};
use sideway::ibverbs::queue_pair::{QueuePairAttribute, QueuePairState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::device::check_libraries;
use super::error::{RdmaError, Result};

/// Most private data a connection request of the TCP port space carries
/// over InfiniBand/RoCE (the IB CM's 92 bytes less rdma_cm's 36-byte header).
pub const MAX_PRIVATE_DATA: usize = 56;

/// rdma_cm event types (`enum rdma_cm_event_type`) Ferry tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmEventKind {
    AddrResolved,
    RouteResolved,
    ConnectRequest,
    ConnectResponse,
    Rejected,
    Established,
    Disconnected,
    /// Anything else (errors, device removal, time-wait exit...), by number.
    Other(u32),
}

impl CmEventKind {
    fn from_raw(v: u32) -> Self {
        match v {
            0 => CmEventKind::AddrResolved,
            2 => CmEventKind::RouteResolved,
            4 => CmEventKind::ConnectRequest,
            5 => CmEventKind::ConnectResponse,
            8 => CmEventKind::Rejected,
            9 => CmEventKind::Established,
            10 => CmEventKind::Disconnected,
            n => CmEventKind::Other(n),
        }
    }

    pub(crate) fn name(self) -> String {
        match self {
            CmEventKind::Other(1) => "AddressError".into(),
            CmEventKind::Other(3) => "RouteError".into(),
            CmEventKind::Other(6) => "ConnectError".into(),
            CmEventKind::Other(7) => "Unreachable".into(),
            CmEventKind::Other(11) => "DeviceRemoval".into(),
            CmEventKind::Other(15) => "TimewaitExit".into(),
            CmEventKind::Other(n) => format!("event {n}"),
            k => format!("{k:?}"),
        }
    }
}

/// Converts a failed rdma_cm call (-1 and errno) into an error.
fn cm_call(call: &'static str, ret: i32) -> Result<()> {
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // rdma-mummy-sys answers EOPNOTSUPP for every call when librdmacm did
    // not load.
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        check_libraries()?;
    }
    Err(RdmaError::verbs(call, e))
}

/// An owned `rdma_event_channel`.
pub(crate) struct EventChannel {
    raw: NonNull<rdma_event_channel>,
}

// SAFETY: an event channel is a file descriptor in a struct that librdmacm
// never changes after creation; librdmacm's calls on a channel are safe from
// any thread, and the channel is destroyed once, by the last owner's Drop.
unsafe impl Send for EventChannel {}
// SAFETY: as above: `&EventChannel` only reads the fd or passes the pointer
// to librdmacm calls, which synchronise internally.
unsafe impl Sync for EventChannel {}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rdma_create_event_channel and is destroyed
        // once, here; every id on it holds an Arc of `self`, so none is left.
        unsafe { rdma_destroy_event_channel(self.raw.as_ptr()) };
    }
}

impl AsRawFd for EventChannel {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: `raw` points to the live channel owned by `self`.
        unsafe { self.raw.as_ref().fd }
    }
}

impl EventChannel {
    fn new() -> Result<Arc<EventChannel>> {
        check_libraries()?;
        // SAFETY: no arguments; returns NULL (errno set) on failure.
        let raw = unsafe { rdma_create_event_channel() };
        let Some(raw) = NonNull::new(raw) else {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // No /dev/infiniband/rdma_cm: no RDMA in this kernel.
                Some(libc::ENOENT | libc::ENODEV | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    RdmaError::NoDevice
                }
                _ => RdmaError::verbs("rdma_create_event_channel", e),
            });
        };
        let ch = Arc::new(EventChannel { raw });
        let fd = ch.as_raw_fd();
        // SAFETY: `fd` is the channel's open descriptor; F_GETFL/F_SETFL
        // take and return plain integers.
        let r = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(RdmaError::verbs(
                "fcntl(O_NONBLOCK) on rdma_cm channel",
                io::Error::last_os_error(),
            ));
        }
        Ok(ch)
    }

    /// The next event, if one is pending (the fd is non-blocking).
    fn try_event(self: &Arc<Self>) -> io::Result<Option<CmEvent>> {
        let mut ev: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is alive (borrowed) and non-blocking, `ev` is a
        // valid out-pointer.
        let r = unsafe { rdma_get_cm_event(self.raw.as_ptr(), &mut ev) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(NonNull::new(ev).map(|raw| CmEvent {
            raw,
            chan: Arc::clone(self),
        }))
    }
}

/// The channel's fd for tokio's reactor (the `Arc` keeps it open).
struct ChanFd(Arc<EventChannel>);

impl AsRawFd for ChanFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An event channel awaited through `AsyncFd`.
pub(crate) struct CmChannel {
    afd: AsyncFd<ChanFd>,
}

impl CmChannel {
    /// A new non-blocking event channel registered with tokio.
    ///
    /// # Panics
    /// Outside a tokio runtime with IO enabled.
    pub(crate) fn new() -> Result<CmChannel> {
        let ch = EventChannel::new()?;
        // SAFETY: the fd belongs to the event channel held by the `Arc`
        // inside `ChanFd`, which the AsyncFd owns: it stays open, and
        // `as_raw_fd` keeps returning it, until the AsyncFd is dropped (it
        // deregisters before dropping `ChanFd`).
        let afd = unsafe { AsyncFd::register_with_interest(ChanFd(ch), Interest::READABLE) }
            .map_err(|e| {
                RdmaError::verbs("AsyncFd::register(rdma_cm channel)", e.into_parts().1)
            })?;
        Ok(CmChannel { afd })
    }

    fn channel(&self) -> &Arc<EventChannel> {
        &self.afd.get_ref().0
    }

    /// Creates an id on this channel in the TCP port space (RC queue pairs).
    pub(crate) fn create_id(&self) -> Result<CmId> {
        let mut raw: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is alive, `raw` is a valid out-pointer, the
        // context pointer is unused (NULL).
        let r = unsafe {
            rdma_create_id(
                self.channel().raw.as_ptr(),
                &mut raw,
                ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        cm_call("rdma_create_id", r)?;
        let raw = NonNull::new(raw).ok_or_else(|| {
            RdmaError::verbs("rdma_create_id", io::Error::other("returned no id"))
        })?;
        Ok(CmId {
            raw,
            _chan: Arc::clone(self.channel()),
        })
    }

    /// Waits for the next event.
    ///
    /// Cancel safe: an event is taken from the channel only synchronously,
    /// right before returning it.
    pub(crate) async fn next(&self) -> Result<CmEvent> {
        loop {
            let mut guard = self
                .afd
                .readable()
                .await
                .map_err(|e| RdmaError::verbs("AsyncFd::readable(rdma_cm channel)", e))?;
            match self.channel().try_event() {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => guard.clear_ready(),
                Err(e) => return Err(RdmaError::verbs("rdma_get_cm_event", e)),
            }
        }
    }

    /// The next event, or an error naming it when it is not `want` (or
    /// none came within `timeout`).
    pub(crate) async fn expect(
        &self,
        want: CmEventKind,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<CmEvent> {
        let expected = match want {
            CmEventKind::AddrResolved => "AddrResolved",
            CmEventKind::RouteResolved => "RouteResolved",
            CmEventKind::ConnectResponse => "ConnectResponse",
            CmEventKind::Established => "Established",
            _ => "another event",
        };
        let ev = tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| RdmaError::Connect {
                peer,
                event: "timeout".into(),
                status: -libc::ETIMEDOUT,
                expected,
            })??;
        let kind = ev.kind();
        if kind == want {
            return Ok(ev);
        }
        if kind == CmEventKind::Rejected && is_refusal(&ev.private_data()) {
            return Err(RdmaError::Refused { peer });
        }
        Err(RdmaError::Connect {
            peer,
            event: kind.name(),
            status: ev.status(),
            expected,
        })
    }
}

/// What a Ferry listener puts in the private data of a rejection, so that
/// the connecting side can tell "refused: no valid token" from "nobody
/// listens there" (both are `Rejected` events).
pub const REFUSAL: &[u8; 12] = b"ferry:refuse";

fn is_refusal(private_data: &[u8]) -> bool {
    private_data.starts_with(REFUSAL)
}

/// An owned `rdma_cm_id`.
pub(crate) struct CmId {
    raw: NonNull<rdma_cm_id>,
    // Keeps the id's event channel alive: destroyed after the id.
    _chan: Arc<EventChannel>,
}

// SAFETY: an rdma_cm_id is used through librdmacm calls, which may be made
// from any thread (librdmacm locks per id); the id is destroyed once, in Drop.
unsafe impl Send for CmId {}
// SAFETY: `&CmId` methods either read fields librdmacm sets before the
// caller can observe them (verbs, addresses once bound/resolved) or pass
// the pointer to librdmacm calls, which synchronise internally.
unsafe impl Sync for CmId {}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: `raw` is owned by `self` and destroyed once. Every event
        // naming this id was acknowledged when it was dropped (events never
        // outlive their inspection), so rdma_destroy_id cannot wait forever.
        unsafe { rdma_destroy_id(self.raw.as_ptr()) };
    }
}

/// A socket address in the form librdmacm takes.
fn sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, any
            // sockaddr type; the write covers only its first bytes.
            unsafe { ptr::write(ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in>(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write(ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in6>(), sin6) };
        }
    }
    ss
}

/// Reads a socket address librdmacm filled in (`None` for other families).
///
/// # Safety
/// `sa` must point to a valid `sockaddr` whose family field tells its size
/// truthfully (as the addresses inside an `rdma_cm_id` do).
unsafe fn from_sockaddr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: forwarded from the contract; the family is read first, then
    // the matching structure (unaligned reads: librdmacm's storage is a union
    // of the address types, but be conservative).
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = ptr::read_unaligned(sa.cast::<libc::sockaddr_in>());
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>());
                Some(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Connection parameters of an RC connection: Ferry's retry counts (7,
/// RNR "infinite"), one outstanding RDMA READ at most (Ferry issues none),
/// `qp_num` and the private data (at most [`MAX_PRIVATE_DATA`] bytes).
fn conn_param(qp_num: u32, private_data: &[u8]) -> rdma_conn_param {
    rdma_conn_param {
        private_data: if private_data.is_empty() {
            ptr::null()
        } else {
            private_data.as_ptr().cast::<c_void>()
        },
        private_data_len: private_data.len().min(MAX_PRIVATE_DATA) as u8,
        responder_resources: 1,
        initiator_depth: 1,
        flow_control: 0,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num,
    }
}

fn check_private_data(private_data: &[u8]) -> Result<()> {
    if private_data.len() > MAX_PRIVATE_DATA {
        return Err(RdmaError::InvalidRequest {
            reason: "rdma_cm private data is limited to 56 bytes",
        });
    }
    Ok(())
}

impl CmId {
    pub(crate) fn bind(&self, addr: SocketAddr) -> Result<()> {
        let mut ss = sockaddr(addr);
        // SAFETY: the id is alive; `ss` is a valid sockaddr for the call
        // (librdmacm copies it).
        let r = unsafe {
            rdma_bind_addr(
                self.raw.as_ptr(),
                ptr::addr_of_mut!(ss).cast::<libc::sockaddr>(),
            )
        };
        cm_call("rdma_bind_addr", r)
    }

    pub(crate) fn listen(&self, backlog: i32) -> Result<()> {
        // SAFETY: the id is alive and bound.
        cm_call("rdma_listen", unsafe {
            rdma_listen(self.raw.as_ptr(), backlog)
        })
    }

    /// Starts resolving `dst` (from the address the id is bound to, if any).
    pub(crate) fn resolve_addr(&self, dst: SocketAddr, timeout: Duration) -> Result<()> {
        let mut ss = sockaddr(dst);
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the id is alive; the source address is NULL (the id's
        // binding is used), `ss` is valid for the call (copied).
        let r = unsafe {
            rdma_resolve_addr(
                self.raw.as_ptr(),
                ptr::null_mut(),
                ptr::addr_of_mut!(ss).cast::<libc::sockaddr>(),
                ms,
            )
        };
        cm_call("rdma_resolve_addr", r)
    }

    pub(crate) fn resolve_route(&self, timeout: Duration) -> Result<()> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the id is alive and its address resolved.
        cm_call("rdma_resolve_route", unsafe {
            rdma_resolve_route(self.raw.as_ptr(), ms)
        })
    }

    /// Sends the connection request for queue pair `qp_num`, carrying
    /// `private_data`.
    pub(crate) fn connect(&self, qp_num: u32, private_data: &[u8]) -> Result<()> {
        check_private_data(private_data)?;
        let mut p = conn_param(qp_num, private_data);
        // SAFETY: the id is alive with its route resolved; `p` and the
        // private data it points to are valid for the call (librdmacm copies
        // both into the request).
        cm_call("rdma_connect", unsafe {
            rdma_connect(self.raw.as_ptr(), &mut p)
        })
    }

    /// Accepts the connection request this id was created for.
    pub(crate) fn accept(&self, qp_num: u32) -> Result<()> {
        let mut p = conn_param(qp_num, &[]);
        // SAFETY: the id is a connection request's, alive; `p` is valid for
        // the call.
        cm_call("rdma_accept", unsafe {
            rdma_accept(self.raw.as_ptr(), &mut p)
        })
    }

    /// Rejects the connection request this id was created for, with
    /// [`REFUSAL`] as private data.
    pub(crate) fn reject(&self) -> Result<()> {
        // SAFETY: the id is a connection request's, alive; the private data
        // is a static byte string (copied by librdmacm).
        cm_call("rdma_reject", unsafe {
            rdma_reject(
                self.raw.as_ptr(),
                REFUSAL.as_ptr().cast::<c_void>(),
                REFUSAL.len() as u8,
            )
        })
    }

    pub(crate) fn establish(&self) -> Result<()> {
        // SAFETY: the id is alive and got its ConnectResponse.
        cm_call("rdma_establish", unsafe {
            rdma_establish(self.raw.as_ptr())
        })
    }

    pub(crate) fn disconnect(&self) -> Result<()> {
        // SAFETY: the id is alive; disconnecting an unconnected id is an
        // error, not undefined behaviour.
        cm_call("rdma_disconnect", unsafe {
            rdma_disconnect(self.raw.as_ptr())
        })
    }

    /// The attributes that move a queue pair of this connection to `state`.
    pub(crate) fn qp_attr(&self, state: QueuePairState) -> Result<QueuePairAttribute> {
        let mut attr = MaybeUninit::<ibv_qp_attr>::zeroed();
        let mut mask: i32 = 0;
        // SAFETY: writing the requested state into zeroed (valid) storage.
        unsafe { (*attr.as_mut_ptr()).qp_state = state as _ };
        // SAFETY: the id is alive; `attr` and `mask` are valid out-pointers.
        let r = unsafe { rdma_init_qp_attr(self.raw.as_ptr(), attr.as_mut_ptr(), &mut mask) };
        cm_call("rdma_init_qp_attr", r)?;
        // SAFETY: zero-initialised and then filled in by librdmacm.
        let attr = unsafe { attr.assume_init_ref() };
        Ok(QueuePairAttribute::from(attr, mask))
    }

    /// The verbs context of the device the id is bound to (NULL before
    /// binding or resolving), as an address to compare.
    pub(crate) fn verbs(&self) -> Option<NonNull<ibv_context>> {
        // SAFETY: the id is alive; librdmacm sets `verbs` when binding or
        // resolving, before the caller can ask.
        NonNull::new(unsafe { self.raw.as_ref().verbs })
    }

    /// The peer's address (a connection request's source).
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is alive; `route.addr.dst_addr` is a sockaddr union
        // librdmacm fills in for connection requests and resolved ids (zero,
        // an unknown family, otherwise).
        unsafe { from_sockaddr(rdma_get_peer_addr(self.raw.as_ref())) }
    }

    /// The local address the id is bound to (after binding or resolving).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as in `peer_addr`, for `route.addr.src_addr`.
        unsafe { from_sockaddr(rdma_get_local_addr(self.raw.as_ref())) }
    }

    pub(crate) fn is(&self, raw: *mut rdma_cm_id) -> bool {
        self.raw.as_ptr() == raw
    }
}

/// One owned rdma_cm event, acknowledged on drop.
pub(crate) struct CmEvent {
    raw: NonNull<rdma_cm_event>,
    chan: Arc<EventChannel>,
}

// SAFETY: an event is memory librdmacm allocated for the caller; nothing
// else references it until it is acknowledged (in Drop), and librdmacm
// allows acknowledging on any thread.
unsafe impl Send for CmEvent {}
// SAFETY: through `&CmEvent` only fields librdmacm never changes after
// handing the event out are read.
unsafe impl Sync for CmEvent {}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged
        // exactly once, here.
        unsafe { rdma_ack_cm_event(self.raw.as_ptr()) };
    }
}

impl CmEvent {
    fn ev(&self) -> &rdma_cm_event {
        // SAFETY: the event is alive until dropped, and `&self` borrows it.
        unsafe { self.raw.as_ref() }
    }

    pub(crate) fn kind(&self) -> CmEventKind {
        CmEventKind::from_raw(self.ev().event)
    }

    pub(crate) fn status(&self) -> i32 {
        self.ev().status
    }

    /// The id the event is about.
    pub(crate) fn id(&self) -> *mut rdma_cm_id {
        self.ev().id
    }

    /// A copy of the event's private data (connection requests, responses
    /// and rejections carry some; empty otherwise).
    pub(crate) fn private_data(&self) -> Vec<u8> {
        match self.kind() {
            CmEventKind::ConnectRequest
            | CmEventKind::ConnectResponse
            | CmEventKind::Rejected
            | CmEventKind::Established => {}
            _ => return Vec::new(),
        }
        // SAFETY: for these connection events the `conn` member of the
        // parameter union is the one librdmacm filled in.
        let conn = unsafe { self.ev().param.conn };
        if conn.private_data.is_null() || conn.private_data_len == 0 {
            return Vec::new();
        }
        // SAFETY: librdmacm points `private_data` at `private_data_len`
        // bytes it owns until the event is acknowledged, which happens only
        // when `self` is dropped.
        unsafe {
            std::slice::from_raw_parts(
                conn.private_data.cast::<u8>(),
                usize::from(conn.private_data_len),
            )
        }
        .to_vec()
    }

    /// For a connection request: acknowledges the event and takes
    /// ownership of the new id librdmacm created for it, with the request's
    /// private data and source address. `None` for any other event.
    pub(crate) fn into_request(self) -> Option<ConnectRequest> {
        if self.kind() != CmEventKind::ConnectRequest {
            return None;
        }
        let raw = NonNull::new(self.id())?;
        let private_data = self.private_data();
        let chan = Arc::clone(&self.chan);
        // Acknowledge before the id can be destroyed (CmId's Drop).
        drop(self);
        let id = CmId { raw, _chan: chan };
        let peer = id.peer_addr();
        Some(ConnectRequest {
            id,
            private_data,
            peer,
        })
    }
}

/// A connection request taken out of its (acknowledged) event: the new id,
/// owned (destroying it without accepting refuses the request), what the
/// peer sent, and where from.
pub(crate) struct ConnectRequest {
    pub(crate) id: CmId,
    pub(crate) private_data: Vec<u8>,
    pub(crate) peer: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_survive_the_round_trip_through_sockaddr() {
        for a in [
            "10.77.10.1:6601",
            "0.0.0.0:0",
            "[fd00::1]:6601",
            "[fe80::5054:ff:fe77:1%3]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let ss = sockaddr(a);
            // SAFETY: `ss` is a valid sockaddr_storage whose family says its type.
            let back = unsafe { from_sockaddr(ptr::addr_of!(ss).cast::<libc::sockaddr>()) };
            assert_eq!(back, Some(a));
        }
        // SAFETY: all-zero storage is a valid sockaddr of family AF_UNSPEC.
        let zero: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let none = unsafe { from_sockaddr(ptr::addr_of!(zero).cast::<libc::sockaddr>()) };
        assert_eq!(none, None);
    }

    #[test]
    fn connection_parameters_carry_the_private_data() {
        let data = [7u8; 48];
        let p = conn_param(0x1234, &data);
        assert_eq!(p.qp_num, 0x1234);
        assert_eq!(usize::from(p.private_data_len), 48);
        assert_eq!(p.private_data.cast::<u8>(), data.as_ptr());
        assert_eq!((p.retry_count, p.rnr_retry_count), (7, 7));
        let empty = conn_param(1, &[]);
        assert!(empty.private_data.is_null());
        assert_eq!(empty.private_data_len, 0);
        assert!(check_private_data(&[0; MAX_PRIVATE_DATA]).is_ok());
        assert!(check_private_data(&[0; MAX_PRIVATE_DATA + 1]).is_err());
        assert!(is_refusal(b"ferry:refuse\0\0\0"));
        assert!(!is_refusal(&[0; 56]));
        assert_eq!(CmEventKind::from_raw(4), CmEventKind::ConnectRequest);
        assert_eq!(CmEventKind::from_raw(7).name(), "Unreachable");
    }
}
