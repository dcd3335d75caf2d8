//! Where a sandbox's outbound connections may go (`--network nat`).
//!
//! The guest's programs reach the outside only through connections the
//! host makes for them (see `microvm::egress`); this is the host's rule for
//! each target address.
//!
//! - Allowed: public unicast addresses.
//! - Refused unless `[network] allow` lists them: private and shared
//!   ranges (RFC 1918, 100.64/10, fc00::/7, the deprecated site-local
//!   fec0::/10), and the host's on-link networks (the network of each of
//!   its interface addresses, from the address's prefix length: a public
//!   IPv4 LAN, a global IPv6 /64), since a developer's LAN and corporate
//!   services are not the sandbox's business by default.
//! - Refused always: the host itself (loopback, any address of its own
//!   interfaces, and a point-to-point link's peer counts as on-link),
//!   link-local (which holds the cloud metadata service, 169.254.169.254,
//!   and its credentials), unspecified, multicast, broadcast and reserved
//!   addresses.
//!
//! The host's addresses and networks are read from its interfaces when an
//! address is checked (at most once a second, see [`host`]), so an address
//! the host gains later (an IPv6 temporary address, a VPN, a new DHCP
//! lease) is refused from then on.
//!
//! IPv6 addresses that carry an IPv4 address get the IPv4 rule as well as
//! their own: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
//! (`::a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`), the well-known
//! NAT64 prefix (`64:ff9b::/96`), 6to4 (`2002:AABB:CCDD::/48`) and ISATAP
//! interface identifiers (`…:0:5efe:a.b.c.d`, `…:200:5efe:a.b.c.d`); the
//! address is refused when either the IPv6 address or the IPv4 one it
//! carries is. Refused outright, since which IPv4 address they lead to is
//! not in the address alone: Teredo (`2001::/32`, a relay's address and an
//! obscured client's) and the local-use NAT64 prefix (`64:ff9b:1::/48`,
//! whose IPv4 position is each network's choice). A NAT64 gateway with a
//! network-specific prefix cannot be told from any other IPv6 network.
//!
//! A name is resolved on the host and every address it resolves to is
//! checked, so DNS cannot smuggle a refused address past the rule.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub mod host;

use host::{HostNetworks, HostView};

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
        match (self.network, mapped(ip)) {
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

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry (a
/// dual-stack socket's way of writing one).
fn mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// What a refused address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Loopback,
    Unspecified,
    LinkLocal,
    Reserved,
    HostItself,
    Private,
    Shared,
    SpecialPurpose,
    UniqueLocal,
    SiteLocal,
    OnLink,
    Teredo,
    LocalNat64,
}

impl Kind {
    /// Whether listing its network in `[network] allow` permits it.
    pub fn allowable(self) -> bool {
        matches!(
            self,
            Kind::Private
                | Kind::Shared
                | Kind::SpecialPurpose
                | Kind::UniqueLocal
                | Kind::SiteLocal
                | Kind::OnLink
        )
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Loopback => "the host's loopback",
            Kind::Unspecified => "an unspecified address",
            Kind::LinkLocal => "a link-local address (where cloud metadata services answer)",
            Kind::Reserved => "a multicast, broadcast or reserved address",
            Kind::HostItself => "an address of the host itself",
            Kind::Private => "a private address",
            Kind::Shared => "a shared (carrier-grade NAT) address",
            Kind::SpecialPurpose => "a special-purpose address",
            Kind::UniqueLocal => "a private (unique local) address",
            Kind::SiteLocal => "a private (site-local) address",
            Kind::OnLink => "an address on the host's own network",
            Kind::Teredo => "a Teredo address (whose IPv4 target cannot be checked)",
            Kind::LocalNat64 => "a local-use NAT64 address (whose IPv4 target cannot be checked)",
        }
    }
}

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: Kind,
    /// Found in the IPv4 address an IPv6 address carries.
    pub embedded: bool,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        if self.embedded {
            f.write_str(" (carried in an IPv6 address)")?;
        }
        Ok(())
    }
}

/// The host's decision for one address.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Refused(Refusal),
}

/// The rule of one sandbox.
#[derive(Debug)]
pub struct Policy {
    /// `[network] allow`: private blocks the sandbox may reach.
    allow: Vec<Cidr>,
    host: HostView,
}

