//! What the RDMA performance option exchanges on the control connection,
//! and the checks both sides make on it. Always compiled (a destination
//! built without RDMA support still decodes, and refuses, an RDMA offer);
//! the data path itself is `ferry_transport::rdma` (feature `rdma`).
//!
//! ```text
//! S -> D  Offer { option: Rdma, .. }
//! S -> D  RdmaOffer { endpoints }           source's RDMA NICs (addr/prefix/device)
//! D       validates; needs an RDMA NIC on a subnet shared with the source,
//!         else Reject(Option) -- before any memory is allocated
//! D       allocates guest memory, binds one rdma_cm listener per shared NIC,
//!         registers every guest region once per device (remote write,
//!         zero-based) in protection domains of this migration only
//! D -> S  Accept { migration_id, .. }
//! D -> S  RdmaAccept { channels: [{ endpoint (with port), regions: [{len,rkey}] }] }
//! S       checks every channel's regions against the offered layout
//!         (same count, same lengths) and refuses anything else
//! S       registers every guest region once per local device, connects one
//!         RC queue pair per channel (rdma_cm, bound to the paired local NIC),
//!         each request carrying the channel's token as private data
//! D       accepts a request only with the token of its channel, from an
//!         address the source offered, once; refuses (rejects) all others
//! ```
//!
//! Both messages travel on the control connection, which the RDMA option
//! requires to be TLS (and every control message is tagged with the
//! session's control keys): region keys never cross in the clear, and no
//! host address crosses at all (regions are zero-based: writes address
//! offsets).
//!
//! # Connection token (rdma_cm private data, 48 bytes)
//!
//! ```text
//!  0       4    5    6         8                16                              48
//!  +-------+----+----+---------+----------------+-------------------------------+
//!  | FRDM  | v1 | 0  | channel | migration id   | token = HMAC-SHA256(data      |
//!  |       |    |    | u16 LE  | u64 LE         |  channel key, label|mid|chan) |
//!  +-------+----+----+---------+----------------+-------------------------------+
//! ```
//!
//! The data-channel key comes from the session's HKDF (see
//! `ferry_proto::keys`), so only the two authenticated ends can make a
//! token; it is bound to this migration and this channel. It crosses the
//! RDMA network in the clear (rdma_cm has no encryption), so it is
//! single-use: once its channel is connected, the same token is refused.
//!
//! Data path (per channel): RDMA WRITEs from source guest memory into
//! destination guest memory, then a SEND carrying the chunk's descriptor (the
//! 32-byte chunk header and its run table, zero runs included); the
//! destination validates the runs, zeroes the zero runs and answers with a
//! SEND of a 16-byte ack. See docs/protocol.md ("RDMA").

use std::net::IpAddr;

use crate::keys::MacKey;
use serde::{Deserialize, Serialize};

use crate::error::{Result, WireError};
use crate::layout::MemoryLayout;
use crate::net::MAX_CHANNELS;

/// Most RDMA channels (device pairs) one migration uses: the channel limit
/// of every option ([`MAX_CHANNELS`]), which is also the width of the end
/// frame's lost-channel mask.
pub const MAX_RDMA_CHANNELS: usize = MAX_CHANNELS as usize;
const _: () = assert!(MAX_RDMA_CHANNELS <= 64, "the lost-channel mask is a u64");

/// Bytes of receive buffers the destination registers per RDMA channel: 32
/// posted descriptor receives of a full descriptor (header and a run table
/// of [`crate::wire::MAX_RUNS`] runs) and 32 ack buffers. Counted in the
/// migration's reservation.
pub const RDMA_CHANNEL_BUFFERS: u64 = 32
    * (crate::wire::HEADER_LEN as u64 + crate::wire::MAX_RUNS as u64 * 16)
    + 32 * crate::wire::ACK_LEN as u64;

/// One RDMA-capable NIC: its address, subnet, device, and (in an
/// [`RdmaAccept`]) the port its rdma_cm listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaEndpoint {
    /// IP address of the NIC the RDMA device sits on (RoCE).
    pub addr: IpAddr,
    /// Prefix length of its subnet.
    pub prefix: u8,
    /// RDMA device name, e.g. `mlx5_0` or `rxe0` (for messages).
    pub device: String,
    /// rdma_cm port (0 in an offer).
    pub port: u16,
}

