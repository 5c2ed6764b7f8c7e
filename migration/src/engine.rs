//! The source side: pre-copy rounds, the pause budget, switchover with
//! proofs, commit, and the audit after the pause.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Handshake
//!     Handshake --> Offer: authenticated
//!     Offer --> Round: Accept
//!     Offer --> [*]: Reject (guest keeps running)
//!     Round --> Round: RoundDone, Ping/Pong; predicted pause above the limit
//!     Round --> Paused: predicted pause fits / round cap with --force-switchover
//!     Round --> Resumed: round cap, pause cannot fit, --timeout (cancelled)
//!     Paused --> FinalCopy
//!     FinalCopy --> AwaitReady: acked; Switchover(device state, its SHA-256)
//!     AwaitReady --> AwaitCommitted: Ready proves our transcripts, evidence, device state / Commit(MAC)
//!     AwaitCommitted --> Audit: Committed(MAC)
//!     Audit --> [*]: Audit(report) sent; pause over already
//!     Round --> Resumed: any error
//!     Paused --> Resumed: any error
//!     FinalCopy --> Resumed: any error
//!     AwaitReady --> Resumed: Abort, a claim differs (named), timeout
//!     AwaitCommitted --> Resumed: CommitRefused(MAC): restore failed there
//!     AwaitCommitted --> LeftPaused: no answer, or one without the session's proof
//!     Resumed --> [*]
//!     LeftPaused --> [*]
//! ```
//!
//! Any failure before `Commit` is sent resumes the source guest and tells the
//! destination to free everything; so does a refusal the destination proves
//! with the session's commit key (it will never run the guest). A failure
//! after `Commit` was sent but before a proven `Committed` or refusal came
//! back leaves the guest paused: it may already run on the destination, and
//! two running copies would be worse than a pause.
//!
//! The control flow above (what may be sent when, what each answer must
//! be, timeouts, whether the guest is still ours) is
//! [`ferry_proto::opening::SourceOpening`] (the offer and its answer) and
//! then [`ferry_proto::source::SourceSession`], state machines without IO; this
//! module drives it: it sends pages (the `Chunker` and the transport),
//! harvests the dirty log, asks [`ferry_proto::policy::Convergence`]
//! after each round whether to go on, switch over or cancel (and which
//! auto-converge throttle to apply), pauses and resumes the
//! guest, and moves the session's messages over the control connection.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_ffi::vio;
use ferry_proto::evidence::PageHash;
use ferry_proto::frame;
use ferry_proto::opening::SourceOpening;
use ferry_proto::policy::{self, AfterRound, ConvergeOptions, Convergence};
use ferry_proto::session::SessionError;
use ferry_proto::source::{SourceSession, Step};
use ferry_proto::switchover::{Claims, Transcripts};
use ferry_proto::SessionKeys;
use ferry_proto::{Evidence, Ledger, MacKey};
use ferry_transport::compress::{
    CompressConfig, CompressPool, CompressSender, CompressionSpec, CopyHint, CopyPlan, SAMPLE_BYTES,
};
use ferry_transport::conn::Conn;
use ferry_transport::multichannel::{ChannelPath, Multichannel, MultichannelConfig};
use ferry_transport::proto::{AuditReport, AuditResult, Msg, Offer, PerformanceOption};
use ferry_transport::stream::Stream;
use ferry_transport::tcp::TcpSender;
use ferry_transport::tls::TlsConfig;
use ferry_transport::wire::Codec;
use ferry_transport::wire::MAX_RUNS;
use ferry_transport::{
    auth::AuthKey, ChannelStats, Chunk, MemoryLayout, PageRun, Transport, TransportError, PAGE_SIZE,
};
use ferry_transport::{BufPool, PooledBuf};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryBackend;

use crate::digest::{hex, memory_evidence};
use crate::dirty::{DirtyLog, DirtySet};
use crate::error::{MigrationError, Result};
use crate::guest::GuestControl;
use crate::memory::SourceMemory;
use crate::nics::{self, MultichannelOptions};

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Longest pause the engine aims for.
    pub downtime_limit: Duration,
    /// Pre-copy rounds after which the engine switches over anyway.
    pub max_rounds: u32,
    /// Payload bytes per chunk.
    pub chunk_bytes: u32,
    /// How long to wait for the peer before giving up (`--peer-timeout`).
    pub timeout: Duration,
    /// Longest the whole migration may take before switchover
    /// (`--timeout`); past it pre-copy is cancelled, the guest running here.
    pub total_timeout: Option<Duration>,
    /// Wire bytes per second across all data channels together
    /// (`--bandwidth-limit`; TCP and compression options).
    pub bandwidth_limit: Option<u64>,
    /// Throttle the guest when rounds stop shrinking (`--auto-converge`).
    pub auto_converge: bool,
    /// At `--max-rounds` without convergence, switch over anyway (the pause
    /// is longer than the limit) instead of cancelling.
    pub force_switchover: bool,
    /// Performance option.
    pub option: PerformanceOption,
    /// Compression option: worker threads.
    pub compression_workers: usize,
    /// Data channels: how many, over which interfaces, failover timeout.
    pub multichannel: MultichannelOptions,
    /// TLS identity for the control connection and every TCP data channel;
    /// `None`: the one derived from the pre-shared key. TLS is always on
    /// unless `plaintext`.
    pub tls: Option<Arc<TlsConfig>>,
    /// How the switchover verifies memory (`--verify`).
    pub verify: Verify,
    /// `--plaintext`: consent to data crossing the network unencrypted (a
    /// trusted, isolated migration network). With the tcp and compression
    /// options nothing is encrypted (control messages stay authenticated);
    /// the RDMA option needs it (RDMA WRITEs cannot be encrypted) and keeps
    /// TLS on its control connection.
    pub plaintext: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            chunk_bytes: 4 << 20,
            timeout: Duration::from_secs(30),
            total_timeout: None,
            bandwidth_limit: None,
            auto_converge: false,
            force_switchover: false,
            option: PerformanceOption::Tcp,
            compression_workers: CompressConfig::default_workers(),
            multichannel: MultichannelOptions::default(),
            tls: None,
            verify: Verify::Evidence,
            plaintext: false,
        }
    }
}

pub use ferry_proto::budget::{
    AutoConverge, ConvergeReason, Decision, PauseCosts, PauseParts, RoundTrips, THROTTLE_INITIAL,
    THROTTLE_MAX, THROTTLE_STEP,
};

/// How the switchover verifies memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// The page evidence both sides built while pages moved, compared
    /// inside MACs: constant work in the pause. A dirty log that missed a
    /// guest write is caught by the audit after the pause.
    #[default]
    Evidence,
    /// Also hash the whole guest memory on both sides inside the pause and
    /// compare (the pause grows with the guest: about 1.5 s for 8 GiB on a
    /// 2-core host).
    Full,
}

const MIB: f64 = (1u64 << 20) as f64;

fn deadline_error(opts: &SourceOptions, round: u32, remaining: u64) -> MigrationError {
    MigrationError::Deadline {
        after: opts.total_timeout.unwrap_or_default(),
        round,
        remaining_mib: remaining as f64 / MIB,
    }
}

/// Phase shown by progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and negotiating.
    Connecting = 0,
    /// Pre-copy rounds.
    Precopy = 1,
    /// Guest paused, final copy and commit.
    Switchover = 2,
    /// Finished.
    Done = 3,
}

/// Live figures for a progress display; updated by the engine.
#[derive(Debug, Default)]
pub struct Progress {
    /// Current round.
    pub round: AtomicU64,
    /// Dirty bytes left after the last round.
    pub remaining_bytes: AtomicU64,
    /// Page bytes sent so far.
    pub sent_bytes: AtomicU64,
    /// Bytes in the current round's set.
    pub round_bytes: AtomicU64,
    /// Bytes of the current round's set handled so far (sent, or found
    /// zero): `round_done / round_bytes` is how far the round is.
    pub round_done: AtomicU64,
    /// [`Phase`] as u8.
    pub phase: AtomicU8,
    /// Per-channel counters (bytes, state), refreshed a few times a second.
    pub channels: std::sync::Mutex<Vec<ChannelStats>>,
    /// The [`Progress::subscribe`]r's feed and when it subscribed.
    events: std::sync::Mutex<Option<(mpsc::UnboundedSender<Stamped>, Instant)>>,
}

impl Progress {
    /// A snapshot of the per-channel counters.
    pub fn channels(&self) -> Vec<ChannelStats> {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    fn set_channels(&self, c: Vec<ChannelStats>) {
        *self.channels.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }
    /// Current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Precopy,
            2 => Phase::Switchover,
            _ => Phase::Done,
        }
    }
    fn set_phase(&self, p: Phase) {
        let before = self.phase.swap(p as u8, Ordering::Relaxed);
        if before != p as u8 || p == Phase::Connecting {
            self.emit(Event::Phase { phase: p.name() });
        }
    }

    /// A live feed of the migration's [`Event`]s from now on (one
    /// subscriber: a later call replaces the earlier one).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Stamped> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some((tx, Instant::now()));
        rx
    }

    /// Ends the feed: the subscriber's receiver ends after the events
    /// already sent.
    pub fn unsubscribe(&self) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Sends `e` to the subscriber, if any, stamped with the time.
    pub fn emit(&self, event: Event) {
        if let Some((tx, since)) = &*self.events.lock().unwrap_or_else(|e| e.into_inner()) {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let _ = tx.send(Stamped {
                t_ms: ms_since(*since),
                unix_ms,
                event,
            });
        }
    }
}

