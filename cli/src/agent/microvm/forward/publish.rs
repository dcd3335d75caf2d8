//! Host listeners for guest ports, raw TCP: each connection accepted on
//! the host's 127.0.0.1 opens its own agent connection with `TcpConnect`
//! and relays bytes both ways. Only a user's explicit choice opens one:
//! `[proxy] publish_same_port = true` (the supervisor publishes each
//! routable guest port at its own number, [`Publisher`]) or
//! `keystone agent forward` ([`forward_until_interrupted`]).
//!
//! A host port is taken only when it is free on both 127.0.0.1 and ::1
//! ([`bind_free`]): a listener beside a host server on the other loopback
//! would answer for it to clients that resolve `localhost` the other way.
//! The host never listens on anything but 127.0.0.1, never at a port
//! other than the one asked for, and never at one of the guest agent's
//! own ports. Relays per listener are bounded ([`MAX_RELAYS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keystone_guest_agent::transport::DuplexStream;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::super::guest;
use super::{AGENT_OWN_PORTS, MAX_PUBLISHED};

/// How long an accept loop sleeps in poll(2) before checking for a stop.
const ACCEPT_TICK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 200_000_000,
};
/// The most connections one host listener relays at once; more are closed.
pub const MAX_RELAYS: usize = 128;

/// Why a host port cannot be opened for a guest port.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "guest port {0} is the sandbox agent's own (its HTTP proxy for outbound connections); \
         it is never forwarded"
    )]
    AgentPort(u16),
    #[error(
        "host port {port} is in use on {loopback}; pass another host port \
         (`keystone agent forward NAME GUEST_PORT HOST_PORT`)"
    )]
    InUse { port: u16, loopback: &'static str },
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Listen { port: u16, source: io::Error },
    #[error("the sandbox stopped; start it again and rerun the forward")]
    SandboxStopped,
}

/// Listens on 127.0.0.1:`port` when that port is free on both loopbacks
/// (a host without IPv6 has only the one).
pub fn bind_free(port: u16) -> Result<TcpListener, ForwardError> {
    let v4 = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            ForwardError::InUse {
                port,
                loopback: "127.0.0.1",
            }
        } else {
            ForwardError::Listen { port, source: e }
        }
    })?;
    let v6 = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    if let Err(e) = v6 {
        if e.kind() == io::ErrorKind::AddrInUse {
            return Err(ForwardError::InUse {
                port,
                loopback: "[::1]",
            });
        }
    }
    Ok(v4)
}

