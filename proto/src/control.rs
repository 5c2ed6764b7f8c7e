//! Control-channel messages and their framing.
//!
//! Every control message travels as a 16-byte header followed by a
//! `postcard`-encoded [`Msg`]:
//!
//! ```text
//! +----------------+----------------+----------------+----------------+
//! | magic "FRYM"   | body len (u32) | crc32 of body  | flags (u32)    |
//! +----------------+----------------+----------------+----------------+
//! | body: postcard(Msg)                                              ...
//! | tag (16 bytes, when flags has FLAG_TAGGED)                          |
//! ```
//!
//! The body length is checked against the connection's current limit before
//! anything is read: 4 KiB until the peer has authenticated, then
//! [`MAX_CONTROL_BODY`]. Frames before authentication have no flag and no
//! tag; every frame after it has [`FLAG_TAGGED`] and the tag of
//! [`crate::handshake::ControlTags`] (sequence number, header, body,
//! under the direction's session key), checked before the body is decoded.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Result, WireError};
use crate::layout::MemoryLayout;
use crate::net::NetInterface;
pub use crate::option::PerformanceOption;

/// Default control port (the one Hyper-V uses for live migration).
pub const DEFAULT_PORT: u16 = 6600;
/// Magic of a control frame.
pub const CONTROL_MAGIC: [u8; 4] = *b"FRYM";
/// Lowest protocol version this build speaks (3: as 2, where the source
/// proves itself first, proofs are bound to the transcript and the TLS
/// session, control messages are tagged and data channels admitted by
/// proof; 3 drops `Accept`'s never-read `max_chunk`, which changes how
/// `Accept` encodes, so a version-2 peer is refused at the hello with
/// `Reject(Version)` naming both ranges).
pub const PROTOCOL_MIN: u16 = 3;
/// Highest protocol version this build speaks.
pub const PROTOCOL_MAX: u16 = 3;
/// Control frame flag: a 16-byte tag follows the body.
pub const FLAG_TAGGED: u32 = 1;
/// Body limit before authentication.
pub const PREAUTH_BODY_LIMIT: u32 = 4096;
/// Body limit after authentication (device state travels in one message).
pub const MAX_CONTROL_BODY: u32 = 64 << 20;
/// Largest device-state blob.
pub const MAX_DEVICE_STATE: usize = 32 << 20;

/// Control frame header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ControlHeader {
    /// [`CONTROL_MAGIC`].
    pub magic: [u8; 4],
    /// Body length.
    pub len: U32,
    /// crc32fast of the body.
    pub crc32: U32,
    /// [`FLAG_TAGGED`] after authentication, else 0.
    pub flags: U32,
}

/// A checked control frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Body length.
    pub len: u32,
    /// CRC32 of the body.
    pub crc: u32,
    /// A tag follows the body.
    pub tagged: bool,
}

impl FrameHead {
    /// Bytes after the header: body and tag.
    pub fn rest_len(&self) -> usize {
        self.len as usize
            + if self.tagged {
                crate::handshake::TAG_LEN
            } else {
                0
            }
    }
}

/// Which kind of connection a hello opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The control connection of a new migration.
    Control,
    /// A data channel of an accepted migration.
    Data,
}

/// Machine-readable reason of a rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// Protocol version not understood.
    Version,
    /// Authentication failed.
    Auth,
    /// Guest memory above the destination's limit.
    MemoryLimit,
    /// The destination runs as many migrations as it allows.
    Busy,
    /// The requested performance option is not available.
    Option,
    /// The offer is malformed.
    BadOffer,
    /// Data-channel token unknown or already used.
    Token,
    /// Address not allowed.
    Network,
    /// Encryption required (the default; `ferry listen --plaintext` lifts
    /// it) and the connection is not encrypted, or the option cannot be
    /// encrypted (RDMA) without that consent.
    Encryption,
    /// The offer's guest configuration (vCPUs, CPU vendor, device-state
    /// format) is not one this destination can restore.
    GuestConfig,
    /// A relay's `--deliver-to` is outside the destination's
    /// `--relay-allow` (the message names both).
    RelayNotAllowed,
    /// A relay opened more streams than its offer allows.
    TooManyStreams,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            RejectReason::Version => "unsupported version",
            RejectReason::Auth => "authentication",
            RejectReason::MemoryLimit => "memory limit",
            RejectReason::Busy => "busy",
            RejectReason::Option => "performance option",
            RejectReason::BadOffer => "bad offer",
            RejectReason::Token => "data-channel token",
            RejectReason::Network => "network not allowed",
            RejectReason::Encryption => "encryption required",
            RejectReason::GuestConfig => "guest configuration",
            RejectReason::RelayNotAllowed => "relay destination not allowed",
            RejectReason::TooManyStreams => "too many relay streams",
        };
        f.write_str(s)
    }
}

