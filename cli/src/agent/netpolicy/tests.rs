//! Tests of the policy: address blocks, the fixed rule, the host's own
//! addresses and on-link networks (also ones it gains while it runs, in a
//! network namespace of the test's own), and IPv6 forms that carry an
//! IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use rustix::thread::{unshare_unsafe, UnshareFlags};

use super::host::{HostNetworks, REFRESH};
use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn refused(p: &Policy, a: IpAddr) -> bool {
    matches!(p.check(a), Verdict::Refused(_))
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// A policy with `allow` on a host with these addresses and networks.
fn on_host(allow: &[&str], addresses: &[&str], networks: &[&str]) -> Policy {
    Policy::with_host(
        allow.iter().map(|c| cidr(c)).collect(),
        HostNetworks {
            addresses: addresses.iter().map(|a| ip(a)).collect(),
            networks: networks.iter().map(|n| cidr(n)).collect(),
        },
    )
}

fn bare() -> Policy {
    on_host(&[], &[], &[])
}

#[test]
fn blocks_parse_and_match() {
    let c = cidr("10.1.0.0/16");
    assert!(c.contains(ip("10.1.200.3")));
    assert!(!c.contains(ip("10.2.0.1")));
    assert!(
        c.contains(ip("::ffff:10.1.0.9")),
        "IPv4-mapped counts as IPv4"
    );
    let one = cidr("192.168.1.5");
    assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
    assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
    let v6 = cidr("fd00::/8");
    assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
    for bad in ["10.0.0.0/33", "fd00::/129", "example.com", "10.0.0/8", ""] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
}

#[test]
fn the_rule() {
    let p = on_host(&["10.20.0.0/16"], &["192.0.2.2"], &[]);
    assert_eq!(p.check(ip("93.184.216.34")), Verdict::Allowed);
    assert_eq!(p.check(ip("2606:4700::1111")), Verdict::Allowed);
    for a in [
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
        assert!(refused(&p, ip(a)), "{a} was allowed");
    }
    assert_eq!(
        p.check(ip("10.20.3.4")),
        Verdict::Allowed,
        "listed in allow"
    );
    let loopback_listed = on_host(&["127.0.0.0/8"], &[], &[]);
    assert!(
        refused(&loopback_listed, ip("127.0.0.1")),
        "the host's loopback cannot be allowed"
    );
}

#[test]
fn the_hosts_on_link_networks_are_refused_unless_listed() {
    let host = (
        ["203.0.113.9", "2001:db8:5::9", "10.8.0.1"],
        [
            "203.0.113.0/24",
            "2001:db8:5::/64",
            "10.8.0.1/32",
            "198.51.100.1/32",
        ],
    );
    let p = on_host(&[], &host.0, &host.1);
    for (a, kind) in [
        ("203.0.113.9", Kind::HostItself),
        ("203.0.113.1", Kind::OnLink),
        ("203.0.113.254", Kind::OnLink),
        ("::ffff:203.0.113.77", Kind::OnLink),
        ("2001:db8:5::1", Kind::OnLink),
        ("2001:db8:5:0:ffff:ffff:ffff:ffff", Kind::OnLink),
        ("198.51.100.1", Kind::OnLink),
        ("10.8.0.1", Kind::HostItself),
    ] {
        let embedded = false;
        assert_eq!(
            p.check(ip(a)),
            Verdict::Refused(Refusal { kind, embedded }),
            "{a}"
        );
        assert_eq!(kind == Kind::OnLink, kind.allowable(), "{a}");
    }
    for a in ["203.0.114.1", "2001:db8:6::1", "198.51.100.2"] {
        assert_eq!(
            p.check(ip(a)),
            Verdict::Allowed,
            "{a} is off the host's links"
        );
    }
    let listed = on_host(&["203.0.113.0/24", "2001:db8::/32"], &host.0, &host.1);
    assert_eq!(listed.check(ip("203.0.113.1")), Verdict::Allowed);
    assert_eq!(listed.check(ip("2001:db8:5::1")), Verdict::Allowed);
    assert!(refused(&listed, ip("203.0.113.9")), "the host itself");
    // A 6to4 address carrying an on-link IPv4 address.
    assert_eq!(
        p.check(ip("2002:cb00:7101::1")),
        Verdict::Refused(Refusal {
            kind: Kind::OnLink,
            embedded: true
        })
    );
}

#[test]
fn the_host_has_addresses() {
    let host = HostNetworks::read();
    assert!(host.addresses.iter().any(|a| a.is_loopback()));
    assert!(host
        .networks
        .iter()
        .any(|n| n.contains(ip("127.0.0.1")) && n.contains(ip("127.0.0.2"))));
}

/// Every IPv6 form that carries `v4` and whose IPv4 target is known.
fn embeddings(v4: Ipv4Addr) -> Vec<(&'static str, Ipv6Addr)> {
    let [a, b, c, d] = v4.octets();
    let low = |hi: [u16; 6]| {
        let s = [
            hi[0],
            hi[1],
            hi[2],
            hi[3],
            hi[4],
            hi[5],
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ];
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
    };
    vec![
        ("IPv4-compatible", low([0, 0, 0, 0, 0, 0])),
        ("IPv4-mapped", low([0, 0, 0, 0, 0, 0xffff])),
        ("IPv4-translated", low([0, 0, 0, 0, 0xffff, 0])),
        ("NAT64", low([0x64, 0xff9b, 0, 0, 0, 0])),
        ("ISATAP", low([0x2001, 0xdb8, 0, 1, 0, 0x5efe])),
        ("ISATAP (global)", low([0x2001, 0xdb8, 0, 1, 0x200, 0x5efe])),
        (
            "6to4",
            Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
                7,
                0,
                0,
                0,
                1,
            ),
        ),
    ]
}

