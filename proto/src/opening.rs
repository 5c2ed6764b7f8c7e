//! The opening of a migration, around the handshake ([`crate::session`]):
//! the destination's checks on a connection's `Hello`, and the offer and
//! its answer on both sides, as state machines without IO. The drivers
//! (`ferry_migration::engine` on the source, `ferry_migration::dest` on the
//! destination) move the frames, run the handshake, book memory and
//! slots, and do what these machines return; from `Accept` on the
//! migration sessions take over ([`crate::source`], [`crate::dest`]).
//!
//! The source ([`SourceOpening`]):
//!
//! ```text
//!  new(offer, rdma) --Offer [, RdmaOffer]--> AwaitAnswer --Accept--> Accepted
//!                                                 |
//!                                                 +-- Reject, any other message --> Failed (error)
//! ```
//!
//! The destination ([`DestOpening`]); nothing is allocated before an offer
//! passed every check:
//!
//! ```text
//!  new --Hello--> Hello(role)  --Data--> (the channel's handshake; done here)
//!        |            |
//!        |            +--Control, DestHandshake done: authenticated--> AwaitOffer
//!        |                                                                |
//!        +-- not a Hello, no common version,                               +--Offer, every check passes--> Offered --accept(id, interfaces)--> Accepted
//!            plain without --plaintext --> Refused (Reject sent)            +--RelayOffer--> Relay (`ferry relay`'s own checks)
//!                                                                           +--Offer fails a check --> Refused (Reject sent)
//!                                                                           +--anything else --> Failed (error)
//! ```
//!
//! The checks on an offer, in order (the first that fails is the
//! `Reject`): the layout is well formed (`BadOffer`); the guest memory is
//! within `--memory-limit` (`MemoryLimit`); the option can be admitted
//! with this connection's encryption ([`crate::policy::destination_admits`],
//! `Encryption`); the option is available here (a known codec and level,
//! RDMA only where built in: `Option`); the guest can be restored here
//! ([`GuestSupport::check`], `GuestConfig`); 1 to
//! [`crate::net::MAX_CHANNELS`] data channels (`BadOffer`).

use crate::control::{
    Accept, GuestConfig, Msg, Offer, RejectReason, Role, PROTOCOL_MAX, PROTOCOL_MIN,
};
use crate::net::{NetInterface, MAX_CHANNELS};
use crate::option::PerformanceOption;
use crate::rdma::RdmaOffer;
use crate::relay::RelayOffer;
use crate::session::{self, HandshakeError};
use crate::units::human_exact;
use crate::wire::{Codec, CompressionSpec};

/// What this destination can restore. The offer's guest configuration is
/// checked against it before `Accept`; a guest it cannot restore is refused
/// with `Reject(GuestConfig)` naming the mismatch, before anything is
/// allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSupport {
    /// Most vCPUs a guest may have.
    pub max_vcpus: u32,
    /// The CPU vendor guests must come from (their state holds the vendor's
    /// CPU features); `None`: any.
    pub cpu_vendor: Option<String>,
    /// Device-state formats this destination restores.
    pub device_state_formats: Vec<String>,
}

impl GuestSupport {
    /// Checks a guest configuration; the error names the mismatch.
    pub fn check(&self, g: &GuestConfig) -> Result<(), String> {
        if g.vcpus == 0 {
            return Err("guest configuration: 0 vCPUs".into());
        }
        if g.vcpus > self.max_vcpus {
            return Err(format!(
                "guest configuration: {} vCPUs, this destination restores at most {}",
                g.vcpus, self.max_vcpus
            ));
        }
        if let Some(v) = &self.cpu_vendor {
            if &g.cpu_vendor != v {
                return Err(format!(
                    "guest configuration: CPU vendor {:?}, this destination's is {v:?} (a guest cannot move between CPU vendors)",
                    g.cpu_vendor
                ));
            }
        }
        if !self.device_state_formats.contains(&g.device_state_format) {
            return Err(format!(
                "guest configuration: device-state format {:?} is not one this destination restores ({})",
                g.device_state_format,
                self.device_state_formats.join(", ")
            ));
        }
        Ok(())
    }
}

/// What a destination admits (its `ferry listen` flags and build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// `--plaintext`: plain connections and the RDMA option are admitted.
    pub plaintext_allowed: bool,
    /// `--memory-limit`: the largest guest memory accepted.
    pub memory_limit: u64,
    /// Whether this build can receive the RDMA option.
    pub rdma: bool,
    /// What the restore hook can restore.
    pub supports: GuestSupport,
}