impl Phase {
    /// `connecting`, `precopy`, `switchover` or `done`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Done => "done",
        }
    }
}

/// What happens during a migration, as it happens (`ferry send --events`:
/// one JSON object per line, `"event"` naming the kind).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The engine entered a [`Phase`] (`connecting`, `precopy`,
    /// `switchover`: the guest is about to pause, `done`: committed).
    Phase {
        /// The phase's name.
        phase: &'static str,
    },
    /// The destination accepted the offer and the data channels are open.
    Connected {
        /// The destination's migration id.
        migration_id: u64,
        /// Performance option.
        option: String,
        /// Data channels open.
        channels: usize,
        /// The addresses the destination offered for data channels (none:
        /// they follow the control connection).
        offered: Vec<String>,
    },
    /// A pre-copy round ended: its figures, as in the summary's `rounds`
    /// (`dirty_bytes_after` is what the next round must send).
    Round(RoundStats),
    /// The guest was paused for the final copy: the pause starts.
    Paused {
        /// Dirty bytes still to copy.
        dirty_bytes: u64,
        /// Pause predicted from them and the link rate, ms.
        predicted_downtime_ms: f64,
        /// `--downtime-limit`, ms.
        downtime_limit_ms: f64,
    },
    /// The pause ended: the guest runs again, `on` the `destination`
    /// (committed) or the `source` (resumed after a failure or cancel).
    Resumed {
        /// Where the guest runs now.
        on: &'static str,
        /// How long it was paused, ms.
        downtime_ms: f64,
    },
    /// A data channel failed; its chunks went over the others.
    ChannelLost {
        /// Channel index.
        channel: u16,
        /// Why.
        error: String,
    },
    /// How the migration ended (emitted by the caller, which knows the
    /// whole outcome): `committed`, `failed`, `cancelled` or
    /// `not_converged`.
    Outcome {
        /// The outcome.
        outcome: &'static str,
        /// The kind of failure (the record's `reason`), unless committed.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The error, unless committed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// An [`Event`] with when it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Stamped {
    /// Milliseconds since the feed was subscribed (the migration's start).
    pub t_ms: f64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The event, flattened into the object.
    #[serde(flatten)]
    pub event: Event,
}

/// Cancels a migration from outside (`ferry send` on SIGINT/SIGTERM).
///
/// Before the source sends `Commit`, a cancel stops the migration at its
/// next step: the destination gets `Abort` with the reason, the guest is
/// resumed here if it was paused, and [`Source::migrate`] returns
/// [`MigrationError::Cancelled`]. Once `Commit` is on its way the guest may
/// already run on the destination, so the cancel is refused
/// ([`Cancel::cancel`] returns false) and the migration finishes.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    state: std::sync::Mutex<CancelState>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone)]
enum CancelState {
    #[default]
    Armed,
    Cancelled(String),
    Committing,
}

impl Cancel {
    /// Asks the migration to stop with `reason` (the destination's abort
    /// reason). False when it is too late: `Commit` was already sent.
    pub fn cancel(&self, reason: &str) -> bool {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match &*s {
            CancelState::Committing => false,
            CancelState::Cancelled(_) => true,
            CancelState::Armed => {
                *s = CancelState::Cancelled(reason.to_string());
                self.0.notify.notify_waiters();
                true
            }
        }
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<String> {
        match &*self.0.state.lock().unwrap_or_else(|e| e.into_inner()) {
            CancelState::Cancelled(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Resolves once cancelled, with the reason.
    pub async fn cancelled(&self) -> String {
        loop {
            let notified = self.0.notify.notified();
            if let Some(r) = self.reason() {
                return r;
            }
            notified.await;
        }
    }

    /// The point of no return, just before `Commit` is sent: from here a
    /// cancel is refused. Fails if the migration was cancelled first.
    pub fn commit(&self) -> Result<()> {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match &*s {
            CancelState::Cancelled(r) => Err(MigrationError::Cancelled(r.clone())),
            _ => {
                *s = CancelState::Committing;
                Ok(())
            }
        }
    }

    /// Runs `f` unless cancelled first (then `f` is dropped).
    pub async fn or_cancel<T, E: Into<MigrationError>>(
        &self,
        f: impl std::future::Future<Output = std::result::Result<T, E>>,
    ) -> Result<T> {
        tokio::select! {
            biased;
            r = self.cancelled() => Err(MigrationError::Cancelled(r)),
            r = f => r.map_err(Into::into),
        }
    }

    /// Fails with [`MigrationError::Cancelled`] if cancelled.
    pub fn check(&self) -> Result<()> {
        match self.reason() {
            Some(r) => Err(MigrationError::Cancelled(r)),
            None => Ok(()),
        }
    }
}

/// Figures of one round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    /// Round number (the final copy is the last).
    pub round: u32,
    /// When the round began, in milliseconds since the migration started.
    pub start_ms: f64,
    /// Pages in the round's set that were sent (zero pages included).
    pub pages: u64,
    /// Zero pages sent as flags.
    pub zero_pages: u64,
    /// Page bytes put on the wire.
    pub bytes: u64,
    /// Wall time of the round, including the wait for acks.
    pub duration_ms: f64,
    /// Pages dirtied meanwhile (the next round's set).
    pub dirty_pages_after: u64,
    /// The same in bytes: the dirty bytes remaining after the round (zero
    /// after the final copy).
    pub dirty_bytes_after: u64,
    /// Page bytes per second over the round.
    pub rate_bytes_per_sec: f64,
    /// Auto-converge throttle in force during the round, percent.
    pub throttle_percent: u8,
}

/// Summary of a committed migration.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Performance option (`tcp`, `compression (zstd:1)`, `rdma`).
    #[serde(serialize_with = "display")]
    pub option: PerformanceOption,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// From connect to `Committed`.
    pub total_ms: f64,
    /// From pause to `Committed`.
    pub downtime_ms: f64,
    /// When the guest was paused, in milliseconds since the start.
    pub switchover_ms: f64,
    /// Part of the downtime spent verifying (`Switchover` sent to `Ready`
    /// checked: `pause_actual.verification_ms`).
    pub digest_ms: f64,
    /// Why pre-copy stopped.
    pub converge_reason: ConvergeReason,
    /// Pause predicted when pre-copy stopped (`pause_predicted`'s total).
    pub predicted_downtime_ms: f64,
    /// The pause's parts as predicted when pre-copy stopped (from the rate,
    /// round trip and costs measured during pre-copy).
    pub pause_predicted: PauseParts,
    /// The pause's parts as measured (they add up to `downtime_ms`, give or
    /// take the guest's pause call).
    pub pause_actual: PauseParts,
    /// How the switchover verified memory.
    pub verify: Verify,
    /// The audit of the frozen source memory after the pause.
    pub audit: Audit,
    /// `--downtime-limit`, ms: the pause the engine aimed for.
    pub downtime_limit_ms: f64,
    /// Auto-converge throttle when the guest was paused, percent (0: none).
    pub throttle_percent: u8,
    /// `--bandwidth-limit`, bytes per second (all channels together).
    pub bandwidth_limit: Option<u64>,
    /// Bytes on the wire per second over the transfer (what the cap bounds).
    pub wire_bytes_per_sec: f64,
    /// Every round, the final copy last.
    pub rounds: Vec<RoundStats>,
    /// Bytes written to data channels (headers and payload).
    pub bytes_on_wire: u64,
    /// Page bytes sent.
    pub payload_bytes: u64,
    /// Page bytes per byte on the wire (above 1 when compression pays off).
    pub compression_ratio: f64,
    /// Page bytes per second over the transfer (connect to final flush).
    pub throughput_bytes_per_sec: f64,
    /// Chunks sent again after a CRC mismatch.
    pub crc_resends: u64,
    /// Fingerprint of the verified switchover (hex; the destination prints
    /// the same one). It reveals nothing of the memory or the keys.
    pub digest: String,
    /// Both sides proved the same transcripts, page evidence and device
    /// state (and with `--verify full` memory) before commit.
    pub digest_verified: bool,
    /// Per-channel counters.
    pub channels: Vec<ChannelStats>,
    /// Encryption of the control connection and the data channels: TLS
    /// version, cipher suite and identity mode, or what `--plaintext` left
    /// unencrypted.
    pub encryption: String,
    /// This process's memory at the end: peak RSS, the guest's resident
    /// part, and Ferry's own.
    pub memory: crate::memory::MemoryUse,
    /// CPU seconds this process spent on the migration, from connect to
    /// the end of the audit, the guest's own threads left out.
    pub cpu: crate::cpu::CpuUse,
}

/// The source's audit after the pause: its frozen memory hashed again and
/// compared, page by page, with what was sent (which the destination proved
/// it holds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// `passed` or `failed`.
    pub result: String,
    /// Pages hashed.
    pub pages: u64,
    /// Pages whose content differs from what was sent: writes the dirty log
    /// never reported. The destination runs with stale copies of them.
    pub mismatched_pages: u64,
    /// Lowest guest address among them.
    pub first_mismatch: Option<u64>,
    /// How long it took (after the pause), milliseconds.
    pub duration_ms: f64,
    /// CPU seconds it took (its worker threads).
    pub cpu_s: f64,
}

impl Audit {
    /// True when pages differ.
    pub fn failed(&self) -> bool {
        self.result != "passed"
    }
}

/// Serializes a value as its `Display` text.
pub fn display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Everything the source needs to migrate one guest.
#[derive(Debug)]
pub struct Source<'a, G: GuestControl, D: DirtyLog> {
    /// Destination `HOST:PORT`.
    pub to: String,
    /// Pre-shared key.
    pub key: &'a AuthKey,
    /// The guest (paused and resumed by the engine).
    pub guest: &'a G,
    /// Its memory.
    pub mem: Arc<SourceMemory>,
    /// Its dirty log.
    pub dirty: &'a D,
    /// Settings.
    pub opts: SourceOptions,
    /// Live figures.
    pub progress: Arc<Progress>,
    /// Stops the migration before commit when cancelled.
    pub cancel: Cancel,
}