/// Guest configuration carried by the offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// CPU vendor string of the source.
    pub cpu_vendor: String,
    /// Format identifier of the device-state blob.
    pub device_state_format: String,
}

/// The source's offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Guest memory layout.
    pub layout: MemoryLayout,
    /// Guest configuration.
    pub guest: GuestConfig,
    /// Requested performance option.
    pub option: PerformanceOption,
    /// Most data channels the source will open (1 to 64). It pairs
    /// interfaces only once it has the destination's list (in `Accept`), so
    /// with `--channels auto` this is an upper bound.
    pub channels: u16,
}

/// The destination's acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// Migration id on the destination.
    pub migration_id: u64,
    /// Interfaces the destination takes data channels on (those its
    /// `--migration-network` list allows), for the source to pair with its
    /// own. Data channels go to the control port at these addresses.
    pub interfaces: Vec<NetInterface>,
}

/// Source's switchover message: sent with the guest paused, after the last
/// pages were acknowledged (see [`crate::switchover`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// Device state blob.
    pub device_state: Vec<u8>,
    /// SHA-256 of `device_state` (bound into every switchover MAC).
    pub device_state_hash: [u8; 32],
    /// `--verify full`: the destination hashes its whole memory too, and
    /// proves the result in `Ready`.
    pub verify_full: bool,
}

/// Whether the source's audit after the pause found its memory equal to
/// what both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditResult {
    /// Every page of the frozen source memory equals what was sent for it.
    Passed,
    /// Some pages differ: the dirty log missed guest writes, so the
    /// destination runs with stale pages.
    Failed,
}

/// The source's report after `Committed`: its audit of the frozen memory
/// and the pause as it predicted and measured it (for the destination's
/// metrics). Sealed with the session's commit key, bound to `Committed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Outcome.
    pub result: AuditResult,
    /// Pages hashed.
    pub pages: u64,
    /// Pages whose content differs from what was sent for them.
    pub mismatched_pages: u64,
    /// Lowest guest address among them.
    pub first_mismatch: Option<u64>,
    /// How long the audit took, microseconds.
    pub duration_us: u64,
    /// The pause predicted when pre-copy stopped.
    pub pause_predicted: PauseMicros,
    /// The pause measured.
    pub pause_actual: PauseMicros,
    /// [`crate::switchover::audit_mac`] over the rest (this field
    /// zero while it is computed).
    pub mac: [u8; 32],
}

/// The parts of a pause ([`crate::budget::PauseParts`]) in whole
/// microseconds, as they travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseMicros {
    /// Final copy.
    pub final_copy: u64,
    /// Device state.
    pub device_state: u64,
    /// Verification.
    pub verification: u64,
    /// Commit round trip.
    pub commit_round_trip: u64,
}

impl From<crate::budget::PauseParts> for PauseMicros {
    fn from(p: crate::budget::PauseParts) -> Self {
        let us = |ms: f64| (ms.max(0.0) * 1e3).round() as u64;
        PauseMicros {
            final_copy: us(p.final_copy_ms),
            device_state: us(p.device_state_ms),
            verification: us(p.verification_ms),
            commit_round_trip: us(p.commit_round_trip_ms),
        }
    }
}

impl From<PauseMicros> for crate::budget::PauseParts {
    fn from(p: PauseMicros) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        crate::budget::PauseParts {
            final_copy_ms: ms(p.final_copy),
            device_state_ms: ms(p.device_state),
            verification_ms: ms(p.verification),
            commit_round_trip_ms: ms(p.commit_round_trip),
        }
    }
}

