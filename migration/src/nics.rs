//! Network interfaces for multichannel migration.
//!
//! * [`discover`]: this host's interfaces — addresses and prefixes
//!   (`getifaddrs`), link speed (`/sys/class/net/*/speed`), and the RDMA
//!   device sitting on each (`/sys/class/infiniband/*`).
//! * [`advertised`]: what a destination offers in its `Accept`: the usable
//!   interfaces its `--migration-network` list allows and its listener
//!   reaches.
//! * [`plan`] and [`open_channels`]: the source pairs its interfaces with the
//!   advertised ones on the same subnet and opens one data channel per pair
//!   (or `--channels N`), each socket bound to its local address — and to
//!   its device when several local interfaces share the subnet, so the
//!   route cannot pick another one. With no pair (plain loopback, a single
//!   network) the channels follow the control connection's path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ferry_proto::SessionKeys;
use ferry_transport::multichannel::{
    pair_interfaces, plan_channels, routable, ChannelCount, ChannelPath, Cidr, NetInterface,
    MAX_CHANNELS,
};
use ferry_transport::TransportError;
use serde::Serialize;
use std::sync::Arc;

use ferry_transport::stream::Stream;
use ferry_transport::tls::TlsConfig;
use tokio::net::TcpSocket;

use crate::error::{MigrationError, Result};

/// One address of one interface of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// Address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// Administratively up.
    pub up: bool,
    /// Carrier present.
    pub running: bool,
    /// Loopback interface.
    pub loopback: bool,
    /// Link speed in Mbit/s, where the kernel reports one.
    pub speed_mbps: Option<u32>,
    /// RDMA device on this interface.
    pub rdma: Option<String>,
}

impl Nic {
    /// Can carry migration traffic to another host: up, with carrier, a
    /// routable address (not loopback or link-local) and a prefix.
    pub fn usable(&self) -> bool {
        self.up && self.running && routable(self.addr) && self.prefix > 0
    }

    /// The interface as advertised on the wire.
    pub fn to_wire(&self) -> NetInterface {
        NetInterface {
            name: self.name.clone(),
            addr: self.addr,
            prefix: self.prefix,
            speed_mbps: self.speed_mbps,
            rdma: self.rdma.clone(),
        }
    }
}

/// Lists this host's interface addresses (IPv4 and IPv6), with link speed
/// and RDMA device where known.
///
/// # Errors
/// When the OS cannot list them.
pub fn discover() -> Result<Vec<Nic>> {
    let addrs = ferry_ffi::ifaddrs::interface_addrs()
        .map_err(|e| MigrationError::Config(format!("cannot list network interfaces: {e}")))?;
    let rdma = rdma_netdevs(Path::new("/sys/class/infiniband"));
    let mut speeds: HashMap<String, Option<u32>> = HashMap::new();
    Ok(addrs
        .into_iter()
        .map(|a| {
            let speed = *speeds
                .entry(a.name.clone())
                .or_insert_with(|| link_speed(Path::new("/sys/class/net"), &a.name));
            Nic {
                rdma: rdma.get(&a.name).cloned(),
                speed_mbps: speed,
                name: a.name,
                addr: a.addr,
                prefix: a.prefix,
                up: a.up,
                running: a.running,
                loopback: a.loopback,
            }
        })
        .collect())
}

/// `/sys/class/net/NAME/speed` in Mbit/s; virtual links report -1 or fail.
fn link_speed(sys_net: &Path, name: &str) -> Option<u32> {
    let s = std::fs::read_to_string(sys_net.join(name).join("speed")).ok()?;
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|&v| v > 0)
        .and_then(|v| u32::try_from(v).ok())
}

