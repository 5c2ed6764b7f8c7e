//! Completion queue with a completion channel, driven by tokio `AsyncFd`.
//!
//! The wait protocol (no busy polling):
//! 1. drain the CQ with `ibv_poll_cq`; if it yielded anything, return it;
//! 2. otherwise arm the CQ (`ibv_req_notify_cq`) and drain **once more**
//!    (a completion that landed between 1 and the arming raises no event);
//! 3. if still empty, await readability of the channel fd, read the event
//!    with `ibv_get_cq_event` (non-blocking), acknowledge it at once with
//!    `ibv_ack_cq_events` (so destroying the CQ can never block on unacked
//!    events), and go to 1. The arming is one-shot, so 2 runs again.
//!
//! `AsyncFdReadyGuard::clear_ready` is called only after `ibv_get_cq_event`
//! reported `EAGAIN`, as tokio's rules require.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_req_notify_cq, ibv_wc_status_str,
};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as _, PollCompletionQueueError,
};
use sideway::ibverbs::device_context::DeviceContext;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::device::io_source;
use super::error::{RdmaError, Result};

/// Status of a work completion (`enum ibv_wc_status`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WcStatus(pub u32);

impl WcStatus {
    /// `IBV_WC_SUCCESS`.
    pub const SUCCESS: WcStatus = WcStatus(0);
    /// `IBV_WC_WR_FLUSH_ERR`: the queue pair went to the error state before
    /// this request ran (the peer went away, or an earlier request failed).
    pub const FLUSHED: WcStatus = WcStatus(5);

    /// Whether the request succeeded.
    pub fn is_success(self) -> bool {
        self == WcStatus::SUCCESS
    }

    /// rdma-core's name for the status (`ibv_wc_status_str`).
    pub fn name(self) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a pointer to
        // a static NUL-terminated string (or "unknown"); the wrapper in
        // rdma-mummy-sys returns NULL if libibverbs is not loaded, checked here.
        let p = unsafe { ibv_wc_status_str(self.0) };
        if p.is_null() {
            return format!("status {}", self.0);
        }
        // SAFETY: non-null pointer to a static C string, see above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl std::fmt::Debug for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WcStatus({}: {})", self.0, self.name())
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One raw work completion as read from the CQ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawWc {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: u32,
    pub byte_len: u32,
    pub imm_be: u32,
    pub vendor_err: u32,
}

/// Owns the completion-channel fd for tokio's reactor (the `Arc` keeps the
/// channel, and so the fd, open while registered).
struct ChannelFd(Arc<CompletionChannel>);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A CQ with its own completion channel, awaited through `AsyncFd`.
pub(crate) struct Cq {
    // Field order is drop order: the CQ before the channel it is attached to
    // (the CQ also holds an Arc of the channel, so this is belt and braces).
    pub(crate) cq: Arc<BasicCompletionQueue>,
    afd: AsyncFd<ChannelFd>,
    armed: bool,
}

impl std::fmt::Debug for Cq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cq").field("armed", &self.armed).finish()
    }
}

impl Cq {
    /// Creates a CQ of `depth` entries on `ctx`.
    ///
    /// # Panics
    /// Outside a tokio runtime with IO enabled (as `AsyncFd::new`).
    pub(crate) fn new(ctx: &Arc<DeviceContext>, depth: u32) -> Result<Cq> {
        let ch = ctx
            .create_comp_channel()
            .map_err(|e| RdmaError::verbs("ibv_create_comp_channel", io_source(&e)))?;
        ch.set_nonblocking(true)
            .map_err(|e| RdmaError::verbs("fcntl(O_NONBLOCK) on completion channel", e))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(depth)
            .setup_comp_channel(&ch, 0)
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_cq", io_source(&e)))?;
        // SAFETY: the fd belongs to the completion channel held by the `Arc`
        // inside `ChannelFd`, which the AsyncFd owns: it stays open, and
        // `as_raw_fd` keeps returning it, until the AsyncFd is dropped (it
        // deregisters before dropping `ChannelFd`).
        let afd = unsafe { AsyncFd::register_with_interest(ChannelFd(ch), Interest::READABLE) }
            .map_err(|e| {
                RdmaError::verbs("AsyncFd::register(completion channel)", e.into_parts().1)
            })?;
        Ok(Cq {
            cq,
            afd,
            armed: false,
        })
    }

