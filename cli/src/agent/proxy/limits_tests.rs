//! The proxy's bounds in process (connections per sandbox and in all, the
//! size of request and response heads, the time to send a head and to
//! reach a guest port), and the real vsock dialer against the real guest
//! agent serving on a Unix socket behind a hybrid vsock handshake.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dial::{Dial, VsockDial};
use super::server::Limits;
use super::testkit::*;
use keystone_test_kit::ScratchDir;

async fn one_port(limits: Limits) -> SocketAddr {
    let mut dial = FakeDial::default();
    dial.ports.insert(8000, echo_backend(8000).await);
    dial.stalled.push(9000);
    start_proxy(routes(&[("app", running(&[8000, 9000]))]), dial, limits)
        .await
        .0
}

#[test]
fn guest_connections_per_sandbox_are_capped() {
    runtime().block_on(async {
        let limits = Limits {
            per_sandbox: 1,
            queue_wait: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = one_port(limits).await;
        let mut first = connect(addr).await;
        let (status, _, _) = get_on(&mut first, Some("8000.app.localhost"), "/").await;
        assert_eq!(status, StatusCode::OK);
        // The first client connection keeps the sandbox's one guest
        // connection: a second client waits, then gets a page.
        let (status, _, body) = get(addr, Some("8000.app.localhost"), "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("Too many connections to sandbox <code>app</code>"),
            "{body}"
        );
        drop(first);
        let t = Instant::now();
        loop {
            let (status, _, _) = get(addr, Some("8000.app.localhost"), "/").await;
            if status == StatusCode::OK {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the slot was never given back"
            );
        }
    });
}

#[test]
fn client_connections_in_all_are_capped() {
    runtime().block_on(async {
        let addr = one_port(Limits {
            connections: 2,
            ..Limits::default()
        })
        .await;
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = tokio::spawn(async move { get(addr, Some("8000.app.localhost"), "/").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !third.is_finished(),
            "a third connection was served beside two"
        );
        drop(idle1);
        let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("served once a slot was free")
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    });
}

#[test]
fn heads_are_bounded_in_size_and_time() {
    runtime().block_on(async {
        let addr = one_port(Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let big = "x".repeat(100 << 10);
        let head = format!("GET / HTTP/1.1\r\nHost: 8000.app.localhost\r\nX-Big: {big}\r\n\r\n");
        let _ = s.write_all(head.as_bytes()).await;
        let mut answer = [0u8; 12];
        let _ = s.read_exact(&mut answer).await;
        assert_eq!(&answer, b"HTTP/1.1 431");

        // Half a head, then nothing: the connection is closed.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: 8000.app")
            .await
            .unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "still open after 5 s");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    });
}

#[test]
fn a_guest_with_a_huge_head_or_no_answer_gets_a_502() {
    runtime().block_on(async {
        let huge = backend(|_req| async {
            Response::builder()
                .header("x-huge", "y".repeat(200 << 10))
                .body(text("never"))
                .unwrap()
        })
        .await;
        let mut dial = FakeDial::default();
        dial.ports.insert(8000, huge);
        dial.stalled.push(9000);
        let limits = Limits {
            handshake: Duration::from_millis(300),
            ..Limits::default()
        };
        let r = routes(&[("app", running(&[8000, 9000, 9001]))]);
        let (addr, _) = start_proxy(r, dial, limits).await;
        let (status, _, body) = get(addr, Some("8000.app.localhost"), "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let t = Instant::now();
        let (status, _, body) = get(addr, Some("9000.app.localhost"), "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("did not answer within"), "{body}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // Listed but refused (the server just stopped).
        let (status, _, body) = get(addr, Some("9001.app.localhost"), "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            body.contains("nothing listens on guest port 9001"),
            "{body}"
        );
    });
}

/// The real guest agent on a Unix socket, behind a front that answers the
/// hybrid vsock handshake as the VMM's socket does; its path.
fn guest_agent(dir: &Path) -> PathBuf {
    use keystone_guest_agent::agent::{self, AgentConfig};
    use keystone_guest_agent::transport::AgentListener;
    let vsock = dir.join("vsock.sock");
    let inner = dir.join("agent.sock");
    let listener = AgentListener::unix(&inner).unwrap();
    std::thread::spawn(move || agent::serve(&listener, AgentConfig::default()));
    let front = std::os::unix::net::UnixListener::bind(&vsock).unwrap();
    std::thread::spawn(move || {
        for s in front.incoming() {
            let Ok(mut s) = s else { return };
            let inner = inner.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert!(line.starts_with(b"CONNECT "));
                s.write_all(b"OK 1\n").unwrap();
                let agent = std::os::unix::net::UnixStream::connect(&inner).unwrap();
                let _ = keystone_guest_agent::relay::relay(Box::new(s), Box::new(agent));
            });
        }
    });
    vsock
}

/// A fake agent behind `vsock` whose `TcpConnect` answer and the guest
/// server's first bytes leave in one write, so the agent client reads
/// both at once; it then echoes four bytes upper-cased.
fn agent_answering_with_a_greeting(vsock: &Path) {
    use keystone_guest_agent::protocol::{
        expect_frame, write_frame, Frame, FrameKind, Hello, Request, Response,
    };
    let listener = std::os::unix::net::UnixListener::bind(vsock).unwrap();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        conn.write_all(b"OK 1\n").unwrap();
        assert_eq!(expect_frame(&mut conn).unwrap().kind, FrameKind::Hello);
        write_frame(&mut conn, &Frame::json(FrameKind::Hello, &Hello::current())).unwrap();
        let req = expect_frame(&mut conn)
            .unwrap()
            .parse_json::<Request>()
            .unwrap();
        assert!(matches!(req, Request::TcpConnect { port: 2525 }), "{req:?}");
        let mut answer = Vec::new();
        let connected = Response::Connected {
            address: "127.0.0.1:2525".parse().unwrap(),
        };
        write_frame(&mut answer, &Frame::json(FrameKind::Response, &connected)).unwrap();
        answer.extend_from_slice(b"220 hello\r\n");
        conn.write_all(&answer).unwrap();
        let mut four = [0u8; 4];
        conn.read_exact(&mut four).unwrap();
        conn.write_all(&four.to_ascii_uppercase()).unwrap();
    });
}

