//! The destination: accepts connections, validates offers (guest
//! configuration included) before allocating anything, lands pages, proves
//! what landed, restores the device state before confirming a commit and
//! resumes only after.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Hello: peer inside --migration-network (or not on it)
//!     [*] --> [*]: Reject(network), nothing read
//!     Hello --> Auth: version ok, slot or queue place free
//!     Hello --> [*]: Reject(version / busy)
//!     Auth --> Offer: proof ok
//!     Auth --> [*]: Reject(auth)
//!     Offer --> Queued: validated, no free slot
//!     Queued --> Offer: slot free
//!     Queued --> [*]: Reject(busy) after --queue-timeout
//!     Offer --> Receiving: slot, memory within the limit over all migrations, guest config restorable, allocated, Accept
//!     Offer --> [*]: Reject(memory limit / option / guest config / bad offer)
//!     Receiving --> Receiving: pages, RoundDone, Ping/Pong, Fence/Fenced
//!     Receiving --> Proving: Switchover, every channel stopped
//!     Proving --> AwaitCommit: device-state hash ok, Ready(MACs over transcripts, evidence, device state)
//!     AwaitCommit --> Restoring: Commit proves the same claims
//!     Restoring --> Resumed: restore ok, Committed(MAC), then resume
//!     Resumed --> [*]: Audit report counted (or missing)
//!     Receiving --> Freed: error, Abort, stall
//!     Proving --> Freed: device state corrupt
//!     AwaitCommit --> Freed: Abort, timeout; CommitRefused(MAC) if its proof differs
//!     Restoring --> Freed: restore failed, CommitRefused(MAC): the source resumes
//!     Freed --> [*]
//! ```
//! Nothing on the destination becomes live before `Committed`, and
//! `Committed` is sent only once everything that can fail has succeeded;
//! every failure drops the guest memory and releases the migration slot.
//!
//! The checks on a connection's `Hello` and on the offer, and the `Accept`,
//! are [`ferry_proto::opening::DestOpening`]'s; the handshake's decisions
//! are [`ferry_proto::session::DestHandshake`]'s (driven by
//! `ferry_transport::conn`), and from `Accept` on those of
//! [`ferry_proto::dest::DestSession`]: what each message of the source
//! means and what is answered, which data channels may land pages, the
//! progress timeout, `Ready`, the check of `Commit` and what `Committed` or
//! a refusal binds. This module drives it: it admits connections, lands
//! pages, stops the channels, runs the hooks and moves the frames.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::control::{PROTOCOL_MAX, PROTOCOL_MIN};
use ferry_proto::dest::{ChannelEnd, ChannelOutcome, DestSession, Step};
use ferry_proto::opening::{
    unknown_channel, Admission, DestOpening, ExpectedChannels, Hello, HelloRefusal, OfferError,
    Offered,
};
use ferry_proto::session::SessionError;
use ferry_proto::switchover::{self as proof, Claims, Transcripts};
use ferry_proto::{Evidence, Ledger};
use ferry_transport::auth::AuthKey;
use ferry_transport::conn::Conn;
use ferry_transport::multichannel::Cidr;
use ferry_transport::proto::{
    Accept, AuditReport, Msg, Offer, PerformanceOption, RejectReason, Role,
};
use ferry_transport::reservation::{channel_allowance, ChannelBudgets, MemoryPool, Reservation};
use ferry_transport::stream::Stream;
use ferry_transport::tcp::{receive_channel_on_own_thread, Inbound, RecvCounters};
use ferry_transport::tls::{TlsConfig, TLS_HANDSHAKE_BYTE};
use ferry_transport::wire::Codec;
use ferry_transport::{MemoryLayout, TransportError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::admission::{self, RefusalLog, Slot, Unauthenticated};
use crate::digest::{hex, memory_evidence};
use crate::error::{MigrationError, Result};
use crate::memory::{dest_memory_backed, Backing, DestMemory, Preallocated};
use crate::metrics::{Attempt, Metrics};
use crate::nics;
use crate::units::human_exact;

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Pre-shared key.
    pub key: AuthKey,
    /// Largest guest memory accepted, and the most guest memory of all
    /// accepted migrations together.
    pub memory_limit: u64,
    /// How long a peer may stay silent (no message, no page) before the
    /// migration is aborted.
    pub timeout: Duration,
    /// Simultaneous incoming migrations.
    pub max_concurrent: usize,
    /// Authenticated migrations that may wait for a slot (`--queue`).
    pub queue: usize,
    /// Longest a queued migration waits (`--queue-timeout`).
    pub queue_timeout: Duration,
    /// Networks migrations may use (`--migration-network`): only
    /// interfaces inside them are advertised, a data channel arriving on
    /// another local address is refused, and a connection arriving on an
    /// address inside them from a peer outside them is closed before
    /// anything is read. Empty: every network.
    pub migration_networks: Vec<Cidr>,
    /// TLS settings: a source that starts a TLS handshake is served with
    /// them (its control connection and data channels encrypted).
    pub tls: Arc<TlsConfig>,
    /// `--plaintext`: also accept sources that do not encrypt, and the RDMA
    /// option (whose data channels cannot be encrypted; its control
    /// connection must still be TLS). Without it both are refused with
    /// `Reject(Encryption)` naming the cause.
    pub plaintext: bool,
    /// One deadline for everything before authentication: TLS handshake,
    /// hello and proof, on control connections and data channels
    /// (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Most connections authenticating at once (`--max-unauthenticated`;
    /// never above a quarter of `RLIMIT_NOFILE`): more are closed as soon
    /// as they are accepted.
    pub max_unauthenticated: usize,
    /// Most of them from one source address
    /// (`--max-unauthenticated-per-source`).
    pub max_unauthenticated_per_source: usize,
}

pub use ferry_proto::opening::GuestSupport;

/// A hook the destination calls with the guest's memory (and device state).
pub type RestoreFn =
    Arc<dyn Fn(&DestMemory, &[u8]) -> std::result::Result<String, String> + Send + Sync>;
/// A hook the destination calls with the guest's memory once committed.
pub type ResumeFn = Arc<dyn Fn(&DestMemory) -> std::result::Result<String, String> + Send + Sync>;

/// How the destination hands a migrated guest to its VMM, in commit order:
///
/// 1. [`ResumeHook::supports`] is checked against the offer, before `Accept`;
/// 2. [`ResumeHook::restore`] runs once the source's `Commit` is checked and
///    before `Committed` is sent: everything that can fail (parsing and
///    loading the device state, creating vCPUs, checks of memory). An error
///    refuses the commit (`CommitRefused`, bound to the session): the
///    destination frees everything and the source resumes its guest;
/// 3. [`ResumeHook::resume`] runs right after `Committed`: starts the guest.
///    It should not fail; if it does, the error is reported (the guest runs
///    nowhere) but the commit stands.
///
/// Their reports end up in the summary.
#[derive(Clone)]
pub struct ResumeHook {
    /// What this destination can restore.
    pub supports: GuestSupport,
    /// Restores the device state into the VMM (before `Committed`).
    pub restore: RestoreFn,
    /// Starts the guest (after `Committed`).
    pub resume: ResumeFn,
}

impl std::fmt::Debug for ResumeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeHook")
            .field("supports", &self.supports)
            .finish_non_exhaustive()
    }
}

pub use crate::summary::DestSummary;

/// The outcome of one incoming migration.
#[derive(Debug)]
pub struct Outcome {
    /// Source address.
    pub peer: String,
    /// Summary, or why it failed.
    pub result: Result<DestSummary>,
}

/// Migrations that take data channels, by id: where their channels go, how
/// many more of the offered channels may still open, whether the
/// migration's control connection is encrypted (its data channels must be
/// too), and the session's `data_channel` key that a channel must prove it
/// holds.
type Pending = Mutex<HashMap<u64, PendingChannels>>;

/// See [`Pending`].
struct PendingChannels {
    tx: mpsc::Sender<Stream>,
    expected: ExpectedChannels,
    key: ferry_proto::MacKey,
}

