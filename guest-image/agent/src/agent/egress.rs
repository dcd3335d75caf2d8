//! Outbound connections for the guest's programs (`Egress`,
//! `EgressAttach`; protocol minor 3).
//!
//! The guest has no network interface. Its programs reach the outside
//! through an HTTP proxy the agent serves on the guest's own loopback
//! ([`PROXY_PORT`]; commands get `http_proxy`/`https_proxy` pointing at
//! it): `CONNECT host:port` for TLS and anything else, absolute-form
//! requests (`GET http://host/...`) for plain HTTP. For each, the agent
//! sends an [`EgressAsk`] on the `Egress` connection the host holds open
//! and waits for the host's `EgressAttach`: a refusal (the host's policy
//! said no, or the target did not answer) becomes an HTTP error with the
//! host's reason, an attach becomes the program's tunnel. The agent never
//! opens a connection to the host and dials nothing itself. With no
//! `Egress` connection the proxy answers 503 with the reason, from the
//! kernel command line's `keystone.network` ([`NetworkSetting`]) and
//! whether the host ever offered: a sandbox started with `--network none`,
//! one whose network is still starting, or one whose supervisor withdrew
//! its offer.

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{
    read_frame, write_frame, write_raw, EgressAsk, Frame, FrameKind, ProtocolError, Response,
};
use crate::relay::relay;
use crate::transport::DuplexStream;

mod request;

/// The guest port of the proxy (the customary one for HTTP proxies).
pub const PROXY_PORT: u16 = 3128;
/// How long a program has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the host has to answer an ask (its connect timeout is shorter).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(40);

/// What the host set up for the sandbox's network
/// (`keystone.network=nat|none` on the kernel command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkSetting {
    /// Outbound connections through the host: an offer is expected.
    Nat,
    /// No network at all.
    None,
    /// Not said (an older host).
    Unknown,
}

impl NetworkSetting {
    /// The setting named on a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Self {
        match super::init::cmdline_value(cmdline, "keystone.network") {
            Some("nat") => Self::Nat,
            Some("none") => Self::None,
            _ => Self::Unknown,
        }
    }

    /// Why there is no connection to offer, as the program reads it.
    fn no_offer_reason(self, offered_before: bool) -> &'static str {
        match (self, offered_before) {
            (Self::None, _) => "this sandbox has no network: it was started with --network none",
            (Self::Nat, false) => {
                "this sandbox is starting: its network is not up yet; try again in a moment"
            }
            (Self::Nat, true) => {
                "this sandbox's network is down: its supervisor stopped offering connections \
                 (the sandbox may be stopping)"
            }
            (Self::Unknown, _) => {
                "this sandbox has no network: it was started with --network none, or its \
                 supervisor is not offering connections"
            }
        }
    }
}

/// The guest end of a connection the host made for an ask, with bytes
/// that came with it, or the host's reason for refusing.
type Attach = Result<(Box<dyn DuplexStream>, Vec<u8>), String>;

/// The proxy and its link to the host.
pub struct Egress {
    address: SocketAddr,
    network: NetworkSetting,
    /// The host has offered connections since the agent started.
    offered: AtomicBool,
    /// The current `Egress` connection: (its number, its writer).
    control: Mutex<Option<(u64, Box<dyn DuplexStream>)>>,
    /// Asks waiting for the host's attach, by id.
    pending: Mutex<HashMap<u64, SyncSender<Attach>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Egress {
    /// Listens on `address` (the guest's 127.0.0.1:[`PROXY_PORT`]) and
    /// serves the proxy from a thread.
    pub fn listen(address: SocketAddr, network: NetworkSetting) -> io::Result<Arc<Self>> {
        let listener = TcpListener::bind(address)?;
        let egress = Arc::new(Egress {
            address: listener.local_addr()?,
            network,
            offered: AtomicBool::new(false),
            control: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let serving = Arc::clone(&egress);
        std::thread::Builder::new()
            .name("egress-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let egress = Arc::clone(&serving);
                    let _ = std::thread::Builder::new()
                        .name("egress-client".into())
                        .spawn(move || egress.serve_client(client));
                }
            })?;
        Ok(egress)
    }

    /// The proxy's URL, for `http_proxy` and friends.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// `Egress`: this connection carries the asks until it closes.
    pub fn run_control(
        &self,
        mut reader: BufReader<Box<dyn DuplexStream>>,
        mut writer: Box<dyn DuplexStream>,
    ) -> Result<(), ProtocolError> {
        write_frame(
            &mut writer,
            &Frame::json(FrameKind::Response, &Response::Done),
        )?;
        let number = self.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&self.control) = Some((number, writer));
        self.offered.store(true, Ordering::SeqCst);
        log::info!("egress: the host offers outbound connections");
        // The host sends nothing more; its end of stream ends the offer.
        while let Ok(Some(_)) = read_frame(&mut reader) {}
        let mut control = lock(&self.control);
        if control.as_ref().is_some_and(|(n, _)| *n == number) {
            *control = None;
            log::info!("egress: the host withdrew its offer");
        }
        Ok(())
    }

