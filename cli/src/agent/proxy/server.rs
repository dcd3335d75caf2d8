//! The proxy's HTTP/1.1 server (hyper): each accepted connection is served
//! by its own task; each request is routed by its Host header and either
//! answered with a page or forwarded to the guest port.
//!
//! A client connection keeps one guest connection for as long as it asks
//! the same guest port (keep-alive on both sides). Bodies stream both ways
//! as they come (nothing is buffered whole). An `Upgrade` request
//! (WebSocket: hot reload) is forwarded as is; when the guest answers 101
//! the two upgraded connections are spliced byte for byte until either
//! side closes.
//!
//! Bounds ([`Limits`]): client connections in all (the accept loop waits
//! for a free slot), guest connections per sandbox (a request waits a
//! little for one, then gets a "too many connections" page), the size of
//! a request head and of a guest's response head, the time to send a
//! request head, and the time the vsock and agent handshakes may take.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::dial::Dial;
use super::headers::{outgoing, page_response, strip_hop_by_hop, wants_upgrade};
use super::pages::{self, Page};
use super::routing::{parse_host, HostName, Resolved, Routes};

/// A response body: the guest's, streamed, or a page.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The proxy's bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Client connections open at once, in all.
    pub connections: usize,
    /// Guest connections open at once, per sandbox.
    pub per_sandbox: usize,
    /// How long a request waits for one of its sandbox's guest connections.
    pub queue_wait: Duration,
    /// The largest request head, and the largest guest response head.
    pub head_bytes: usize,
    /// How long a client may take to send a request head.
    pub head_timeout: Duration,
    /// How long reaching a guest port may take (vsock and agent handshakes).
    pub handshake: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 1024,
            per_sandbox: 256,
            queue_wait: Duration::from_secs(10),
            head_bytes: 64 << 10,
            head_timeout: Duration::from_secs(30),
            handshake: Duration::from_secs(5),
        }
    }
}

/// One guest connection a client connection keeps.
struct Upstream {
    sandbox: String,
    port: u16,
    sender: SendRequest<Incoming>,
    /// The sandbox's connection slot, held while the guest connection lives.
    slot: Arc<OwnedSemaphorePermit>,
}