/// A destination daemon.
pub struct Destination {
    opts: ListenOptions,
    slots: Arc<Semaphore>,
    /// Migrations waiting for a slot.
    queued: AtomicUsize,
    /// Guest memory of the migrations accepted and not finished.
    /// `--memory-limit`: guest memory and receive buffers of the migrations
    /// accepted and not finished.
    reserved: Arc<MemoryPool>,
    pending: Pending,
    next_id: AtomicU64,
    resume: ResumeHook,
    metrics: Arc<Metrics>,
    /// True once [`Destination::shutdown`] was called.
    stop: tokio::sync::watch::Sender<bool>,
    /// Connections not authenticated yet.
    unauth: Unauthenticated,
    /// Where relays may deliver (`--relay-allow`; default loopback).
    relay_allow: Mutex<Vec<ferry_proto::net::Cidr>>,
    /// Guest memory backed before any migration (`--prealloc-guest`),
    /// until a migration of its layout takes it.
    preallocated: Mutex<Option<Preallocated>>,
    /// How guest memory that is not preallocated is backed (`--hugepages`).
    backing: Mutex<Backing>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Destination {
    /// A destination with these settings and resume hook.
    pub fn new(opts: ListenOptions, resume: ResumeHook) -> Arc<Self> {
        let cap = admission::effective_cap(
            opts.max_unauthenticated,
            ferry_ffi::net::nofile_limit().ok(),
        );
        Arc::new(Destination {
            unauth: Unauthenticated::new(cap, opts.max_unauthenticated_per_source),
            slots: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
            queued: AtomicUsize::new(0),
            reserved: MemoryPool::new(opts.memory_limit),
            opts,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            resume,
            metrics: Arc::default(),
            stop: tokio::sync::watch::Sender::new(false),
            relay_allow: Mutex::new(ferry_proto::relay::default_allow()),
            preallocated: Mutex::new(None),
            backing: Mutex::new(Backing::Anonymous),
        })
    }

    /// `--prealloc-guest`: guest memory mapped and backed before any
    /// migration arrives (as a VMM that preallocates its guest's memory
    /// has it); the first migration whose layout is `p.layout` lands in it
    /// instead of in fresh memory, others map their own as usual.
    /// Populating it was the guest's work, outside every migration's
    /// window and CPU figure.
    pub fn set_preallocated(&self, p: Preallocated) {
        *self.preallocated.lock().expect("preallocated") = Some(p);
    }

    /// `--hugepages`: back each migration's guest memory as `backing`
    /// says (memory preallocated with [`Destination::set_preallocated`] is
    /// backed as it was mapped). A migration whose memory cannot be mapped
    /// so (a hugetlb pool too small) is refused with the reason.
    pub fn set_backing(&self, backing: Backing) {
        *self.backing.lock().expect("backing") = backing;
    }

    /// The preallocated guest memory, if there is some for `layout`.
    fn take_preallocated(&self, layout: &MemoryLayout) -> Option<DestMemory> {
        let mut p = self.preallocated.lock().expect("preallocated");
        if p.as_ref().is_some_and(|p| &p.layout == layout) {
            p.take().map(|p| p.mem)
        } else {
            None
        }
    }

    /// `--relay-allow`: where `ferry relay` sources may have their streams
    /// delivered (replaces the default, loopback only).
    pub fn set_relay_allow(&self, allow: Vec<ferry_proto::net::Cidr>) {
        *self.relay_allow.lock().expect("relay_allow") = allow;
    }

    /// Stops the daemon: [`Destination::serve`] accepts nothing more,
    /// migrations waiting for a slot are refused, and every migration
    /// still before its switchover is aborted (`Abort` with "destination
    /// shutting down") and freed; one already in its switchover finishes.
    /// `serve` returns once all have ended.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// The cap on unauthenticated connections in force (`--max-unauthenticated`,
    /// lowered to a quarter of the descriptor limit).
    pub fn unauthenticated_cap(&self) -> usize {
        self.unauth.total_cap()
    }

    /// Its metrics (`ferry listen --metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Bytes booked against `--memory-limit` now, by every migration and
    /// relay together.
    pub fn memory_reserved(&self) -> u64 {
        self.reserved.used()
    }

    /// Accepts connections until [`Destination::shutdown`], reporting each
    /// migration's outcome; then waits for the connections in flight to end.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) -> Result<()> {
        let listen_ip = listener
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| TransportError::Io {
                context: "reading the listening address".into(),
                source: e,
            })?;
        let mut stop = self.stop.subscribe();
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::ZERO;
        let mut refusals = RefusalLog::new(Duration::from_secs(10));
        let mut starved = RefusalLog::new(Duration::from_secs(10));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopped(&mut stop) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            // Never fatal: out of descriptors, wait and try again (the
            // connections in progress end within their deadlines); a
            // connection that died in the backlog is skipped.
            let (stream, addr) = match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) => {
                    let (wait, warn) = admission::accept_retry(&e, &mut backoff);
                    if warn {
                        if let Some(n) = starved.note(std::time::Instant::now()) {
                            tracing::warn!(
                                failures = n,
                                unauthenticated = self.unauth.in_progress(),
                                "accepting a connection failed: {e}; retrying in {wait:?} (raise the descriptor limit, e.g. LimitNOFILE=, or lower --max-unauthenticated)"
                            );
                        }
                    } else {
                        tracing::debug!("accepting a connection failed: {e}; skipped");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stopped(&mut stop) => break,
                    }
                    continue;
                }
            };
            // Before anything is read: a cap on connections that have not
            // authenticated, overall and per source address.
            let slot = match self.unauth.admit(addr.ip()) {
                Ok(s) => s,
                Err(why) => {
                    let total = self.metrics.refused_unauthenticated();
                    if let Some(n) = refusals.note(std::time::Instant::now()) {
                        tracing::warn!(
                            peer = %addr,
                            refused = n,
                            refused_total = total,
                            "connection closed before authentication: {why}"
                        );
                    }
                    drop(stream);
                    continue;
                }
            };
            // The migration network admits only its own: a connection that
            // arrives on an address inside it from a peer outside it is
            // refused before anything is read. (A control connection to a
            // management address outside it is not its business: listen on
            // a migration-network address to close that path too.)
            let nets = &self.opts.migration_networks;
            let on_migration_network = stream
                .local_addr()
                .is_ok_and(|l| !nets.is_empty() && nics::allowed(nets, l.ip()));
            if on_migration_network && !nics::allowed(nets, addr.ip()) {
                self.refuse_network(stream, addr, slot);
                continue;
            }
            let me = self.clone();
            let out = outcomes.clone();
            // Every log line of the connection names its peer and, once
            // accepted, its migration id.
            let span = tracing::info_span!(
                "migration",
                peer = %addr,
                migration_id = tracing::field::Empty
            );
            tasks.spawn(
                async move {
                    if let Some(result) = me.handle(stream, listen_ip, slot).await {
                        log_outcome(&result);
                        let _ = out.send(Outcome {
                            peer: addr.to_string(),
                            result,
                        });
                    }
                }
                .instrument(span),
            );
        }
        drop(listener);
        tracing::info!(
            connections = tasks.len(),
            "shutting down: no new connections; aborting the migrations in flight"
        );
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Refuses a peer outside `--migration-network` without reading
    /// anything it sent: one `Reject` frame, then the socket is closed
    /// (after a short, bounded wait so the peer can read the reason rather
    /// than a reset). No key, nonce or memory is touched.
    fn refuse_network(&self, mut stream: TcpStream, addr: SocketAddr, slot: Slot) {
        let n = self.metrics.refused_network();
        let nets = self
            .opts
            .migration_networks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            peer = %addr,
            refused = n,
            "connection refused before authentication: {} is not in --migration-network {nets}",
            addr.ip()
        );
        let frame = Msg::Reject {
            reason: RejectReason::Network,
            message: format!(
                "connections from {} are refused: not in this destination's --migration-network {nets}",
                addr.ip()
            ),
        }
        .encode();
        tokio::spawn(async move {
            let _slot = slot;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                stream.write_all(&frame).await?;
                stream.shutdown().await?;
                // Discard (bounded) what the peer sent until it closes.
                let mut sink = [0u8; 1024];
                let mut left = 64 * 1024;
                while left > 0 {
                    match stream.read(&mut sink).await? {
                        0 => break,
                        n => left -= n.min(left),
                    }
                }
                std::io::Result::Ok(())
            })
            .await;
        });
    }

    /// Registers `migration_id` as expecting `channels` data channels, each
    /// admitted with the session's data-channel key and encrypted like the
    /// control connection `conn`; they arrive on the returned receiver.
    fn expect_channels(
        &self,
        migration_id: u64,
        channels: u16,
        conn: &Conn,
        keys: &ferry_proto::SessionKeys,
    ) -> mpsc::Receiver<Stream> {
        let (tx, rx) = mpsc::channel(usize::from(channels));
        self.pending.lock().expect("pending").insert(
            migration_id,
            PendingChannels {
                tx,
                expected: ExpectedChannels {
                    left: channels,
                    encrypted: conn.is_encrypted(),
                },
                key: keys.data_channel.clone(),
            },
        );
        rx
    }

    /// The interfaces a source may open data channels to: this host's,
    /// narrowed to `--migration-network` and the listening address family
    /// (logged; none when they cannot be read, and the source then uses
    /// the control connection's address).
    fn advertised_interfaces(
        &self,
        migration_id: u64,
        listen_ip: IpAddr,
    ) -> Vec<ferry_proto::net::NetInterface> {
        let local = nics::discover().unwrap_or_else(|e| {
            tracing::warn!("{e}; advertising no interface");
            Vec::new()
        });
        let interfaces = nics::advertised(&local, &self.opts.migration_networks, listen_ip);
        tracing::info!(
            migration_id,
            interfaces = ?interfaces.iter().map(|i| i.addr).collect::<Vec<_>>(),
            "advertising data-channel interfaces"
        );
        interfaces
    }

    /// Waits for a migration slot: at once when one is free, else in the
    /// queue (`--queue`, at most `--queue-timeout`), else refused as busy
    /// with the numbers.
    async fn admit(&self) -> std::result::Result<tokio::sync::OwnedSemaphorePermit, String> {
        const STOPPING: &str = "destination shutting down: it takes no new migrations";
        if self.stopping() {
            return Err(STOPPING.into());
        }
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        let busy = |queued: usize| {
            format!(
                "busy: {} migrations running (--max-concurrent {}) and {} waiting (--queue {})",
                self.opts.max_concurrent.max(1) - self.slots.available_permits(),
                self.opts.max_concurrent.max(1),
                queued,
                self.opts.queue
            )
        };
        let queued = self.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.opts.queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(busy(queued));
        }
        tracing::info!(position = queued + 1, "no free slot: migration queued");
        let mut stop = self.stop.subscribe();
        let got = tokio::select! {
            got = tokio::time::timeout(self.opts.queue_timeout, self.slots.clone().acquire_owned()) => Some(got),
            _ = stopped(&mut stop) => None,
        };
        let waiting = self.queued.fetch_sub(1, Ordering::SeqCst) - 1;
        match got {
            None => Err(STOPPING.into()),
            Some(Ok(Ok(p))) => Ok(p),
            _ => Err(format!(
                "{} after waiting {:?} in the queue (--queue-timeout)",
                busy(waiting),
                self.opts.queue_timeout
            )),
        }
    }

    /// Books `guest` bytes of guest memory and `buffers` bytes of receive
    /// buffers against `--memory-limit`, for all migrations together;
    /// released when the returned guard drops.
    fn reserve(&self, guest: u64, buffers: u64) -> std::result::Result<Arc<Reservation>, String> {
        self.reserved
            .reserve(guest.saturating_add(buffers))
            .map(Arc::new)
            .map_err(|f| {
                format!(
                    "guest memory of {} (and {} of receive buffers for its first data channel) plus the {} of the migrations already accepted is above this destination's --memory-limit of {}",
                    human_exact(guest),
                    human_exact(buffers),
                    human_exact(f.used),
                    human_exact(f.limit),
                )
            })
    }

    /// Handles one connection and counts it in the metrics. Returns `None`
    /// for data channels and for connections that never became a migration
    /// attempt.
    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        listen_ip: IpAddr,
        slot: Slot,
    ) -> Option<Result<DestSummary>> {
        let mut attempt = None;
        let result = self
            .handle_conn(stream, listen_ip, &mut attempt, slot)
            .await;
        if let (Some(a), Some(r)) = (attempt, &result) {
            a.finish(r);
        }
        result
    }

    async fn handle_conn(
        self: Arc<Self>,
        stream: TcpStream,
        listen_ip: IpAddr,
        attempt: &mut Option<Attempt>,
        slot: Slot,
    ) -> Option<Result<DestSummary>> {
        let local = stream.local_addr().ok();
        // One deadline for TLS, hello and proof.
        let deadline = tokio::time::Instant::now() + self.opts.handshake_timeout;
        let stream = match self.secure(stream, deadline).await {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                // A failed TLS handshake is a refused attempt (metrics
                // reason `tls`).
                *attempt = Some(self.metrics.begin());
                return Some(Err(e));
            }
        };
        let encrypted = stream.is_encrypted();
        let mut conn = Conn::new(stream, self.opts.timeout);
        let hello = match tokio::time::timeout_at(deadline, conn.recv("the hello")).await {
            Ok(h) => h,
            Err(_) => Err(self.handshake_expired()),
        };
        if !matches!(
            hello,
            Ok(Msg::Hello {
                role: Role::Data,
                ..
            }) | Err(TransportError::PeerClosed { .. })
        ) {
            *attempt = Some(self.metrics.begin());
        }
        let mut opening = DestOpening::new(self.admission());
        let hello = match hello {
            Ok(m) => opening.on_hello(m, encrypted),
            // Closed before saying anything: a health check or port scan,
            // not a migration attempt.
            Err(TransportError::PeerClosed { .. }) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        let Hello {
            version,
            role,
            nonce,
        } = match hello {
            Ok(h) => h,
            Err(refused) => {
                let r = refused.refusal();
                let e = conn.reject(r.reason, r.message).await;
                let e = match refused {
                    HelloRefusal::Version { peer_min, peer_max } => {
                        TransportError::UnsupportedVersion {
                            peer_min,
                            peer_max,
                            ours_min: PROTOCOL_MIN,
                            ours_max: PROTOCOL_MAX,
                        }
                    }
                    HelloRefusal::Unencrypted => {
                        tracing::warn!(peer = conn.peer(), "unencrypted connection refused: {e}");
                        e
                    }
                    _ => e,
                };
                return Some(Err(e.into()));
            }
        };
        match role {
            Role::Data => {
                let nets = &self.opts.migration_networks;
                if !local.is_some_and(|l| nics::allowed(nets, l.ip())) {
                    let e = conn
                        .reject(
                            RejectReason::Network,
                            format!(
                                "data channel to {} refused: not in --migration-network {}",
                                local.map_or("?".into(), |l| l.ip().to_string()),
                                nets.iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                        .await;
                    tracing::warn!(peer = conn.peer(), "{e}");
                    return None;
                }
                // The channel proves which session it belongs to; no token
                // crosses the network.
                let claim = match tokio::time::timeout_at(deadline, conn.data_challenge(version))
                    .await
                    .unwrap_or_else(|_| Err(self.handshake_expired()))
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(peer = conn.peer(), "data channel refused: {e}");
                        return None;
                    }
                };
                let found = {
                    let mut pending = self.pending.lock().expect("pending");
                    match pending.values_mut().find(|p| claim.belongs_to(&p.key)) {
                        Some(p) => p
                            .expected
                            .admit(encrypted)
                            .map(|()| (p.tx.clone(), p.key.clone())),
                        None => Err(unknown_channel()),
                    }
                };
                match found {
                    Ok((tx, key)) => {
                        let admitted =
                            tokio::time::timeout_at(deadline, conn.admit_data(&claim, &key)).await;
                        drop(slot);
                        if matches!(admitted, Ok(Ok(()))) {
                            let _ = tx.send(conn.into_stream()).await;
                        }
                    }
                    Err(r) => {
                        let e = conn.reject(r.reason, r.message).await;
                        tracing::warn!(peer = conn.peer(), "{e}");
                    }
                }
                None
            }
            Role::Control => Some(
                self.session(conn, opening, nonce, version, listen_ip, (deadline, slot))
                    .await,
            ),
        }
    }

    /// Tells a TLS client from a plaintext one by the first byte (a TLS
    /// handshake record starts with 0x16, a Ferry frame with "FRYM") and
    /// runs the TLS handshake for the former. `None`: closed before a byte,
    /// or not a byte before the handshake deadline.
    async fn secure(
        &self,
        stream: TcpStream,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Stream>> {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(TransportError::io("reading the hello", "control", e).into()),
            // Not a byte before the deadline: not a migration attempt (an
            // idle stranger, a port scan); closed without a log line each.
            Err(_) => {
                tracing::debug!("closed: nothing sent before --handshake-timeout");
                return Ok(None);
            }
        }
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        if first[0] == TLS_HANDSHAKE_BYTE {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            self.opts
                .tls
                .accept(stream, timeout)
                .await
                .map(Some)
                .map_err(|e| {
                    tracing::warn!(peer, "{e}");
                    e.into()
                })
        } else {
            Ok(Some(stream.into()))
        }
    }

    /// The pre-authentication deadline passed.
    fn handshake_expired(&self) -> TransportError {
        TransportError::Timeout {
            what: "the TLS handshake, hello and proof (--handshake-timeout)",
            after: self.opts.handshake_timeout,
        }
    }

    /// What this destination admits, for the checks of
    /// [`DestOpening`].
    fn admission(&self) -> Admission {
        Admission {
            plaintext_allowed: self.opts.plaintext,
            memory_limit: self.opts.memory_limit,
            rdma: cfg!(feature = "rdma"),
            supports: self.resume.supports.clone(),
        }
    }

    async fn session(
        self: Arc<Self>,
        mut conn: Conn,
        mut opening: DestOpening,
        nonce_s: [u8; 32],
        version: u16,
        listen_ip: IpAddr,
        (deadline, slot): (tokio::time::Instant, Slot),
    ) -> Result<DestSummary> {
        let started = Instant::now();
        let meter = crate::cpu::CpuMeter::start(Duration::ZERO);
        // Refused before any authentication work when the slots and the
        // queue are full.
        if self.slots.available_permits() == 0
            && self.queued.load(Ordering::SeqCst) >= self.opts.queue
        {
            let msg = format!(
                "busy: {n} migrations running (--max-concurrent {n}) and {} waiting (--queue {})",
                self.queued.load(Ordering::SeqCst),
                self.opts.queue,
                n = self.opts.max_concurrent.max(1),
            );
            return Err(conn.reject(RejectReason::Busy, msg).await.into());
        }
        let authenticated = tokio::time::timeout_at(
            deadline,
            conn.server_authenticate(&self.opts.key, nonce_s, version),
        )
        .await
        .unwrap_or_else(|_| Err(self.handshake_expired()));
        // Authenticated (or gone): no longer counted against the caps.
        drop(slot);
        match authenticated {
            Ok(()) => opening.authenticated().map_err(MigrationError::from)?,
            // The source aborts the handshake only when our proof does not
            // match its key.
            Err(TransportError::PeerAborted(_)) => {
                return Err(TransportError::AuthFailed(
                    "the source refused our proof (different --auth-key-file?)",
                )
                .into())
            }
            Err(e) => return Err(e.into()),
        }
        let encrypted = conn.is_encrypted();
        let offer = match opening.on_offer(conn.recv("the offer").await?, encrypted) {
            Ok(Offered::Migration(o)) => o,
            // `ferry relay` (issue 13): streams, not a guest.
            Ok(Offered::Relay(o)) => return self.relay_session(conn, o, listen_ip, started).await,
            Err(OfferError::Refused(r)) => {
                return Err(conn.reject(r.reason, r.message).await.into())
            }
            Err(OfferError::Session(e)) => return Err(e.into()),
        };
        let _permit = match self.admit().await {
            Ok(p) => p,
            Err(msg) => return Err(conn.reject(RejectReason::Busy, msg).await.into()),
        };
        // Receive buffers are bounded per data channel (see
        // ferry_transport::reservation): the first channel's are booked
        // now, with the guest memory, so a migration that cannot run at all
        // is refused here; each further channel books its own when it
        // opens (refused if it does not fit, the others carry on).
        let per_channel = channel_allowance(offer.option);
        let reserved = match self.reserve(offer.layout.total_bytes(), per_channel) {
            Ok(r) => r,
            Err(msg) => return Err(conn.reject(RejectReason::MemoryLimit, msg).await.into()),
        };
        // RDMA: the source's NICs follow the offer; ours must share a subnet
        // with one of them (checked before anything is allocated).
        #[cfg(feature = "rdma")]
        let rdma_shared = if offer.option == PerformanceOption::Rdma {
            match crate::rdma::dest_endpoints(&mut conn, &self.opts.migration_networks).await {
                Ok(s) => Some(s),
                Err((reason, message)) => return Err(conn.reject(reason, message).await.into()),
            }
        } else {
            None
        };
        // Validated: now, and only now, allocate.
        let mem = Arc::new(match self.take_preallocated(&offer.layout) {
            Some(m) => {
                tracing::info!(
                    "landing in the guest memory preallocated at start (--prealloc-guest)"
                );
                m
            }
            None => {
                let backing = *self.backing.lock().expect("backing");
                match dest_memory_backed(&offer.layout, backing) {
                    Ok(m) => m,
                    // The pool (or the host) cannot hold this guest: the
                    // source is told why, as for --memory-limit.
                    Err(e @ MigrationError::Memory(_)) => {
                        return Err(conn
                            .reject(RejectReason::MemoryLimit, e.to_string())
                            .await
                            .into())
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        // The destination's evidence, under the session's page key: every
        // page any channel lands is recorded in it.
        let keys = conn.session_keys().ok_or(TransportError::AuthFailed(
            "no session keys after authentication",
        ))?;
        let ledger = Arc::new(offer.layout.ledger(keys.page.clone())?);
        // Every channel checks frames with the session's frame key, shares
        // the round gate, gives each frame --peer-timeout to arrive once it
        // has begun, and books its receive buffers on this migration's
        // reservation (so they count against --memory-limit).
        let inbound = Arc::new(
            Inbound::new(
                offer.layout.clone(),
                match offer.option {
                    // Validated before Accept: the id is known.
                    PerformanceOption::Compression { codec, .. } => Codec::from_id(codec).ok(),
                    _ => None,
                },
                ledger.clone(),
                keys.frame.clone(),
            )
            .with_deadline(self.opts.timeout)
            .with_buffers(ChannelBudgets::new(reserved, per_channel, 1)),
        );
        let _allocation = self.metrics.allocated(offer.layout.total_bytes());
        let migration_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // RDMA: listeners on the shared NICs, guest memory registered once
        // per device in this migration's protection domains (a memlock
        // failure is the rejection); each channel admits one connection,
        // with its token. Remote write access is revoked at the switchover,
        // and (the guard) whenever this migration ends otherwise.
        #[cfg(feature = "rdma")]
        let rdma = match &rdma_shared {
            Some(shared) => match crate::rdma::dest_prepare(
                &mem,
                &offer.layout,
                shared,
                &keys.data_channel,
                migration_id,
            ) {
                Ok(r) => Some(r),
                Err((reason, message)) => return Err(conn.reject(reason, message).await.into()),
            },
            None => None,
        };
        #[cfg(feature = "rdma")]
        let rdma_exposure = rdma.as_ref().map(|r| r.exposure());
        #[cfg(feature = "rdma")]
        let _revoke_on_exit = rdma_exposure.clone().map(crate::rdma::RevokeOnDrop);
        tracing::Span::current().record("migration_id", migration_id);
        let rx = self.expect_channels(migration_id, offer.channels, &conn, &keys);
        let peer = conn.peer().to_string();
        tracing::info!(
            migration_id,
            peer,
            bytes = offer.layout.total_bytes(),
            "offer accepted"
        );
        let interfaces = self.advertised_interfaces(migration_id, listen_ip);
        let accepted = conn.send(&opening.accept(migration_id, interfaces)?).await;
        #[cfg(feature = "rdma")]
        let accepted = match (&rdma, accepted) {
            (Some(r), Ok(())) => conn.send(&Msg::RdmaAccept(r.accept().clone())).await,
            (_, a) => a,
        };
        let (mut writer, msgs) = conn.split();
        let result = match accepted {
            Ok(()) => {
                Receive {
                    offer: &offer,
                    mem: &mem,
                    inbound: &inbound,
                    timeout: self.opts.timeout,
                    resume: &self.resume,
                    metrics: &self.metrics,
                    migration_id,
                    stop: self.stop.subscribe(),
                    #[cfg(feature = "rdma")]
                    rdma: std::sync::Mutex::new(rdma),
                    #[cfg(feature = "rdma")]
                    rdma_exposure,
                }
                .run(&mut writer, msgs, rx)
                .await
            }
            Err(e) => {
                let e = MigrationError::from(e);
                writer.abort(&e.to_string()).await;
                Err(e)
            }
        };
        self.pending.lock().expect("pending").remove(&migration_id);
        self.metrics.retire(migration_id);
        match result {
            Ok(r) => Ok(DestSummary {
                migration_id,
                peer,
                memory_bytes: offer.layout.total_bytes(),
                payload_bytes: r.payload_bytes,
                crc_errors: r.crc_errors,
                digest: hex(&r.fingerprint),
                verify_full: r.verify_full,
                restore_report: r.restore_report,
                resume_report: r.resume_report,
                audit: r.audit,
                memory: crate::memory::memory_use(&*mem),
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                downtime_ms: r.downtime.as_secs_f64() * 1e3,
                cpu: crate::cpu::CpuUse {
                    first_touch_s: r.first_touch.as_secs_f64(),
                    ..meter.finish(r.hooks_cpu, r.payload_bytes)
                },
            }),
            Err(e) => {
                match source_knows(&e) {
                    SourceKnows::LetGo => tracing::error!(migration_id, "{e}"),
                    SourceKnows::Refused => tracing::warn!(migration_id, "migration aborted: {e}"),
                    // Receive::run told the source, before closing the
                    // channels (tell_then_close).
                    SourceKnows::Nothing => {}
                }
                Err(e)
            }
        }
    }
}

/// Ends a migration's data channels (TCP and RDMA); when it `failed`, tells
/// the source why first (unless [`source_knows`] says it was told or let
/// go): a source that sees its channels close before the reason comes has
/// only a moment to read it.
async fn tell_then_close(
    ch: &mut DataChannels,
    writer: &mut ferry_transport::conn::ConnWriter,
    migration_id: u64,
    failed: Option<&MigrationError>,
) {
    if let Some(e) = failed.filter(|e| source_knows(e) == SourceKnows::Nothing) {
        tracing::debug!(migration_id, "migration aborted, telling the source: {e}");
        writer.abort(&e.to_string()).await;
    }
    ch.close(failed.is_some()).await;
}

/// What the source already knows of a migration that failed here: the one
/// place the destination sorts its errors by it ([`tell_then_close`] tells
/// the source with `Abort` by it, [`Destination::session`] logs by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKnows {
    /// `Committed` was sent: the source has let go, nothing to tell it.
    LetGo,
    /// Refused after `Commit`, bound to the session's proof: the source
    /// was told.
    Refused,
    /// Nothing yet: it is told with `Abort`, before the channels close.
    Nothing,
}

/// What the source knows of a migration that failed with `e` ([`SourceKnows`]).
fn source_knows(e: &MigrationError) -> SourceKnows {
    match e {
        MigrationError::ResumeFailed(_) => SourceKnows::LetGo,
        MigrationError::RestoreFailed(_) | MigrationError::CommitProof => SourceKnows::Refused,
        _ => SourceKnows::Nothing,
    }
}

impl Destination {
    /// A relay (`ferry relay`): its `--deliver-to` checked against
    /// `--relay-allow` before anything else, admitted like a migration,
    /// its windows booked against `--memory-limit`, then carried by
    /// [`crate::relay::serve_destination`].
    async fn relay_session(
        self: Arc<Self>,
        mut conn: Conn,
        offer: ferry_proto::relay::RelayOffer,
        listen_ip: IpAddr,
        started: Instant,
    ) -> Result<DestSummary> {
        if let Err(e) = offer.validate() {
            return Err(conn
                .reject(RejectReason::BadOffer, e.to_string())
                .await
                .into());
        }
        let allow = self.relay_allow.lock().expect("relay_allow").clone();
        let resolved: Vec<SocketAddr> =
            match tokio::net::lookup_host(offer.deliver_to.as_str()).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    let msg = format!("--deliver-to {}: {e}", offer.deliver_to);
                    return Err(conn.reject(RejectReason::RelayNotAllowed, msg).await.into());
                }
            };
        let deliver_to = match resolved
            .iter()
            .find(|a| ferry_proto::relay::check_deliver_to(**a, &allow).is_ok())
        {
            Some(a) => *a,
            None => {
                let msg = ferry_proto::relay::check_deliver_to(
                    resolved
                        .first()
                        .copied()
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    &allow,
                )
                .err()
                .unwrap_or_default();
                tracing::warn!(peer = conn.peer(), "relay refused: {msg}");
                return Err(conn.reject(RejectReason::RelayNotAllowed, msg).await.into());
            }
        };
        let _permit = match self.admit().await {
            Ok(p) => p,
            Err(msg) => return Err(conn.reject(RejectReason::Busy, msg).await.into()),
        };
        // What the relay needs at least (its main stream's windows, its
        // channels' read buffers); each further stream books its own
        // windows when it opens (crate::relay::StreamBudget).
        let reserved = match self.reserved.reserve(offer.admission_reservation()) {
            Ok(r) => Arc::new(r),
            Err(f) => {
                let msg = format!(
                    "relay buffers of {} (the main stream's two {} windows and the read buffers of {} data channels) plus the {} of the migrations already accepted is above this destination's --memory-limit of {}",
                    human_exact(f.bytes),
                    ferry_proto::units::human(u64::from(offer.window)),
                    offer.channels,
                    human_exact(f.used),
                    human_exact(f.limit),
                );
                return Err(conn.reject(RejectReason::MemoryLimit, msg).await.into());
            }
        };
        let Some(keys) = conn.session_keys() else {
            return Err(TransportError::AuthFailed("no session keys after authentication").into());
        };
        let migration_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::Span::current().record("migration_id", migration_id);
        let rx = self.expect_channels(migration_id, offer.channels, &conn, &keys);
        let interfaces = self.advertised_interfaces(migration_id, listen_ip);
        let peer = conn.peer().to_string();
        tracing::info!(migration_id, peer, deliver_to = %deliver_to, "relay accepted");
        // Its streams on --metrics while it runs, totals once it ended.
        let live = Arc::new(crate::relay::RelayLive::default());
        self.metrics.track_relay(migration_id, live.clone());
        let _retire = RetireRelay(&self.metrics, migration_id);
        let result = match conn
            .send(&Msg::Accept(Accept {
                migration_id,
                interfaces,
            }))
            .await
        {
            Ok(()) => crate::relay::serve_destination(
                conn,
                &offer,
                deliver_to,
                rx,
                self.opts.timeout,
                reserved,
                live,
            )
            .await
            .map_err(crate::relay::RelayFailure::into_migration_error),
            Err(e) => Err(e.into()),
        };
        self.pending.lock().expect("pending").remove(&migration_id);
        let r = result?;
        tracing::info!(
            migration_id,
            streams = r.streams.len(),
            bytes = r.stream_bytes,
            "relay finished: every byte of every stream delivered and checked"
        );
        for s in &r.streams {
            tracing::info!(
                migration_id,
                stream = s.stream,
                label = %s.label,
                forward_bytes = s.forward_bytes,
                back_bytes = s.back_bytes,
                chunks_received = s.chunks_received,
                duplicates_dropped = s.duplicates_dropped,
                waited_to_deliver_s = s.waited_to_deliver_s,
                waited_for_window_s = s.waited_for_window_s,
                "relay stream"
            );
        }
        Ok(DestSummary {
            migration_id,
            peer,
            memory_bytes: 0,
            payload_bytes: r.stream_bytes,
            crc_errors: 0,
            digest: String::new(),
            verify_full: false,
            restore_report: format!("relay: {} streams to {deliver_to}", r.streams.len()),
            resume_report: String::new(),
            audit: None,
            memory: Default::default(),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: 0.0,
            cpu: Default::default(),
        })
    }
}

/// A relay's streams leave `--metrics`' live figures (for its totals)
/// however its session ends.
struct RetireRelay<'a>(&'a Metrics, u64);