/// Network device name -> RDMA device name. A PCI RDMA device lists its
/// network devices under `device/net/`; a RoCE port (soft-RoCE included)
/// names the network device of each GID in `ports/*/gid_attrs/ndevs/*`.
fn rdma_netdevs(sys_ib: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(devs) = std::fs::read_dir(sys_ib) else {
        return out;
    };
    for dev in devs.flatten() {
        let ibdev = dev.file_name().to_string_lossy().into_owned();
        if let Ok(nets) = std::fs::read_dir(dev.path().join("device/net")) {
            for n in nets.flatten() {
                out.entry(n.file_name().to_string_lossy().into_owned())
                    .or_insert_with(|| ibdev.clone());
            }
        }
        let Ok(ports) = std::fs::read_dir(dev.path().join("ports")) else {
            continue;
        };
        for port in ports.flatten() {
            let Ok(ndevs) = std::fs::read_dir(port.path().join("gid_attrs/ndevs")) else {
                continue;
            };
            for nd in ndevs.flatten() {
                if let Ok(name) = std::fs::read_to_string(nd.path()) {
                    let name = name.trim();
                    if !name.is_empty() {
                        out.entry(name.to_string()).or_insert_with(|| ibdev.clone());
                    }
                }
            }
        }
    }
    out
}

/// True if `ip` is in one of `networks`; an empty list allows everything.
/// IPv4-mapped IPv6 addresses (a dual-stack listener) count as IPv4.
pub fn allowed(networks: &[Cidr], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.is_empty() || networks.iter().any(|n| n.contains(ip))
}

/// What a destination listening on `listen` advertises: its usable
/// interfaces inside `networks`, and only those the listener accepts on (an
/// unspecified IPv4 address takes every IPv4 address, `::` every address,
/// a specific address only itself).
pub fn advertised(nics: &[Nic], networks: &[Cidr], listen: IpAddr) -> Vec<NetInterface> {
    let mut out: Vec<NetInterface> = Vec::new();
    for n in nics
        .iter()
        .filter(|n| n.usable() && allowed(networks, n.addr))
    {
        let reached = match listen {
            IpAddr::V4(a) if a.is_unspecified() => n.addr.is_ipv4(),
            IpAddr::V6(a) if a.is_unspecified() => true,
            ip => ip.to_canonical() == n.addr,
        };
        if reached && !out.iter().any(|o| o.addr == n.addr) {
            out.push(n.to_wire());
        }
    }
    out
}

/// The usable addresses of this host, inside `networks`, that a daemon
/// listening on `listen` cannot take data channels on (empty for an
/// unspecified address): when there are any, its migrations use one
/// network path although the host has more.
pub fn unreached(nics: &[Nic], networks: &[Cidr], listen: IpAddr) -> Vec<IpAddr> {
    let offered: Vec<IpAddr> = advertised(nics, networks, listen)
        .iter()
        .map(|i| i.addr)
        .collect();
    let mut out: Vec<IpAddr> = Vec::new();
    for n in nics
        .iter()
        .filter(|n| n.usable() && allowed(networks, n.addr))
    {
        if !offered.contains(&n.addr) && !out.contains(&n.addr) {
            out.push(n.addr);
        }
    }
    out
}

/// Source-side multichannel settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultichannelOptions {
    /// How many channels.
    pub channels: ChannelCount,
    /// Only these local addresses (empty: every usable interface).
    pub nics: Vec<IpAddr>,
    /// A channel that makes no progress for this long fails over.
    pub channel_timeout: Duration,
}

impl Default for MultichannelOptions {
    fn default() -> Self {
        MultichannelOptions {
            channels: ChannelCount::Auto,
            nics: Vec::new(),
            channel_timeout: Duration::from_secs(10),
        }
    }
}

impl MultichannelOptions {
    /// The most channels this source may open: what the offer announces
    /// before the destination's interfaces are known.
    pub fn max_channels(&self) -> u16 {
        match self.channels {
            ChannelCount::Auto => MAX_CHANNELS,
            ChannelCount::Fixed(n) => n,
        }
    }
}

/// One data channel to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChannel {
    /// Local address to bind (port chosen by the kernel).
    pub local: IpAddr,
    /// Destination address and port.
    pub remote: SocketAddr,
    /// Device to bind to, when routing needs it.
    pub device: Option<String>,
}

