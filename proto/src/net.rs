//! Network addresses as the protocol sees them: the interfaces a host
//! offers for migration traffic, subnet math, and the one pairing rule both
//! TCP multichannel and RDMA use (two addresses pair when each lies in the
//! other's subnet).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most data channels one migration may open.
pub const MAX_CHANNELS: u16 = 64;

/// An interface a host offers for migration traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// Interface name on its host (for messages and device binding).
    pub name: String,
    /// Address.
    pub addr: IpAddr,
    /// Prefix length of its subnet.
    pub prefix: u8,
    /// Link speed in Mbit/s, where the kernel reports one.
    pub speed_mbps: Option<u32>,
    /// RDMA device on this interface, if any.
    pub rdma: Option<String>,
}

impl NetInterface {
    /// The interface's subnet.
    pub fn subnet(&self) -> Cidr {
        Cidr::new(self.addr, self.prefix)
    }
}

/// Whether `a/a_prefix` and `b/b_prefix` share a subnet: each address lies
/// inside the other's prefix. A prefix of 0 means unknown and never
/// matches. The one pairing rule of TCP multichannel and RDMA.
pub fn shares_subnet(a: IpAddr, a_prefix: u8, b: IpAddr, b_prefix: u8) -> bool {
    a_prefix > 0
        && b_prefix > 0
        && Cidr::new(a, a_prefix).contains(b)
        && Cidr::new(b, b_prefix).contains(a)
}

/// An IP network, `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// The network of `addr/prefix` (host bits are cleared; the prefix is
    /// capped at the address width).
    pub fn new(addr: IpAddr, prefix: u8) -> Cidr {
        match addr {
            IpAddr::V4(a) => {
                let p = prefix.min(32);
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                Cidr {
                    addr: IpAddr::V4((u32::from(a) & mask).into()),
                    prefix: p,
                }
            }
            IpAddr::V6(a) => {
                let p = prefix.min(128);
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                Cidr {
                    addr: IpAddr::V6((u128::from(a) & mask).into()),
                    prefix: p,
                }
            }
        }
    }

    /// True if `ip` lies in this network (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new(ip, self.prefix).addr == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `ADDR/PREFIX`, or a bare address (a single host).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|e| format!("{a:?} is not an IP address: {e}"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => width,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= width => p,
                _ => return Err(format!("prefix {p:?} is not 0..={width}")),
            },
        };
        Ok(Cidr::new(addr, prefix))
    }
}

/// True for an address that can carry a migration between two hosts:
/// not loopback, unspecified, multicast or link-local (a link-local address
/// needs a scope that the other host cannot name).
pub fn routable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_link_local()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// A source interface paired with a destination interface on the same subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The source's interface.
    pub local: NetInterface,
    /// The destination's interface.
    pub remote: NetInterface,
    /// More than one local interface sits on this subnet, so the route alone
    /// would not pick `local`'s device: bind the socket to it.
    pub bind_device: bool,
}

/// Pairs source interfaces with destination interfaces on the same subnet
/// (each side's address lies in the other's subnet). Every destination
/// interface gets at most one pair; among the source interfaces on its
/// subnet the least used one is chosen, so N links on both sides make N
/// pairs. Interfaces that are not [`routable`] or have no prefix never pair.
pub fn pair_interfaces(local: &[NetInterface], remote: &[NetInterface]) -> Vec<Pair> {
    let ok = |i: &NetInterface| routable(i.addr) && i.prefix > 0;
    let pairs_with =
        |l: &NetInterface, r: &NetInterface| shares_subnet(l.addr, l.prefix, r.addr, r.prefix);
    let mut uses: HashMap<IpAddr, usize> = HashMap::new();
    let mut seen = Vec::new();
    let mut pairs = Vec::new();
    for r in remote.iter().filter(|r| ok(r)) {
        if seen.contains(&r.addr) {
            continue;
        }
        seen.push(r.addr);
        let candidates: Vec<&NetInterface> =
            local.iter().filter(|l| ok(l) && pairs_with(l, r)).collect();
        let Some(best) = candidates
            .iter()
            .min_by_key(|l| uses.get(&l.addr).copied().unwrap_or(0))
        else {
            continue;
        };
        *uses.entry(best.addr).or_default() += 1;
        let mut devices: Vec<&str> = candidates.iter().map(|l| l.name.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        pairs.push(Pair {
            local: (*best).clone(),
            remote: r.clone(),
            bind_device: devices.len() > 1,
        });
    }
    pairs
}

/// How many channels to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelCount {
    /// One per pair of interfaces (one in all when there is no pair).
    #[default]
    Auto,
    /// Exactly this many, spread round-robin over the pairs.
    Fixed(u16),
}

impl FromStr for ChannelCount {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(ChannelCount::Auto);
        }
        match s.parse::<u16>() {
            Ok(n) if (1..=MAX_CHANNELS).contains(&n) => Ok(ChannelCount::Fixed(n)),
            _ => Err(format!(
                "{s:?}: expected auto or a channel count of 1 to {MAX_CHANNELS}"
            )),
        }
    }
}

/// Which pair each channel uses: `plan[i]` is channel i's index into
/// `pairs`. With no pair the plan is empty (the caller falls back to the
/// control connection's path).
pub fn plan_channels(pairs: usize, count: ChannelCount) -> Vec<usize> {
    if pairs == 0 {
        return Vec::new();
    }
    let n = match count {
        ChannelCount::Auto => pairs.min(usize::from(MAX_CHANNELS)),
        ChannelCount::Fixed(n) => usize::from(n),
    };
    (0..n).map(|i| i % pairs).collect()
}
