//! The proxy server in process, against TCP listeners standing in for
//! guest ports (reached through [`FakeDial`]): both URL forms, the pages,
//! keep-alive, streaming, a slow server beside a quick one, and a
//! WebSocket-style upgrade spliced both ways.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::server::Limits;
use super::testkit::*;

/// Two guest ports of a running sandbox `web` (3000 and 8000), a stopped
/// sandbox `off`, and the proxy in front.
async fn two_ports() -> (std::net::SocketAddr, FakeDial) {
    let mut dial = FakeDial::default();
    dial.ports.insert(3000, echo_backend(3000).await);
    dial.ports.insert(8000, echo_backend(8000).await);
    let mut off = running(&[]);
    off.running = false;
    let r = routes(&[("web", running(&[3000, 8000])), ("off", off)]);
    let (addr, _) = start_proxy(r, dial.clone(), Limits::default()).await;
    (addr, dial)
}

#[test]
fn both_url_forms_reach_their_guest_ports() {
    runtime().block_on(async {
        let (addr, _) = two_ports().await;
        let (status, _, body) = get(addr, Some("8000.web.localhost:7300"), "/a?b=1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            "port 8000 GET /a?b=1 host=8000.web.localhost:7300 proto=http"
        );
        // The primary server: the lowest listening port.
        let (status, _, body) = get(addr, Some("web.localhost:7300"), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("port 3000 GET / "), "{body}");
        // Case, a trailing dot, no port suffix, the configured domain.
        for host in [
            "3000.WEB.LocalHost.:7300",
            "3000.web.localhost",
            "3000.web.sandbox.local",
        ] {
            let (status, _, body) = get(addr, Some(host), "/x").await;
            assert_eq!(status, StatusCode::OK, "{host}: {body}");
            assert!(body.starts_with("port 3000 GET /x"), "{host}: {body}");
        }
    });
}

#[test]
fn stopped_unknown_and_silent_addresses_get_pages() {
    runtime().block_on(async {
        let (addr, dial) = two_ports().await;
        let (status, headers, body) = get(addr, Some("3000.off.localhost:7300"), "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "5");
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert!(
            body.contains("Sandbox <code>off</code> is not running"),
            "{body}"
        );
        assert!(body.contains("keystone agent start off"), "{body}");
        assert!(
            body.contains("http-equiv=\"refresh\" content=\"5\""),
            "{body}"
        );

        for host in [
            None,
            Some("localhost:7300"),
            Some("127.0.0.1:7300"),
            Some("[::1]:7300"),
        ] {
            let (status, _, body) = get(addr, host, "/").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{host:?}");
            assert!(body.contains("Keystone sandboxes"), "{host:?}: {body}");
            assert!(body.contains("http://8000.web.localhost:7300/"), "{body}");
            assert!(
                !body.contains("off.localhost"),
                "a stopped sandbox is not listed: {body}"
            );
        }
        let (status, _, body) = get(addr, Some("nope.localhost:7300"), "/").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body.contains("No sandbox at <code>nope.localhost:7300</code>"),
            "{body}"
        );
        assert!(body.contains("http://web.localhost:7300/"), "{body}");
        // Markup in the Host header comes back escaped.
        let (_, _, body) = get(addr, Some("a<b>c.localhost"), "/").await;
        assert!(
            body.contains("a&lt;b&gt;c.localhost") && !body.contains("a<b>"),
            "{body}"
        );
        // A port nothing listens on, and the agent's own proxy port.
        for port in [9999, 3128] {
            let (status, _, body) = get(addr, Some(&format!("{port}.web.localhost")), "/").await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(body.contains(&format!("listens on port {port}")), "{body}");
        }
        assert_eq!(
            dial.dials.load(Ordering::SeqCst),
            0,
            "no page opened a guest connection"
        );
    });
}

#[test]
fn a_head_request_and_a_connect_get_no_body() {
    runtime().block_on(async {
        let (addr, _) = two_ports().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"HEAD / HTTP/1.1\r\nHost: off.localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(
            out.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {out}"
        );

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"CONNECT 3000.web.localhost:80 HTTP/1.1\r\nHost: 3000.web.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 405");
    });
}

#[test]
fn a_kept_alive_client_connection_keeps_one_guest_connection() {
    runtime().block_on(async {
        let (addr, dial) = two_ports().await;
        let mut client = connect(addr).await;
        for i in 0..5 {
            let (status, _, body) =
                get_on(&mut client, Some("8000.web.localhost"), &format!("/{i}")).await;
            assert_eq!(status, StatusCode::OK);
            assert!(body.starts_with(&format!("port 8000 GET /{i} ")), "{body}");
        }
        assert_eq!(dial.dials.load(Ordering::SeqCst), 1);
        // Another port on the same client connection: a new guest one.
        let (_, _, body) = get_on(&mut client, Some("3000.web.localhost"), "/").await;
        assert!(body.starts_with("port 3000"), "{body}");
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2);
    });
}

