//! Where a sandbox's outbound connections may go (`--network nat`).
//!
//! The guest's programs reach the outside only through connections the
//! host makes for them (see `microvm::egress`); this is the host's rule for
//! each target address. Allowed: public unicast addresses. Refused unless
//! `[network] allow` lists them: private and shared ranges (RFC 1918,
//! 100.64/10, fc00::/7), since a developer's LAN and corporate services are
//! not the sandbox's business by default. Refused always: the host itself
//! (loopback, any address of its own interfaces), link-local (which holds
//! the cloud metadata service, 169.254.169.254, and its credentials),
//! unspecified, multicast and broadcast addresses. A name is resolved on
//! the host and every address it resolves to is checked, so DNS cannot
//! smuggle a refused address past the rule.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block, `10.0.0.0/8` or `2001:db8::/32`; a bare address is
/// a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The host's decision for one address.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused, with what the address is ("a private address", ...).
    Refused(&'static str),
}

/// The rule of one sandbox.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `[network] allow`: private blocks the sandbox may reach.
    pub allow: Vec<Cidr>,
    /// The host's own interface addresses (never reachable).
    pub own: Vec<IpAddr>,
}

impl Policy {
    /// The rule with the host's current interface addresses.
    pub fn new(allow: Vec<Cidr>) -> Self {
        Policy {
            allow,
            own: own_addresses(),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Verdict {
        let ip = canonical(ip);
        if let Some(always) = always_refused(ip) {
            return Verdict::Refused(always);
        }
        if self.own.iter().any(|o| canonical(*o) == ip) {
            return Verdict::Refused("an address of the host itself");
        }
        if let Some(private) = private(ip) {
            if !self.allow.iter().any(|c| c.contains(ip)) {
                return Verdict::Refused(private);
            }
        }
        Verdict::Allowed
    }
}

fn always_refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some("the host's loopback")
            } else if a.is_unspecified() || a.octets()[0] == 0 {
                Some("an unspecified address")
            } else if a.is_link_local() {
                Some("a link-local address (where cloud metadata services answer)")
            } else if a.is_multicast() || a.is_broadcast() || a.octets()[0] >= 240 {
                Some("a multicast, broadcast or reserved address")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_loopback() {
                Some("the host's loopback")
            } else if a.is_unspecified() {
                Some("an unspecified address")
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address (where cloud metadata services answer)")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
    }
}

fn private(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            let [x, y, ..] = a.octets();
            if a.is_private() {
                Some("a private address")
            } else if x == 100 && (64..128).contains(&y) {
                Some("a shared (carrier-grade NAT) address")
            } else if a == Ipv4Addr::new(192, 0, 0, 170) || a == Ipv4Addr::new(192, 0, 0, 171) {
                Some("a special-purpose address")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.segments()[0] & 0xfe00 == 0xfc00 {
                Some("a private (unique local) address")
            } else if a.segments()[0] == 0x64 && a.segments()[1] == 0xff9b {
                // NAT64 prefixes embed IPv4 targets that were not checked.
                Some("a NAT64 address")
            } else {
                None
            }
        }
    }
}

/// Every address of the host's interfaces.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its
        // address, when not null, points to a sockaddr of the family it
        // names.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            c.contains(ip("::ffff:10.1.0.9")),
            "IPv4-mapped counts as IPv4"
        );
        let one: Cidr = "192.168.1.5".parse().unwrap();
        assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.0/33", "fd00::/129", "example.com", "10.0.0/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_rule() {
        let p = Policy {
            allow: vec!["10.20.0.0/16".parse().unwrap()],
            own: vec![ip("192.0.2.2")],
        };
        assert_eq!(p.check(ip("93.184.216.34")), Verdict::Allowed);
        assert_eq!(p.check(ip("2606:4700::1111")), Verdict::Allowed);
        for refused in [
            "127.0.0.1",
            "127.8.9.1",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.2",
            "::ffff:192.0.2.2",
            "10.0.0.1",
            "172.16.5.5",
            "192.168.0.1",
            "100.64.0.1",
            "fd00::1",
            "64:ff9b::7f00:1",
        ] {
            assert!(
                matches!(p.check(ip(refused)), Verdict::Refused(_)),
                "{refused} was allowed"
            );
        }
        assert_eq!(
            p.check(ip("10.20.3.4")),
            Verdict::Allowed,
            "listed in allow"
        );
        let loopback_listed = Policy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            own: vec![],
        };
        assert!(
            matches!(loopback_listed.check(ip("127.0.0.1")), Verdict::Refused(_)),
            "the host's loopback cannot be allowed"
        );
    }

    #[test]
    fn the_host_has_addresses() {
        assert!(own_addresses().iter().any(|a| a.is_loopback()));
    }
}