impl<G: GuestControl, D: DirtyLog> Source<'_, G, D> {
    /// Runs the migration. On any error before commit the guest keeps running
    /// (it is resumed if it was paused) and the destination is told to abort.
    pub async fn migrate(&self) -> Result<Summary> {
        // Ferry's CPU time for the migration, the guest's own left out.
        let meter = crate::cpu::CpuMeter::start(self.guest.cpu_time());
        let mut summary = self.migrate_measured().await?;
        summary.cpu = meter.finish(self.guest.cpu_time(), summary.payload_bytes);
        summary.cpu.audit_s = summary.audit.cpu_s;
        Ok(summary)
    }

    async fn migrate_measured(&self) -> Result<Summary> {
        let started = Instant::now();
        self.progress.set_phase(Phase::Connecting);
        let compression = match self.opts.option {
            PerformanceOption::Compression { codec, level } => {
                let spec = CompressionSpec {
                    codec: Codec::from_id(codec)?,
                    level,
                };
                spec.validate()?;
                Some(CompressConfig {
                    spec,
                    workers: self.opts.compression_workers.max(1),
                    adaptive: true,
                })
            }
            _ => None,
        };
        // RDMA: this host's RDMA NICs, found before anything is sent (none:
        // a clear error, the guest untouched).
        #[cfg(feature = "rdma")]
        let rdma_endpoints = match self.opts.option {
            PerformanceOption::Rdma if self.opts.bandwidth_limit.is_some() => {
                return Err(MigrationError::Config(
                    "--bandwidth-limit applies to the tcp and compression options; RDMA WRITEs are not paced (cap the RDMA NIC's port instead)".into(),
                ))
            }
            PerformanceOption::Rdma => {
                Some(crate::rdma::source_endpoints(&self.opts.multichannel)?)
            }
            _ => None,
        };
        let (control_tls, data_tls) = self.tls_settings()?;
        #[cfg(not(feature = "rdma"))]
        if self.opts.option == PerformanceOption::Rdma {
            return Err(MigrationError::Config(
                "--performance-option rdma: this ferry was built without the rdma feature".into(),
            ));
        }
        let cancel = &self.cancel;
        let control = cancel
            .or_cancel(connect(&self.to, self.opts.timeout))
            .await?;
        let control_path = (
            control
                .local_addr()
                .map_err(|e| TransportError::io("local address", "control", e))?,
            control
                .peer_addr()
                .map_err(|e| TransportError::io("peer address", "control", e))?,
        );
        let control = cancel
            .or_cancel(secure(control, control_tls.as_deref(), self.opts.timeout))
            .await?;
        let mut conn = Conn::new(control, self.opts.timeout);
        cancel.or_cancel(conn.client_handshake(self.key)).await?;
        let layout = ferry_transport::layout::of(&*self.mem);
        // Both sides keep evidence under the session's page key: here what
        // is sent for each page, there what lands.
        let keys = conn.session_keys().ok_or(TransportError::AuthFailed(
            "no session keys after the handshake",
        ))?;
        let ledger = Arc::new(layout.ledger(keys.page.clone())?);
        #[cfg(feature = "rdma")]
        let rdma_offer =
            rdma_endpoints
                .as_ref()
                .map(|endpoints| ferry_transport::rdma_wire::RdmaOffer {
                    endpoints: endpoints.clone(),
                });
        #[cfg(not(feature = "rdma"))]
        let rdma_offer = None;
        let (mut opening, offer) = SourceOpening::new(
            Offer {
                layout: layout.clone(),
                guest: self.guest.config(),
                option: self.opts.option,
                channels: self.opts.multichannel.max_channels(),
            },
            rdma_offer,
        );
        for m in &offer {
            conn.send(m).await?;
        }
        let answer = cancel
            .or_cancel(conn.recv("the destination's answer to the offer"))
            .await;
        let answer = match answer {
            Err(e @ MigrationError::Cancelled(_)) => {
                // It may have accepted meanwhile: tell it why we leave.
                conn.abort(&e.to_string()).await;
                return Err(e);
            }
            a => a?,
        };
        let accept = opening.on_answer(answer).map_err(TransportError::from)?;
        #[cfg(feature = "rdma")]
        if let Some(endpoints) = &rdma_endpoints {
            let t = crate::rdma::open_source(
                &mut conn,
                &self.mem,
                &layout,
                endpoints,
                self.opts.timeout,
                &self.opts.multichannel,
                &keys,
                accept.migration_id,
            )
            .await;
            let mut t = match t {
                Ok(t) => t,
                Err(e) => {
                    conn.abort(&e.to_string()).await;
                    return Err(e);
                }
            };
            self.connected(&accept, t.stats().len());
            let mut run = Run::new(self, &mut conn, ledger.clone(), &keys);
            let result = run.precopy_and_switch(&mut t, &layout, started).await;
            return run.settle(result).await;
        }
        let data = match cancel
            .or_cancel(self.open_channels(&accept, control_path, data_tls, &conn))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                conn.abort(&e.to_string()).await;
                return Err(e);
            }
        };
        self.connected(&accept, data.len());
        let mut run = Run::new(self, &mut conn, ledger.clone(), &keys);
        // Each channel's sender times out its acks after the channel
        // timeout (never longer than the peer timeout), and multichannel
        // fails a channel over after it.
        let timeout = self
            .opts
            .multichannel
            .channel_timeout
            .min(self.opts.timeout);
        let mc = MultichannelConfig {
            stall_timeout: timeout,
            ..Default::default()
        };
        // One bucket for every channel: the cap holds for the migration.
        let limiter = self
            .opts
            .bandwidth_limit
            .map(|r| Arc::new(ferry_transport::ratelimit::RateLimiter::new(r)));
        let result = match compression {
            Some(cfg) => {
                // One worker pool for the migration, fed by every channel.
                match CompressPool::start(cfg, keys.frame.clone()) {
                    Ok(pool) => {
                        run.copy_hint = Some(pool.copy_hint());
                        let senders: Vec<_> = data
                            .into_iter()
                            .enumerate()
                            .map(|(i, (s, path))| {
                                let t = CompressSender::new(
                                    s,
                                    self.mem.clone(),
                                    i as u16,
                                    timeout,
                                    pool.clone(),
                                    limiter.clone(),
                                );
                                (t, path)
                            })
                            .collect();
                        let mut t = Multichannel::new(senders, mc);
                        let r = run.precopy_and_switch(&mut t, &layout, started).await;
                        run.settle(r).await
                    }
                    Err(e) => run.settle(Err(e.into())).await,
                }
            }
            None => {
                let senders: Vec<(TcpSender<SourceMemory>, ChannelPath)> = data
                    .into_iter()
                    .enumerate()
                    .map(|(i, (s, path))| {
                        (
                            TcpSender::new(
                                s,
                                self.mem.clone(),
                                i as u16,
                                timeout,
                                keys.frame.clone(),
                            )
                            .with_limiter(limiter.clone()),
                            path,
                        )
                    })
                    .collect();
                let mut t = Multichannel::new(senders, mc);
                let r = run.precopy_and_switch(&mut t, &layout, started).await;
                run.settle(r).await
            }
        };
        // Settled while the data channels were still open, so the
        // destination hears the reason (Abort) before the channels close.
        result
    }
}

impl<G: GuestControl, D: DirtyLog> Source<'_, G, D> {
    /// TLS of the control connection and of the TCP data channels: both
    /// unless `--plaintext`; the RDMA option needs `--plaintext` (its data
    /// cannot be encrypted) and keeps TLS on its control connection.
    #[allow(clippy::type_complexity)]
    fn tls_settings(&self) -> Result<(Option<Arc<TlsConfig>>, Option<Arc<TlsConfig>>)> {
        let tls = || -> Result<Arc<TlsConfig>> {
            match &self.opts.tls {
                Some(t) => Ok(t.clone()),
                None => Ok(Arc::new(TlsConfig::from_psk(self.key)?)),
            }
        };
        let encrypt = policy::source_encryption(self.opts.option, self.opts.plaintext)
            .map_err(|why| MigrationError::Config(why.into()))?;
        let control = if encrypt.control { Some(tls()?) } else { None };
        let data = if encrypt.data { control.clone() } else { None };
        Ok((control, data))
    }

    /// Tells the progress stream the offer was accepted and `channels`
    /// data channels are open.
    fn connected(&self, accept: &ferry_transport::proto::Accept, channels: usize) {
        self.progress.emit(Event::Connected {
            migration_id: accept.migration_id,
            option: self.opts.option.to_string(),
            channels,
            offered: accept
                .interfaces
                .iter()
                .map(|i| i.addr.to_string())
                .collect(),
        });
    }

    /// Pairs interfaces with the destination's and opens the data channels.
    async fn open_channels(
        &self,
        accept: &ferry_transport::proto::Accept,
        control: (std::net::SocketAddr, std::net::SocketAddr),
        tls: Option<Arc<TlsConfig>>,
        conn: &Conn,
    ) -> Result<Vec<(Stream, ChannelPath)>> {
        let keys = conn.session_keys().ok_or(TransportError::AuthFailed(
            "no session keys after authentication",
        ))?;
        let mc = &self.opts.multichannel;
        let local = nics::discover().unwrap_or_else(|e| {
            tracing::warn!("{e}; data channels follow the control connection");
            Vec::new()
        });
        let planned = nics::plan(mc, &local, &accept.interfaces, control)?;
        tracing::info!(
            planned = planned.len(),
            offered = accept.interfaces.len(),
            "opening data channels"
        );
        nics::open_channels(&planned, keys, self.opts.timeout, tls).await
    }
}