impl RdmaEndpoint {
    /// Whether `other` lies on the same subnet (each address inside the
    /// other's prefix; a prefix of 0 means unknown and never matches).
    pub fn shares_subnet(&self, other: &RdmaEndpoint) -> bool {
        crate::net::shares_subnet(self.addr, self.prefix, other.addr, other.prefix)
    }
}

impl std::fmt::Display for RdmaEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}/{})", self.device, self.addr, self.prefix)
    }
}

/// A destination guest region as registered on one device: where RDMA
/// WRITEs for that region may land. The registration is zero-based: a
/// write's remote address is its offset in the region (no host address of
/// the destination is ever sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaRegionKey {
    /// Registered length (the region's size).
    pub len: u64,
    /// Remote key of the registration.
    pub rkey: u32,
}

/// One channel the destination offers: a listener on one of its RDMA NICs
/// and the keys of every guest region registered on that NIC's device, in
/// layout order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaChannel {
    /// The listener (address, port) and its device.
    pub endpoint: RdmaEndpoint,
    /// One key per region of the offered layout, in the same order.
    pub regions: Vec<RdmaRegionKey>,
}

/// Follows an `Offer` whose option is RDMA: the source's RDMA NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaOffer {
    /// The source's RDMA endpoints (port 0).
    pub endpoints: Vec<RdmaEndpoint>,
}

/// Follows the `Accept` of an RDMA offer: the channels to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaAccept {
    /// One per destination RDMA NIC that shares a subnet with the source.
    pub channels: Vec<RdmaChannel>,
}

/// Destination endpoints that share a subnet with at least one source
/// endpoint, in the destination's order, without duplicate addresses.
pub fn shared_endpoints(ours: &[RdmaEndpoint], theirs: &[RdmaEndpoint]) -> Vec<RdmaEndpoint> {
    let mut out: Vec<RdmaEndpoint> = Vec::new();
    for e in ours {
        if out.iter().any(|o| o.addr == e.addr) {
            continue;
        }
        if theirs.iter().any(|t| t.shares_subnet(e)) {
            out.push(e.clone());
        }
    }
    out.truncate(MAX_RDMA_CHANNELS);
    out
}

/// For each destination channel, the local endpoint to connect from: the
/// least used one on the same subnet. `None` where no local endpoint shares
/// the channel's subnet.
pub fn pair_channels(
    local: &[RdmaEndpoint],
    channels: &[RdmaChannel],
) -> Vec<Option<RdmaEndpoint>> {
    let mut uses = vec![0usize; local.len()];
    channels
        .iter()
        .map(|c| {
            let best = local
                .iter()
                .enumerate()
                .filter(|(_, l)| l.shares_subnet(&c.endpoint))
                .min_by_key(|(i, _)| uses[*i])
                .map(|(i, l)| (i, l.clone()));
            best.map(|(i, l)| {
                uses[i] += 1;
                l
            })
        })
        .collect()
}

/// Checks what the source offers: at most [`MAX_RDMA_CHANNELS`]
/// endpoints, none with a prefix longer than its address.
pub fn check_offer(offer: &RdmaOffer) -> Result<()> {
    if offer.endpoints.len() > 256 {
        return Err(WireError::TooLarge {
            field: "RDMA endpoint count",
            len: offer.endpoints.len() as u64,
            limit: 256,
        });
    }
    for e in &offer.endpoints {
        let width = if e.addr.is_ipv4() { 32 } else { 128 };
        if e.prefix > width {
            return Err(WireError::Invalid {
                field: "RDMA endpoint",
                detail: format!("{e}: prefix longer than the address"),
            });
        }
    }
    Ok(())
}