impl Drop for RetireRelay<'_> {
    fn drop(&mut self) {
        self.0.retire_relay(self.1);
    }
}

/// The event of a migration's end: committed (with its size and pause)
/// or failed (with the reason), inside its span (peer, migration id).
fn log_outcome(result: &Result<DestSummary>) {
    match result {
        Ok(s) => tracing::info!(
            migration_id = s.migration_id,
            bytes = s.memory_bytes,
            payload_bytes = s.payload_bytes,
            downtime_ms = s.downtime_ms,
            total_ms = s.total_ms,
            cpu_s = s.cpu.ferry_s,
            cpu_s_per_gib = s.cpu.ferry_s_per_gib,
            first_touch_s = s.cpu.first_touch_s,
            digest = %s.digest,
            "migration committed"
        ),
        Err(MigrationError::Transport(TransportError::PeerAborted(why))) => tracing::warn!(
            reason = "peer_aborted",
            "migration failed: the source aborted it: {why}"
        ),
        Err(e) => tracing::warn!(reason = %e.reason(), "migration failed: {e}"),
    }
}

/// Resolves once the daemon's shutdown flag is set.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the daemon is gone: that is a stop too.
    let _ = stop.wait_for(|s| *s).await;
}

/// Logs why a data channel's task (`channel`: the source's address, or
/// "rdma") failed, if it did, and returns the line; a task stopped on
/// purpose (fenced, or the migration over) is no failure.
fn failure(
    channel: &str,
    done: std::result::Result<ferry_transport::Result<()>, tokio::task::JoinError>,
) -> Option<String> {
    let why = match done {
        Ok(Ok(())) => return None,
        Err(e) if e.is_cancelled() => return None,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(channel, "data channel failed: {why}");
    Some(format!("{channel}: {why}"))
}

/// The data channels of one incoming migration, by the source's address:
/// their tasks. Which may start, which are fenced and when none is left are
/// the session's ([`DestSession`]).
#[derive(Default)]
struct DataChannels {
    set: JoinSet<ferry_transport::Result<()>>,
    by_task: HashMap<tokio::task::Id, SocketAddr>,
    live: HashMap<SocketAddr, tokio::task::AbortHandle>,
    /// RDMA option: the one task that lands pages from every RDMA channel
    /// (it ends once each has sent its end frame or was reported lost).
    rdma: JoinSet<ferry_transport::Result<()>>,
}

impl DataChannels {
    /// Ends the channel tasks of a migration that is over, TCP and RDMA
    /// alike. When it `failed`, first says why the channels that had
    /// already ended failed (their reason, a frame refused, would be lost
    /// when the migration ended for another one, its control connection
    /// closed); then stops the others and waits until they have. Each task
    /// holds the migration's Inbound (its booking against --memory-limit)
    /// and guest memory: waiting here means the slot the migration gives
    /// back when it returns comes with its memory (a queued migration woken
    /// by the slot was refused for a limit the ended one still filled).
    /// Returns what it logged, one line per failed channel.
    async fn close(&mut self, failed: bool) -> Vec<String> {
        let mut said = Vec::new();
        if failed {
            while let Some(done) = self.set.try_join_next_with_id() {
                let peer = done.as_ref().map_or_else(|e| e.id(), |(id, _)| *id);
                let peer = self.by_task.get(&peer).map(ToString::to_string);
                said.extend(failure(
                    peer.as_deref().unwrap_or("?"),
                    done.map(|(_, r)| r),
                ));
            }
            while let Some(done) = self.rdma.try_join_next() {
                said.extend(failure("rdma", done));
            }
        }
        self.set.shutdown().await;
        self.rdma.shutdown().await;
        said
    }

    /// Starts receiving on `stream` with `recv`, unless the session refuses
    /// it (fenced).
    fn start<F, Fut>(&mut self, session: &mut DestSession, stream: Stream, recv: F)
    where
        F: FnOnce(Stream) -> Fut,
        Fut: std::future::Future<Output = ferry_transport::Result<()>> + Send + 'static,
    {
        let Ok(peer) = stream.peer_addr() else {
            return;
        };
        if !session.channel_opened(peer) {
            tracing::warn!(%peer, "data channel arrived after it was fenced: dropped");
            return;
        }
        let h = self.set.spawn(recv(stream));
        self.by_task.insert(h.id(), peer);
        self.live.insert(peer, h);
    }

    /// Aborts the channel from `peer` (its task reports back once it has
    /// stopped).
    fn abort(&mut self, peer: &SocketAddr) {
        if let Some(h) = self.live.get(peer) {
            h.abort();
        }
    }
}

struct Receive<'a> {
    offer: &'a Offer,
    mem: &'a Arc<DestMemory>,
    /// What every data channel shares: layout, codec, the destination's
    /// ledger and the round gate.
    inbound: &'a Arc<Inbound>,
    timeout: Duration,
    resume: &'a ResumeHook,
    metrics: &'a Metrics,
    migration_id: u64,
    /// The daemon's shutdown flag: aborts the migration before its switchover.
    stop: tokio::sync::watch::Receiver<bool>,
    /// RDMA option: the prepared channels, taken when receiving starts.
    #[cfg(feature = "rdma")]
    rdma: std::sync::Mutex<Option<ferry_transport::rdma::RdmaReceiver<()>>>,
    /// RDMA option: the remote-write exposure, revoked at the switchover.
    #[cfg(feature = "rdma")]
    rdma_exposure: Option<ferry_transport::rdma::RdmaExposure<()>>,
}