/// Connects with a timeout.
pub async fn connect(to: &str, timeout: Duration) -> Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(TransportError::Io {
            context: format!("cannot connect to {to}"),
            source: e,
        }
        .into()),
        Err(_) => Err(TransportError::Timeout {
            what: "the connection to the destination",
            after: timeout,
        }
        .into()),
    }
}

/// Why the RDMA option needs `--plaintext` ([`ferry_proto::policy`]).
pub use ferry_proto::policy::RDMA_NOT_ENCRYPTED;

/// What was encrypted, for the summary and `--json`: the control
/// connection's TLS session (version, suite, identity mode), and whether
/// the data channels shared it.
pub fn describe_encryption(conn: &Conn, option: PerformanceOption) -> String {
    match (conn.encryption(), option) {
        (Some(tls), o) if !o.can_encrypt_data() => {
            format!("{tls} on the control connection; RDMA data channels unencrypted (--plaintext)")
        }
        (Some(tls), _) => format!("{tls}, on the control connection and every data channel"),
        (None, _) => "none (--plaintext)".into(),
    }
}

/// Starts TLS on a connected socket when `tls` is given
/// ([`ferry_transport::tls::secure`]).
pub async fn secure(tcp: TcpStream, tls: Option<&TlsConfig>, timeout: Duration) -> Result<Stream> {
    Ok(ferry_transport::tls::secure(tcp, tls, timeout).await?)
}

/// Opens one data channel (TLS when `tls` is given) and proves it belongs
/// to the session of `keys` (the control connection's
/// [`Conn::session_keys`]).
pub async fn open_data_channel(
    to: &str,
    keys: &ferry_proto::SessionKeys,
    timeout: Duration,
    tls: Option<&TlsConfig>,
) -> Result<Stream> {
    let tcp = connect(to, timeout).await?;
    let stream = secure(tcp, tls, timeout).await?;
    Ok(ferry_transport::conn::open_data_channel(stream, keys, timeout).await?)
}

struct Run<'r, 'a, G: GuestControl, D: DirtyLog> {
    src: &'r Source<'a, G, D>,
    conn: &'r mut Conn,
    /// The source's evidence: for every page, the hash of what was last
    /// sent for it (recorded as chunks are built).
    ledger: Arc<Ledger>,
    /// The session's frame key: chunks' payload tags.
    frame: MacKey,
    /// Chunk-sized buffers for the pages' private copies (transports that
    /// cannot send from guest memory).
    pages: Arc<BufPool>,
    paused_at: Option<Instant>,
    /// The migration's control flow: what may be said when, what each
    /// answer must be, and whether the guest is still ours
    /// ([`ferry_proto::source`]); this driver does the IO.
    session: SourceSession,
    /// Auto-converge throttle applied to the guest, percent.
    throttled: u8,
    /// Compression option: which chunks the page pass copies for the
    /// workers (the others go raw from guest memory).
    copy_hint: Option<Arc<dyn CopyHint>>,
}

/// Returns true if the page holds only zero bytes.
pub fn is_zero_page(p: &[u8]) -> bool {
    ferry_proto::evidence::is_zero(p)
}

/// Idle chunk buffers a migration keeps for reuse: up to 32 MiB of them
/// (at least two), so a burst does not leave more than that resident.
fn chunk_buffers_kept(chunk_bytes: u32) -> usize {
    ((32 << 20) / (chunk_bytes.max(1) as usize)).max(2)
}

/// Builds chunks from a dirty set in one pass over each page: the page is
/// copied out of guest memory once ([`vio::copy_out`], the only read of it
/// here), and on that private copy it is tested for zero and hashed with
/// the session's page key; the hash is recorded in the source's ledger
/// (what was sent for the page) and its contribution summed into the
/// chunk's payload tag. A zero page becomes a zero run (or is skipped when
/// `skip_zero`: the destination's memory starts zeroed, so round 0 need not
/// mention it).
///
/// When the transport cannot send from guest memory (compression, TLS:
/// `copy` on), the page is copied straight into the chunk's own buffer,
/// which travels with the chunk ([`Chunk::data`]) to be compressed or
/// encrypted: guest memory is still read once. Otherwise (plain TCP, RDMA)
/// the copy goes to one scratch page and the transport sends from guest
/// memory; a guest write in between makes the destination's tag differ and
/// the chunk is sent again (the page is dirty anyway).
struct Chunker<'m> {
    mem: &'m SourceMemory,
    ledger: &'m Ledger,
    frame: &'m MacKey,
    max_payload: u64,
    skip_zero: bool,
    round: u32,
    cur: Vec<PageRun>,
    payload: u64,
    /// Sum of the current chunk's pages' contributions.
    sum: u128,
    /// Change to the evidence not applied yet.
    delta: u128,
    /// The private copy of one page (`copy` off).
    page: Vec<u8>,
    /// Where chunk buffers come from (`copy` on).
    pool: Option<&'m Arc<BufPool>>,
    /// Asked at each chunk's first page whether to copy it (`copy` on);
    /// none: every chunk is copied.
    hint: Option<&'m Arc<dyn CopyHint>>,
    /// How the current chunk's pages are read (decided at its first page).
    reading: Option<Reading>,
    /// The current chunk's buffer: its non-zero pages so far.
    data: Option<PooledBuf>,
}

/// How the page pass reads the current chunk's pages (`copy` on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Into the chunk's buffer.
    Copy,
    /// Into the scratch page: the chunk goes without a copy.
    Scratch,
    /// Into the chunk's buffer until it holds [`SAMPLE_BYTES`], then as the
    /// hint's verdict on them says ([`CopyPlan::Sample`]); `gpa` is the
    /// chunk's first page.
    Sampling { gpa: u64 },
}

impl<'m> Chunker<'m> {
    fn new(
        mem: &'m SourceMemory,
        ledger: &'m Ledger,
        frame: &'m MacKey,
        max_payload: u64,
        round: u32,
        skip_zero: bool,
    ) -> Self {
        Chunker {
            mem,
            ledger,
            frame,
            max_payload: max_payload.max(PAGE_SIZE),
            skip_zero,
            round,
            cur: Vec::new(),
            payload: 0,
            sum: 0,
            delta: 0,
            page: vec![0; PAGE_SIZE as usize],
            pool: None,
            hint: None,
            reading: None,
            data: None,
        }
    }

    /// Keeps each chunk's pages in a buffer from `pool` (see the type docs).
    fn copying(mut self, pool: &'m Arc<BufPool>, hint: Option<&'m Arc<dyn CopyHint>>) -> Self {
        self.pool = Some(pool);
        self.hint = hint;
        self
    }

    /// Appends one page (zero or not) to the current chunk.
    fn push(&mut self, gpa: u64, zero: bool) {
        match self.cur.last_mut() {
            Some(last) if last.zero == zero && last.gpa + last.bytes() == gpa => last.pages += 1,
            _ => self.cur.push(PageRun {
                gpa,
                pages: 1,
                zero,
            }),
        }
        if !zero {
            self.payload += PAGE_SIZE;
        }
    }

    fn maybe_cut(&mut self, out: &mut Vec<Chunk>, seq: &mut u64) {
        if self.payload >= self.max_payload || self.cur.len() >= MAX_RUNS as usize {
            self.cut(out, seq);
        }
    }

    fn cut(&mut self, out: &mut Vec<Chunk>, seq: &mut u64) {
        self.ledger.apply(std::mem::take(&mut self.delta));
        if self.cur.is_empty() {
            return;
        }
        // A chunk of zero runs only carries no copy (its buffer goes back).
        let payload = self.payload as usize;
        let data = self.data.take().filter(|_| payload > 0).map(|mut d| {
            d.truncate(payload);
            d.freeze()
        });
        out.push(Chunk {
            seq: *seq,
            round: self.round,
            runs: std::mem::take(&mut self.cur),
            tag: frame::payload_tag(self.frame, *seq, self.round, self.sum),
            data,
        });
        *seq += 1;
        self.payload = 0;
        self.sum = 0;
        self.reading = None;
    }

