//! `TcpConnect` end to end without a VM: the agent served on a Unix
//! socket, TCP servers on this host's loopback standing in for the
//! guest's, and the client (and a host-side listener, as the port
//! forwarder uses it) on the other end.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use keystone_guest_agent::agent::{self, AgentConfig};
use keystone_guest_agent::client::{unix_connector, AgentClient, ClientError};
use keystone_guest_agent::transport::{AgentListener, DuplexStream};
use keystone_test_kit::{fnv64, skip, ScratchDir};

fn start_agent() -> (AgentClient, ScratchDir) {
    let dir = ScratchDir::new("tcp");
    let socket = dir.join("agent.sock");
    let listener = AgentListener::unix(&socket).unwrap();
    let cfg = AgentConfig {
        workspace_root: dir.path().to_path_buf(),
        ..AgentConfig::default()
    };
    std::thread::spawn(move || agent::serve(&listener, cfg));
    (AgentClient::new(unix_connector(&socket)), dir)
}

/// An echo server on `addr`; each connection echoes until end of stream,
/// then closes.
fn echo_server(addr: &str) -> u16 {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 253) as u8).collect()
}

#[test]
fn bytes_round_trip_both_ways_through_the_tunnel() {
    let (client, _dir) = start_agent();
    let port = echo_server("127.0.0.1:0");
    let tunnel = client.tcp_connect(port).unwrap();
    assert_eq!(tunnel.guest_address().port(), port);
    assert!(tunnel.guest_address().ip().is_loopback());
    let data = pattern(8 << 20);
    let sum = fnv64(&data);
    // The tunnel relayed to one end of a socket pair; the test drives the
    // other end from two threads.
    let (host_end, relay_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || tunnel.relay(Box::new(relay_end)).unwrap());
    let mut host_end = host_end;
    let mut w = host_end.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    host_end.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert_eq!(fnv64(&back), sum, "the echoed bytes differ");
    let totals = t.join().unwrap();
    assert_eq!((totals.a_to_b, totals.b_to_a), (8 << 20, 8 << 20));
}

#[test]
fn a_server_that_speaks_first_and_a_request_response_loop() {
    let (client, _dir) = start_agent();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"220 hello\n").unwrap();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return;
            }
            let mut reply = b"re:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            s.write_all(&reply).unwrap();
        }
    });
    let mut tunnel = client.tcp_connect(port).unwrap();
    let mut greeting = [0u8; 10];
    tunnel.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 hello\n");
    for i in 0..20 {
        let msg = format!("ping {i:02}");
        tunnel.write_all(msg.as_bytes()).unwrap();
        let mut reply = vec![0u8; 3 + msg.len()];
        tunnel.read_exact(&mut reply).unwrap();
        assert_eq!(reply, format!("re:{msg}").into_bytes());
    }
    tunnel.shutdown_write().unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn nothing_listening_is_a_clear_error() {
    let (client, _dir) = start_agent();
    // A port that was free a moment ago.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = match client.tcp_connect(port) {
        Err(e) => e,
        Ok(_) => panic!("connected to port {port}, which nobody listens on"),
    };
    match &err {
        ClientError::Agent(msg) => {
            assert!(
                msg.contains(&format!("nothing is listening on guest port {port}")),
                "{msg}"
            );
            assert!(msg.contains("127.0.0.1"), "{msg}");
        }
        other => panic!("expected an agent error, got {other:?}"),
    }
    // The agent still answers afterwards.
    assert!(client.ping().is_ok());
}

#[test]
fn an_ipv6_only_server_is_reached_on_its_loopback() {
    if TcpListener::bind("[::1]:0").is_err() {
        skip!("no IPv6 loopback on this host");
    }
    let port = echo_server("[::1]:0");
    let (client, _dir) = start_agent();
    let mut tunnel = client.tcp_connect(port).unwrap();
    assert_eq!(tunnel.guest_address().to_string(), format!("[::1]:{port}"));
    tunnel.write_all(b"six").unwrap();
    tunnel.shutdown_write().unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"six");
}

#[test]
fn host_listener_relay_as_the_port_forwarder_uses_it() {
    let (client, _dir) = start_agent();
    let port = echo_server("127.0.0.1:0");
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let front_port = front.local_addr().unwrap().port();
    let client = std::sync::Arc::new(client);
    {
        let client = client.clone();
        std::thread::spawn(move || {
            for s in front.incoming() {
                let Ok(s) = s else { return };
                let tunnel = client.tcp_connect(port).unwrap();
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    tunnel.relay(Box::new(s) as Box<dyn DuplexStream>)
                });
            }
        });
    }
    // Several connections at once, each with its own data.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", front_port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let data = pattern((i + 1) * 100_000);
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let t = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                t.join().unwrap();
                assert!(back == data, "connection {i}: bytes differ");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