impl Policy {
    /// The rule with the host's interfaces as they are at each check.
    pub fn new(allow: Vec<Cidr>) -> Self {
        Policy {
            allow,
            host: HostView::live(),
        }
    }

    /// The rule with a fixed view of the host's interfaces.
    #[cfg(test)]
    pub fn with_host(allow: Vec<Cidr>, host: HostNetworks) -> Self {
        Policy {
            allow,
            host: HostView::fixed(host),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Verdict {
        let ip = mapped(ip);
        let refused = |kind, embedded| Verdict::Refused(Refusal { kind, embedded });
        if let IpAddr::V6(v6) = ip {
            if let Some(kind) = unknown_target(v6) {
                return refused(kind, false);
            }
        }
        let host = self.host.current();
        if let Some(kind) = self.refusal(ip, &host) {
            return refused(kind, false);
        }
        if let Some(v4) = carried_ipv4(ip) {
            if let Some(kind) = self.refusal(IpAddr::V4(v4), &host) {
                return refused(kind, true);
            }
        }
        Verdict::Allowed
    }

    /// The rule for `ip` itself (not what it carries).
    fn refusal(&self, ip: IpAddr, host: &HostNetworks) -> Option<Kind> {
        if let Some(always) = always_refused(ip) {
            return Some(always);
        }
        if host.addresses.iter().any(|o| mapped(*o) == ip) {
            return Some(Kind::HostItself);
        }
        let listed = self.allow.iter().any(|c| c.contains(ip));
        if let Some(private) = private(ip).filter(|_| !listed) {
            return Some(private);
        }
        if !listed && host.networks.iter().any(|n| n.contains(ip)) {
            return Some(Kind::OnLink);
        }
        None
    }
}

fn always_refused(ip: IpAddr) -> Option<Kind> {
    match ip {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some(Kind::Loopback)
            } else if a.is_unspecified() || a.octets()[0] == 0 {
                Some(Kind::Unspecified)
            } else if a.is_link_local() {
                Some(Kind::LinkLocal)
            } else if a.is_multicast() || a.is_broadcast() || a.octets()[0] >= 240 {
                Some(Kind::Reserved)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_loopback() {
                Some(Kind::Loopback)
            } else if a.is_unspecified() {
                Some(Kind::Unspecified)
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                Some(Kind::LinkLocal)
            } else if a.is_multicast() {
                Some(Kind::Reserved)
            } else {
                None
            }
        }
    }
}

fn private(ip: IpAddr) -> Option<Kind> {
    match ip {
        IpAddr::V4(a) => {
            let [x, y, ..] = a.octets();
            if a.is_private() {
                Some(Kind::Private)
            } else if x == 100 && (64..128).contains(&y) {
                Some(Kind::Shared)
            } else if a == Ipv4Addr::new(192, 0, 0, 170) || a == Ipv4Addr::new(192, 0, 0, 171) {
                Some(Kind::SpecialPurpose)
            } else {
                None
            }
        }
        IpAddr::V6(a) => match a.segments()[0] {
            s if s & 0xfe00 == 0xfc00 => Some(Kind::UniqueLocal),
            s if s & 0xffc0 == 0xfec0 => Some(Kind::SiteLocal),
            _ => None,
        },
    }
}

/// IPv6 forms whose IPv4 target is not in the address alone.
fn unknown_target(a: Ipv6Addr) -> Option<Kind> {
    match a.segments() {
        [0x2001, 0, ..] => Some(Kind::Teredo),
        [0x64, 0xff9b, 1, ..] => Some(Kind::LocalNat64),
        _ => None,
    }
}

/// The IPv4 address an IPv6 address carries, for the forms that carry
/// one in a known place (the IPv4-mapped form is already IPv4 here).
fn carried_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(a) = ip else { return None };
    let s = a.segments();
    let low = Ipv4Addr::from(u128::from(a) as u32);
    match s {
        // IPv4-compatible (`::` and `::1` are refused before this).
        [0, 0, 0, 0, 0, 0, ..] => Some(low),
        // IPv4-translated.
        [0, 0, 0, 0, 0xffff, 0, ..] => Some(low),
        // The well-known NAT64 prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        // 6to4: the IPv4 address follows the prefix.
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        // ISATAP: an interface identifier of [00|02]00:5efe:a.b.c.d (with
        // either value of the group bit).
        [_, _, _, _, iid, 0x5efe, ..] if iid & 0xfcff == 0 => Some(low),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
