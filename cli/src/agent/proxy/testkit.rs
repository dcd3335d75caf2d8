//! What the proxy's in-process tests share: a runtime, a fake dialer that
//! reaches "guest ports" on this host's loopback (TCP listeners standing
//! in for the guest's servers), backends built on hyper, the proxy on a
//! free port, and a client that sends one request.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::dial::{Dial, Dialing, GuestStream};
use super::routing::{Routes, SandboxRoute};
use super::server::{Body, Limits, Proxy};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reaches guest port `p` at `ports[p]` on this host; counts its dials.
/// A port in `stalled` never answers.
#[derive(Clone, Default)]
pub struct FakeDial {
    pub ports: HashMap<u16, SocketAddr>,
    pub stalled: Vec<u16>,
    pub dials: Arc<AtomicUsize>,
}

impl Dial for FakeDial {
    fn dial(&self, _vsock: &Path, port: u16) -> Dialing {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let (target, stalled) = (self.ports.get(&port).copied(), self.stalled.contains(&port));
        Box::pin(async move {
            if stalled {
                std::future::pending::<()>().await;
            }
            let Some(addr) = target else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on guest port {port}"),
                ));
            };
            let s = tokio::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as GuestStream)
        })
    }
}

/// A running sandbox whose routable ports are `ports`.
pub fn running(ports: &[u16]) -> SandboxRoute {
    SandboxRoute {
        running: true,
        vsock: PathBuf::from("/nonexistent/vsock.sock"),
        ports: ports.to_vec(),
        configured_primary: None,
    }
}

pub fn routes(list: &[(&str, SandboxRoute)]) -> Routes {
    Routes {
        sandboxes: list
            .iter()
            .map(|(n, r)| (n.to_string(), r.clone()))
            .collect(),
    }
}

pub fn text(s: impl Into<String>) -> Body {
    Full::new(Bytes::from(s.into()))
        .map_err(|never| match never {})
        .boxed()
}

/// A hyper server on 127.0.0.1:0 answering with `handler` (upgrades on).
pub async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let f = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(f.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A backend that says which port it stands for and what it was asked:
/// `port <tag> <method> <path> host=<Host> proto=<X-Forwarded-Proto>`.
pub async fn echo_backend(tag: u16) -> SocketAddr {
    backend(move |req: Request<Incoming>| async move {
        let h = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let line = format!(
            "port {tag} {} {} host={} proto={}",
            req.method(),
            req.uri(),
            h("host"),
            h("x-forwarded-proto")
        );
        Response::new(text(line))
    })
    .await
}

/// The proxy (announcing port 7300 on its pages) on a free port.
pub async fn start_proxy(
    routes: Routes,
    dial: FakeDial,
    limits: Limits,
) -> (SocketAddr, Arc<Proxy>) {
    let domains = vec!["localhost".to_string(), "sandbox.local".to_string()];
    let proxy = Proxy::new(routes, Box::new(dial), limits, 7300, domains);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Arc::clone(&proxy).serve(listener));
    (addr, proxy)
}

/// A client connection to the proxy.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// Sends `GET path` with `host` (none when `None`) on `sender`; the status,
/// headers and whole body (within 10 s).
pub async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    host: Option<&str>,
    path: &str,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get(path);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let req = req.body(text("")).unwrap();
    let exchange = async {
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the proxy answered within 10 s")
}

/// One GET on a new connection.
pub async fn get(
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
) -> (StatusCode, HeaderMap, String) {
    let mut sender = connect(addr).await;
    get_on(&mut sender, host, path).await
}
