//! The host's interface addresses (`getifaddrs(3)`), for multichannel
//! discovery. std has no safe way to list them and `/proc` only lists IPv6
//! ones, so this is the one call made here.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name (e.g. `eth0`).
    pub name: String,
    /// The address.
    pub addr: IpAddr,
    /// Prefix length of its netmask (0 when the kernel gave none).
    pub prefix: u8,
    /// `IFF_UP`: administratively up.
    pub up: bool,
    /// `IFF_RUNNING`: operationally up (carrier).
    pub running: bool,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
}

/// Reads an address out of a `sockaddr` of family `AF_INET` or `AF_INET6`.
///
/// # Safety
/// `sa` must be null or point to a `sockaddr` whose storage is at least as
/// large as its family's structure (`getifaddrs` guarantees that).
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the contract; `sa_family` is the
    // first field of every sockaddr.
    let family = i32::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the family says the storage is a sockaddr_in; read it
            // unaligned because nothing promises its alignment.
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Prefix length of a netmask (its leading one bits).
fn prefix_of(mask: Option<IpAddr>) -> u8 {
    match mask {
        Some(IpAddr::V4(m)) => u32::from(m).leading_ones() as u8,
        Some(IpAddr::V6(m)) => u128::from(m).leading_ones() as u8,
        None => 0,
    }
}

/// Every IPv4 and IPv6 address of every interface, in the kernel's order.
///
/// # Errors
/// The OS error of `getifaddrs`.
pub fn interface_addrs() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocated into `head`,
    // which is a valid out-pointer; on error it writes nothing we use.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, which
        // stays allocated until freeifaddrs below.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_addr and ifa_netmask are null or point to sockaddrs
        // sized for their family, owned by the list.
        let (addr, mask) = unsafe { (ip_of(ifa.ifa_addr), ip_of(ifa.ifa_netmask)) };
        if let (Some(addr), false) = (addr, ifa.ifa_name.is_null()) {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            let flags = ifa.ifa_flags as libc::c_int;
            out.push(IfAddr {
                name,
                addr,
                prefix: prefix_of(mask),
                up: flags & libc::IFF_UP != 0,
                running: flags & libc::IFF_RUNNING != 0,
                loopback: flags & libc::IFF_LOOPBACK != 0,
            });
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once;
    // no reference into the list outlives this call (names were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_prefix() {
        let all = interface_addrs().unwrap();
        let lo = all
            .iter()
            .find(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST))
            .unwrap_or_else(|| panic!("127.0.0.1 in {all:?}"));
        assert!(lo.loopback && lo.up, "{lo:?}");
        assert_eq!(lo.prefix, 8);
    }

    #[test]
    fn netmasks_become_prefix_lengths() {
        assert_eq!(prefix_of(Some("255.255.255.0".parse().unwrap())), 24);
        assert_eq!(prefix_of(Some("255.255.255.255".parse().unwrap())), 32);
        assert_eq!(
            prefix_of(Some("ffff:ffff:ffff:ffff::".parse().unwrap())),
            64
        );
        assert_eq!(prefix_of(None), 0);
    }
}