    /// `EgressAttach`: hands this connection (or the refusal) to the
    /// program waiting for ask `id`.
    pub fn run_attach(
        &self,
        reader: BufReader<Box<dyn DuplexStream>>,
        mut writer: Box<dyn DuplexStream>,
        id: u64,
        refused: Option<String>,
    ) -> Result<(), ProtocolError> {
        let Some(waiter) = lock(&self.pending).remove(&id) else {
            return write_raw(
                &mut writer,
                FrameKind::Error,
                format!("no program is waiting for egress connection {id}").as_bytes(),
            );
        };
        write_frame(
            &mut writer,
            &Frame::json(FrameKind::Response, &Response::Done),
        )?;
        let attach = match refused {
            Some(reason) => Err(reason),
            None => {
                let early = reader.buffer().to_vec();
                drop(reader);
                Ok((writer, early))
            }
        };
        // A waiter that gave up has dropped its receiver: nothing to do.
        let _ = waiter.send(attach);
        Ok(())
    }

    /// Sends an ask on the control connection; false when there is none.
    fn ask(&self, ask: &EgressAsk) -> bool {
        let mut control = lock(&self.control);
        let Some((_, writer)) = control.as_mut() else {
            return false;
        };
        if write_frame(writer, &Frame::json(FrameKind::EgressAsk, ask)).is_err() {
            *control = None;
            return false;
        }
        true
    }

    fn serve_client(&self, mut client: TcpStream) {
        let _ = client.set_nodelay(true);
        let timeouts = client.try_clone();
        let set_timeout = |t| {
            if let Ok(c) = &timeouts {
                let _ = c.set_read_timeout(t);
            }
        };
        let (request, rest) = match request::read_request(&mut client, set_timeout, HEAD_TIMEOUT) {
            Ok(r) => r,
            Err(msg) => return http_error(&mut client, 400, "Bad Request", &msg),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel::<Attach>(1);
        lock(&self.pending).insert(id, tx);
        let ask = EgressAsk {
            id,
            host: request.host.clone(),
            port: request.port,
        };
        if !self.ask(&ask) {
            lock(&self.pending).remove(&id);
            let reason = self
                .network
                .no_offer_reason(self.offered.load(Ordering::SeqCst));
            return http_error(&mut client, 503, "Service Unavailable", reason);
        }
        let t0 = Instant::now();
        let attach = match rx.recv_timeout(ATTACH_TIMEOUT) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                lock(&self.pending).remove(&id);
                return http_error(
                    &mut client,
                    504,
                    "Gateway Timeout",
                    &format!(
                        "the host did not connect to {}:{} in time",
                        ask.host, ask.port
                    ),
                );
            }
        };
        let (mut tunnel, early) = match attach {
            Ok(t) => t,
            Err(reason) => return http_error(&mut client, 403, "Forbidden", &reason),
        };
        log::debug!(
            "egress {id}: {}:{} attached after {:?}",
            ask.host,
            ask.port,
            t0.elapsed()
        );
        let started = match &request.forward {
            None => client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .and_then(|()| tunnel.write_all(&rest)),
            Some(head) => tunnel
                .write_all(head)
                .and_then(|()| tunnel.write_all(&rest)),
        };
        let started = started.and_then(|()| client.write_all(&early));
        if started.is_err() {
            return;
        }
        let _ = relay(Box::new(client), tunnel);
    }
}

fn http_error(client: &mut TcpStream, code: u16, phrase: &str, message: &str) {
    log::info!("egress proxy: {code} {message}");
    let body = format!("keystone sandbox: {message}\n");
    let _ = write!(
        client,
        "HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.shutdown(std::net::Shutdown::Write);
}