/// A refusal: the reason and explanation of the `Reject` the source gets
/// ([`Refusal::reject`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    /// The reason.
    pub reason: RejectReason,
    /// The explanation.
    pub message: String,
}

impl Refusal {
    fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }

    /// The `Reject` to send.
    pub fn reject(&self) -> Msg {
        Msg::Reject {
            reason: self.reason,
            message: self.message.clone(),
        }
    }
}

/// Why the destination refused a connection's first message. Each is
/// answered with [`HelloRefusal::refusal`]'s `Reject`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloRefusal {
    /// The first message is not a `Hello`.
    #[error("expected Hello, got {got}")]
    NotHello {
        /// What came.
        got: &'static str,
    },
    /// The source's versions and ours do not meet.
    #[error("unsupported protocol version: peer speaks {peer_min}..={peer_max}, this host speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}")]
    Version {
        /// The source's lowest.
        peer_min: u16,
        /// The source's highest.
        peer_max: u16,
    },
    /// A plain connection, and this destination requires encryption.
    #[error("{}", crate::policy::ENCRYPTION_REQUIRED)]
    Unencrypted,
}

impl HelloRefusal {
    /// The `Reject` this refusal sends: its reason and explanation.
    pub fn refusal(&self) -> Refusal {
        let reason = match self {
            HelloRefusal::NotHello { .. } => RejectReason::BadOffer,
            HelloRefusal::Version { .. } => RejectReason::Version,
            HelloRefusal::Unencrypted => RejectReason::Encryption,
        };
        Refusal::new(reason, self.to_string())
    }
}

/// A `Hello` the destination takes: the version chosen, the connection's
/// role and the source's nonce (for [`crate::session::DestHandshake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The version both speak, the highest.
    pub version: u16,
    /// A control connection or a data channel.
    pub role: Role,
    /// The source's nonce.
    pub nonce: [u8; 32],
}

/// What an authenticated control connection offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// A migration, checked: the driver books a slot and memory (refusing
    /// it when they are not there), allocates, then accepts
    /// ([`DestOpening::accept`]).
    Migration(Offer),
    /// `ferry relay`'s streams (checked by the relay's driver).
    Relay(RelayOffer),
}

/// Why an offer ended the opening.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The offer failed a check: send the `Reject`.
    #[error(transparent)]
    Refused(Refusal),
    /// A message that is no offer (nothing is answered), or the opening
    /// driven out of order.
    #[error(transparent)]
    Session(#[from] session::SessionError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DestState {
    AwaitHello,
    /// A control connection's `Hello` was taken; its handshake runs.
    Authenticating,
    AwaitOffer,
    Offered,
    Accepted,
    /// A data channel's `Hello` was taken: its own handshake follows, the
    /// opening has nothing more to say.
    DataChannel,
    Refused,
    Failed,
}

impl DestState {
    fn name(&self) -> &'static str {
        match self {
            DestState::AwaitHello => "awaiting Hello",
            DestState::Authenticating => "authenticating",
            DestState::AwaitOffer => "awaiting the offer",
            DestState::Offered => "offered",
            DestState::Accepted => "accepted",
            DestState::DataChannel => "a data channel",
            DestState::Refused => "refused",
            DestState::Failed => "failed",
        }
    }
}

/// The destination's side of one connection's opening.
#[derive(Debug, Clone)]
pub struct DestOpening {
    admission: Admission,
    state: DestState,
}

impl DestOpening {
    /// A connection to a destination that admits `admission`.
    pub fn new(admission: Admission) -> Self {
        DestOpening {
            admission,
            state: DestState::AwaitHello,
        }
    }

    fn out_of_order(&mut self, event: &'static str) -> session::SessionError {
        let e = session::SessionError::OutOfOrder {
            event,
            state: self.state.name(),
        };
        self.state = DestState::Failed;
        e
    }