/// What a committed incoming migration produced.
struct Received {
    payload_bytes: u64,
    crc_errors: u64,
    fingerprint: [u8; 16],
    verify_full: bool,
    restore_report: String,
    resume_report: String,
    audit: Option<AuditReport>,
    downtime: Duration,
    /// CPU time of the restore and resume hooks (the guest's work).
    hooks_cpu: Duration,
    /// CPU time spent populating fresh memory where pages landed.
    first_touch: Duration,
}

/// The sum of one counter over every channel's counters.
fn total(all: &[Arc<RecvCounters>], counter: fn(&RecvCounters) -> &AtomicU64) -> u64 {
    all.iter().map(|c| counter(c).load(Ordering::Relaxed)).sum()
}

impl Receive<'_> {
    /// The destination's evidence so far: the sum over every page of what
    /// landed in it (see [`ferry_proto::evidence`]).
    fn evidence(&self) -> Evidence {
        self.ledger().evidence()
    }

    /// The destination's ledger.
    fn ledger(&self) -> &Ledger {
        &self.inbound.ledger
    }

    /// Starts receiving a data channel into its own counters (kept in
    /// `all`, and in the metrics under the channel's index); every channel
    /// shares the migration's [`Inbound`] (ledger, round gate).
    fn start_channel(
        &self,
        ch: &mut DataChannels,
        session: &mut DestSession,
        stream: Stream,
        all: &mut Vec<Arc<RecvCounters>>,
    ) {
        let index = session.channels().0;
        let (i, m, c) = (
            self.inbound.clone(),
            self.mem.clone(),
            Arc::new(RecvCounters::default()),
        );
        let counters = c.clone();
        ch.start(session, stream, move |s| {
            receive_channel_on_own_thread(s, i, m, c)
        });
        if session.channels().0 > index {
            self.metrics
                .track_channel(self.migration_id, index.to_string(), counters.clone());
            all.push(counters);
        }
    }

    /// Receives pages until the switchover, proves what landed, and
    /// restores and resumes the guest on a valid commit.
    async fn run(
        &self,
        writer: &mut ferry_transport::conn::ConnWriter,
        msgs: mpsc::Receiver<ferry_transport::Result<Msg>>,
        streams: mpsc::Receiver<Stream>,
    ) -> Result<Received> {
        let mut ch = DataChannels::default();
        let received = self.receive(&mut ch, writer, msgs, streams).await;
        tell_then_close(&mut ch, writer, self.migration_id, received.as_ref().err()).await;
        received
    }

    async fn receive(
        &self,
        ch: &mut DataChannels,
        writer: &mut ferry_transport::conn::ConnWriter,
        mut msgs: mpsc::Receiver<ferry_transport::Result<Msg>>,
        mut streams: mpsc::Receiver<Stream>,
    ) -> Result<Received> {
        let keys = writer.session_keys().ok_or(TransportError::Unexpected {
            expected: "an authenticated session",
            got: "no session keys".into(),
        })?;
        // The RDMA channels' counters first, then one per TCP data channel
        // (each counted in the metrics under its index).
        let counters = Arc::new(RecvCounters::default());
        let mut all_counters = vec![counters.clone()];
        // RDMA: every channel lands pages on its own; the task ends once each
        // has sent its end frame (or was reported lost by the source).
        #[cfg(feature = "rdma")]
        if let Some(r) = self.rdma.lock().expect("rdma").take() {
            self.metrics
                .track_channel(self.migration_id, "rdma".into(), counters.clone());
            // Every RDMA channel's registered receive buffers count against
            // --memory-limit too (the first was booked with the offer).
            let bookings = match &self.inbound.buffers {
                Some(b) => (0..r.accept().channels.len())
                    .map(|_| b.book())
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                None => Vec::new(),
            };
            let receiving = r.receive(
                self.inbound.clone(),
                self.mem.clone(),
                counters.clone(),
                self.timeout,
            );
            ch.rdma.spawn(async move {
                let _bookings = bookings;
                receiving.await
            });
        }
        // What the source's messages mean and what is answered, which
        // channels may land pages, the progress timeout and the
        // switchover's proofs: the session decides, this loop does the IO.
        let mut session = DestSession::new(keys.commit.clone(), self.timeout, Instant::now());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut stop = self.stop.clone();
        // Receive until the source's switchover. Every chunk was acknowledged
        // before it was sent, so whatever a channel still carries then is an
        // end frame or a fenced channel's stale bytes: all channels are
        // closed before the digest.
        while session.is_receiving() {
            tokio::select! {
                Some(stream) = streams.recv(), if session.channels().0 < self.offer.channels => {
                    self.start_channel(ch, &mut session, stream, &mut all_counters);
                }
                Some(done) = ch.set.join_next_with_id() => {
                    let (id, r) = match done {
                        Ok((id, r)) => (id, Some(r)),
                        Err(e) if e.is_cancelled() => (e.id(), None),
                        Err(e) => return Err(MigrationError::Guest(format!("data channel task failed: {e}"))),
                    };
                    let peer = ch.by_task.remove(&id);
                    if let Some(p) = peer {
                        ch.live.remove(&p);
                    }
                    let how = match &r {
                        Some(Ok(())) => ChannelOutcome::Finished,
                        Some(Err(_)) => ChannelOutcome::Failed,
                        None => ChannelOutcome::Closed,
                    };
                    let end = session.channel_ended(peer, how);
                    match (end, r) {
                        // The source fails a channel over to the others; only
                        // when none is left is the migration lost.
                        (ChannelEnd::NoneLeft, Some(Err(e))) => {
                            return Err(why_the_last_channel_was_lost(&mut msgs, e).await.into());
                        }
                        (end, r) => {
                            if let Some(Err(e)) = r {
                                tracing::warn!(peer = ?peer, "data channel failed, the others carry on: {e}");
                            }
                            if let ChannelEnd::Send(fenced) = end {
                                writer.send(&fenced).await?;
                            }
                        }
                    }
                }
                // RDMA: one task lands every RDMA channel; it fails only
                // once none is left (or a descriptor was refused), which is
                // the last channel lost. Ended cleanly (every channel's end
                // frame), the switchover is still to come.
                Some(done) = ch.rdma.join_next() => match done {
                    Ok(Ok(())) => tracing::debug!("every RDMA channel ended"),
                    Ok(Err(e)) => {
                        tracing::warn!("RDMA data channels failed: {e}");
                        return Err(why_the_last_channel_was_lost(&mut msgs, e).await.into());
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => return Err(MigrationError::Guest(format!("RDMA receive task failed: {e}"))),
                },
                msg = msgs.recv() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(TransportError::PeerClosed { what: "control" }.into()),
                    };
                    match session.handle(msg, Instant::now())? {
                        Step::RoundDone { round, pages } => tracing::debug!(round, pages, "round done"),
                        Step::Send(answer) => writer.send(&answer).await?,
                        Step::Fence { channels, close, reply } => {
                            // Channels accepted but not started yet: a fenced one is dropped.
                            while let Ok(stream) = streams.try_recv() {
                                self.start_channel(ch, &mut session, stream, &mut all_counters);
                            }
                            for p in &close {
                                ch.abort(p);
                            }
                            tracing::warn!(?channels, closing = close.len(), "source lost data channels: fencing them");
                            if let Some(fenced) = reply {
                                writer.send(&fenced).await?;
                            }
                        }
                        Step::Switchover => {}
                        other => return Err(SessionError::OutOfOrder { event: step_name(&other), state: "receiving" }.into()),
                    }
                }
                _ = stopped(&mut stop) => return Err(MigrationError::ShuttingDown),
                _ = tick.tick() => {
                    let progress = total(&all_counters, |c| &c.bytes_on_wire) + total(&all_counters, |c| &c.chunks);
                    session.tick(Instant::now(), progress)?;
                }
            }
        }
        let (opened, ended) = session.channels();
        ch.set.shutdown().await;
        tracing::debug!(opened, ended, "data channels closed");
        // RDMA: the source sends its switchover only after every chunk was
        // acknowledged, and a channel it lost had its queue pair destroyed
        // first: everything has landed. Stop the channels (a lost one may
        // never send its end frame), unless one failed its checks.
        #[cfg(feature = "rdma")]
        {
            if let Some(Ok(Err(e))) = ch.rdma.try_join_next() {
                return Err(e.into());
            }
            ch.rdma.shutdown().await;
            // Nothing more may land: deregister every remote-write region
            // (the NIC refuses their rkeys from here on) before taking the
            // evidence of what landed.
            if let Some(x) = &self.rdma_exposure {
                x.revoke(ferry_transport::rdma_wire::RevokeReason::Switchover);
            }
        }
        self.switchover(writer, &mut msgs, &keys, &mut session, &all_counters)
            .await
    }

    /// From `Switchover` on, with every data channel stopped: proves what
    /// landed (`Ready`), checks the source's `Commit`, restores the device
    /// state, and only then confirms (`Committed`) and resumes; then takes
    /// the source's audit.
    async fn switchover(
        &self,
        writer: &mut ferry_transport::conn::ConnWriter,
        msgs: &mut mpsc::Receiver<ferry_transport::Result<Msg>>,
        keys: &ferry_proto::SessionKeys,
        session: &mut DestSession,
        all_counters: &[Arc<RecvCounters>],
    ) -> Result<Received> {
        // The session checked the device state against its hash when
        // Switchover came.
        let sw = session
            .switchover()
            .cloned()
            .ok_or(SessionError::OutOfOrder {
                event: "switchover",
                state: "no Switchover received",
            })?;
        // Nothing was sent since Switchover and nothing more can come in
        // before Ready: both sides take the transcripts at this point.
        let t = writer.transcript();
        let transcripts = Transcripts {
            s2d: t.received,
            d2s: t.sent,
        };
        // --verify full: the whole memory too, hashed in the pause.
        let memory = if sw.verify_full {
            let (mem, key) = (self.mem.clone(), keys.page.clone());
            let scan = tokio::task::spawn_blocking(move || memory_evidence(&*mem, &key))
                .await
                .map_err(|e| MigrationError::Guest(format!("verification task failed: {e}")))?;
            Some(scan.evidence)
        } else {
            None
        };
        let claims = Claims {
            transcripts,
            // What landed on every page: complete, every channel stopped.
            evidence: self.evidence(),
            device_state: sw.device_state_hash,
            memory,
        };
        let ready = session.ready(claims, Instant::now())?;
        writer.send(&ready).await?;
        let (what, deadline) = session.poll_timeout().ok_or(SessionError::OutOfOrder {
            event: "await Commit",
            state: "nothing awaited",
        })?;
        let step = match tokio::time::timeout_at(deadline.into(), msgs.recv()).await {
            Ok(Some(Ok(m))) => session.handle(m, Instant::now()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => return Err(TransportError::PeerClosed { what: "control" }.into()),
            // The timer says the deadline passed: the session names it.
            Err(_) => Err(session
                .tick(Instant::now().max(deadline), 0)
                .err()
                .unwrap_or(SessionError::Timeout {
                    what,
                    after: self.timeout,
                })),
        };
        match step {
            Ok(Step::Restore) => {}
            // Refused with a proof bound to the Commit the source should
            // have sent.
            Err(SessionError::CommitProof) => {
                let e = MigrationError::CommitProof;
                if let Some(refusal) = session.abort(&e.to_string()) {
                    writer.send(&refusal).await?;
                }
                return Err(e);
            }
            Err(e) => return Err(e.into()),
            Ok(other) => {
                return Err(SessionError::OutOfOrder {
                    event: step_name(&other),
                    state: "awaiting Commit",
                }
                .into())
            }
        }
        // Restore: everything that can fail, before this side takes the
        // guest (off the runtime: a VMM may do real work here).
        let (hook, mem, state) = (self.resume.clone(), self.mem.clone(), sw.device_state);
        let mut hooks_cpu = Duration::ZERO;
        let restored =
            tokio::task::spawn_blocking(move || on_thread_cpu(|| (hook.restore)(&mem, &state)))
                .await
                .map(|(r, cpu)| {
                    hooks_cpu += cpu;
                    r
                })
                .map_err(|e| format!("restore task failed: {e}"))
                .and_then(|r| r);
        let restore_report = match restored {
            Ok(r) => r,
            Err(e) => {
                let e = MigrationError::RestoreFailed(e);
                let refusal = session.restore_failed(&e.to_string())?;
                writer.send(&refusal).await?;
                return Err(e);
            }
        };
        let (committed_msg, downtime) = session.restored(Instant::now())?;
        let committed = session.committed().ok_or(SessionError::OutOfOrder {
            event: "committed",
            state: "not committed",
        })?;
        writer.send(&committed_msg).await?;
        // The guest is this side's now: resume it.
        let (hook, mem) = (self.resume.clone(), self.mem.clone());
        let resume_report =
            tokio::task::spawn_blocking(move || on_thread_cpu(|| (hook.resume)(&mem)))
                .await
                .map(|(r, cpu)| {
                    hooks_cpu += cpu;
                    r
                })
                .map_err(|e| format!("resume task failed: {e}"))
                .and_then(|r| r)
                .map_err(MigrationError::ResumeFailed)?;
        // The source audits its frozen memory after the pause and reports.
        let audit = match tokio::time::timeout(self.timeout, msgs.recv()).await {
            Ok(Some(Ok(m))) => {
                let is_audit = matches!(m, Msg::Audit(_));
                let name = m.name();
                match session.handle(m, Instant::now()) {
                    Ok(Step::Audit(Some(a))) => Some(a),
                    _ if is_audit => {
                        tracing::warn!(
                            migration_id = self.migration_id,
                            "audit report without this session's proof: ignored"
                        );
                        None
                    }
                    _ => {
                        tracing::warn!(
                            migration_id = self.migration_id,
                            "no audit report from the source: got {name}"
                        );
                        None
                    }
                }
            }
            Ok(other) => {
                tracing::warn!(
                    migration_id = self.migration_id,
                    "no audit report from the source: {other:?}"
                );
                None
            }
            Err(_) => {
                tracing::warn!(
                    migration_id = self.migration_id,
                    "no audit report from the source within {:?}",
                    self.timeout
                );
                None
            }
        };
        if let Some(a) = &audit {
            if a.result == ferry_transport::proto::AuditResult::Failed {
                tracing::error!(
                    migration_id = self.migration_id,
                    mismatched_pages = a.mismatched_pages,
                    first = ?a.first_mismatch,
                    "AUDIT FAILED: the source's memory differs from what was migrated (its dirty log missed guest writes); this guest runs with stale pages"
                );
            }
        }
        Ok(Received {
            payload_bytes: total(all_counters, |c| &c.payload_bytes),
            crc_errors: total(all_counters, |c| &c.crc_errors),
            fingerprint: proof::fingerprint(&committed),
            verify_full: sw.verify_full,
            restore_report,
            resume_report,
            audit,
            downtime,
            hooks_cpu,
            first_touch: Duration::from_nanos(total(all_counters, |c| &c.first_touch_ns)),
        })
    }
}