    /// Reads, tests, hashes and records every page of `run` and adds it.
    fn add(&mut self, run: PageRun, out: &mut Vec<Chunk>, seq: &mut u64) -> Result<()> {
        for p in 0..u64::from(run.pages) {
            let gpa = run.gpa + p * PAGE_SIZE;
            if self.payload + PAGE_SIZE > self.max_payload {
                self.cut(out, seq);
            }
            let slice = self
                .mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .map_err(|e| {
                    MigrationError::Guest(format!("dirty page {gpa:#x} outside guest memory: {e}"))
                })?;
            // The one read of the page: into the chunk's buffer, at the
            // end of its pages so far, or into the scratch page.
            let at = self.payload as usize;
            let hint = self.hint;
            let reading = *self
                .reading
                .get_or_insert_with(|| match hint.map(|h| h.plan(gpa)) {
                    None | Some(CopyPlan::Copy) => Reading::Copy,
                    Some(CopyPlan::Skip) => Reading::Scratch,
                    Some(CopyPlan::Sample) => Reading::Sampling { gpa },
                });
            let bytes: &mut [u8] = match self.pool {
                Some(pool) if reading != Reading::Scratch => {
                    let max = self.max_payload as usize;
                    let d = self.data.get_or_insert_with(|| pool.take(max));
                    &mut d.as_mut_slice()[at..at + PAGE_SIZE as usize]
                }
                _ => &mut self.page,
            };
            vio::copy_out(&slice, bytes);
            let h = self.ledger.key().hash_or_zero(bytes);
            let (delta, contribution) = self.ledger.record_page(gpa, h).map_err(|e| {
                MigrationError::Guest(format!("dirty page outside the layout: {e}"))
            })?;
            self.delta = self.delta.wrapping_add(delta);
            // A zero page's bytes in the buffer are overwritten by the next.
            let zero = h == PageHash::ZERO;
            if zero && self.skip_zero {
                continue;
            }
            self.sum = self.sum.wrapping_add(contribution);
            self.push(gpa, zero);
            if let Reading::Sampling { gpa: first } = reading {
                self.sampled(first);
            }
            self.maybe_cut(out, seq);
        }
        Ok(())
    }

    /// Once a sampling chunk's buffer holds [`SAMPLE_BYTES`]: the hint's
    /// verdict on them decides whether the rest is copied too, or the copy
    /// is dropped (its buffer goes back) and the chunk goes without one.
    fn sampled(&mut self, first: u64) {
        if (self.payload as usize) < SAMPLE_BYTES {
            return;
        }
        let keep = match (self.hint, &self.data) {
            (Some(h), Some(d)) => h.sampled(first, &d[..SAMPLE_BYTES]),
            _ => true,
        };
        if keep {
            self.reading = Some(Reading::Copy);
        } else {
            self.reading = Some(Reading::Scratch);
            self.data = None;
        }
    }
}

impl<'r, 'a, G: GuestControl, D: DirtyLog> Run<'r, 'a, G, D> {
    /// The driver of one accepted migration over `conn`, recording what it
    /// sends in `ledger`, with the session's `keys`: its session starts at
    /// round 0.
    fn new(
        src: &'r Source<'a, G, D>,
        conn: &'r mut Conn,
        ledger: Arc<Ledger>,
        keys: &SessionKeys,
    ) -> Self {
        Run {
            src,
            conn,
            ledger,
            frame: keys.frame.clone(),
            pages: BufPool::new(chunk_buffers_kept(src.opts.chunk_bytes)),
            paused_at: None,
            session: SourceSession::new(keys.commit.clone(), src.opts.timeout),
            throttled: 0,
            copy_hint: None,
        }
    }
}

impl<G: GuestControl, D: DirtyLog> Run<'_, '_, G, D> {
    /// The source's evidence so far: the sum over every page of what was
    /// last sent for it (see [`ferry_proto::evidence`]). Equal to the
    /// destination's once every chunk landed and was acknowledged.
    fn evidence(&self) -> Evidence {
        self.ledger.evidence()
    }

    /// Settles a migration's outcome, whatever its transport: marks the
    /// progress done, or — when `Commit` was not sent yet — tells the
    /// destination to abort and resumes the guest if it was paused.
    async fn settle(&mut self, result: Result<Summary>) -> Result<Summary> {
        // The guest runs at full speed again, here or (after commit) there.
        if self.throttled > 0 {
            if let Err(e) = self.src.guest.throttle(0) {
                tracing::warn!("could not lift the auto-converge throttle: {e}");
            }
        }
        match result {
            Ok(s) => {
                self.src.progress.emit(Event::Resumed {
                    on: "destination",
                    downtime_ms: s.downtime_ms,
                });
                self.src.progress.set_phase(Phase::Done);
                Ok(s)
            }
            Err(e) if !self.session.guest_is_ours() => Err(e),
            Err(e) => {
                if let Some(paused_at) = self.paused_at {
                    self.src.guest.resume()?;
                    self.src.progress.emit(Event::Resumed {
                        on: "source",
                        downtime_ms: ms_since(paused_at),
                    });
                }
                let e = self.destination_view(e).await;
                if let Some(Msg::Abort { reason }) = self.session.abort(&e.to_string()) {
                    self.conn.abort(&reason).await;
                }
                Err(e)
            }
        }
    }

    /// A failure seen here (a data channel closed, a write failed) is often
    /// the destination giving up on something only it saw (a corrupt frame,
    /// its own timeout): it sends `Abort` with its reason before closing.
    /// Reads that (briefly) from the control connection and adds it to the
    /// error, or that the control connection is gone.
    async fn destination_view(&mut self, e: MigrationError) -> MigrationError {
        // Only transport failures: what this side decided itself (a digest
        // mismatch, corruption in the final copy) it names already.
        if !matches!(e, MigrationError::Transport(_))
            || matches!(
                e,
                MigrationError::Transport(
                    TransportError::PeerAborted(_) | TransportError::PeerClosed { what: "control" }
                )
            )
        {
            return e;
        }
        let peer = match self
            .conn
            .recv_within("the destination's abort", Duration::from_secs(1))
            .await
        {
            Ok(Msg::Abort { reason }) | Err(TransportError::PeerAborted(reason)) => {
                format!("aborted: {reason}")
            }
            Err(TransportError::PeerClosed { .. }) => "closed the control connection".into(),
            _ => return e,
        };
        MigrationError::Destination {
            cause: Box::new(e),
            peer,
        }
    }

    async fn send_set<T: Transport>(
        &mut self,
        t: &mut T,
        set: &DirtySet,
        round: u32,
        seq: &mut u64,
    ) -> Result<RoundStats> {
        let started = Instant::now();
        let max_pages = (self.src.opts.chunk_bytes as u64 / PAGE_SIZE).max(1) as u32;
        let mut ch = Chunker::new(
            &self.src.mem,
            &self.ledger,
            &self.frame,
            u64::from(self.src.opts.chunk_bytes),
            round,
            round == 0,
        );
        if !t.capabilities().zero_copy {
            ch = ch.copying(&self.pages, self.copy_hint.as_ref());
        }
        let mut stats = RoundStats {
            round,
            ..Default::default()
        };
        self.src
            .progress
            .round
            .store(round.into(), Ordering::Relaxed);
        self.src
            .progress
            .round_bytes
            .store(set.count() * PAGE_SIZE, Ordering::Relaxed);
        self.src.progress.round_done.store(0, Ordering::Relaxed);
        let mut ready = Vec::new();
        let mut runs = set.runs(max_pages);
        let mut shown = Instant::now();
        loop {
            let next = runs.next();
            match next {
                Some(r) => ch.add(r, &mut ready, seq)?,
                None => ch.cut(&mut ready, seq),
            }
            for c in ready.drain(..) {
                let (pages, payload) = (c.pages(), c.payload_bytes());
                stats.pages += pages;
                stats.zero_pages += pages - payload / PAGE_SIZE;
                stats.bytes += payload;
                self.src
                    .cancel
                    .or_cancel(unless_destination_speaks(self.conn, t.send(c)))
                    .await?;
                self.src
                    .progress
                    .sent_bytes
                    .fetch_add(payload, Ordering::Relaxed);
                if shown.elapsed() >= Duration::from_millis(100) {
                    self.src.progress.set_channels(t.stats());
                    shown = Instant::now();
                }
            }
            match next {
                Some(r) => self
                    .src
                    .progress
                    .round_done
                    .fetch_add(u64::from(r.pages) * PAGE_SIZE, Ordering::Relaxed),
                None => break,
            };
        }
        let flushed = self
            .src
            .cancel
            .or_cancel(unless_destination_speaks(self.conn, t.flush()))
            .await;
        self.src.progress.set_channels(t.stats());
        let flushed = flushed?;
        if !flushed.resend.is_empty() {
            self.src.dirty.restore(&flushed.resend);
        }
        self.fence_lost_channels(t).await?;
        stats.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(stats)
    }

    /// The round barrier held, but channels that failed during the round
    /// may still have bytes in the network: an older copy of a page than
    /// the one resent elsewhere. Harmless until the next round begins, so
    /// before it does the destination must close them and confirm that
    /// nothing more of theirs can land.
    async fn fence_lost_channels<T: Transport>(&mut self, t: &mut T) -> Result<()> {
        let lost = t.lost_channels();
        let channels: Vec<std::net::SocketAddr> = lost.iter().map(|l| l.path.local).collect();
        for l in &lost {
            self.src.progress.emit(Event::ChannelLost {
                channel: l.channel,
                error: l.error.to_string(),
            });
            tracing::warn!(
                channel = l.channel,
                local = %l.path.local,
                remote = %l.path.remote,
                "data channel lost, its chunks went over the others; fencing it: {}",
                l.error
            );
        }
        if let Some(fence) = self.session.round_flushed(channels, Instant::now())? {
            self.conn.send(&fence).await?;
            self.answer().await?;
        }
        Ok(())
    }

