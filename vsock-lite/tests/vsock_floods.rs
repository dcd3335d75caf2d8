//! Floods against the vsock connection table ([`Muxer`]): a guest that
//! sends thousands of requests, resets, shutdowns and credit requests
//! without taking its answers, host programs past the connection cap, and
//! a guest that ignores the credit it was given while host programs do not
//! read. The device must keep every queue and buffer bounded, never let a
//! guest packet open a connection, and reset what overruns.
//!
//! [`Muxer`]: vsock_lite::muxer::Muxer

mod fuzz_support;
mod muxer_rig;

use std::io::{ErrorKind, Read};

use keystone_test_kit::skip;
use muxer_rig::{Link, Rig};
use vsock_lite::connection::CONN_BUF_SIZE;
use vsock_lite::muxer::{MAX_CONNECTIONS, MAX_RST_QUEUE};
use vsock_lite::packet::{op, shutdown, MAX_PAYLOAD};

const FLOOD: u32 = 20_000;

/// Takes every packet the device has, counting them by op.
fn take_all(rig: &mut Rig) -> [usize; 8] {
    let before = rig.rx_ops;
    while rig.take(MAX_PAYLOAD).is_some() {}
    let mut counts = [0; 8];
    for (c, (now, then)) in counts.iter_mut().zip(rig.rx_ops.iter().zip(before)) {
        *c = now - then;
    }
    counts
}

fn stranger(port: u32) -> Link {
    Link {
        guest_port: port,
        host_port: 1024 + port % 7,
        received: 0,
    }
}

/// `count` host programs connect; the guest accepts every connection the
/// device offers.
fn established(rig: &mut Rig, count: u32) -> Vec<Link> {
    for i in 0..count {
        let host = rig.connect_host(format!("CONNECT {}\n", 2000 + i).as_bytes());
        rig.hosts.push(host);
    }
    let first = rig.links.len();
    let got = take_all(rig);
    let links = rig.links[first..].to_vec();
    assert_eq!(got[usize::from(op::REQUEST)], links.len(), "{got:?}");
    for &link in &links {
        rig.send(op::RESPONSE, link, &[]);
    }
    links
}

#[test]
fn guest_request_and_reset_floods_get_bounded_answers() {
    let mut rig = Rig::new("vsock-flood-requests");
    for port in 0..FLOOD {
        rig.send(op::REQUEST, stranger(port), &[]);
    }
    let got = take_all(&mut rig);
    assert_eq!(got[usize::from(op::RST)], MAX_RST_QUEUE, "{got:?}");
    assert_eq!(got.iter().sum::<usize>(), MAX_RST_QUEUE, "{got:?}");
    assert_eq!(rig.muxer.connection_count(), 0);

    for port in 0..FLOOD {
        rig.send(op::RST, stranger(port), &[]);
    }
    assert_eq!(take_all(&mut rig), [0; 8], "resets are never answered");

    let ops = [op::SHUTDOWN, op::RW, op::CREDIT_UPDATE, op::CREDIT_REQUEST];
    for port in 0..FLOOD {
        let payload: &[u8] = if port % 3 == 0 { b"data" } else { &[] };
        rig.send(ops[port as usize % ops.len()], stranger(port), payload);
    }
    let got = take_all(&mut rig);
    assert_eq!(got.iter().sum::<usize>(), MAX_RST_QUEUE, "{got:?}");
    assert_eq!(rig.muxer.connection_count(), 0);
}

/// Raises this process's open-file limit to at least `want`; false when
/// the hard limit is lower.
fn raise_fd_limit(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_max < want {
        return false;
    }
    lim.rlim_cur = lim.rlim_cur.max(want);
    // SAFETY: setrlimit reads one valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}

#[test]
fn host_programs_past_the_cap_are_closed_and_guest_floods_stay_bounded() {
    let extra = 64;
    // Both ends of every host program's stream live in this process.
    let fds = 2 * (MAX_CONNECTIONS as u64 + extra as u64) + 64;
    if !raise_fd_limit(fds) {
        skip!("this test needs {fds} open files and the hard limit is lower");
    }
    let mut rig = Rig::new("vsock-flood-connections");
    let links = established(&mut rig, MAX_CONNECTIONS as u32 + extra);
    assert_eq!(links.len(), MAX_CONNECTIONS);
    assert_eq!(rig.muxer.connection_count(), MAX_CONNECTIONS);
    // The programs past the cap were accepted and closed at once (with
    // their line unread: end of stream or a reset).
    for host in &mut rig.hosts[MAX_CONNECTIONS..] {
        let got = host.read(&mut [0u8; 8]).map_err(|e| e.kind());
        assert!(
            matches!(got, Ok(0) | Err(ErrorKind::ConnectionReset)),
            "{got:?}"
        );
    }

    // Requests aimed at live host ports open nothing; credit requests and
    // answers repeated many times queue one packet per connection at most.
    for round in 0..8u32 {
        for &link in &links {
            rig.send(op::CREDIT_REQUEST, link, &[]);
            rig.send(op::RESPONSE, link, &[]);
            let imposter = Link {
                guest_port: 60_000 + round,
                ..link
            };
            rig.send(op::REQUEST, imposter, &[]);
        }
    }
    rig.check_bounds();
    let got = take_all(&mut rig);
    assert_eq!(
        got[usize::from(op::CREDIT_UPDATE)],
        MAX_CONNECTIONS,
        "{got:?}"
    );
    assert_eq!(got[usize::from(op::RST)], MAX_RST_QUEUE, "{got:?}");
    assert_eq!(rig.muxer.connection_count(), MAX_CONNECTIONS);

    // Each host program got its `OK` line and nothing else.
    for (host, link) in rig.hosts.iter_mut().zip(&links) {
        let want = format!("OK {}\n", link.host_port);
        let mut line = vec![0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], want.as_bytes());
    }

    // Shutting both ways resets every connection; the hosts see the end.
    for &link in &links {
        rig.send_flags(op::SHUTDOWN, link, shutdown::RCV | shutdown::SEND, &[]);
    }
    let got = take_all(&mut rig);
    assert_eq!(got[usize::from(op::RST)], MAX_CONNECTIONS, "{got:?}");
    assert_eq!(rig.muxer.connection_count(), 0);
    for host in &mut rig.hosts[..MAX_CONNECTIONS] {
        assert!(matches!(host.read(&mut [0u8; 8]), Ok(0)), "not closed");
    }
}

#[test]
fn guest_data_past_its_credit_is_reset_not_buffered() {
    let conns = 16;
    let mut rig = Rig::new("vsock-flood-data");
    let links = established(&mut rig, conns);
    let chunk = vec![b'd'; MAX_PAYLOAD];
    let mut peak = 0;
    // The host programs never read: everything beyond the socket buffers
    // and our advertised CONN_BUF_SIZE must end in a reset.
    for _ in 0..(4 * CONN_BUF_SIZE as usize / MAX_PAYLOAD + 8) {
        for &link in &links {
            rig.send(op::RW, link, &chunk);
            rig.check_bounds();
            peak = peak.max(rig.muxer.host_backlog_bytes());
        }
    }
    assert!(
        peak > 0,
        "the host programs read everything: nothing was tested"
    );
    // One reset per connection, then one per packet to a connection gone.
    let got = take_all(&mut rig);
    assert!(got[usize::from(op::RST)] >= conns as usize, "{got:?}");
    assert_eq!(rig.muxer.connection_count(), 0);
    for host in &mut rig.hosts {
        host.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match host.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => panic!("not closed"),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            total <= 4 * CONN_BUF_SIZE as usize,
            "{total} bytes reached a host"
        );
    }
}
