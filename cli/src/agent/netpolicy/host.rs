//! The host's own addresses and on-link networks, as the policy sees them.
//!
//! They are read from the host's interfaces (`getifaddrs`): each address,
//! the network its prefix length makes on-link, and the peer of a
//! point-to-point link (a VPN's or a PPP link's far end). The live view
//! reads them again when the last reading is more than [`REFRESH`] old,
//! so an address the host gains while a sandbox runs counts within a
//! second, and a flood of checks costs one reading a second.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Cidr;

/// The longest the live view uses a reading of the interfaces.
pub const REFRESH: Duration = Duration::from_secs(1);

/// One reading of the host's interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostNetworks {
    /// Every address of the host's interfaces.
    pub addresses: Vec<IpAddr>,
    /// The networks those addresses are on, and point-to-point peers.
    pub networks: Vec<Cidr>,
}

impl HostNetworks {
    /// The interfaces as they are now (empty if they cannot be read).
    pub fn read() -> Self {
        let mut out = HostNetworks::default();
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list freed below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned; its
            // addresses, when not null, point to sockaddrs of the family
            // they name, and the node lives until freeifaddrs below.
            let node = unsafe { &*cur };
            // SAFETY: as above, for the node's address fields.
            let (address, mask, peer) = unsafe {
                (
                    ip_of(node.ifa_addr),
                    ip_of(node.ifa_netmask),
                    ip_of(node.ifa_ifu),
                )
            };
            if let Some(address) = address {
                out.addresses.push(address);
                if let Some(prefix) = mask.and_then(prefix_len) {
                    out.networks.push(Cidr {
                        network: address,
                        prefix,
                    });
                }
                let point_to_point = node.ifa_flags & libc::IFF_POINTOPOINT as u32 != 0;
                if let Some(peer) = peer.filter(|_| point_to_point) {
                    out.networks.push(Cidr {
                        network: peer,
                        prefix: if peer.is_ipv4() { 32 } else { 128 },
                    });
                }
            }
            cur = node.ifa_next;
        }
        // SAFETY: the list came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(head) };
        out
    }
}

/// The IP address in `sa`, if it holds one.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr of the family it names.
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's guarantee; the family says which sockaddr it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

/// The prefix length of a netmask (its leading ones).
fn prefix_len(mask: IpAddr) -> Option<u8> {
    let ones = match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones(),
        IpAddr::V6(m) => u128::from(m).leading_ones(),
    };
    u8::try_from(ones).ok()
}

/// Where the policy gets the host's interfaces from.
#[derive(Debug)]
pub(super) enum HostView {
    /// Read again when older than [`REFRESH`].
    Live(Mutex<Option<(Instant, Arc<HostNetworks>)>>),
    /// Given once (tests).
    #[cfg(test)]
    Fixed(Arc<HostNetworks>),
}

impl HostView {
    pub(super) fn live() -> Self {
        HostView::Live(Mutex::new(None))
    }

    #[cfg(test)]
    pub(super) fn fixed(host: HostNetworks) -> Self {
        HostView::Fixed(Arc::new(host))
    }

    /// The reading to check against now.
    pub(super) fn current(&self) -> Arc<HostNetworks> {
        match self {
            #[cfg(test)]
            HostView::Fixed(host) => Arc::clone(host),
            HostView::Live(cache) => {
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                match &*cache {
                    Some((at, host)) if at.elapsed() < REFRESH => Arc::clone(host),
                    _ => {
                        let host = Arc::new(HostNetworks::read());
                        *cache = Some((Instant::now(), Arc::clone(&host)));
                        host
                    }
                }
            }
        }
    }
}