    /// Waits for the answer the session awaits, until its deadline, and
    /// hands it to the session.
    async fn answer(&mut self) -> Result<Step> {
        let Some((what, deadline)) = self.session.poll_timeout() else {
            return Err(SessionError::OutOfOrder {
                event: "await an answer",
                state: "nothing awaited",
            }
            .into());
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.conn.recv_within(what, wait).await {
            Ok(msg) => Ok(self.session.handle(msg, Instant::now())?),
            // The transport's timer says the deadline passed.
            Err(TransportError::Timeout { .. }) => {
                self.session.handle_timeout(Instant::now().max(deadline))?;
                Err(SessionError::OutOfOrder {
                    event: "timeout",
                    state: "before the deadline",
                }
                .into())
            }
            Err(e) => Err(match self.session.connection_failed(e.to_string()) {
                Some(s) => s.into(),
                None => e.into(),
            }),
        }
    }

    /// Announces the round and measures the control connection's round
    /// trip (between rounds, not in the pause).
    async fn round_done(&mut self, pages: u64) -> Result<Duration> {
        let done = self.session.round_done(pages)?;
        self.conn.send(&done).await?;
        let ping = self.session.ping(Instant::now())?;
        self.conn.send(&ping).await?;
        match self.answer().await? {
            Step::RoundTrip(rtt) => Ok(rtt),
            s => Err(unexpected_step(s)),
        }
    }

    async fn precopy_and_switch<T: Transport>(
        &mut self,
        t: &mut T,
        layout: &MemoryLayout,
        started: Instant,
    ) -> Result<Summary> {
        let src = self.src;
        let opts = &src.opts;
        let keys = self.conn.session_keys().ok_or(TransportError::Unexpected {
            expected: "an authenticated session",
            got: "no session keys".into(),
        })?;
        src.progress.set_phase(Phase::Precopy);
        src.dirty.start();
        let mut set = DirtySet::all(layout);
        let mut rounds = Vec::new();
        let mut seq = 0u64;
        let cap = opts.bandwidth_limit.map_or(f64::INFINITY, |c| c as f64);
        let deadline = opts.total_timeout.map(|t| started + t);
        let mut convergence = Convergence::new(ConvergeOptions {
            downtime_limit: opts.downtime_limit,
            max_rounds: opts.max_rounds,
            force_switchover: opts.force_switchover,
            auto_converge: opts.auto_converge,
        });
        let mut remaining = layout.total_bytes();
        // What the pause will cost besides the final dirty bytes: measured
        // as pre-copy goes (rate, round trip), or known up front.
        let mut costs = PauseCosts {
            rate: 0.0,
            round_trip: Duration::ZERO,
            device_state_bytes: src.guest.device_state_size_hint(),
            verification: match opts.verify {
                Verify::Evidence => Duration::ZERO,
                Verify::Full => {
                    let rate = crate::digest::scan_rate(&keys.page);
                    Duration::from_secs_f64(layout.total_bytes() as f64 / rate.max(1.0))
                }
            },
        };
        let mut rtts = RoundTrips::default();
        src.progress
            .remaining_bytes
            .store(remaining, Ordering::Relaxed);
        let (reason, predicted) = loop {
            let round = self.session.round();
            let start_ms = ms_since(started);
            let sent = self.send_set(t, &set, round, &mut seq);
            let mut stats = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), sent).await {
                    Ok(r) => r?,
                    Err(_) => return Err(deadline_error(opts, round, remaining)),
                },
                None => sent.await?,
            };
            stats.start_ms = start_ms;
            stats.throttle_percent = self.throttled;
            let rtt = self.round_done(stats.pages).await?;
            // The round trip the pause pays three times: the largest of the
            // last three measured (a noisy host errs on the long side).
            rtts.measured(rtt);
            costs.round_trip = rtts.for_prediction();
            // The link the prediction uses: measured, never above the cap.
            if stats.duration_ms > 1.0 && stats.bytes > 0 {
                costs.rate = (stats.bytes as f64 / (stats.duration_ms / 1e3)).min(cap);
            }
            set = src.dirty.harvest();
            stats.dirty_pages_after = set.count();
            remaining = stats.dirty_pages_after * PAGE_SIZE;
            stats.dirty_bytes_after = remaining;
            stats.rate_bytes_per_sec = stats.bytes as f64 / (stats.duration_ms / 1e3).max(1e-6);
            src.progress
                .remaining_bytes
                .store(remaining, Ordering::Relaxed);
            tracing::debug!(
                round,
                pages = stats.pages,
                remaining,
                rate = costs.rate,
                rtt_us = costs.round_trip.as_micros() as u64,
                throttle = self.throttled,
                "round done"
            );
            src.progress.emit(Event::Round(stats.clone()));
            rounds.push(stats);
            // The session counted the round once it was announced.
            let round = self.session.round();
            src.cancel.check()?;
            let throttle = match convergence.after_round(remaining, &costs, &rtts, round) {
                AfterRound::Continue { throttle } => throttle,
                AfterRound::Switchover { reason, predicted } => break (reason, predicted),
                AfterRound::Remeasure => {
                    tracing::info!(
                        round,
                        rtt_ms = costs.round_trip.as_secs_f64() * 1e3,
                        "the pause's round trips alone are over --downtime-limit: measuring them again in another round"
                    );
                    None
                }
                AfterRound::CannotFit { fixed } => {
                    return Err(MigrationError::PauseCannotFit {
                        limit_ms: opts.downtime_limit.as_secs_f64() * 1e3,
                        fixed_ms: fixed.total_ms(),
                        round_trips_ms: 3.0 * costs.round_trip.as_secs_f64() * 1e3,
                        device_state_ms: fixed.device_state_ms,
                        verification_ms: costs.verification.as_secs_f64() * 1e3,
                        hint: if opts.verify == Verify::Full {
                            ", or drop --verify full".into()
                        } else {
                            String::new()
                        },
                    });
                }
                AfterRound::NotConverged { predicted_ms } => {
                    return Err(MigrationError::NotConverged {
                        rounds: round,
                        last_dirty_mib: remaining as f64 / MIB,
                        link_mb_s: costs.rate / 1e6,
                        predicted_ms,
                        limit_ms: opts.downtime_limit.as_secs_f64() * 1e3,
                        throttle: if self.throttled > 0 {
                            format!(", auto-converge throttle {}%", self.throttled)
                        } else {
                            String::new()
                        },
                    });
                }
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(deadline_error(opts, round, remaining));
            }
            if let Some(p) = throttle {
                match src.guest.throttle(p) {
                    Ok(()) => {
                        tracing::info!(round, percent = p, "auto-converge: guest throttled");
                        self.throttled = p;
                    }
                    Err(e) => tracing::warn!("auto-converge: {e}"),
                }
            }
            self.session.next_round()?;
        };
        if matches!(reason, ConvergeReason::RoundCap | ConvergeReason::CannotFit) {
            tracing::warn!(
                predicted_ms = predicted.total_ms(),
                ?reason,
                "--force-switchover: switching over without a pause that fits the limit"
            );
        }

        // Switchover: pause, copy the rest.
        let round = self.session.pause()?;
        src.progress.set_phase(Phase::Switchover);
        let paused_at = Instant::now();
        src.guest.pause()?;
        self.paused_at = Some(paused_at);
        src.progress.emit(Event::Paused {
            dirty_bytes: remaining,
            predicted_downtime_ms: predicted.total_ms(),
            downtime_limit_ms: opts.downtime_limit.as_secs_f64() * 1e3,
        });
        tracing::debug!(
            after_ms = paused_at.elapsed().as_secs_f64() * 1e3,
            "guest paused"
        );
        set.merge(&src.dirty.harvest());
        let mut final_stats = self.send_set(t, &set, round, &mut seq).await?;
        final_stats.throttle_percent = self.throttled;
        // Chunks that failed their CRC are sent again; with the guest paused a
        // mismatch is real corruption, so give up after a few tries.
        let mut tries = 0;
        loop {
            let again = src.dirty.harvest();
            if again.count() == 0 {
                break;
            }
            tries += 1;
            if tries > 3 {
                return Err(MigrationError::FinalCopyCorrupt(again.count()));
            }
            let s = self.send_set(t, &again, round, &mut seq).await?;
            final_stats.pages += s.pages;
            final_stats.bytes += s.bytes;
        }
        unless_destination_speaks(self.conn, t.finish()).await?;
        let copied_at = Instant::now();
        tracing::debug!(
            after_ms = paused_at.elapsed().as_secs_f64() * 1e3,
            "final copy acknowledged"
        );
        let transfer_secs = started.elapsed().as_secs_f64();
        final_stats.duration_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        final_stats.start_ms = ms_since(started) - final_stats.duration_ms;
        final_stats.rate_bytes_per_sec =
            final_stats.bytes as f64 / (final_stats.duration_ms / 1e3).max(1e-6);
        rounds.push(final_stats);

        let proven = self.prove(&keys, copied_at).await?;
        let committed_at = Instant::now();
        let downtime_ms = (committed_at - paused_at).as_secs_f64() * 1e3;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let pause_actual = PauseParts {
            final_copy_ms: ms(copied_at - paused_at),
            device_state_ms: ms(proven.switchover_sent - copied_at),
            verification_ms: ms(proven.ready_checked - proven.switchover_sent),
            commit_round_trip_ms: ms(committed_at - proven.ready_checked),
        };
        tracing::debug!(downtime_ms, ?pause_actual, "committed");

        // The audit: the source's memory is frozen from here on (the guest
        // runs on the destination); hash it again, after the pause.
        let audit = self.audit(&proven, &predicted, &pause_actual).await;
        let channels = t.stats();
        let payload_bytes: u64 = rounds.iter().map(|r| r.bytes).sum();
        let bytes_on_wire: u64 = channels.iter().map(|c| c.bytes_on_wire).sum();
        Ok(Summary {
            option: opts.option,
            memory_bytes: layout.total_bytes(),
            total_ms: (committed_at - started).as_secs_f64() * 1e3,
            downtime_ms,
            switchover_ms: (paused_at - started).as_secs_f64() * 1e3,
            digest_ms: pause_actual.verification_ms,
            converge_reason: reason,
            predicted_downtime_ms: predicted.total_ms(),
            pause_predicted: predicted,
            pause_actual,
            verify: opts.verify,
            audit,
            downtime_limit_ms: opts.downtime_limit.as_secs_f64() * 1e3,
            throttle_percent: self.throttled,
            bandwidth_limit: opts.bandwidth_limit,
            wire_bytes_per_sec: bytes_on_wire as f64 / transfer_secs.max(1e-9),
            rounds,
            bytes_on_wire,
            payload_bytes,
            compression_ratio: payload_bytes as f64 / bytes_on_wire.max(1) as f64,
            throughput_bytes_per_sec: payload_bytes as f64 / transfer_secs.max(1e-9),
            crc_resends: channels.iter().map(|c| c.crc_resends).sum(),
            digest: hex(&ferry_proto::switchover::fingerprint(&proven.committed)),
            digest_verified: true,
            channels,
            encryption: describe_encryption(self.conn, opts.option),
            memory: crate::memory::memory_use(&*src.mem),
            cpu: crate::cpu::CpuUse::default(),
        })
    }

    /// With the final copy acknowledged: sends the device state, checks the
    /// destination's proof (`Ready`) against this side's claims, commits,
    /// and checks the destination's confirmation or refusal.
    async fn prove(&mut self, keys: &SessionKeys, copied_at: Instant) -> Result<Proven> {
        let src = self.src;
        let device_state = src.guest.device_state()?;
        let verify_full = src.opts.verify == Verify::Full;
        let switchover = self
            .session
            .switchover(device_state, verify_full, Instant::now())?;
        let device_state_hash = self.session.device_state_hash();
        self.conn.send(&switchover).await?;
        let switchover_sent = Instant::now();
        tracing::debug!(
            after_ms = (switchover_sent - copied_at).as_secs_f64() * 1e3,
            "device state sent"
        );
        // Everything both sides said, up to and including Switchover.
        let t = self.conn.transcript();
        let transcripts = Transcripts {
            s2d: t.sent,
            d2s: t.received,
        };
        // --verify full: this side's whole memory, hashed while the
        // destination hashes its own.
        let scan = verify_full.then(|| {
            let (mem, key) = (src.mem.clone(), keys.page.clone());
            tokio::task::spawn_blocking(move || memory_evidence(&*mem, &key))
        });
        let ready = self.answer().await;
        let memory = match scan {
            Some(t) => Some(
                t.await
                    .map_err(|e| MigrationError::Guest(format!("verification task failed: {e}")))?
                    .evidence,
            ),
            None => None,
        };
        let claims = Claims {
            transcripts,
            // What was sent for every page: complete, every chunk acked.
            evidence: self.evidence(),
            device_state: device_state_hash.unwrap_or_default(),
            memory,
        };
        match ready? {
            Step::Ready => self.session.verify_ready(&claims)?,
            s => return Err(unexpected_step(s)),
        }
        let ready_checked = Instant::now();
        tracing::debug!("destination's proof checked, committing");
        // The point of no return: a cancel from here on is refused.
        src.cancel.commit()?;
        let commit = self.session.commit(Instant::now())?;
        self.conn.send(&commit).await?;
        match self.answer().await? {
            Step::Committed(mac) => Ok(Proven {
                claims,
                committed: mac,
                switchover_sent,
                ready_checked,
            }),
            s => Err(MigrationError::CommitUnconfirmed(format!("{s:?}"))),
        }
    }

    /// Hashes the frozen source memory again, compares it with the evidence
    /// both sides proved, and tells the destination (with the pause's
    /// figures). Runs after `Committed`: it never lengthens the pause.
    async fn audit(
        &mut self,

        proven: &Proven,
        predicted: &PauseParts,
        actual: &PauseParts,
    ) -> Audit {
        let started = Instant::now();
        let (mem, ledger) = (self.src.mem.clone(), self.ledger.clone());
        let scan = tokio::task::spawn_blocking(move || crate::digest::audit(&*mem, &ledger)).await;
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        let audit = match scan {
            Ok(scan) => {
                // Every page equals what was sent for it, and the sum equals
                // the evidence both sides proved.
                let equal = scan.mismatched == 0 && scan.evidence == proven.claims.evidence;
                Audit {
                    result: if equal { "passed" } else { "failed" }.into(),
                    pages: scan.pages,
                    mismatched_pages: scan.mismatched,
                    first_mismatch: scan.first_mismatch,
                    duration_ms,
                    cpu_s: scan.cpu.as_secs_f64(),
                }
            }
            Err(e) => {
                tracing::error!("audit task failed: {e}");
                Audit {
                    result: format!("failed: audit task failed: {e}"),
                    duration_ms,
                    ..Audit::default()
                }
            }
        };
        if audit.failed() {
            tracing::error!(
                mismatched_pages = audit.mismatched_pages,
                first = ?audit.first_mismatch,
                "AUDIT FAILED: the frozen source memory differs from what was migrated (the dirty log missed guest writes)"
            );
        }
        let report = AuditReport {
            result: if audit.failed() {
                AuditResult::Failed
            } else {
                AuditResult::Passed
            },
            pages: audit.pages,
            mismatched_pages: audit.mismatched_pages,
            first_mismatch: audit.first_mismatch,
            duration_us: (duration_ms * 1e3) as u64,
            pause_predicted: (*predicted).into(),
            pause_actual: (*actual).into(),
            mac: [0; 32],
        };
        let sent = match self.session.audit(report) {
            Ok(m) => self.conn.send(&m).await.map_err(MigrationError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = sent {
            tracing::warn!("could not send the audit report to the destination: {e}");
        }
        audit
    }
}

/// `work`, a step of sending pages, unless the destination speaks first.
/// While pages go out it has nothing to answer, so its `Abort` ends the
/// migration at once with the reason only it saw (its RDMA channels failing
/// never reach the source's, and a dead link holds a TCP channel until its
/// timeout); any other message is out of order. The control connection's
/// end is left to the step that meets it next (a data channel failing with
/// it, or the next control message), as before. The receive is cancel
/// safe: when `work` ends first, nothing is lost.
async fn unless_destination_speaks<T>(
    conn: &mut Conn,
    work: impl std::future::Future<Output = ferry_transport::Result<T>>,
) -> Result<T> {
    tokio::pin!(work);
    let mut listening = true;
    loop {
        tokio::select! {
            biased;
            r = &mut work => return r.map_err(Into::into),
            m = conn.recv_unprompted("the destination's abort"), if listening => match m {
                Err(TransportError::PeerAborted(reason)) => {
                    return Err(MigrationError::DestinationAborted(reason))
                }
                Err(TransportError::PeerClosed { .. } | TransportError::Io { .. }) => listening = false,
                Err(e) => return Err(e.into()),
                Ok(m) => {
                    return Err(TransportError::Unexpected {
                        expected: "nothing while pages are sent (an Abort at most)",
                        got: m.name().into(),
                    }
                    .into())
                }
            },
        }
    }
}

/// What the switchover proved.
struct Proven {
    claims: Claims,
    committed: [u8; 32],
    switchover_sent: Instant,
    ready_checked: Instant,
}

/// A step the session took that the driver did not wait for (a driver bug).
fn unexpected_step(s: Step) -> MigrationError {
    SessionError::OutOfOrder {
        event: match s {
            Step::Fenced => "Fenced",
            Step::RoundTrip(_) => "round trip",
            Step::Ready => "Ready",
            Step::Committed(_) => "Committed",
        },
        state: "not awaited by the driver",
    }
    .into()
}

impl From<SessionError> for MigrationError {
    /// A session's error as the migration reports it (the same words, and
    /// the same metrics reason, as when the drivers checked inline).
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Unexpected { expected, got } => TransportError::Unexpected {
                expected,
                got: got.into(),
            }
            .into(),
            SessionError::Timeout { what, after } => TransportError::Timeout { what, after }.into(),
            SessionError::PeerAborted(why) => TransportError::PeerAborted(why).into(),
            SessionError::Verification(m) => MigrationError::Verification(m),
            SessionError::CommitProof => MigrationError::CommitProof,
            SessionError::DeviceStateCorrupt => MigrationError::DeviceStateCorrupt,
            SessionError::CommitRefused(why) => MigrationError::CommitRefused(why),
            SessionError::CommitUnconfirmed(why) => MigrationError::CommitUnconfirmed(why),
            other => TransportError::Unexpected {
                expected: "a step the session allows",
                got: other.to_string(),
            }
            .into(),
        }
    }
}