    /// The connection's first message; `encrypted`: whether it came over
    /// TLS. A `Hello` whose versions meet ours on a connection this
    /// destination admits ([`crate::policy::destination_accepts_connection`])
    /// is taken: the driver answers with the
    /// [`crate::session::DestHandshake`] of the version chosen. Otherwise
    /// the refusal to send.
    pub fn on_hello(&mut self, msg: Msg, encrypted: bool) -> Result<Hello, HelloRefusal> {
        if self.state != DestState::AwaitHello {
            self.state = DestState::Failed;
            return Err(HelloRefusal::NotHello { got: msg.name() });
        }
        self.state = DestState::Refused;
        let Msg::Hello {
            min_version,
            max_version,
            role,
            nonce,
        } = msg
        else {
            return Err(HelloRefusal::NotHello { got: msg.name() });
        };
        let version =
            session::negotiate(min_version, max_version).ok_or(HelloRefusal::Version {
                peer_min: min_version,
                peer_max: max_version,
            })?;
        crate::policy::destination_accepts_connection(self.admission.plaintext_allowed, encrypted)
            .map_err(|_| HelloRefusal::Unencrypted)?;
        self.state = match role {
            Role::Control => DestState::Authenticating,
            Role::Data => DestState::DataChannel,
        };
        Ok(Hello {
            version,
            role,
            nonce,
        })
    }

    /// The control connection's handshake succeeded: the offer comes next.
    pub fn authenticated(&mut self) -> Result<(), session::SessionError> {
        if self.state != DestState::Authenticating {
            return Err(self.out_of_order("authenticated"));
        }
        self.state = DestState::AwaitOffer;
        Ok(())
    }

    /// The source's first message after the handshake; `encrypted`:
    /// whether the control connection is TLS. An `Offer` that passes every
    /// check (see the module documentation) or a `RelayOffer` is returned
    /// to the driver; an `Offer` that fails one is refused (send
    /// [`Refusal::reject`]); anything else ends the opening.
    pub fn on_offer(&mut self, msg: Msg, encrypted: bool) -> Result<Offered, OfferError> {
        if self.state != DestState::AwaitOffer {
            return Err(self.out_of_order("offer").into());
        }
        let offer = match msg {
            Msg::Offer(o) => o,
            Msg::RelayOffer(o) => {
                self.state = DestState::Offered;
                return Ok(Offered::Relay(o));
            }
            m => {
                self.state = DestState::Failed;
                return Err(session::SessionError::Unexpected {
                    expected: "Offer",
                    got: m.name(),
                }
                .into());
            }
        };
        if let Err(r) = self.check(&offer, encrypted) {
            self.state = DestState::Refused;
            return Err(OfferError::Refused(r));
        }
        self.state = DestState::Offered;
        Ok(Offered::Migration(offer))
    }

    /// Every check on an offer, in order; the first that fails is the
    /// refusal.
    pub fn check(&self, offer: &Offer, encrypted: bool) -> Result<(), Refusal> {
        let a = &self.admission;
        offer
            .layout
            .validate()
            .map_err(|e| Refusal::new(RejectReason::BadOffer, e.to_string()))?;
        let total = offer.layout.total_bytes();
        if total > a.memory_limit {
            return Err(Refusal::new(
                RejectReason::MemoryLimit,
                format!(
                    "guest memory of {} is above this destination's --memory-limit of {}",
                    human_exact(total),
                    human_exact(a.memory_limit)
                ),
            ));
        }
        crate::policy::destination_admits(offer.option, a.plaintext_allowed, encrypted)
            .map_err(|(reason, why)| Refusal::new(reason, why))?;
        match offer.option {
            PerformanceOption::Tcp => {}
            PerformanceOption::Compression { codec, level } => {
                let option = |e: crate::WireError| {
                    Refusal::new(RejectReason::Option, format!("compression option: {e}"))
                };
                let codec = Codec::from_id(codec).map_err(option)?;
                CompressionSpec { codec, level }
                    .validate()
                    .map_err(option)?;
            }
            PerformanceOption::Rdma if a.rdma => {}
            other => {
                return Err(Refusal::new(
                    RejectReason::Option,
                    format!("performance option {other} is not available on this destination"),
                ))
            }
        }
        a.supports
            .check(&offer.guest)
            .map_err(|e| Refusal::new(RejectReason::GuestConfig, e))?;
        if offer.channels == 0 || offer.channels > MAX_CHANNELS {
            return Err(Refusal::new(
                RejectReason::BadOffer,
                format!(
                    "{} data channels requested (1 to {MAX_CHANNELS} allowed)",
                    offer.channels
                ),
            ));
        }
        Ok(())
    }