/// Checks the destination's channels against the layout the source
/// offered: 1 to [`MAX_RDMA_CHANNELS`] channels, each with exactly one key
/// per region, each as long as its region and not wrapping the address
/// space. A destination that advertises anything else (a region it did not
/// register whole, a missing key) is refused before any page moves.
pub fn check_accept(accept: &RdmaAccept, layout: &MemoryLayout) -> Result<()> {
    if accept.channels.is_empty() {
        return Err(WireError::Invalid {
            field: "RDMA accept",
            detail: "the destination offered no RDMA channel".into(),
        });
    }
    if accept.channels.len() > MAX_RDMA_CHANNELS {
        return Err(WireError::TooLarge {
            field: "RDMA channel count",
            len: accept.channels.len() as u64,
            limit: MAX_RDMA_CHANNELS as u64,
        });
    }
    for c in &accept.channels {
        if c.regions.len() != layout.regions.len() {
            return Err(WireError::Invalid {
                field: "RDMA region keys",
                detail: format!(
                    "channel {} carries {} region keys for a layout of {} regions",
                    c.endpoint,
                    c.regions.len(),
                    layout.regions.len()
                ),
            });
        }
        for (i, (k, r)) in c.regions.iter().zip(&layout.regions).enumerate() {
            if k.len != r.size {
                return Err(WireError::Invalid {
                    field: "RDMA region key",
                    detail: format!(
                        "channel {}: region {i} registered with {:#x} bytes (rkey {:#x}), \
                         the offered region is {:#x} bytes",
                        c.endpoint, k.len, k.rkey, r.size
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Bytes of the private data a source puts in each RDMA connection request.
pub const CM_PRIVATE_DATA_LEN: usize = 48;
const CM_MAGIC: [u8; 4] = *b"FRDM";
const CM_VERSION: u8 = 1;

/// The token of `channel` of migration `migration_id`: HMAC-SHA256 under the
/// session's data-channel key.
pub fn channel_token(key: &MacKey, migration_id: u64, channel: u16) -> [u8; 32] {
    key.mac(&[
        b"ferry rdma-cm token",
        &migration_id.to_le_bytes(),
        &channel.to_le_bytes(),
    ])
}

/// What the source sends as private data of channel `channel`'s connection
/// request (layout in the module docs).
pub fn cm_private_data(key: &MacKey, migration_id: u64, channel: u16) -> [u8; CM_PRIVATE_DATA_LEN] {
    let mut d = [0u8; CM_PRIVATE_DATA_LEN];
    d[..4].copy_from_slice(&CM_MAGIC);
    d[4] = CM_VERSION;
    d[6..8].copy_from_slice(&channel.to_le_bytes());
    d[8..16].copy_from_slice(&migration_id.to_le_bytes());
    d[16..].copy_from_slice(&channel_token(key, migration_id, channel));
    d
}

/// Why the destination refused an RDMA connection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CmRefusal {
    /// No private data (or all zero): not a Ferry source of this session.
    NoToken,
    /// Private data that is not a Ferry connection token (magic, version).
    Malformed,
    /// A token for another migration.
    OtherMigration,
    /// A token for another channel, or a channel this migration does not have.
    OtherChannel,
    /// The token does not verify under this session's key.
    BadToken,
    /// The request came from an address the source did not offer.
    UnknownPeer,
    /// The channel is connected already (a replayed token).
    ChannelConnected,
    /// The migration's RDMA exposure was revoked.
    Revoked(RevokeReason),
}

impl std::fmt::Display for CmRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmRefusal::NoToken => f.write_str("no token in the request's private data"),
            CmRefusal::Malformed => f.write_str("private data is not a Ferry connection token"),
            CmRefusal::OtherMigration => f.write_str("token of another migration"),
            CmRefusal::OtherChannel => f.write_str("token of another channel"),
            CmRefusal::BadToken => f.write_str("token does not verify under this session's key"),
            CmRefusal::UnknownPeer => f.write_str("from an address the source did not offer"),
            CmRefusal::ChannelConnected => {
                f.write_str("channel already connected (token replayed)")
            }
            CmRefusal::Revoked(r) => write!(f, "RDMA access revoked ({r})"),
        }
    }
}

/// Why a migration's RDMA exposure ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevokeReason {
    /// The source's switchover: every chunk was acknowledged, nothing more
    /// may land.
    Switchover,
    /// The migration failed or was aborted (either side).
    Abort,
    /// Every channel ended or failed.
    ChannelsEnded,
}

impl std::fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RevokeReason::Switchover => "switchover",
            RevokeReason::Abort => "migration aborted",
            RevokeReason::ChannelsEnded => "every channel ended",
        })
    }
}