/// Pairs `local` interfaces with the destination's `remote` ones and plans
/// the channels (see the module docs). `control` is the control
/// connection's (local, remote) pair: data channels use its port, and its
/// path when no interfaces pair.
///
/// # Errors
/// `--nic` restricted the source to addresses that pair with nothing and
/// the control connection does not run from one of them either.
pub fn plan(
    opts: &MultichannelOptions,
    local: &[Nic],
    remote: &[NetInterface],
    control: (SocketAddr, SocketAddr),
) -> Result<Vec<PlannedChannel>> {
    let (ctl_local, ctl_remote) = control;
    let mine: Vec<NetInterface> = local
        .iter()
        .filter(|n| n.usable() && (opts.nics.is_empty() || opts.nics.contains(&n.addr)))
        .map(Nic::to_wire)
        .collect();
    let pairs = pair_interfaces(&mine, remote);
    let plan = plan_channels(pairs.len(), opts.channels);
    if !plan.is_empty() {
        return Ok(plan
            .into_iter()
            .map(|i| {
                let p = &pairs[i];
                PlannedChannel {
                    local: p.local.addr,
                    remote: SocketAddr::new(p.remote.addr, ctl_remote.port()),
                    device: p.bind_device.then(|| p.local.name.clone()),
                }
            })
            .collect());
    }
    if !opts.nics.is_empty() && !opts.nics.contains(&ctl_local.ip().to_canonical()) {
        return Err(MigrationError::Config(format!(
            "no destination interface shares a subnet with --nic {} (the destination offers {})",
            opts.nics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if remote.is_empty() {
                "none".to_string()
            } else {
                remote
                    .iter()
                    .map(|r| format!("{}/{}", r.addr, r.prefix))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    let n = match opts.channels {
        ChannelCount::Auto => 1,
        ChannelCount::Fixed(n) => n,
    };
    Ok((0..n)
        .map(|_| PlannedChannel {
            local: ctl_local.ip(),
            remote: ctl_remote,
            device: None,
        })
        .collect())
}

/// Connects one planned channel and proves it belongs to the session of
/// `keys`.
async fn open_one(
    p: PlannedChannel,
    keys: Arc<SessionKeys>,
    timeout: Duration,
    tls: Option<Arc<TlsConfig>>,
) -> Result<(Stream, ChannelPath)> {
    let what = |e: std::io::Error, step: &str| {
        MigrationError::from(TransportError::Io {
            context: format!("data channel {} -> {}: {step}", p.local, p.remote),
            source: e,
        })
    };
    let sock = match p.remote {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| what(e, "socket"))?;
    if let Some(dev) = &p.device {
        // Needs CAP_NET_RAW; without it the route decides, which is right
        // unless two local interfaces share the subnet.
        if let Err(e) = sock.bind_device(Some(dev.as_bytes())) {
            tracing::warn!(device = %dev, "cannot bind the data channel to its device: {e}");
        }
    }
    sock.bind(SocketAddr::new(p.local, 0))
        .map_err(|e| what(e, "bind"))?;
    let stream = match tokio::time::timeout(timeout, sock.connect(p.remote)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(what(e, "connect")),
        Err(_) => {
            return Err(TransportError::Timeout {
                what: "a data channel connection",
                after: timeout,
            }
            .into())
        }
    };
    let path = ChannelPath {
        local: stream.local_addr().map_err(|e| what(e, "local address"))?,
        remote: p.remote,
        device: p.device.clone(),
    };
    let stream = ferry_transport::tls::secure(stream, tls.as_deref(), timeout).await?;
    Ok((
        ferry_transport::conn::open_data_channel(stream, &keys, timeout).await?,
        path,
    ))
}

/// Opens the planned channels at once. Channels that fail to open are
/// left out with a warning.
///
/// # Errors
/// The first channel's error when none opened.
pub async fn open_channels(
    planned: &[PlannedChannel],
    keys: Arc<SessionKeys>,
    timeout: Duration,
    tls: Option<Arc<TlsConfig>>,
) -> Result<Vec<(Stream, ChannelPath)>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in planned.iter().enumerate() {
        let (p, tls, keys) = (p.clone(), tls.clone(), keys.clone());
        set.spawn(async move { (i, open_one(p, keys, timeout, tls).await) });
    }
    let mut results: Vec<(usize, Result<(Stream, ChannelPath)>)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => {
                return Err(MigrationError::Guest(format!(
                    "data channel task failed: {e}"
                )))
            }
        }
    }
    results.sort_by_key(|(i, _)| *i);
    let mut opened = Vec::new();
    let mut first_err = None;
    for (i, r) in results {
        match r {
            Ok(c) => opened.push(c),
            Err(e) => {
                tracing::warn!(
                    local = %planned[i].local,
                    remote = %planned[i].remote,
                    "data channel not opened: {e}"
                );
                first_err.get_or_insert(e);
            }
        }
    }
    match (opened.is_empty(), first_err) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(MigrationError::Config("no data channel planned".into())),
        _ => Ok(opened),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, addr: &str, prefix: u8) -> Nic {
        Nic {
            name: name.into(),
            addr: addr.parse().unwrap(),
            prefix,
            up: true,
            running: true,
            loopback: false,
            speed_mbps: None,
            rdma: None,
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rdma_and_speed_are_read_from_sysfs_layouts() {
        let d = tempfile_dir();
        let ib = d.join("infiniband");
        std::fs::create_dir_all(ib.join("mlx5_0/device/net/ens1f0")).unwrap();
        std::fs::create_dir_all(ib.join("rxe0/ports/1/gid_attrs/ndevs")).unwrap();
        std::fs::write(ib.join("rxe0/ports/1/gid_attrs/ndevs/0"), "veth-a\n").unwrap();
        std::fs::write(ib.join("rxe0/ports/1/gid_attrs/ndevs/1"), "").unwrap();
        let m = rdma_netdevs(&ib);
        assert_eq!(m.get("ens1f0").map(String::as_str), Some("mlx5_0"));
        assert_eq!(m.get("veth-a").map(String::as_str), Some("rxe0"));
        assert_eq!(m.len(), 2);
        let net = d.join("net");
        std::fs::create_dir_all(net.join("eth0")).unwrap();
        std::fs::create_dir_all(net.join("veth0")).unwrap();
        std::fs::write(net.join("eth0/speed"), "25000\n").unwrap();
        std::fs::write(net.join("veth0/speed"), "-1\n").unwrap();
        assert_eq!(link_speed(&net, "eth0"), Some(25_000));
        assert_eq!(link_speed(&net, "veth0"), None);
        assert_eq!(link_speed(&net, "missing"), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-nics-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn discovery_lists_loopback_as_unusable() {
        let all = discover().unwrap();
        let lo = all
            .iter()
            .find(|n| n.addr == IpAddr::from([127, 0, 0, 1]))
            .expect("loopback listed");
        assert!(lo.loopback && !lo.usable());
    }

    #[test]
    fn destination_advertises_allowed_usable_reachable_interfaces() {
        let mut down = nic("eth3", "10.200.3.2", 24);
        down.running = false;
        let nics = vec![
            nic("lo", "127.0.0.1", 8),
            nic("eth0", "10.200.0.2", 24),
            nic("eth1", "10.200.1.2", 24),
            nic("eth2", "fd00:200:2::2", 64),
            down,
            nic("eth4", "fe80::1", 64),
        ];
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let names = |v: Vec<NetInterface>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(advertised(&nics, &[], any4)), ["eth0", "eth1"]);
        assert_eq!(
            names(advertised(&nics, &[], any6)),
            ["eth0", "eth1", "eth2"]
        );
        let only1: Vec<Cidr> = vec!["10.200.1.0/24".parse().unwrap()];
        assert_eq!(names(advertised(&nics, &only1, any6)), ["eth1"]);
        assert_eq!(
            names(advertised(&nics, &[], "10.200.0.2".parse().unwrap())),
            ["eth0"]
        );
        assert!(allowed(&only1, "::ffff:10.200.1.9".parse().unwrap()));
        // Listening on one address leaves the others unreached.
        let ips = |v: Vec<IpAddr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            ips(unreached(&nics, &[], "10.200.0.2".parse().unwrap())),
            ["10.200.1.2", "fd00:200:2::2"]
        );
        assert_eq!(
            ips(unreached(&nics, &only1, "10.200.1.2".parse().unwrap())),
            Vec::<String>::new()
        );
        assert!(unreached(&nics, &[], any6).is_empty());
        assert_eq!(ips(unreached(&nics, &[], any4)), ["fd00:200:2::2"]);
        assert!(!allowed(&only1, "10.200.0.9".parse().unwrap()));
        assert!(allowed(&[], "10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn four_links_make_four_channels_each_from_its_own_address() {
        let local: Vec<Nic> = (0..4)
            .map(|i| nic(&format!("s{i}"), &format!("10.200.{i}.1"), 24))
            .chain([nic("lo", "127.0.0.1", 8), nic("mgmt", "192.168.1.5", 24)])
            .collect();
        let remote: Vec<NetInterface> = (0..4)
            .map(|i| nic(&format!("d{i}"), &format!("10.200.{i}.2"), 24).to_wire())
            .collect();
        let ctl = (sa("10.200.0.1:40000"), sa("10.200.0.2:6600"));
        let p = plan(&MultichannelOptions::default(), &local, &remote, ctl).unwrap();
        assert_eq!(p.len(), 4);
        for (i, c) in p.iter().enumerate() {
            assert_eq!(c.local, format!("10.200.{i}.1").parse::<IpAddr>().unwrap());
            assert_eq!(c.remote, sa(&format!("10.200.{i}.2:6600")));
            assert_eq!(c.device, None, "one local interface per subnet");
        }
        // --channels 6 spreads round-robin; --nic restricts.
        let six = MultichannelOptions {
            channels: ChannelCount::Fixed(6),
            ..Default::default()
        };
        let p = plan(&six, &local, &remote, ctl).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p[4].remote, p[0].remote);
        let two = MultichannelOptions {
            nics: vec!["10.200.1.1".parse().unwrap(), "10.200.3.1".parse().unwrap()],
            ..Default::default()
        };
        let p = plan(&two, &local, &remote, ctl).unwrap();
        let remotes: Vec<SocketAddr> = p.iter().map(|c| c.remote).collect();
        assert_eq!(remotes, [sa("10.200.1.2:6600"), sa("10.200.3.2:6600")]);
    }

    #[test]
    fn shared_subnet_binds_devices_and_no_pair_falls_back_to_the_control_path() {
        let local = vec![nic("a", "10.0.0.1", 24), nic("b", "10.0.0.3", 24)];
        let remote = vec![
            nic("x", "10.0.0.2", 24).to_wire(),
            nic("y", "10.0.0.4", 24).to_wire(),
        ];
        let ctl = (sa("10.0.0.1:1"), sa("10.0.0.2:6600"));
        let p = plan(&MultichannelOptions::default(), &local, &remote, ctl).unwrap();
        assert_eq!(p.len(), 2);
        assert_ne!(p[0].local, p[1].local, "both local links used");
        assert!(p.iter().all(|c| c.device.is_some()));
        // Loopback: nothing pairs; N channels over the control path.
        let lo = vec![nic("lo", "127.0.0.1", 8)];
        let ctl = (sa("127.0.0.1:5000"), sa("127.0.0.1:6600"));
        let three = MultichannelOptions {
            channels: ChannelCount::Fixed(3),
            ..Default::default()
        };
        let p = plan(&three, &lo, &[], ctl).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|c| c.remote == ctl.1 && c.local == ctl.0.ip()));
        assert_eq!(
            plan(&MultichannelOptions::default(), &lo, &[], ctl)
                .unwrap()
                .len(),
            1
        );
        // --nic that pairs with nothing and is not the control path: refused.
        let nic_opt = MultichannelOptions {
            nics: vec!["10.0.0.3".parse().unwrap()],
            ..Default::default()
        };
        let e = plan(&nic_opt, &lo, &[], ctl).unwrap_err().to_string();
        assert!(
            e.contains("no destination interface shares a subnet with --nic 10.0.0.3"),
            "{e}"
        );
    }
}