    /// The checked offer is taken: memory allocated, channels expected.
    /// Returns the `Accept` to send, with the migration's id and the
    /// interfaces data channels may come to.
    pub fn accept(
        &mut self,
        migration_id: u64,
        interfaces: Vec<NetInterface>,
    ) -> Result<Msg, session::SessionError> {
        if self.state != DestState::Offered {
            return Err(self.out_of_order("accept"));
        }
        self.state = DestState::Accepted;
        Ok(Msg::Accept(Accept {
            migration_id,
            interfaces,
        }))
    }

    /// True once the offer was accepted.
    pub fn is_accepted(&self) -> bool {
        self.state == DestState::Accepted
    }
}

/// The data channels an accepted migration still expects: how many may
/// still open, and whether they must be encrypted (as its control
/// connection is). A data channel whose proof names the migration
/// ([`crate::session::DestHandshake::proves`]) is admitted here
/// ([`ExpectedChannels::admit`]) before it is welcomed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedChannels {
    /// Channels that may still open (the offer's count at first).
    pub left: u16,
    /// Whether the migration's control connection is encrypted: then so
    /// must every data channel be.
    pub encrypted: bool,
}

/// Why a data channel was refused: its migration's control connection is
/// encrypted and it is not.
pub const CHANNEL_NOT_ENCRYPTED: &str =
    "data channel refused: its migration's control connection is encrypted and it is not";
/// Why a data channel was refused: the migration has all it offered.
pub const CHANNELS_ALL_OPEN: &str = "every data channel the migration offered is already open";
/// Why a data channel was refused: its proof names no migration.
pub const CHANNEL_UNKNOWN: &str = "the data channel's proof matches no migration in progress (another session's, an ended one's, or forged)";

impl ExpectedChannels {
    /// Admits a data channel whose proof matched this migration
    /// (`encrypted`: whether it is TLS), counting it; or the refusal to
    /// send. A refused channel counts against nothing.
    pub fn admit(&mut self, encrypted: bool) -> Result<(), Refusal> {
        if self.encrypted && !encrypted {
            return Err(Refusal::new(
                RejectReason::Encryption,
                CHANNEL_NOT_ENCRYPTED,
            ));
        }
        if self.left == 0 {
            return Err(Refusal::new(RejectReason::Token, CHANNELS_ALL_OPEN));
        }
        self.left -= 1;
        Ok(())
    }
}

/// The refusal of a data channel whose proof matched no migration.
pub fn unknown_channel() -> Refusal {
    Refusal::new(RejectReason::Token, CHANNEL_UNKNOWN)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceState {
    AwaitAnswer,
    Accepted,
    Failed,
}

/// The source's side of the opening, after its handshake: the offer out,
/// the destination's answer in.
#[derive(Debug, Clone)]
pub struct SourceOpening {
    state: SourceState,
}

impl SourceOpening {
    /// Offers `offer` (and, for the RDMA option, this host's RDMA
    /// endpoints `rdma`, right after it). Returns the machine and the
    /// messages to send, in order.
    pub fn new(offer: Offer, rdma: Option<RdmaOffer>) -> (Self, Vec<Msg>) {
        let mut send = vec![Msg::Offer(offer)];
        send.extend(rdma.map(Msg::RdmaOffer));
        (
            SourceOpening {
                state: SourceState::AwaitAnswer,
            },
            send,
        )
    }

    /// The destination's answer: its `Accept`, or why the migration cannot
    /// go on (its `Reject`, or a message that is no answer).
    pub fn on_answer(&mut self, msg: Msg) -> Result<Accept, HandshakeError> {
        if self.state != SourceState::AwaitAnswer {
            self.state = SourceState::Failed;
            return Err(HandshakeError::Unexpected {
                expected: "nothing (the offer was answered)",
                got: msg.name(),
            });
        }
        self.state = SourceState::Failed;
        match msg {
            Msg::Accept(a) => {
                self.state = SourceState::Accepted;
                Ok(a)
            }
            Msg::Reject { reason, message } => Err(HandshakeError::Rejected { reason, message }),
            m => Err(HandshakeError::Unexpected {
                expected: "Accept or Reject",
                got: m.name(),
            }),
        }
    }

    /// True once the destination accepted.
    pub fn is_accepted(&self) -> bool {
        self.state == SourceState::Accepted
    }
}