/// Milliseconds since `t`.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[3] = 1;
        assert!(!is_zero_page(&p));
    }

    /// A chunk's tag (and copy, if it has one) is what a fresh read of its
    /// runs gives.
    fn assert_as_read<M: ferry_transport::guest::GuestMem>(
        mem: &M,
        page: &ferry_proto::PageKey,
        frame_key: &MacKey,
        c: &Chunk,
    ) {
        let again =
            Chunk::read(mem, page, frame_key, c.seq, c.round, c.runs.clone(), true).unwrap();
        assert_eq!(c.tag, again.tag, "chunk {}", c.seq);
        if let Some(d) = &c.data {
            assert!(**d == *again.data.unwrap(), "chunk {} bytes", c.seq);
        }
    }

    fn test_ledger(layout: &MemoryLayout) -> Ledger {
        layout
            .ledger(ferry_proto::PageKey::from_secrets([3; 192], [5; 192]))
            .unwrap()
    }

    #[test]
    fn chunker_splits_zero_and_data_runs_caps_payload_and_records_evidence() {
        use crate::memory::{default_layout, source_memory};
        use vm_memory::Bytes;
        let layout = default_layout(64 * PAGE_SIZE).unwrap();
        let mem = source_memory(&layout).unwrap();
        for p in [0u64, 1, 2, 5, 6, 7, 8, 9] {
            mem.write_slice(&[p as u8 + 1], GuestAddress(p * PAGE_SIZE + 10))
                .unwrap();
        }
        let ledger = test_ledger(&layout);
        let frame_key = MacKey::from_bytes([7; 32]);
        let mut out = Vec::new();
        let mut seq = 0;
        let mut ch = Chunker::new(&mem, &ledger, &frame_key, 4 * PAGE_SIZE, 2, false);
        let all12 = PageRun {
            gpa: 0,
            pages: 12,
            zero: false,
        };
        ch.add(all12, &mut out, &mut seq).unwrap();
        ch.cut(&mut out, &mut seq);
        let all: Vec<PageRun> = out.iter().flat_map(|c| c.runs.clone()).collect();
        let pages: u64 = all.iter().map(|r| u64::from(r.pages)).sum();
        assert_eq!(pages, 12, "every page accounted for: {all:?}");
        assert!(out
            .iter()
            .all(|c| c.payload_bytes() <= 4 * PAGE_SIZE && c.round == 2));
        assert_eq!(
            all.iter().filter(|r| r.zero).map(|r| r.pages).sum::<u32>(),
            4,
            "pages 3,4,10,11 are zero"
        );
        assert_eq!(
            out.iter().map(|c| c.seq).collect::<Vec<_>>(),
            (0..out.len() as u64).collect::<Vec<_>>()
        );
        // The ledger holds exactly the pages' hashes: the same evidence as
        // hashing them directly.
        let direct = test_ledger(&layout);
        for p in 0..12u64 {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            let d = direct
                .record(p * PAGE_SIZE, direct.key().hash_or_zero(&page))
                .unwrap();
            direct.apply(d);
        }
        assert_ne!(ledger.evidence(), Evidence::default());
        assert_eq!(ledger.evidence(), direct.evidence());
        // A page changed and sent again replaces its old hash.
        mem.write_slice(&[0xee], GuestAddress(5 * PAGE_SIZE + 99))
            .unwrap();
        let again = PageRun {
            gpa: 5 * PAGE_SIZE,
            pages: 1,
            zero: false,
        };
        let mut ch = Chunker::new(&mem, &ledger, &frame_key, 4 * PAGE_SIZE, 3, false);
        ch.add(again, &mut out, &mut seq).unwrap();
        ch.cut(&mut out, &mut seq);
        assert_ne!(ledger.evidence(), direct.evidence());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        direct.apply(
            direct
                .record(5 * PAGE_SIZE, direct.key().hash_or_zero(&page))
                .unwrap(),
        );
        assert_eq!(ledger.evidence(), direct.evidence());
        // Round 0 skips zero pages entirely.
        let mut out0 = Vec::new();
        let mut ch0 = Chunker::new(&mem, &ledger, &frame_key, 1 << 20, 0, true);
        ch0.add(all12, &mut out0, &mut seq).unwrap();
        ch0.cut(&mut out0, &mut seq);
        assert!(out0.iter().flat_map(|c| &c.runs).all(|r| !r.zero));
        assert_eq!(out0.iter().map(|c| c.pages()).sum::<u64>(), 8);
        // Copying (compression, TLS): each chunk carries exactly its
        // non-zero pages' bytes, and its tag is the one a fresh read gives.
        let pool = BufPool::new(2);
        let mut copied = Vec::new();
        let mut ch =
            Chunker::new(&mem, &ledger, &frame_key, 4 * PAGE_SIZE, 4, false).copying(&pool, None);
        ch.add(all12, &mut copied, &mut seq).unwrap();
        ch.cut(&mut copied, &mut seq);
        // A chunk's tag (and copy, if it has one) is what a fresh read gives.
        let as_read = |c: &Chunk| assert_as_read(&mem, ledger.key(), &frame_key, c);
        for c in &copied {
            as_read(c);
            assert!(
                c.data.is_some() || c.payload_bytes() == 0,
                "only zero runs go without a copy"
            );
        }
        drop(copied);
        assert!(pool.idle() >= 1, "buffers go back to the pool");
        // With a copy hint (compression): a chunk the hint declines when
        // its first page is read carries no copy, yet the same tag.
        #[derive(Debug, Default)]
        struct EveryOther(std::sync::atomic::AtomicU64);
        impl CopyHint for EveryOther {
            fn plan(&self, _gpa: u64) -> CopyPlan {
                if self.0.fetch_add(1, Ordering::Relaxed) & 1 == 0 {
                    CopyPlan::Copy
                } else {
                    CopyPlan::Skip
                }
            }
            fn sampled(&self, _gpa: u64, _sample: &[u8]) -> bool {
                unreachable!("never planned")
            }
        }
        let hint: Arc<dyn CopyHint> = Arc::new(EveryOther::default());
        let mut hinted = Vec::new();
        let mut ch = Chunker::new(&mem, &ledger, &frame_key, 2 * PAGE_SIZE, 4, false)
            .copying(&pool, Some(&hint));
        ch.add(all12, &mut hinted, &mut seq).unwrap();
        ch.cut(&mut hinted, &mut seq);
        let with_data: Vec<bool> = hinted
            .iter()
            .filter(|c| c.payload_bytes() > 0)
            .map(|c| c.data.is_some())
            .collect();
        assert!(
            with_data.contains(&true) && with_data.contains(&false),
            "{with_data:?}"
        );
        hinted.iter().for_each(as_read);
        // A run longer than a chunk is split over chunks.
        let mut big = Vec::new();
        let mut ch = Chunker::new(&mem, &ledger, &frame_key, 2 * PAGE_SIZE, 1, false);
        ch.add(all12, &mut big, &mut seq).unwrap();
        ch.cut(&mut big, &mut seq);
        assert!(big.iter().all(|c| c.payload_bytes() <= 2 * PAGE_SIZE));
        assert_eq!(big.iter().map(|c| c.pages()).sum::<u64>(), 12);
    }

    #[test]
    fn a_sampled_chunk_keeps_its_copy_only_if_its_first_pages_compress() {
        use crate::memory::{default_layout, source_memory};
        use vm_memory::Bytes;
        let layout = default_layout(128 * PAGE_SIZE).unwrap();
        let mem = source_memory(&layout).unwrap();
        // Pages 0..128 each marked with their number (page 20 zero).
        for p in (0..128u64).filter(|&p| p != 20) {
            mem.write_slice(&[p as u8 + 1; 8], GuestAddress(p * PAGE_SIZE + 8))
                .unwrap();
        }
        let ledger = test_ledger(&layout);
        let frame_key = MacKey::from_bytes([7; 32]);
        // Every chunk is sampled; the verdicts alternate no, yes, ...; the
        // samples seen are kept.
        #[derive(Debug, Default)]
        struct Alternate(std::sync::Mutex<Vec<(u64, Vec<u8>)>>);
        impl CopyHint for Alternate {
            fn plan(&self, _gpa: u64) -> CopyPlan {
                CopyPlan::Sample
            }
            fn sampled(&self, gpa: u64, sample: &[u8]) -> bool {
                let mut seen = self.0.lock().unwrap();
                seen.push((gpa, sample.to_vec()));
                seen.len() & 1 == 0
            }
        }
        let alt = Arc::new(Alternate::default());
        let hint: Arc<dyn CopyHint> = alt.clone();
        let pool = BufPool::new(2);
        let (mut out, mut seq) = (Vec::new(), 0);
        // Chunks of 32 pages, round 0 (zero pages skipped); then a short
        // chunk of 8 pages, below the sample.
        let mut ch = Chunker::new(&mem, &ledger, &frame_key, 32 * PAGE_SIZE, 0, true)
            .copying(&pool, Some(&hint));
        for run in [(0, 120), (120, 8)] {
            ch.add(
                PageRun {
                    gpa: run.0 * PAGE_SIZE,
                    pages: run.1,
                    zero: false,
                },
                &mut out,
                &mut seq,
            )
            .unwrap();
            ch.cut(&mut out, &mut seq);
        }
        let with_data: Vec<bool> = out.iter().map(|c| c.data.is_some()).collect();
        assert_eq!(with_data, [false, true, false, true, true], "{out:?}");
        // The samples were each chunk's first 16 non-zero pages, copied.
        let pages = SAMPLE_BYTES as u64 / PAGE_SIZE;
        let seen = alt.0.lock().unwrap();
        assert_eq!(seen.len(), 4, "the short chunk is not sampled");
        for ((gpa, sample), c) in seen.iter().zip(&out) {
            assert_eq!(*gpa, c.runs[0].gpa);
            let mut want = Vec::new();
            for p in (gpa / PAGE_SIZE..)
                .filter(|&p| p != 20)
                .take(pages as usize)
            {
                let mut page = vec![0u8; PAGE_SIZE as usize];
                mem.read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                    .unwrap();
                want.extend(page);
            }
            assert!(*sample == want, "sample of the chunk at {gpa:#x}");
        }
        // Copy or not, every chunk's tag (and copy) is what a fresh read
        // gives, and every non-zero page went into one chunk.
        for c in &out {
            assert_as_read(&mem, ledger.key(), &frame_key, c);
        }
        assert_eq!(out.iter().map(|c| c.pages()).sum::<u64>(), 127);
    }
}