/// The destination's admission of RDMA connections for one migration, and
/// the lifetime of its remote-write exposure:
///
/// ```text
///            admit(ch, token ok)         revoke(reason)
///  Open{} ────────────────────▶ Open{ch} ─────────────────▶ Revoked(reason)
///    │  refused: no/bad token, other      (regions deregistered,
///    │  migration/channel, unknown peer,   every request refused)
///    │  channel connected (replay)
///    └──────────── revoke(reason) ─────────────────────────▶ Revoked(reason)
/// ```
///
/// Each channel admits exactly one connection; a refused request changes
/// nothing (it takes no channel's place). Revocation is final.
#[derive(Debug)]
pub struct Admission {
    key: MacKey,
    migration_id: u64,
    channels: u16,
    peers: Vec<IpAddr>,
    connected: u64,
    refused: u64,
    revoked: Option<RevokeReason>,
}

impl Admission {
    /// Admission for `channels` channels of migration `migration_id`,
    /// checking tokens under `key` (the session's data-channel key) and
    /// source addresses against `peers` (the source's offered endpoints).
    pub fn new(key: MacKey, migration_id: u64, channels: usize, peers: Vec<IpAddr>) -> Self {
        Admission {
            key,
            migration_id,
            channels: channels.min(MAX_RDMA_CHANNELS) as u16,
            peers,
            connected: 0,
            refused: 0,
            revoked: None,
        }
    }

    /// Decides on a connection request for `channel` from `peer` carrying
    /// `private_data`; on `Ok` the channel counts as connected.
    pub fn admit(
        &mut self,
        channel: u16,
        peer: Option<IpAddr>,
        private_data: &[u8],
    ) -> std::result::Result<(), CmRefusal> {
        let r = self.check(channel, peer, private_data);
        match r {
            Ok(()) => self.connected |= 1 << channel,
            Err(_) => self.refused += 1,
        }
        r
    }

    fn check(
        &self,
        channel: u16,
        peer: Option<IpAddr>,
        d: &[u8],
    ) -> std::result::Result<(), CmRefusal> {
        if let Some(r) = self.revoked {
            return Err(CmRefusal::Revoked(r));
        }
        if channel >= self.channels {
            return Err(CmRefusal::OtherChannel);
        }
        if d.iter().all(|&b| b == 0) {
            return Err(CmRefusal::NoToken);
        }
        if d.len() < CM_PRIVATE_DATA_LEN || d[..4] != CM_MAGIC || d[4] != CM_VERSION {
            return Err(CmRefusal::Malformed);
        }
        let ch = u16::from_le_bytes([d[6], d[7]]);
        let mid = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
        if mid != self.migration_id {
            return Err(CmRefusal::OtherMigration);
        }
        if ch != channel {
            return Err(CmRefusal::OtherChannel);
        }
        let token: &[u8; 32] = d[16..48].try_into().expect("32 bytes");
        if !self.key.verify(
            &[
                b"ferry rdma-cm token",
                &mid.to_le_bytes(),
                &ch.to_le_bytes(),
            ],
            token,
        ) {
            return Err(CmRefusal::BadToken);
        }
        if !peer.is_some_and(|p| self.peers.contains(&p)) {
            return Err(CmRefusal::UnknownPeer);
        }
        if self.connected & (1 << channel) != 0 {
            return Err(CmRefusal::ChannelConnected);
        }
        Ok(())
    }

    /// Ends the exposure; `true` only for the call that ended it.
    pub fn revoke(&mut self, reason: RevokeReason) -> bool {
        if self.revoked.is_some() {
            return false;
        }
        self.revoked = Some(reason);
        true
    }

    /// Why the exposure ended, once it has.
    pub fn revoked(&self) -> Option<RevokeReason> {
        self.revoked
    }

    /// Mask of the channels admitted so far.
    pub fn connected(&self) -> u64 {
        self.connected
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The migration this admission is for.
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RegionDesc, PAGE_SIZE};

    fn ep(addr: &str, prefix: u8, dev: &str) -> RdmaEndpoint {
        RdmaEndpoint {
            addr: addr.parse().unwrap(),
            prefix,
            device: dev.into(),
            port: 0,
        }
    }