    fn raw_cq(&self) -> *mut ibv_cq {
        // SAFETY: the pointer is only used while `self.cq` (which owns the
        // ibv_cq) is alive, i.e. within methods of `self`.
        unsafe { self.cq.cq() }.as_ptr()
    }

    /// Moves every available completion into `out`; returns how many.
    pub(crate) fn drain(&self, out: &mut Vec<RawWc>) -> Result<usize> {
        let before = out.len();
        let poller = match self.cq.start_poll() {
            Ok(p) => p,
            Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(0),
            Err(e) => return Err(RdmaError::verbs("ibv_poll_cq", io_source(&e))),
        };
        for wc in poller {
            out.push(RawWc {
                wr_id: wc.wr_id(),
                status: WcStatus(wc.status()),
                opcode: wc.opcode(),
                byte_len: wc.byte_len(),
                imm_be: wc.imm_data(),
                vendor_err: wc.vendor_err(),
            });
        }
        Ok(out.len() - before)
    }

    /// Arms the CQ for the next completion event.
    fn arm(&mut self) -> Result<()> {
        // SAFETY: `raw_cq()` is the live CQ owned by `self.cq`; 0 = notify on
        // any completion (not only solicited ones).
        let r = unsafe { ibv_req_notify_cq(self.raw_cq(), 0) };
        if r != 0 {
            return Err(RdmaError::verbs(
                "ibv_req_notify_cq",
                io::Error::from_raw_os_error(r.abs()),
            ));
        }
        self.armed = true;
        Ok(())
    }

    /// Waits (without spinning) until at least one completion is in `out`.
    ///
    /// Cancel safe: completions are moved into `out` only synchronously,
    /// right before returning.
    pub(crate) async fn wait(&mut self, out: &mut Vec<RawWc>) -> Result<usize> {
        loop {
            let n = self.drain(out)?;
            if n > 0 {
                return Ok(n);
            }
            if !self.armed {
                // Re-arm, then drain again before sleeping (see module docs).
                self.arm()?;
                continue;
            }
            let mut guard = self
                .afd
                .readable()
                .await
                .map_err(|e| RdmaError::verbs("AsyncFd::readable(completion channel)", e))?;
            match take_event(&self.afd.get_ref().0) {
                Ok(true) => self.armed = false,
                Ok(false) => guard.clear_ready(),
                Err(e) => return Err(RdmaError::verbs("ibv_get_cq_event", e)),
            }
        }
    }
}

/// Reads and acknowledges one completion event of `ch`, if one is pending.
fn take_event(ch: &CompletionChannel) -> io::Result<bool> {
    let mut ev_cq: *mut ibv_cq = ptr::null_mut();
    let mut ev_ctx: *mut std::ffi::c_void = ptr::null_mut();
    // SAFETY: `ch` is alive for the call (borrowed), its fd is non-blocking
    // so this cannot block, and both out-pointers are valid for writes.
    let r = unsafe { ibv_get_cq_event(ch.comp_channel().as_ptr(), &mut ev_cq, &mut ev_ctx) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        return Err(e);
    }
    // SAFETY: `ev_cq` was just returned by ibv_get_cq_event for this channel;
    // its CQ is alive because the CQ holds the channel and the caller holds
    // the CQ. Acknowledging exactly the one event taken keeps the count
    // balanced, so ibv_destroy_cq can never wait on unacknowledged events.
    unsafe { ibv_ack_cq_events(ev_cq, 1) };
    Ok(true)
}