/// One host listener: its accept loop.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn open(listener: TcpListener, guest_port: u16, vsock: &Path) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let vsock = vsock.to_path_buf();
            std::thread::Builder::new()
                .name(format!("publish-{guest_port}"))
                .spawn(move || {
                    accept_loop(&listener, guest_port, &vsock, &|| {
                        !stop.load(Ordering::SeqCst)
                    })
                })?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the accept loop to end (within one accept tick).
    fn signal(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `keep_going` says no (checked every accept tick) and
/// relays each connection from a thread of its own, at most
/// [`MAX_RELAYS`] at once.
fn accept_loop(
    listener: &TcpListener,
    guest_port: u16,
    vsock: &Path,
    keep_going: &dyn Fn() -> bool,
) {
    let relays = Arc::new(AtomicUsize::new(0));
    let mut warned = false;
    while keep_going() {
        let mut pfd = [PollFd::new(listener, PollFlags::IN)];
        if !matches!(poll(&mut pfd, Some(&ACCEPT_TICK)), Ok(ready) if ready > 0) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if relays.fetch_add(1, Ordering::SeqCst) >= MAX_RELAYS {
                    relays.fetch_sub(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let (vsock, relays) = (vsock.to_path_buf(), Arc::clone(&relays));
                let spawned = std::thread::Builder::new()
                    .name(format!("publish-{guest_port}-conn"))
                    .spawn(move || {
                        relay_connection(stream, guest_port, &vsock);
                        relays.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    log::warn!("port {guest_port}: cannot start a relay thread: {e}");
                }
            }
            Err(e) => {
                if !warned {
                    log::warn!("port {guest_port}: accept failed: {e}");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Relays one accepted host connection to the guest port.
fn relay_connection(stream: TcpStream, guest_port: u16, vsock: &Path) {
    let _ = stream.set_nodelay(true);
    match guest::client(vsock).tcp_connect(guest_port) {
        Ok(tunnel) => {
            let _ = tunnel.relay(Box::new(stream) as Box<dyn DuplexStream>);
        }
        // The peer sees its connection closed, as with a refused port.
        Err(e) => log::info!("port {guest_port}: {e}"),
    }
}

/// Why a guest port is not published (the note `status` shows for it).
#[derive(Debug, thiserror::Error)]
pub enum NotPublished {
    /// It is one of the guest agent's own ports.
    #[error(transparent)]
    AgentPort(ForwardError),
    /// [`MAX_PUBLISHED`] ports are published already.
    #[error("not published: {MAX_PUBLISHED} guest ports are published already")]
    Full,
    /// The host port could not be taken.
    #[error("not published on the host: {0}")]
    Bind(#[source] ForwardError),
    /// The listener's thread could not start.
    #[error("not published on the host: {0}")]
    Thread(#[source] io::Error),
}

/// The supervisor's published ports (`[proxy] publish_same_port`).
pub struct Publisher<'a> {
    vsock: &'a Path,
    open: BTreeMap<u16, Listener>,
    /// Ports whose host listener could not be opened (logged once).
    failed: BTreeSet<u16>,
}

impl<'a> Publisher<'a> {
    pub fn new(vsock: &'a Path) -> Self {
        Self {
            vsock,
            open: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Closes the listeners of guest ports no longer in `listed`, all
    /// within about one accept tick.
    pub fn close_gone(&mut self, listed: &BTreeMap<u16, Vec<IpAddr>>) {
        let gone: Vec<u16> = self
            .open
            .keys()
            .copied()
            .filter(|p| !listed.contains_key(p))
            .collect();
        let mut closing = Vec::new();
        for port in gone {
            if let Some(l) = self.open.remove(&port) {
                log::info!("guest port {port} stopped listening: closing 127.0.0.1:{port}");
                l.signal();
                closing.push(l);
            }
        }
        drop(closing);
        self.failed.retain(|p| listed.contains_key(p));
    }

    /// Publishes the routable guest `port` at its own number on the host;
    /// the host port, or a note saying why it is not published.
    pub fn publish(&mut self, port: u16) -> Result<u16, NotPublished> {
        if self.open.contains_key(&port) {
            return Ok(port);
        }
        if AGENT_OWN_PORTS.contains(&port) {
            return Err(NotPublished::AgentPort(ForwardError::AgentPort(port)));
        }
        if self.open.len() >= MAX_PUBLISHED {
            return Err(NotPublished::Full);
        }
        let opened = bind_free(port)
            .map_err(NotPublished::Bind)
            .and_then(|l| Listener::open(l, port, self.vsock).map_err(NotPublished::Thread));
        match opened {
            Ok(l) => {
                log::info!("publishing guest port {port} on 127.0.0.1:{port}");
                self.failed.remove(&port);
                self.open.insert(port, l);
                Ok(port)
            }
            Err(why) => {
                if self.failed.insert(port) {
                    log::info!("guest port {port}: {why}");
                }
                Err(why)
            }
        }
    }
}

/// `keystone agent forward`: relays 127.0.0.1:`host_port` to `guest_port`
/// of the sandbox whose agent listens on `vsock` until the process is
/// interrupted, or until `alive` says the sandbox stopped (checked every
/// accept tick). `ready` is told once the host port listens.
pub fn forward_until_interrupted(
    vsock: PathBuf,
    guest_port: u16,
    host_port: u16,
    alive: &dyn Fn() -> bool,
    ready: &mut dyn FnMut(),
) -> Result<(), ForwardError> {
    if AGENT_OWN_PORTS.contains(&guest_port) {
        return Err(ForwardError::AgentPort(guest_port));
    }
    let listener = bind_free(host_port)?;
    ready();
    accept_loop(&listener, guest_port, &vsock, alive);
    Err(ForwardError::SandboxStopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that bind host ports run one at a time, so that a port
    /// one of them frees is not taken by the other.
    static HOST_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[test]
    fn a_port_taken_on_either_loopback_is_refused() {
        let _one = HOST_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = v4.local_addr().unwrap().port();
        let err = bind_free(taken).unwrap_err();
        assert!(
            matches!(
                err,
                ForwardError::InUse {
                    loopback: "127.0.0.1",
                    ..
                }
            ),
            "{err}"
        );
        match TcpListener::bind("[::1]:0") {
            Ok(v6) => {
                let taken = v6.local_addr().unwrap().port();
                let err = bind_free(taken).unwrap_err();
                assert!(
                    matches!(
                        err,
                        ForwardError::InUse {
                            loopback: "[::1]",
                            ..
                        }
                    ),
                    "{err}"
                );
                assert!(err.to_string().contains("in use on [::1]"), "{err}");
                // Refused means nothing was left listening on 127.0.0.1.
                assert!(TcpStream::connect(("127.0.0.1", taken)).is_err());
            }
            Err(e) => eprintln!("SKIP (the ::1 half): no IPv6 loopback here: {e}"),
        }
        let free = free_port();
        let l = bind_free(free).unwrap();
        assert_eq!(
            l.local_addr().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], free))
        );
    }

    #[test]
    fn the_agents_own_ports_are_never_published() {
        let mut p = Publisher::new(Path::new("/nonexistent/vsock.sock"));
        let err = p.publish(3128).unwrap_err().to_string();
        assert!(err.contains("never forwarded"), "{err}");
        let err = forward_until_interrupted(
            PathBuf::from("/nonexistent/vsock.sock"),
            3128,
            free_port(),
            &|| false,
            &mut || panic!("no listener for the agent's own port"),
        )
        .unwrap_err();
        assert!(matches!(err, ForwardError::AgentPort(3128)), "{err}");
    }
}
