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
//!         registers every guest region once per device (remote write)
//! D -> S  Accept { .. }
//! D -> S  RdmaAccept { channels: [{ endpoint (with port), regions: [{addr,len,rkey}] }] }
//! S       checks every channel's regions against the offered layout
//!         (same count, same lengths) and refuses anything else
//! S       registers every guest region once per local device, connects one
//!         RC queue pair per channel (rdma_cm, bound to the paired local NIC)
//! ```
//!
//! Data path (per channel): RDMA WRITEs from source guest memory into
//! destination guest memory, then a SEND carrying the chunk's descriptor (the
//! 32-byte chunk header and its run table, zero runs included); the
//! destination validates the runs, zeroes the zero runs and answers with a
//! SEND of a 16-byte ack. See docs/protocol.md ("RDMA").

use std::net::IpAddr;

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
/// WRITEs for that region may land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaRegionKey {
    /// Destination virtual address of the region's first byte.
    pub addr: u64,
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
            if k.len != r.size || k.addr.checked_add(k.len).is_none() {
                return Err(WireError::Invalid {
                    field: "RDMA region key",
                    detail: format!(
                        "channel {}: region {i} registered as {:#x}+{:#x} (rkey {:#x}), \
                         the offered region is {:#x} bytes",
                        c.endpoint, k.addr, k.len, k.rkey, r.size
                    ),
                });
            }
        }
    }
    Ok(())
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

    fn keys(addr: u64) -> Vec<RdmaRegionKey> {
        vec![
            RdmaRegionKey {
                addr,
                len: 1 << 20,
                rkey: 1,
            },
            RdmaRegionKey {
                addr: addr + (1 << 30),
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
                regions: keys(0x7f00_0000_0000),
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
                regions: keys(0x7f00_0000_0000),
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

        let mut wrap = good.clone();
        wrap.channels[0].regions[0].addr = u64::MAX - 10;
        assert!(check_accept(&wrap, &l).is_err());

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
}