/// A response body fed by the test, one frame at a time.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Fed {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[test]
fn bodies_stream_both_ways_without_waiting_for_their_end() {
    runtime().block_on(async {
        let (feed, fed) = tokio::sync::mpsc::channel::<Bytes>(4);
        let fed = std::sync::Arc::new(std::sync::Mutex::new(Some(fed)));
        // The guest server answers at once and streams what the test
        // feeds; it echoes the request's first body frame in a header.
        let server = backend(move |req: Request<Incoming>| {
            let fed = fed.lock().unwrap().take();
            async move {
                let mut body = req.into_body();
                let first = body
                    .frame()
                    .await
                    .and_then(|f| f.ok())
                    .and_then(|f| f.into_data().ok());
                let first = String::from_utf8_lossy(&first.unwrap_or_default()).into_owned();
                let body = Fed(fed.expect("one request"));
                Response::builder()
                    .header("x-first-chunk", first)
                    .body(body.boxed())
                    .unwrap()
            }
        })
        .await;
        let mut dial = FakeDial::default();
        dial.ports.insert(5173, server);
        let (addr, _) = start_proxy(
            routes(&[("app", running(&[5173]))]),
            dial,
            Limits::default(),
        )
        .await;

        // The upload: one chunk now, the rest never (until the end).
        let (upload, upload_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        upload
            .send(Bytes::from_static(b"first part"))
            .await
            .unwrap();
        let mut client = connect(addr).await;
        let req = Request::post("/upload")
            .header("host", "app.localhost")
            .body(Fed(upload_rx).boxed())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.send_request(req))
            .await
            .expect("the head came back before the upload ended")
            .unwrap();
        assert_eq!(resp.headers()["x-first-chunk"], "first part");
        let mut body = resp.into_body();
        for chunk in ["one ", "two ", "three"] {
            feed.send(Bytes::from(chunk)).await.unwrap();
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("each chunk arrives before the body ends")
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), chunk);
        }
        drop(feed);
        drop(upload);
        assert!(body.frame().await.is_none() || body.is_end_stream());
    });
}

#[test]
fn a_slow_server_does_not_hold_up_another() {
    runtime().block_on(async {
        let slow = backend(|_req| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Response::new(text("late"))
        })
        .await;
        let mut dial = FakeDial::default();
        dial.ports.insert(4000, slow);
        dial.ports.insert(8000, echo_backend(8000).await);
        dial.stalled.push(4001);
        let r = routes(&[("app", running(&[4000, 4001, 8000]))]);
        let (addr, _) = start_proxy(r, dial, Limits::default()).await;
        let mut waiting = Vec::new();
        for host in ["4000.app.localhost", "4001.app.localhost"] {
            for _ in 0..8 {
                waiting.push(tokio::spawn(
                    async move { get(addr, Some(host), "/").await },
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        for _ in 0..20 {
            let (status, _, _) = get(addr, Some("8000.app.localhost"), "/").await;
            assert_eq!(status, StatusCode::OK);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        for w in waiting {
            w.abort();
        }
    });
}

#[test]
fn an_upgrade_is_spliced_both_ways() {
    runtime().block_on(async {
        // A WebSocket-style server: 101, then it echoes bytes upper-cased.
        let ws = backend(|mut req: Request<Incoming>| async move {
            assert_eq!(req.headers()["upgrade"], "websocket");
            assert_eq!(req.headers()["connection"], "upgrade");
            assert_eq!(
                req.headers()["sec-websocket-key"],
                "dGhlIHNhbXBsZSBub25jZQ=="
            );
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 1024];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    io.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(text(""))
                .unwrap()
        })
        .await;
        let mut dial = FakeDial::default();
        dial.ports.insert(24678, ws);
        dial.ports.insert(8000, echo_backend(8000).await);
        let (addr, _) = start_proxy(
            routes(&[("app", running(&[8000, 24678]))]),
            dial,
            Limits::default(),
        )
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /hmr HTTP/1.1\r\nHost: 24678.app.localhost:7300\r\nUpgrade: websocket\r\n\
              Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(
                s.read(&mut b).await.unwrap(),
                1,
                "{}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        for msg in [&b"hello"[..], b"hot reload", &[b'x'; 5000]] {
            s.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(back, msg.to_ascii_uppercase());
            // Plain requests go on beside the spliced connection.
            let (status, _, _) = get(addr, Some("8000.app.localhost"), "/").await;
            assert_eq!(status, StatusCode::OK);
        }
    });
}