type Kept = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// The proxy: routes, the way to guest ports, and its bounds.
pub struct Proxy {
    routes: RwLock<Arc<Routes>>,
    dial: Box<dyn Dial>,
    limits: Limits,
    /// The port it listens on, for the URLs on its pages.
    port: u16,
    /// The suffixes sandbox names live under (`localhost` first).
    domains: Vec<String>,
    connections: Arc<Semaphore>,
    per_sandbox: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Proxy {
    pub fn new(
        routes: Routes,
        dial: Box<dyn Dial>,
        limits: Limits,
        port: u16,
        domains: Vec<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes: RwLock::new(Arc::new(routes)),
            dial,
            connections: Arc::new(Semaphore::new(limits.connections)),
            limits,
            port,
            domains,
            per_sandbox: Mutex::new(HashMap::new()),
        })
    }

    pub fn routes(&self) -> Arc<Routes> {
        Arc::clone(&self.routes.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the snapshot; forgets the idle slots of sandboxes gone.
    pub fn set_routes(&self, routes: Routes) {
        let limit = self.limits.per_sandbox;
        self.per_sandbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name, s| routes.sandboxes.contains_key(name) || s.available_permits() < limit);
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
    }

    fn sandbox_slots(&self, sandbox: &str) -> Arc<Semaphore> {
        let mut map = self
            .per_sandbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            map.entry(sandbox.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_sandbox))),
        )
    }

    /// Accepts and serves connections on `listener`, forever.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut warned = false;
        loop {
            let Ok(slot) = Arc::clone(&self.connections).acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !warned {
                        log::warn!("accept failed: {e}");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.serve_connection(stream, peer).await;
                drop(slot);
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let kept: Kept = Arc::default();
        let me = Arc::clone(&self);
        let service = hyper::service::service_fn(move |req| {
            let (me, kept) = (Arc::clone(&me), Arc::clone(&kept));
            async move { Ok::<_, Infallible>(me.handle(req, peer, &kept).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.head_timeout)
            .max_header_size(self.limits.head_bytes)
            .keep_alive(true);
        let _ = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
    }

    /// Answers one request.
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        kept: &Kept,
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return page_response(pages::not_allowed());
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
        let domains: Vec<&str> = self.domains.iter().map(String::as_str).collect();
        let name = parse_host(host.as_deref(), &domains);
        let routes = self.routes();
        let (sandbox, vsock, port) = match routes.resolve(&name) {
            Resolved::Guest {
                sandbox,
                vsock,
                port,
            } => (sandbox.to_string(), vsock.to_path_buf(), port),
            Resolved::NotRunning { sandbox } => return page_response(pages::not_running(sandbox)),
            Resolved::NotListening { sandbox, port } => {
                let listing = routes.listing(self.port);
                return page_response(pages::not_listening(sandbox, port, &listing));
            }
            Resolved::Unknown => {
                let asked = match name {
                    HostName::Nothing => None,
                    _ => host.as_deref(),
                };
                let listing = routes.listing(self.port);
                return page_response(pages::unknown(asked, &listing, self.port));
            }
        };
        drop(routes);
        let req = outgoing(req, peer, host.as_deref());
        self.forward(req, &sandbox, &vsock, port, kept).await
    }

    /// Opens a guest connection for a client connection.
    async fn open(&self, sandbox: &str, vsock: &Path, port: u16) -> Result<Upstream, Page> {
        let slots = self.sandbox_slots(sandbox);
        let slot = match tokio::time::timeout(self.limits.queue_wait, slots.acquire_owned()).await {
            Ok(Ok(slot)) => Arc::new(slot),
            _ => return Err(pages::busy(sandbox)),
        };
        let io =
            match tokio::time::timeout(self.limits.handshake, self.dial.dial(vsock, port)).await {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    log::info!("{sandbox} port {port}: {e}");
                    return Err(pages::unreachable(sandbox, port, &e.to_string()));
                }
                Err(_) => {
                    let why = format!(
                        "the sandbox did not answer within {} s",
                        self.limits.handshake.as_secs()
                    );
                    log::info!("{sandbox} port {port}: {why}");
                    return Err(pages::unreachable(sandbox, port, &why));
                }
            };
        let handshake = hyper::client::conn::http1::Builder::new()
            .max_header_size(self.limits.head_bytes)
            .handshake(TokioIo::new(io))
            .await;
        let (sender, connection) = match handshake {
            Ok(pair) => pair,
            Err(e) => return Err(pages::unreachable(sandbox, port, &e.to_string())),
        };
        let held = Arc::clone(&slot);
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
            drop(held);
        });
        Ok(Upstream {
            sandbox: sandbox.to_string(),
            port,
            sender,
            slot,
        })
    }

    /// Sends `req` to guest `port` of `sandbox` on the client connection's
    /// kept guest connection (opened or replaced as needed).
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        sandbox: &str,
        vsock: &Path,
        port: u16,
        kept: &Kept,
    ) -> Response<Body> {
        let mut kept = kept.lock().await;
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        // One more try on a new connection when the kept one turns out
        // closed before the request went out (a server's keep-alive ended).
        let mut tries = 0;
        let response = loop {
            tries += 1;
            let reusable = kept
                .as_ref()
                .is_some_and(|u| u.sandbox == sandbox && u.port == port && !u.sender.is_closed());
            if !reusable {
                *kept = None;
                match self.open(sandbox, vsock, port).await {
                    Ok(u) => *kept = Some(u),
                    Err(page) => return page_response(page),
                }
            }
            let Some(up) = kept.as_mut() else {
                return page_response(pages::unreachable(sandbox, port, "no connection"));
            };
            let sent = match up.sender.ready().await {
                Ok(()) => up.sender.try_send_request(req).await,
                Err(e) => {
                    *kept = None;
                    if tries < 2 {
                        continue;
                    }
                    return page_response(pages::unreachable(sandbox, port, &e.to_string()));
                }
            };
            match sent {
                Ok(response) => break response,
                Err(mut e) => {
                    *kept = None;
                    match e.take_message() {
                        Some(unsent) if tries < 2 => req = unsent,
                        _ => {
                            let why = format!("the server closed the connection: {}", e.error());
                            log::info!("{sandbox} port {port}: {why}");
                            return page_response(pages::unreachable(sandbox, port, &why));
                        }
                    }
                }
            }
        };
        let (mut parts, body) = response.into_parts();
        let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let guest_upgrade_value = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if upgraded {
            // The guest connection now carries the upgraded protocol.
            let Some(up) = kept.take() else {
                return page_response(pages::unreachable(sandbox, port, "no connection"));
            };
            let (Some(client_upgrade), Some(value)) = (client_upgrade, guest_upgrade_value) else {
                let why = "the server switched protocols without being asked";
                return page_response(pages::unreachable(sandbox, port, why));
            };
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, value);
            let mut guest_response = Response::from_parts(parts, body);
            let guest_upgrade = hyper::upgrade::on(&mut guest_response);
            tokio::spawn(splice(client_upgrade, guest_upgrade, up.slot));
            let (parts, body) = guest_response.into_parts();
            return Response::from_parts(parts, body.boxed());
        }
        Response::from_parts(parts, body.boxed())
    }
}

/// Relays the two upgraded connections until either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    guest: hyper::upgrade::OnUpgrade,
    slot: Arc<OwnedSemaphorePermit>,
) {
    let (Ok(client), Ok(guest)) = (client.await, guest.await) else {
        return;
    };
    let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
    drop(slot);
}