#[test]
fn bytes_read_ahead_with_the_agents_answer_are_not_lost() {
    let dir = ScratchDir::new("proxy-greeting");
    let vsock = dir.path().join("vsock.sock");
    agent_answering_with_a_greeting(&vsock);
    runtime().block_on(async {
        let dial = VsockDial {
            handshake: Duration::from_secs(5),
        };
        let mut s = dial.dial(&vsock, 2525).await.unwrap();
        let mut greeting = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
            .await
            .expect("the greeting arrived")
            .unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"PING");
    });
}

#[test]
fn the_vsock_dialer_reaches_guest_ports_through_the_agent() {
    let dir = ScratchDir::new("proxy-dial");
    let vsock = guest_agent(dir.path());
    // A server that speaks first, then echoes: its greeting must arrive
    // even when the agent client had read it ahead.
    let greeter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let greeter_port = greeter.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in greeter.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(b"220 hello\r\n");
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf.map(|c| c.to_ascii_uppercase()));
            }
        }
    });
    runtime().block_on(async {
        let dial = VsockDial {
            handshake: Duration::from_secs(5),
        };
        let mut s = dial.dial(&vsock, greeter_port).await.unwrap();
        let mut greeting = [0u8; 11];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"PING");
        // Nothing listening: the agent's refusal, as an error.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(dial.dial(&vsock, closed_port).await.is_err());

        // The whole path: the proxy, the real dialer, the agent, a server.
        let server = echo_backend(1).await;
        let port = server.port();
        let mut route = running(&[port]);
        route.vsock = vsock.clone();
        let proxy = super::server::Proxy::new(
            routes(&[("box", route)]),
            Box::new(dial),
            Limits::default(),
            7300,
            vec!["localhost".into()],
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(std::sync::Arc::clone(&proxy).serve(listener));
        let mut client = connect(addr).await;
        for path in ["/one", "/two"] {
            let (status, _, body) =
                get_on(&mut client, Some(&format!("{port}.box.localhost")), path).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.starts_with(&format!("port 1 GET {path} ")), "{body}");
        }
    });
}