impl AuditReport {
    fn body(&self) -> Vec<u8> {
        let mut unsealed = self.clone();
        unsealed.mac = [0; 32];
        postcard::to_stdvec(&unsealed).expect("an audit report always serializes")
    }

    /// Sets the MAC (`committed`: the `Committed` MAC it follows).
    pub fn seal(&mut self, key: &crate::MacKey, committed: &[u8; 32]) {
        self.mac = crate::switchover::audit_mac(key, committed, &self.body());
    }

    /// Checks the MAC.
    pub fn verify(&self, key: &crate::MacKey, committed: &[u8; 32]) -> bool {
        key.verify(&[b"ferry audit", committed, &self.body()], &self.mac)
    }
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// First message of every connection (source to destination). Its
    /// layout is the same in every protocol version, so that a peer of
    /// another version can be told which versions this one speaks.
    Hello {
        /// Lowest version the sender speaks.
        min_version: u16,
        /// Highest version the sender speaks.
        max_version: u16,
        /// Connection role.
        role: Role,
        /// The source's fresh random nonce.
        nonce: [u8; 32],
    },
    /// Destination's answer to a hello: the chosen version and its own
    /// nonce. Nothing derived from the key: a stranger learns nothing.
    HelloReply {
        /// Chosen version.
        version: u16,
        /// The destination's fresh random nonce.
        nonce: [u8; 32],
    },
    /// Source's proof (of the key on a control connection, of its session
    /// on a data channel), over the handshake so far and the TLS session
    /// ([`crate::handshake`]).
    Auth {
        /// The proof.
        proof: [u8; 32],
    },
    /// The source's proof was right; the destination's own, over the
    /// handshake including `Auth`.
    Welcome {
        /// The proof.
        proof: [u8; 32],
    },
    /// The offer.
    Offer(Offer),
    /// Offer accepted.
    Accept(Accept),
    /// Refused, with a reason.
    Reject {
        /// Why.
        reason: RejectReason,
        /// Explanation.
        message: String,
    },
    /// A pre-copy round is complete (all its chunks acknowledged).
    RoundDone {
        /// Round number.
        round: u32,
        /// Pages sent in the round.
        pages: u64,
    },
    /// Switchover (guest paused on the source).
    Switchover(Switchover),
    /// Destination: every channel stopped, device state intact; its proof
    /// of the transcripts, its page evidence and the device state.
    Ready(crate::switchover::ReadyProof),
    /// Source lets go: the destination checks the MAC against its own
    /// claims, restores the device state and answers `Committed`, or
    /// refuses (`CommitRefused`).
    Commit {
        /// [`crate::switchover::commit_mac`].
        mac: [u8; 32],
    },
    /// Destination restored the device state and takes the guest: it
    /// resumes it right after sending this.
    Committed {
        /// [`crate::switchover::committed_mac`].
        mac: [u8; 32],
    },
    /// Either side gives up; the source keeps its guest.
    Abort {
        /// Why.
        reason: String,
    },
    /// Between rounds (source to destination): these data channels, named
    /// by the source's socket address, failed on the source; close them and
    /// make sure nothing more of theirs lands before answering `Fenced`.
    Fence {
        /// Source addresses of the channels.
        channels: Vec<SocketAddr>,
    },
    /// The channels of a `Fence` are closed: none of their bytes can land.
    Fenced {
        /// The same addresses.
        channels: Vec<SocketAddr>,
    },
    /// Follows an `Offer` whose option is RDMA: the source's RDMA NICs
    /// (see [`crate::rdma`]).
    RdmaOffer(crate::rdma::RdmaOffer),
    /// Follows the `Accept` of an RDMA offer: the destination's listeners
    /// and the keys of its registered guest memory.
    RdmaAccept(crate::rdma::RdmaAccept),
    /// The destination checked `Commit` but will not run the guest (its
    /// device state could not be restored): the source may resume its own.
    CommitRefused {
        /// Why.
        reason: String,
        /// [`crate::switchover::refusal_mac`].
        mac: [u8; 32],
    },
    /// Source, between rounds: measures the control round trip (the pause
    /// budget counts three).
    Ping {
        /// Echoed.
        seq: u64,
    },
    /// Destination: the answer to `Ping`.
    Pong {
        /// The ping's.
        seq: u64,
    },
    /// Source, after `Committed`: the audit of its frozen memory.
    Audit(AuditReport),
    /// A relay's request (`ferry relay`), in place of `Offer`: the
    /// destination answers `Accept` or `Reject` (see [`crate::relay`]).
    RelayOffer(crate::relay::RelayOffer),
    /// Relay source: the hypervisor opened stream `stream` (accept order
    /// from 0); the destination connects it to `deliver_to` in that order.
    Open {
        /// Stream id.
        stream: u32,
    },
    /// Relay destination: stream `stream` is connected.
    Opened {
        /// Stream id.
        stream: u32,
    },
    /// Relay destination: stream `stream` could not be connected; the
    /// relay fails.
    OpenFailed {
        /// Stream id.
        stream: u32,
        /// Why.
        error: String,
    },
    /// Relay, either way: the receiver of a stream direction wrote
    /// `delivered` bytes into its hypervisor socket (the sender's window
    /// moves), and with `finished` it checked the `Fin` and passed the EOF on.
    Credit {
        /// Stream id.
        stream: u32,
        /// Direction.
        dir: crate::relay::Dir,
        /// Bytes delivered.
        delivered: u64,
        /// End delivered and checked.
        finished: bool,
    },
    /// Relay, either way: the sender's hypervisor closed this direction
    /// after `length` bytes, whose keyed digest is `digest`.
    Fin {
        /// Stream id.
        stream: u32,
        /// Direction.
        dir: crate::relay::Dir,
        /// Bytes in the direction.
        length: u64,
        /// [`crate::relay::StreamDigest::finish`].
        digest: [u8; 16],
    },
    /// Relay: every stream opened is done, each way (source first, the
    /// destination confirms).
    RelayEnd {
        /// Streams opened.
        streams: u32,
    },
}