#[test]
fn ipv6_forms_carrying_ipv4_get_the_ipv4_rule() {
    let p = bare();
    let refused_v4 = [
        "10.0.0.1",
        "172.16.5.5",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "255.255.255.255",
        "0.0.0.1",
    ];
    for v4 in refused_v4 {
        let v4: Ipv4Addr = v4.parse().unwrap();
        assert!(refused(&p, IpAddr::V4(v4)), "{v4}");
        for (form, v6) in embeddings(v4) {
            assert!(refused(&p, IpAddr::V6(v6)), "{form} {v6} carries {v4}");
        }
    }
    for v4 in ["93.184.216.34", "8.8.8.8", "1.1.1.1"] {
        let v4: Ipv4Addr = v4.parse().unwrap();
        for (form, v6) in embeddings(v4) {
            assert_eq!(p.check(IpAddr::V6(v6)), Verdict::Allowed, "{form} {v6}");
        }
    }
}

#[test]
fn ambiguous_and_site_local_forms_are_refused() {
    let p = bare();
    for a in [
        // Teredo: a server and an obscured client address.
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001::1",
        // The local-use NAT64 prefix, whose IPv4 position is the
        // network's choice.
        "64:ff9b:1::a00:1",
        // Site-local.
        "fec0::1",
        "feff:ffff::1",
    ] {
        assert!(refused(&p, ip(a)), "{a} was allowed");
    }
    assert_eq!(p.check(ip("2001:db8::1")), Verdict::Allowed);
    assert_eq!(p.check(ip("2002:5db8:d822::1")), Verdict::Allowed);
}

/// Why a test cannot have a network namespace of its own here.
#[derive(Debug, thiserror::Error)]
enum NoNetns {
    #[error("not root (a network namespace needs it)")]
    NotRoot,
    #[error("iproute2's `ip` is not installed")]
    NoIp(#[source] std::io::Error),
    #[error("unshare(CLONE_NEWNET): {0}")]
    Unshare(#[source] std::io::Error),
}

/// Runs `f` on a thread in a network namespace of its own (where `ip`
/// commands it runs apply too); the reason when that cannot be done here.
fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, NoNetns> {
    if !rustix::process::geteuid().is_root() {
        return Err(NoNetns::NotRoot);
    }
    Command::new("ip")
        .arg("-V")
        .output()
        .map_err(NoNetns::NoIp)?;
    std::thread::spawn(move || {
        // SAFETY: unshare with CLONE_NEWNET moves only this thread into a
        // new network namespace; it touches no memory of ours, and the
        // descriptor table (`UnshareFlags::FILES`) stays shared.
        if let Err(e) = unsafe { unshare_unsafe(UnshareFlags::NEWNET) } {
            return Err(NoNetns::Unshare(e.into()));
        }
        Ok(f())
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn addresses_the_host_gains_later_are_refused_with_their_networks() {
    let ran = in_own_netns(|| {
        let p = Policy::new(vec![]);
        let listed = Policy::new(vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8:5::/64".parse().unwrap(),
        ]);
        let (own4, own6) = (ip("203.0.113.9"), ip("2001:db8:5::9"));
        let (lan4, lan6) = (ip("203.0.113.77"), ip("2001:db8:5::77"));
        let (far4, far6) = (ip("198.51.100.7"), ip("2001:db8:6::1"));
        for a in [own4, own6, lan4, lan6, far4, far6] {
            assert_eq!(p.check(a), Verdict::Allowed, "{a} before it was added");
        }
        ip_cmd(&["addr", "add", "203.0.113.9/24", "dev", "lo"]);
        ip_cmd(&[
            "-6",
            "addr",
            "add",
            "2001:db8:5::9/64",
            "dev",
            "lo",
            "nodad",
        ]);
        ip_cmd(&["link", "set", "lo", "up"]);
        std::thread::sleep(REFRESH + Duration::from_millis(200));
        for a in [own4, own6, lan4, lan6] {
            assert!(refused(&p, a), "{a} is the host's or on its network");
        }
        for a in [far4, far6] {
            assert_eq!(p.check(a), Verdict::Allowed, "{a} is elsewhere");
        }
        // Listing the network opens it, but never the host itself.
        assert_eq!(listed.check(lan4), Verdict::Allowed);
        assert_eq!(listed.check(lan6), Verdict::Allowed);
        assert!(refused(&listed, own4) && refused(&listed, own6));
        // An address that goes away stops counting.
        ip_cmd(&["addr", "del", "203.0.113.9/24", "dev", "lo"]);
        std::thread::sleep(REFRESH + Duration::from_millis(200));
        assert_eq!(p.check(lan4), Verdict::Allowed);
        assert!(refused(&p, lan6));
    });
    if let Err(why) = ran {
        eprintln!("SKIP: {why}");
    }
}
