//! TCP ports in LISTEN state, from `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! Each line after the header reads
//! `sl local_address rem_address st ...`, with `local_address` as
//! `ADDR:PORT` in hex: the port in host order, the address as the kernel's
//! in-memory (network order) words printed as native-endian integers.
//! State `0A` is LISTEN.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::protocol::ListeningPort;

const TCP_LISTEN: &str = "0A";

/// Reads `<dir>/tcp` and `<dir>/tcp6` (a missing tcp6 is fine).
pub fn listening_ports(proc_net_dir: &Path) -> io::Result<Vec<ListeningPort>> {
    let mut ports = parse_proc_net_tcp(&std::fs::read_to_string(proc_net_dir.join("tcp"))?);
    if let Ok(text) = std::fs::read_to_string(proc_net_dir.join("tcp6")) {
        ports.extend(parse_proc_net_tcp(&text));
    }
    ports.sort();
    ports.dedup();
    Ok(ports)
}

/// Parses one `/proc/net/tcp{,6}` table; malformed lines are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<ListeningPort> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _sl = fields.next()?;
            let local = fields.next()?;
            let _remote = fields.next()?;
            let state = fields.next()?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(ListeningPort {
                port: u16::from_str_radix(port, 16).ok()?,
                address: parse_addr(addr)?,
            })
        })
        .collect()
}

fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_tcp6() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n\
   garbage\n";
        let ports = parse_proc_net_tcp(tcp);
        assert_eq!(
            ports,
            vec![
                ListeningPort {
                    port: 8080,
                    address: "127.0.0.1".parse().unwrap()
                },
                ListeningPort {
                    port: 22,
                    address: "0.0.0.0".parse().unwrap()
                },
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000\n\
   1: 00000000000000000000000000000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000\n";
        let ports = parse_proc_net_tcp(tcp6);
        assert_eq!(ports[0].port, 3000);
        assert_eq!(ports[0].address, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(ports[1].address, "::".parse::<IpAddr>().unwrap());
    }
}