impl Msg {
    /// Short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::HelloReply { .. } => "HelloReply",
            Msg::Auth { .. } => "Auth",
            Msg::Welcome { .. } => "Welcome",
            Msg::Offer(_) => "Offer",
            Msg::Accept(_) => "Accept",
            Msg::Reject { .. } => "Reject",
            Msg::RoundDone { .. } => "RoundDone",
            Msg::Switchover(_) => "Switchover",
            Msg::Ready(_) => "Ready",
            Msg::Commit { .. } => "Commit",
            Msg::Committed { .. } => "Committed",
            Msg::CommitRefused { .. } => "CommitRefused",
            Msg::Ping { .. } => "Ping",
            Msg::Pong { .. } => "Pong",
            Msg::Audit(_) => "Audit",
            Msg::Abort { .. } => "Abort",
            Msg::RdmaOffer(_) => "RdmaOffer",
            Msg::RdmaAccept(_) => "RdmaAccept",
            Msg::Fence { .. } => "Fence",
            Msg::Fenced { .. } => "Fenced",
            Msg::RelayOffer(_) => "RelayOffer",
            Msg::Open { .. } => "Open",
            Msg::Opened { .. } => "Opened",
            Msg::OpenFailed { .. } => "OpenFailed",
            Msg::Credit { .. } => "Credit",
            Msg::Fin { .. } => "Fin",
            Msg::RelayEnd { .. } => "RelayEnd",
        }
    }

    /// Encodes header and body (a frame before authentication: no tag).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_frame(None)
    }

    /// Encodes header and body, and with `tags` (after authentication) the
    /// [`FLAG_TAGGED`] flag and the frame's tag.
    pub fn encode_frame(&self, tags: Option<&mut crate::handshake::ControlTags>) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("control messages always serialize");
        let len = u32::try_from(body.len()).expect("control message below 4 GiB");
        let h = ControlHeader {
            magic: CONTROL_MAGIC,
            len: U32::new(len),
            crc32: U32::new(crc32fast::hash(&body)),
            flags: U32::new(if tags.is_some() { FLAG_TAGGED } else { 0 }),
        };
        let mut out = Vec::with_capacity(16 + body.len() + crate::handshake::TAG_LEN);
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&body);
        if let Some(t) = tags {
            let tag = t.seal(&out[..16], &out[16..]);
            out.extend_from_slice(&tag);
        }
        out
    }

    /// Checks a control header against `limit`; returns the body length and CRC.
    pub fn decode_header(bytes: &[u8; 16], limit: u32) -> Result<(u32, u32)> {
        Self::decode_head(bytes, limit).map(|h| (h.len, h.crc))
    }

    /// Checks a control header against `limit` and its flags.
    pub fn decode_head(bytes: &[u8; 16], limit: u32) -> Result<FrameHead> {
        let h = ControlHeader::read_from_bytes(bytes).expect("16 bytes");
        if h.magic != CONTROL_MAGIC {
            return Err(WireError::BadMagic {
                what: "control frame",
                expected: CONTROL_MAGIC,
                found: h.magic,
            });
        }
        if h.len.get() > limit {
            return Err(WireError::TooLarge {
                field: "control message length",
                len: h.len.get().into(),
                limit: limit.into(),
            });
        }
        let flags = h.flags.get();
        if flags & !FLAG_TAGGED != 0 {
            return Err(WireError::Invalid {
                field: "control frame flags",
                detail: format!("unknown flags {:#x}", flags & !FLAG_TAGGED),
            });
        }
        Ok(FrameHead {
            len: h.len.get(),
            crc: h.crc32.get(),
            tagged: flags & FLAG_TAGGED != 0,
        })
    }

    /// Checks the body's CRC and decodes it.
    pub fn decode_body(body: &[u8], crc: u32) -> Result<Msg> {
        let computed = crc32fast::hash(body);
        if computed != crc {
            return Err(WireError::CrcMismatch {
                what: "control message",
                seq: 0,
                expected: crc,
                computed,
            });
        }
        let (msg, rest) =
            postcard::take_from_bytes::<Msg>(body).map_err(|e| WireError::Malformed {
                what: "control message",
                detail: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(WireError::Malformed {
                what: "control message",
                detail: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(msg)
    }
}

/// Runs the control decoders on arbitrary bytes; used by the fuzz target.
pub fn fuzz_decode(data: &[u8]) {
    if data.len() >= 16 {
        let head: &[u8; 16] = data[..16].try_into().expect("16 bytes");
        if let Ok(h) = Msg::decode_head(head, MAX_CONTROL_BODY) {
            let rest = &data[16..];
            if rest.len() >= h.rest_len() {
                let body = &rest[..h.len as usize];
                if h.tagged {
                    let tag: [u8; 16] = rest[h.len as usize..h.rest_len()]
                        .try_into()
                        .expect("16 bytes");
                    let mut t =
                        crate::handshake::ControlTags::new(crate::MacKey::from_bytes([0; 32]));
                    let _ = t.open(head, body, &tag);
                }
                let _ = Msg::decode_body(body, h.crc);
            }
        }
    }
    let _ = postcard::from_bytes::<Msg>(data);
}

/// Decodes a control message body from arbitrary bytes and runs the checks
/// a peer's offer goes through (the memory layout, the RDMA offer, the RDMA
/// accept against a layout); used by the fuzz target. Never panics.
pub fn fuzz_check(data: &[u8]) {
    let layout = MemoryLayout {
        page_size: crate::layout::PAGE_SIZE,
        regions: vec![crate::layout::RegionDesc {
            gpa: 0,
            size: 64 << 20,
        }],
    };
    match postcard::from_bytes::<Msg>(data) {
        Ok(Msg::Offer(o)) => {
            if o.layout.validate().is_ok() {
                let _ = o.layout.check_run(0, 1);
                let _ = o.layout.total_pages();
            }
            let _ = o.option.to_string();
        }
        Ok(Msg::RdmaOffer(o)) => {
            let _ = crate::rdma::check_offer(&o);
            let _ = crate::rdma::shared_endpoints(&o.endpoints, &o.endpoints);
        }
        Ok(Msg::RdmaAccept(a)) => {
            let _ = crate::rdma::check_accept(&a, &layout);
        }
        Ok(Msg::Audit(r)) => {
            let _ = r.verify(&crate::MacKey::from_bytes([0; 32]), &[0; 32]);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionDesc, PAGE_SIZE};

    fn roundtrip(m: &Msg) -> Msg {
        let b = m.encode();
        let head: [u8; 16] = b[..16].try_into().unwrap();
        let (len, crc) = Msg::decode_header(&head, MAX_CONTROL_BODY).unwrap();
        assert_eq!(len as usize, b.len() - 16);
        Msg::decode_body(&b[16..], crc).unwrap()
    }

    #[test]
    fn tagged_frames_carry_the_flag_and_a_tag_that_opens_in_order() {
        use crate::handshake::ControlTags;
        let key = crate::MacKey::from_bytes([4; 32]);
        let (mut tx, mut rx) = (ControlTags::new(key.clone()), ControlTags::new(key));
        for round in 0..3 {
            let b = Msg::RoundDone { round, pages: 1 }.encode_frame(Some(&mut tx));
            let head: [u8; 16] = b[..16].try_into().unwrap();
            let h = Msg::decode_head(&head, MAX_CONTROL_BODY).unwrap();
            assert!(h.tagged);
            assert_eq!(h.rest_len(), b.len() - 16);
            let (body, tag) = b[16..].split_at(h.len as usize);
            rx.open(&head, body, tag.try_into().unwrap()).unwrap();
            assert_eq!(
                Msg::decode_body(body, h.crc).unwrap(),
                Msg::RoundDone { round, pages: 1 }
            );
        }
        let plain = Msg::Abort { reason: "x".into() }.encode();
        let head: [u8; 16] = plain[..16].try_into().unwrap();
        assert!(!Msg::decode_head(&head, MAX_CONTROL_BODY).unwrap().tagged);
        let mut odd = head;
        odd[12] = 2;
        let e = Msg::decode_head(&odd, MAX_CONTROL_BODY).unwrap_err();
        assert!(e.to_string().contains("unknown flags 0x2"), "{e}");
    }

    #[test]
    fn every_message_round_trips() {
        let offer = Offer {
            layout: MemoryLayout {
                page_size: PAGE_SIZE,
                regions: vec![RegionDesc {
                    gpa: 0,
                    size: 1 << 20,
                }],
            },
            guest: GuestConfig {
                vcpus: 2,
                cpu_vendor: "GenuineIntel".into(),
                device_state_format: "x".into(),
            },
            option: PerformanceOption::Tcp,
            channels: 1,
        };
        let msgs = vec![
            Msg::Hello {
                min_version: 1,
                max_version: 1,
                role: Role::Control,
                nonce: [7; 32],
            },
            Msg::HelloReply {
                version: 1,
                nonce: [1; 32],
            },
            Msg::Auth { proof: [3; 32] },
            Msg::Welcome { proof: [2; 32] },
            Msg::Offer(offer.clone()),
            Msg::Offer(Offer {
                option: PerformanceOption::Compression { codec: 2, level: 3 },
                ..offer
            }),
            Msg::Accept(Accept {
                migration_id: 9,
                interfaces: vec![NetInterface {
                    name: "eth1".into(),
                    addr: "10.200.1.2".parse().unwrap(),
                    prefix: 24,
                    speed_mbps: Some(25_000),
                    rdma: Some("rxe0".into()),
                }],
            }),
            Msg::Reject {
                reason: RejectReason::Busy,
                message: "full".into(),
            },
            Msg::RoundDone {
                round: 3,
                pages: 100,
            },
            Msg::Switchover(Switchover {
                device_state: vec![1, 2, 3],
                device_state_hash: [5; 32],
                verify_full: true,
            }),
            Msg::Ready(crate::switchover::ReadyProof {
                transcript: [1; 32],
                evidence: [2; 32],
                device_state: [3; 32],
                memory: Some([4; 32]),
            }),
            Msg::Commit { mac: [6; 32] },
            Msg::Committed { mac: [7; 32] },
            Msg::CommitRefused {
                reason: "restore failed".into(),
                mac: [8; 32],
            },
            Msg::Ping { seq: 3 },
            Msg::Pong { seq: 3 },
            Msg::Audit(AuditReport {
                result: AuditResult::Failed,
                pages: 10,
                mismatched_pages: 1,
                first_mismatch: Some(4096),
                duration_us: 1500,
                pause_predicted: Default::default(),
                pause_actual: PauseMicros {
                    final_copy: 1000,
                    device_state: 500,
                    verification: 250,
                    commit_round_trip: 125,
                },
                mac: [9; 32],
            }),
            Msg::Abort { reason: "x".into() },
            Msg::RdmaOffer(crate::rdma::RdmaOffer {
                endpoints: vec![crate::rdma::RdmaEndpoint {
                    addr: "10.77.10.2".parse().unwrap(),
                    prefix: 24,
                    device: "rxe0".into(),
                    port: 0,
                }],
            }),
            Msg::RdmaAccept(crate::rdma::RdmaAccept {
                channels: vec![crate::rdma::RdmaChannel {
                    endpoint: crate::rdma::RdmaEndpoint {
                        addr: "fd00::1".parse().unwrap(),
                        prefix: 64,
                        device: "mlx5_0".into(),
                        port: 6601,
                    },
                    regions: vec![crate::rdma::RdmaRegionKey {
                        len: 1 << 20,
                        rkey: 0x1234,
                    }],
                }],
            }),
            Msg::Fence {
                channels: vec!["10.200.3.1:40000".parse().unwrap()],
            },
            Msg::Fenced {
                channels: vec!["[fd00::1]:40001".parse().unwrap()],
            },
            Msg::RelayOffer(crate::relay::RelayOffer {
                deliver_to: "127.0.0.1:4444".into(),
                max_streams: 65,
                window: 8 << 20,
                chunk: 256 << 10,
                option: PerformanceOption::Compression { codec: 1, level: 0 },
                channels: 4,
            }),
            Msg::Open { stream: 2 },
            Msg::Opened { stream: 2 },
            Msg::OpenFailed {
                stream: 2,
                error: "connection refused".into(),
            },
            Msg::Credit {
                stream: 1,
                dir: crate::relay::Dir::Back,
                delivered: 1 << 40,
                finished: true,
            },
            Msg::Fin {
                stream: 0,
                dir: crate::relay::Dir::Forward,
                length: 12345,
                digest: [3; 16],
            },
            Msg::RelayEnd { streams: 5 },
        ];
        for m in msgs {
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn audit_reports_are_sealed_to_the_commit() {
        let key = crate::MacKey::from_bytes([1; 32]);
        let mut r = AuditReport {
            result: AuditResult::Passed,
            pages: 10,
            mismatched_pages: 0,
            first_mismatch: None,
            duration_us: 3000,
            pause_predicted: Default::default(),
            pause_actual: Default::default(),
            mac: [0; 32],
        };
        r.seal(&key, &[2; 32]);
        assert!(r.verify(&key, &[2; 32]));
        assert!(
            !r.verify(&key, &[3; 32]),
            "bound to the Committed it follows"
        );
        let mut forged = r.clone();
        forged.result = AuditResult::Failed;
        assert!(!forged.verify(&key, &[2; 32]), "bound to its content");
    }

    #[test]
    fn options_display_their_codec() {
        assert_eq!(PerformanceOption::Tcp.to_string(), "tcp");
        let z = PerformanceOption::Compression { codec: 2, level: 1 };
        assert_eq!(z.to_string(), "compression (zstd:1)");
        let l = PerformanceOption::Compression { codec: 1, level: 0 };
        assert_eq!(l.to_string(), "compression (lz4)");
        let u = PerformanceOption::Compression { codec: 9, level: 0 };
        assert_eq!(u.to_string(), "compression (codec id 9)");
    }

    #[test]
    fn control_frames_are_checked_before_decoding() {
        let mut b = Msg::Welcome { proof: [0; 32] }.encode();
        let head: [u8; 16] = b[..16].try_into().unwrap();
        let e = Msg::decode_header(&head, 0).unwrap_err().to_string();
        assert!(e.contains("control message length"), "{e}");
        b[0] = b'X';
        let head: [u8; 16] = b[..16].try_into().unwrap();
        assert!(Msg::decode_header(&head, 100)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let b = Msg::Abort {
            reason: "hello".into(),
        }
        .encode();
        let mut body = b[16..].to_vec();
        let crc = crc32fast::hash(&body);
        body[2] ^= 0xff;
        assert!(Msg::decode_body(&body, crc)
            .unwrap_err()
            .to_string()
            .contains("CRC mismatch"));
        let junk = [250u8, 1, 2];
        assert!(Msg::decode_body(&junk, crc32fast::hash(&junk))
            .unwrap_err()
            .to_string()
            .contains("malformed"));
    }
}