    fn layout() -> MemoryLayout {
        MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![
                RegionDesc {
                    gpa: 0,
                    size: 1 << 20,
                },
                RegionDesc {
                    gpa: 4 << 30,
                    size: 2 << 20,
                },
            ],
        }
    }

    fn keys() -> Vec<RdmaRegionKey> {
        vec![
            RdmaRegionKey {
                len: 1 << 20,
                rkey: 1,
            },
            RdmaRegionKey {
                len: 2 << 20,
                rkey: 2,
            },
        ]
    }

    #[test]
    fn endpoints_pair_by_subnet() {
        let dst = [
            ep("10.77.10.1", 24, "rxe0"),
            ep("10.77.11.1", 24, "rxe1"),
            ep("192.168.5.1", 24, "mlx5_0"),
        ];
        let src = [ep("10.77.10.2", 24, "rxe0"), ep("10.77.11.2", 24, "rxe1")];
        let shared = shared_endpoints(&dst, &src);
        assert_eq!(shared, dst[..2].to_vec());
        assert!(shared_endpoints(&dst, &[ep("172.16.0.2", 16, "x")]).is_empty());
        // A prefix of 0 is "unknown", never a match.
        assert!(shared_endpoints(&dst, &[ep("10.77.10.2", 0, "x")]).is_empty());
        let chans: Vec<RdmaChannel> = shared
            .into_iter()
            .map(|endpoint| RdmaChannel {
                endpoint,
                regions: keys(),
            })
            .collect();
        let pairs = pair_channels(&src, &chans);
        assert_eq!(pairs, vec![Some(src[0].clone()), Some(src[1].clone())]);
        assert_eq!(pair_channels(&src[..1], &chans)[1], None);
    }

    #[test]
    fn accept_must_cover_the_layout_exactly() {
        let l = layout();
        let good = RdmaAccept {
            channels: vec![RdmaChannel {
                endpoint: ep("10.77.10.1", 24, "rxe0"),
                regions: keys(),
            }],
        };
        check_accept(&good, &l).unwrap();

        let mut short = good.clone();
        short.channels[0].regions[1].len -= PAGE_SIZE;
        let e = check_accept(&short, &l).unwrap_err().to_string();
        assert!(e.contains("region 1"), "{e}");

        let mut missing = good.clone();
        missing.channels[0].regions.pop();
        let e = check_accept(&missing, &l).unwrap_err().to_string();
        assert!(e.contains("1 region keys for a layout of 2"), "{e}");

        let mut long = good.clone();
        long.channels[0].regions[0].len += PAGE_SIZE;
        assert!(check_accept(&long, &l).is_err());

        let none = RdmaAccept { channels: vec![] };
        assert!(check_accept(&none, &l)
            .unwrap_err()
            .to_string()
            .contains("no RDMA channel"));
    }

    #[test]
    fn offers_are_checked() {
        check_offer(&RdmaOffer {
            endpoints: vec![ep("10.0.0.1", 24, "rxe0"), ep("fd00::1", 64, "rxe1")],
        })
        .unwrap();
        assert!(check_offer(&RdmaOffer {
            endpoints: vec![ep("10.0.0.1", 33, "rxe0")],
        })
        .is_err());
    }

    #[test]
    fn region_keys_carry_no_address() {
        // A region key is its length and rkey, nothing else: the wire
        // form is exactly theirs (regions are zero-based; writes address
        // offsets), so no destination host address can be in it.
        let k = RdmaRegionKey {
            len: 1 << 30,
            rkey: 0xdead_beef,
        };
        let bytes = postcard::to_allocvec(&k).unwrap();
        assert_eq!(
            bytes,
            postcard::to_allocvec(&(1u64 << 30, 0xdead_beefu32)).unwrap()
        );
        let accept = RdmaAccept {
            channels: vec![RdmaChannel {
                endpoint: ep("10.77.10.1", 24, "rxe0"),
                regions: keys(),
            }],
        };
        let wire = postcard::to_allocvec(&accept).unwrap();
        let back: RdmaAccept = postcard::from_bytes(&wire).unwrap();
        assert_eq!(back, accept);
    }

    fn admission() -> (MacKey, Admission) {
        let key = MacKey::from_bytes([7; 32]);
        let peers = vec!["10.77.10.2".parse().unwrap(), "10.77.11.2".parse().unwrap()];
        (key.clone(), Admission::new(key, 42, 2, peers))
    }

    #[test]
    fn tokens_are_bound_to_key_migration_and_channel() {
        let k = MacKey::from_bytes([7; 32]);
        let t = channel_token(&k, 42, 0);
        assert_eq!(t, channel_token(&k, 42, 0));
        assert_ne!(t, channel_token(&k, 42, 1));
        assert_ne!(t, channel_token(&k, 43, 0));
        assert_ne!(t, channel_token(&MacKey::from_bytes([8; 32]), 42, 0));
        let d = cm_private_data(&k, 42, 1);
        assert_eq!(d.len(), CM_PRIVATE_DATA_LEN);
        // Fits rdma_cm's private data of a connection request (56 bytes).
        const { assert!(CM_PRIVATE_DATA_LEN <= 56) };
        assert_eq!(&d[..4], b"FRDM");
        assert_eq!(&d[16..], &channel_token(&k, 42, 1));
    }

    #[test]
    fn admission_takes_only_the_channels_token_once() {
        let (key, mut a) = admission();
        let src = Some("10.77.10.2".parse().unwrap());
        let good0 = cm_private_data(&key, 42, 0);
        // rdma_cm pads private data with zeros to 56 bytes.
        let mut padded1 = cm_private_data(&key, 42, 1).to_vec();
        padded1.resize(56, 0);
        let refusals = [
            (0, &[][..], CmRefusal::NoToken),
            (0, &[0u8; 56][..], CmRefusal::NoToken),
            (0, &b"GET / HTTP/1.1"[..], CmRefusal::Malformed),
            (0, &good0[..40], CmRefusal::Malformed),
            (1, &good0[..], CmRefusal::OtherChannel),
            (2, &good0[..], CmRefusal::OtherChannel),
        ];
        for (ch, data, want) in refusals {
            assert_eq!(a.admit(ch, src, data), Err(want), "{data:?}");
        }
        let other_mig = cm_private_data(&key, 41, 0);
        assert_eq!(a.admit(0, src, &other_mig), Err(CmRefusal::OtherMigration));
        let forged = cm_private_data(&MacKey::from_bytes([9; 32]), 42, 0);
        assert_eq!(a.admit(0, src, &forged), Err(CmRefusal::BadToken));
        let mut flipped = good0;
        flipped[47] ^= 1;
        assert_eq!(a.admit(0, src, &flipped), Err(CmRefusal::BadToken));
        // The right token from an address the source did not offer.
        let stranger = Some("10.77.10.99".parse().unwrap());
        assert_eq!(a.admit(0, stranger, &good0), Err(CmRefusal::UnknownPeer));
        assert_eq!(a.admit(0, None, &good0), Err(CmRefusal::UnknownPeer));
        // None of that took the channel's place.
        assert_eq!(a.connected(), 0);
        assert_eq!(a.refused(), 11);
        assert_eq!(a.admit(0, src, &good0), Ok(()));
        // Replayed: refused.
        assert_eq!(a.admit(0, src, &good0), Err(CmRefusal::ChannelConnected));
        assert_eq!(
            a.admit(1, Some("10.77.11.2".parse().unwrap()), &padded1),
            Ok(())
        );
        assert_eq!(a.connected(), 0b11);
    }

    #[test]
    fn revocation_is_final() {
        let (key, mut a) = admission();
        let src = Some("10.77.10.2".parse().unwrap());
        assert_eq!(a.revoked(), None);
        assert!(a.revoke(RevokeReason::Abort));
        assert!(
            !a.revoke(RevokeReason::Switchover),
            "the first reason stays"
        );
        assert_eq!(a.revoked(), Some(RevokeReason::Abort));
        // Even the right token is refused once revoked.
        assert_eq!(
            a.admit(0, src, &cm_private_data(&key, 42, 0)),
            Err(CmRefusal::Revoked(RevokeReason::Abort))
        );
        let (_, mut b) = admission();
        assert_eq!(b.admit(0, src, &cm_private_data(&key, 42, 0)), Ok(()));
        assert!(b.revoke(RevokeReason::Switchover));
        assert_eq!(
            b.admit(
                1,
                Some("10.77.11.2".parse().unwrap()),
                &cm_private_data(&key, 42, 1)
            ),
            Err(CmRefusal::Revoked(RevokeReason::Switchover))
        );
    }
}