/// A step's name, for a driver that did not expect it.
fn step_name(s: &Step) -> &'static str {
    match s {
        Step::RoundDone { .. } => "RoundDone",
        Step::Send(_) => "an answer",
        Step::Fence { .. } => "Fence",
        Step::Switchover => "Switchover",
        Step::Restore => "Restore",
        Step::Audit(_) => "Audit",
    }
}

/// Runs `f` on this thread and returns what it returned and the CPU time
/// it used (the restore and resume hooks: the guest's work, left out of
/// Ferry's CPU figure).
fn on_thread_cpu<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let before = ferry_ffi::cpu::thread_times().ok();
    let r = f();
    let used = match (before, ferry_ffi::cpu::thread_times()) {
        (Some(b), Ok(a)) => a.since(&b).total(),
        _ => Duration::ZERO,
    };
    (r, used)
}

/// Checks that an offer's layout is something this host can map.
pub fn layout_fits(layout: &MemoryLayout) -> bool {
    layout
        .regions
        .iter()
        .all(|r| usize::try_from(r.size).is_ok())
}

/// The reason to report when the last data channel was lost with `lost`.
/// A frame this side refused (a tag, the framing, a run outside the layout)
/// is the cause: the source only sees its channel close, and waits (a
/// second) for the Abort naming it, so it is returned at once. A channel
/// closed, reset or timed out: a source that gives up says why (`Abort`)
/// just before its channels close, and its reason is preferred; a control
/// connection that closed is the cause when the source's channels close
/// because of it (its end may be read after theirs). Messages before
/// either, a `RoundDone`, are skipped; after 200 ms the channel's own error
/// stands.
async fn why_the_last_channel_was_lost(
    msgs: &mut mpsc::Receiver<ferry_transport::Result<Msg>>,
    lost: TransportError,
) -> TransportError {
    if lost.kind() != ferry_proto::ErrorKind::Connection {
        return lost;
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        match tokio::time::timeout_at(until, msgs.recv()).await {
            // Its Abort, or the control connection's own end (closed, reset).
            Ok(Some(Err(why))) => return why,
            Ok(Some(Ok(_))) => {}
            Ok(None) => return TransportError::PeerClosed { what: "control" },
            Err(_) => return lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields until `marker` is held by nobody else (the task holding it has
    /// ended and its future been dropped).
    async fn until_only_held_here<T>(marker: &Arc<T>) {
        for _ in 0..1000 {
            if Arc::strong_count(marker) == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the task holding the marker never ended");
    }

    /// The destination's end of an authenticated control connection (and
    /// the source's, kept open, with a second handle on its socket to peek
    /// at what arrived), for a [`Receive`] in a test.
    async fn control() -> (ferry_transport::conn::ConnWriter, Conn, std::net::TcpStream) {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (d, _) = l.accept().await.unwrap();
        let k = key.clone();
        let dest = tokio::spawn(async move {
            let mut c = Conn::new(d, Duration::from_secs(30));
            let (version, nonce) = match c.recv("hello").await.unwrap() {
                Msg::Hello {
                    max_version, nonce, ..
                } => (max_version, nonce),
                m => panic!("{m:?}"),
            };
            c.server_authenticate(&k, nonce, version).await.unwrap();
            c
        });
        let probe =
            std::net::TcpStream::from(std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().unwrap());
        let mut source = Conn::new(s, Duration::from_secs(30));
        source.client_handshake(&key).await.unwrap();
        (dest.await.unwrap().split().0, source, probe)
    }

    /// A failed migration tells the source why before it closes the data
    /// channels: when a channel's task is stopped, the `Abort` is already in
    /// the source's socket (a source that saw its channels close first had
    /// only a moment to read the reason). A migration that ended well, or
    /// whose source was told otherwise (a refusal with the session's proof)
    /// or has let go (after `Committed`), sends nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_migration_tells_the_source_before_closing_its_channels() {
        /// Held by a stand-in channel task: when it is stopped, notes
        /// whether anything had come to the source's control socket.
        struct Stopped {
            probe: std::net::TcpStream,
            told: Arc<std::sync::Mutex<Option<bool>>>,
        }
        impl Drop for Stopped {
            fn drop(&mut self) {
                let mut b = [0u8; 16];
                let there = matches!(self.probe.peek(&mut b), Ok(n) if n > 0);
                *self.told.lock().unwrap() = Some(there);
            }
        }
        let cases = [
            (Some(MigrationError::ShuttingDown), true),
            (Some(MigrationError::CommitProof), false),
            (Some(MigrationError::ResumeFailed("x".into())), false),
            (None, false),
        ];
        for (failed, told) in cases {
            let (mut writer, mut source, probe) = control().await;
            let seen = Arc::new(std::sync::Mutex::new(None));
            let stopped = Stopped {
                probe,
                told: seen.clone(),
            };
            let mut ch = DataChannels::default();
            ch.set.spawn(async move {
                let _stopped = stopped;
                std::future::pending::<ferry_transport::Result<()>>().await
            });
            tokio::task::yield_now().await;
            tell_then_close(&mut ch, &mut writer, 1, failed.as_ref()).await;
            assert_eq!(*seen.lock().unwrap(), Some(told), "{failed:?}");
            drop(writer);
            let heard = source.recv_within("abort", Duration::from_secs(5)).await;
            match heard {
                Err(TransportError::PeerAborted(why)) => {
                    assert!(told, "{failed:?}: {why}");
                    assert!(why.contains("shutting down"), "{why}");
                }
                other => assert!(!told, "{failed:?}: {other:?}"),
            }
        }
    }

    /// Runs an RDMA migration's receive loop with `rdma` standing in for its
    /// RDMA receive task and `msgs` for what the source says on the control
    /// connection. Returns how the migration ended, or `None` if it was
    /// still receiving after a minute (a guard against waiting forever: the
    /// session's own progress timeout is an hour).
    async fn receive_with_rdma(
        rdma: impl std::future::Future<Output = ferry_transport::Result<()>> + Send + 'static,
        msgs: mpsc::Receiver<ferry_transport::Result<Msg>>,
    ) -> Option<std::result::Result<(), MigrationError>> {
        let (mut writer, _source, _) = control().await;
        let keys = writer.session_keys().unwrap();
        let layout = MemoryLayout {
            page_size: ferry_transport::layout::PAGE_SIZE,
            regions: vec![ferry_proto::layout::RegionDesc {
                gpa: 0,
                size: 1 << 20,
            }],
        };
        let offer = Offer {
            layout: layout.clone(),
            guest: ferry_proto::control::GuestConfig {
                vcpus: 1,
                cpu_vendor: "test".into(),
                device_state_format: "test".into(),
            },
            option: PerformanceOption::Rdma,
            channels: 2,
        };
        let mem = Arc::new(crate::memory::dest_memory(&layout).unwrap());
        let ledger = Arc::new(layout.ledger(keys.page.clone()).unwrap());
        let inbound = Arc::new(Inbound::new(layout, None, ledger, keys.frame.clone()));
        let resume = ResumeHook {
            supports: GuestSupport {
                max_vcpus: 1,
                cpu_vendor: None,
                device_state_formats: vec!["test".into()],
            },
            restore: Arc::new(|_, _| Ok(String::new())),
            resume: Arc::new(|_| Ok(String::new())),
        };
        let metrics = Metrics::default();
        let (_stop, stop) = tokio::sync::watch::channel(false);
        // No TCP data channel comes (RDMA); the sender stays open.
        let (_streams, streams) = mpsc::channel(1);
        let r = Receive {
            offer: &offer,
            mem: &mem,
            inbound: &inbound,
            timeout: Duration::from_secs(3600),
            resume: &resume,
            metrics: &metrics,
            migration_id: 1,
            stop,
            #[cfg(feature = "rdma")]
            rdma: std::sync::Mutex::new(None),
            #[cfg(feature = "rdma")]
            rdma_exposure: None,
        };
        let mut ch = DataChannels::default();
        ch.rdma.spawn(rdma);
        let guard = Duration::from_secs(60);
        let ended = tokio::time::timeout(guard, r.receive(&mut ch, &mut writer, msgs, streams))
            .await
            .ok()
            .map(|r| r.map(drop));
        ch.close(true).await;
        ended
    }

    /// An RDMA migration whose receive task fails before the switchover
    /// (every channel lost: a queue pair in error, its connection broken)
    /// fails at once, as a TCP migration that lost its last data channel
    /// does, with the RDMA failure as its reason: it does not wait for the
    /// source to abort or switch over. The source's own reason, when it
    /// comes with the failure, is preferred; a descriptor this side refused
    /// is a reason too. An RDMA task that ended cleanly (every channel's end
    /// frame) ends nothing: the switchover is still to come. Runs without
    /// RDMA: the task is a stand-in.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_rdma_receive_task_fails_the_migration_at_once() {
        let lost = || TransportError::Channel {
            what: "RDMA channels",
            detail: "no channel ended cleanly (2 failed; last: rxe0: work request flushed)".into(),
        };
        // The source says nothing (it would only abort or switch over).
        let (_silent, msgs) = mpsc::channel(4);
        let ended = receive_with_rdma(async move { Err(lost()) }, msgs).await;
        match ended {
            Some(Err(MigrationError::Transport(TransportError::Channel { what, detail }))) => {
                assert_eq!(what, "RDMA channels");
                assert!(detail.contains("work request flushed"), "{detail}");
            }
            other => panic!("the migration did not fail with the RDMA failure: {other:?}"),
        }

        // The source aborted as its channels broke: its reason is the one.
        let (abort, msgs) = mpsc::channel(4);
        let failing = async move {
            let why = TransportError::PeerAborted("the source's own reason".into());
            abort.send(Err(why)).await.unwrap();
            Err(lost())
        };
        let ended = receive_with_rdma(failing, msgs).await;
        assert!(
            matches!(&ended, Some(Err(MigrationError::Transport(TransportError::PeerAborted(w)))) if w.contains("own reason")),
            "{ended:?}"
        );

        // A descriptor refused here.
        let (_silent, msgs) = mpsc::channel(4);
        let refused = async move {
            Err(TransportError::Wire(ferry_proto::WireError::Invalid {
                field: "RDMA descriptors",
                detail: "more descriptors in flight than the source may have".into(),
            }))
        };
        let ended = receive_with_rdma(refused, msgs).await;
        assert!(
            matches!(
                &ended,
                Some(Err(MigrationError::Transport(TransportError::Wire(_))))
            ),
            "{ended:?}"
        );

        // Every channel ended cleanly: the migration goes on until the
        // source's next word (here its control connection closing, a while
        // after the task ended).
        let (closing, msgs) = mpsc::channel::<ferry_transport::Result<Msg>>(4);
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = ended_rx.await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(closing);
        });
        let clean = async move {
            let _ = ended_tx.send(());
            Ok(())
        };
        let ended = receive_with_rdma(clean, msgs).await;
        assert!(
            matches!(
                &ended,
                Some(Err(MigrationError::Transport(TransportError::PeerClosed {
                    what: "control"
                })))
            ),
            "{ended:?}"
        );
    }

    /// A migration that is over stops its RDMA task as it stops its TCP
    /// channels and waits until each has stopped, so what they hold (its
    /// --memory-limit booking, guest memory) is released before its slot is
    /// given back; and a failed migration says why the channels that had
    /// already ended failed, the RDMA task's included. Runs without RDMA:
    /// the tasks are stand-ins holding a booking.
    #[tokio::test(flavor = "current_thread")]
    async fn a_migration_that_is_over_waits_for_its_rdma_task_and_says_why_it_failed() {
        let refused = |what: &'static str| {
            Err::<(), _>(TransportError::Unexpected {
                expected: what,
                got: "a refused frame".into(),
            })
        };
        for failed in [true, false] {
            let (booking, ended) = (Arc::new(()), Arc::new(()));
            let mut ch = DataChannels::default();
            let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
            let (b, e) = (booking.clone(), ended.clone());
            let tcp = ch.set.spawn(async move {
                let _ended = e;
                refused("tcp")
            });
            ch.by_task.insert(tcp.id(), peer);
            let e = ended.clone();
            ch.rdma.spawn(async move {
                let _ended = e;
                refused("rdma")
            });
            ch.rdma.spawn(async move {
                let _booking = b;
                std::future::pending::<ferry_transport::Result<()>>().await
            });
            until_only_held_here(&ended).await;
            let said = ch.close(failed).await;
            assert_eq!(
                Arc::strong_count(&booking),
                1,
                "the RDMA task still held its booking when the migration returned"
            );
            if failed {
                assert_eq!(said.len(), 2, "{said:?}");
                assert!(said[0].starts_with("192.0.2.1:4000: ") && said[0].contains("tcp"));
                assert!(said[1].starts_with("rdma: ") && said[1].contains("rdma"));
            } else {
                assert!(said.is_empty(), "{said:?}");
            }
        }
    }

    fn daemon() -> Arc<Destination> {
        let key = AuthKey::random();
        let opts = ListenOptions {
            tls: Arc::new(TlsConfig::from_psk(&key).unwrap()),
            key,
            memory_limit: u64::MAX,
            timeout: Duration::from_secs(5),
            max_concurrent: 1,
            queue: 0,
            queue_timeout: Duration::ZERO,
            migration_networks: Vec::new(),
            plaintext: true,
            handshake_timeout: Duration::from_secs(5),
            max_unauthenticated: 8,
            max_unauthenticated_per_source: 8,
        };
        let hook = ResumeHook {
            supports: GuestSupport {
                max_vcpus: 1,
                cpu_vendor: None,
                device_state_formats: Vec::new(),
            },
            restore: Arc::new(|_, _| Ok(String::new())),
            resume: Arc::new(|_| Ok(String::new())),
        };
        Destination::new(opts, hook)
    }

    #[test]
    fn preallocated_memory_goes_to_the_first_migration_of_its_layout_only() {
        let d = daemon();
        let small = crate::memory::default_layout(4 << 20).unwrap();
        let other = crate::memory::default_layout(8 << 20).unwrap();
        assert!(d.take_preallocated(&small).is_none(), "none set");
        d.set_preallocated(
            crate::memory::preallocated_dest_memory(&small, Backing::Anonymous).unwrap(),
        );
        assert!(d.take_preallocated(&other).is_none(), "another layout");
        let m = d.take_preallocated(&small).expect("its layout");
        // The memory handed out is the backed one.
        assert_eq!(crate::memory::memory_use(&m).guest_resident_bytes, 4 << 20);
        assert!(d.take_preallocated(&small).is_none(), "used once");
    }
}
