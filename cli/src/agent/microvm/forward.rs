//! Guest port forwarding, run by the supervisor: every second it asks the
//! guest agent which TCP ports listen, and gives each one a listener on
//! the host's 127.0.0.1 (the same port number when it is free, else the
//! next free one above it). Each connection accepted there opens its own
//! agent connection with `TcpConnect` and relays bytes both ways; the
//! guest never connects to the host (security invariant 2).
//!
//! What is forwarded: ports from 1024 up that listen on the guest's
//! loopback or on all addresses. Ports below 1024 are the guest's system
//! services (a dev server does not need root), and a port bound to one
//! other guest address only cannot be reached through the loopback; both
//! are listed with a note instead, as are ports beyond the first
//! [`MAX_FORWARDS`]. The host never listens on anything
//! but 127.0.0.1. A forward is closed once its guest port stops
//! listening (connections already relayed run on until they end), and
//! all are closed when the supervisor ends.
//!
//! The current forwards are written to `run/forwards.json` in the
//! sandbox's folder (a JSON array of [`PortForward`]), which `status`
//! and `attach --web` read; the file is removed when the supervisor ends.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keystone_guest_agent::protocol::ListeningPort;
use keystone_guest_agent::transport::DuplexStream;

use super::super::backend::PortForward;
use super::super::fsutil;
use super::engine::Layout;
use super::guest;
use super::readiness::{Readiness, Service};

/// How often the guest's listening ports are read, at the most.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often they are read at the least, however slow the guest answers.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(15);
/// A poll may take this share of the time between polls, at the most.
const POLL_SHARE: u32 = 20;
/// Guest ports below this are not forwarded.
pub const FIRST_FORWARDED_PORT: u16 = 1024;
/// The most guest ports forwarded at once (each holds a host listener and
/// a thread; the guest decides how many ports listen).
pub const MAX_FORWARDS: usize = 64;
/// How many ports above a taken one are tried before any free port.
const PORT_SEARCH: u16 = 100;
/// How long an accept loop sleeps in poll(2) before checking for a stop.
const ACCEPT_TICK_MS: libc::c_int = 200;

/// The file the supervisor keeps the current forwards in.
pub fn forwards_file(layout: &Layout) -> PathBuf {
    layout.run.join("forwards.json")
}

/// The current forwards of a running sandbox; `None` when its supervisor
/// keeps none (not started, or stopped).
pub fn read_forwards(layout: &Layout) -> Option<Vec<PortForward>> {
    read_file(&forwards_file(layout))
}

fn read_file(file: &Path) -> Option<Vec<PortForward>> {
    let text = std::fs::read_to_string(file).ok()?;
    serde_json::from_str(&text).ok()
}

/// The host URL of a forwarded port.
pub fn url(sandbox: &str, host_port: u16) -> String {
    format!("http://{sandbox}.localhost:{host_port}")
}

/// Why a guest port is not forwarded, or `None` when it is forwardable.
fn not_forwarded_because(port: u16, addresses: &[IpAddr]) -> Option<String> {
    if port < FIRST_FORWARDED_PORT {
        return Some(format!(
            "not forwarded: a system port (below {FIRST_FORWARDED_PORT})"
        ));
    }
    if !addresses
        .iter()
        .any(|a| a.is_loopback() || a.is_unspecified())
    {
        return Some(
            "not forwarded: it listens on a non-loopback guest address only; \
             listen on 127.0.0.1 or all addresses"
                .to_string(),
        );
    }
    None
}

/// Groups the agent's report by port (a server may listen on both
/// 127.0.0.1 and ::1, or on 0.0.0.0 and ::).
fn by_port(ports: &[ListeningPort]) -> BTreeMap<u16, Vec<IpAddr>> {
    let mut map: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for p in ports {
        map.entry(p.port).or_default().push(p.address);
    }
    map
}

/// The address shown for a port: a loopback or wildcard one if any.
fn shown_address(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .find(|a| a.is_loopback() || a.is_unspecified())
        .or(addresses.first())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Binds 127.0.0.1 at `want`, else the next free port above it, else any.
fn bind_host_port(want: u16) -> std::io::Result<TcpListener> {
    let last = want.saturating_add(PORT_SEARCH);
    for port in want..=last {
        if let Ok(l) = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            return Ok(l);
        }
    }
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
}

/// One forwarded port: its accept loop.
struct Forward {
    host_port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forward {
    fn open(guest_port: u16, vsock: &Path, log: fn(&str)) -> std::io::Result<Self> {
        let listener = bind_host_port(guest_port)?;
        let host_port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let vsock = vsock.to_path_buf();
            std::thread::Builder::new()
                .name(format!("fwd-{guest_port}"))
                .spawn(move || accept_loop(listener, guest_port, &vsock, &stop, log))?
        };
        Ok(Self {
            host_port,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the accept loop to end (within one accept tick).
    fn signal(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Ends the accept loop and waits for it; the listener is closed.
    fn close(&mut self) {
        self.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Closes many forwards in about one accept tick, not one tick each.
fn close_all(forwards: impl IntoIterator<Item = Forward>) {
    let forwards: Vec<Forward> = forwards.into_iter().collect();
    for f in &forwards {
        f.signal();
    }
    drop(forwards);
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(
    listener: TcpListener,
    guest_port: u16,
    vsock: &Path,
    stop: &AtomicBool,
    log: fn(&str),
) {
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a descriptor the listener keeps open.
        let ready = unsafe { libc::poll(&mut pfd, 1, ACCEPT_TICK_MS) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let vsock = vsock.to_path_buf();
                let spawned = std::thread::Builder::new()
                    .name(format!("fwd-{guest_port}-conn"))
                    .spawn(move || relay_connection(stream, guest_port, &vsock, log));
                if let Err(e) = spawned {
                    log(&format!(
                        "port {guest_port}: cannot start a relay thread: {e}"
                    ));
                }
            }
            Err(e) => {
                if !warned {
                    log(&format!("port {guest_port}: accept failed: {e}"));
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Relays one accepted host connection to the guest port.
fn relay_connection(stream: TcpStream, guest_port: u16, vsock: &Path, log: fn(&str)) {
    let _ = stream.set_nodelay(true);
    match guest::client(vsock).tcp_connect(guest_port) {
        Ok(tunnel) => {
            let _ = tunnel.relay(Box::new(stream) as Box<dyn DuplexStream>);
        }
        // The peer sees its connection closed, as with a refused port.
        Err(e) => log(&format!("port {guest_port}: {e}")),
    }
}

/// The supervisor's port forwarder; dropping it closes every forward and
/// removes the forwards file.
pub struct PortForwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    file: PathBuf,
}

impl PortForwarder {
    /// Starts polling the guest of `sandbox` through `vsock` once its agent
    /// is up; the first answer reports the port watch up in `ready`.
    pub fn start(sandbox: &str, layout: &Layout, ready: &Arc<Readiness>, log: fn(&str)) -> Self {
        let file = forwards_file(layout);
        write_file(&file, &[], log);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let sandbox = sandbox.to_string();
            let vsock = layout.vsock.clone();
            let file = file.clone();
            let ready = Arc::clone(ready);
            std::thread::Builder::new()
                .name("port-forwarder".into())
                .spawn(move || {
                    if ready.wait_up(Service::Agent, &stop) {
                        poll_loop(&sandbox, &vsock, &file, &stop, &ready, log);
                    }
                })
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log(&format!("cannot start the port forwarder: {e}"));
                None
            }
        };
        Self { stop, thread, file }
    }

    /// Closes every forward (the guest is going away) and returns the host
    /// ports that were forwarded; a second call returns none.
    pub fn stop(&mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let forwarded = read_file(&self.file).unwrap_or_default();
        let _ = std::fs::remove_file(&self.file);
        forwarded.iter().filter_map(|f| f.host_port).collect()
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn write_file(file: &Path, forwards: &[PortForward], log: fn(&str)) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = fsutil::write_json_atomic(file, &forwards) {
        log(&format!("cannot write {}: {e}", file.display()));
    }
}

/// The forwarder's state between polls.
struct Forwarder<'a> {
    sandbox: &'a str,
    vsock: &'a Path,
    log: fn(&str),
    open: BTreeMap<u16, Forward>,
    /// Ports whose host listener could not be opened (logged once).
    failed: BTreeMap<u16, String>,
}

impl Forwarder<'_> {
    /// Opens and closes forwards to match the guest; returns the view.
    fn reconcile(&mut self, listening: &[ListeningPort]) -> Vec<PortForward> {
        let wanted = by_port(listening);
        let gone: Vec<u16> = self
            .open
            .keys()
            .copied()
            .filter(|p| !wanted.contains_key(p))
            .collect();
        let mut closing = Vec::new();
        for port in gone {
            if let Some(f) = self.open.remove(&port) {
                (self.log)(&format!(
                    "guest port {port} stopped listening: closing 127.0.0.1:{}",
                    f.host_port
                ));
                closing.push(f);
            }
        }
        close_all(closing);
        self.failed.retain(|p, _| wanted.contains_key(p));
        let mut view = Vec::new();
        for (port, addresses) in &wanted {
            let mut entry = PortForward {
                guest_port: *port,
                guest_address: shown_address(addresses),
                host_port: None,
                url: None,
                note: None,
            };
            if let Some(why) = not_forwarded_because(*port, addresses) {
                entry.note = Some(why);
                view.push(entry);
                continue;
            }
            if !self.open.contains_key(port) && self.open.len() >= MAX_FORWARDS {
                entry.note = Some(format!(
                    "not forwarded: {MAX_FORWARDS} guest ports are forwarded already"
                ));
                view.push(entry);
                continue;
            }
            if !self.open.contains_key(port) {
                match Forward::open(*port, self.vsock, self.log) {
                    Ok(f) => {
                        (self.log)(&format!(
                            "forwarding guest port {port} to 127.0.0.1:{}",
                            f.host_port
                        ));
                        self.failed.remove(port);
                        self.open.insert(*port, f);
                    }
                    Err(e) => {
                        let why = format!("not forwarded: no host port could be opened ({e})");
                        if self.failed.insert(*port, why.clone()).is_none() {
                            (self.log)(&format!("guest port {port}: {why}"));
                        }
                    }
                }
            }
            match self.open.get(port) {
                Some(f) => {
                    entry.host_port = Some(f.host_port);
                    entry.url = Some(url(self.sandbox, f.host_port));
                }
                None => entry.note = self.failed.get(port).cloned(),
            }
            view.push(entry);
        }
        view
    }
}

/// The time between two polls when one took `took`: a poll costs the
/// guest kernel time (where KVM emulates it, a large share of a second),
/// so a slow answer spaces the next poll out to keep that share at
/// 1/[`POLL_SHARE`].
fn poll_interval(took: Duration) -> Duration {
    (took * POLL_SHARE).clamp(POLL_INTERVAL, MAX_POLL_INTERVAL)
}

fn poll_loop(
    sandbox: &str,
    vsock: &Path,
    file: &Path,
    stop: &AtomicBool,
    ready: &Readiness,
    log: fn(&str),
) {
    let mut fwd = Forwarder {
        sandbox,
        vsock,
        log,
        open: BTreeMap::new(),
        failed: BTreeMap::new(),
    };
    let mut written: Vec<PortForward> = Vec::new();
    let mut reached = false;
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        // Until the agent first answers the guest is booting: no noise.
        if vsock.exists() {
            let client = guest::quick_client(vsock, Duration::from_secs(3));
            match client.listening_ports() {
                Ok(ports) => {
                    reached = true;
                    failing = false;
                    let view = fwd.reconcile(&ports);
                    if view != written {
                        write_file(file, &view, log);
                        written = view;
                    }
                    ready.up(Service::Ports);
                }
                Err(e) if reached && !failing => {
                    failing = true;
                    log(&format!("cannot read the guest's listening ports: {e}"));
                }
                Err(_) => {}
            }
        }
        let interval = poll_interval(t.elapsed());
        while !stop.load(Ordering::SeqCst) && t.elapsed() < interval {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    close_all(std::mem::take(&mut fwd.open).into_values());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_guest_is_polled_less_often() {
        assert_eq!(poll_interval(Duration::from_millis(5)), POLL_INTERVAL);
        assert_eq!(
            poll_interval(Duration::from_millis(200)),
            Duration::from_secs(4)
        );
        assert_eq!(poll_interval(Duration::from_secs(5)), MAX_POLL_INTERVAL);
    }

    /// The tests that bind host ports run one at a time, so that a port
    /// one of them frees is not taken by the other.
    static HOST_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn lp(port: u16, addr: &str) -> ListeningPort {
        ListeningPort {
            port,
            address: addr.parse().unwrap(),
        }
    }

    #[test]
    fn which_guest_ports_are_forwarded() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let other: IpAddr = "10.0.2.15".parse().unwrap();
        assert_eq!(not_forwarded_because(3000, &[lo]), None);
        assert_eq!(not_forwarded_because(8082, &[any6]), None);
        assert_eq!(not_forwarded_because(5000, &[other, lo]), None);
        assert!(not_forwarded_because(22, &[lo])
            .unwrap()
            .contains("below 1024"));
        assert!(not_forwarded_because(5000, &[other])
            .unwrap()
            .contains("non-loopback"));
        let grouped = by_port(&[lp(3000, "127.0.0.1"), lp(3000, "::1"), lp(22, "0.0.0.0")]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(shown_address(&grouped[&3000]), "127.0.0.1");
        assert_eq!(url("app-1a2b3c", 3001), "http://app-1a2b3c.localhost:3001");
    }

    #[test]
    fn a_taken_host_port_moves_to_the_next_free_one() {
        let _one = HOST_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let first = bind_host_port(0).unwrap();
        let taken = first.local_addr().unwrap().port();
        let second = bind_host_port(taken).unwrap();
        let got = second.local_addr().unwrap();
        assert!(got.ip().is_loopback(), "{got}");
        assert_ne!(got.port(), taken);
    }

    #[test]
    fn a_guest_with_many_ports_gets_a_bounded_number_of_forwards() {
        let _one = HOST_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        fn log(_: &str) {}
        let mut fwd = Forwarder {
            sandbox: "box",
            vsock: Path::new("/nonexistent/vsock.sock"),
            log,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
        };
        let ports: Vec<ListeningPort> = (0..MAX_FORWARDS as u16 + 6)
            .map(|i| lp(47000 + i, "127.0.0.1"))
            .collect();
        let view = fwd.reconcile(&ports);
        assert_eq!(view.len(), ports.len());
        let forwarded = view.iter().filter(|v| v.host_port.is_some()).count();
        assert_eq!(forwarded, MAX_FORWARDS);
        assert!(view.iter().filter(|v| v.host_port.is_none()).all(|v| v
            .note
            .as_deref()
            .unwrap_or("")
            .contains("forwarded already")));
        assert!(fwd.reconcile(&[]).is_empty());
        assert!(fwd.open.is_empty());
    }

    #[test]
    fn forwards_follow_the_guest_and_relay_through_the_agent() {
        use keystone_guest_agent::agent::{self, AgentConfig};
        use keystone_guest_agent::transport::AgentListener;
        use std::io::{Read, Write};

        let _one = HOST_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = fsutil::test_support::TempDir::new("forward");
        // A guest agent on a plain Unix socket stands in for the vsock one:
        // the forwarder's connections do the hybrid handshake, so serve
        // that first line by hand.
        let vsock = dir.path().join("vsock.sock");
        let inner = dir.path().join("agent.sock");
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

        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in server.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf.map(|c| c.to_ascii_uppercase())).unwrap();
            }
        });
        fn log(_: &str) {}
        let mut fwd = Forwarder {
            sandbox: "box",
            vsock: &vsock,
            log,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
        };
        let view = fwd.reconcile(&[lp(guest_port, "127.0.0.1"), lp(22, "0.0.0.0")]);
        assert_eq!(view.len(), 2, "{view:?}");
        let ssh = view.iter().find(|v| v.guest_port == 22).unwrap();
        assert_eq!(ssh.host_port, None);
        let web = view.iter().find(|v| v.guest_port == guest_port).unwrap();
        // The same number is taken on this host (the stand-in server holds
        // it), so the forward moved to another port.
        let host_port = web.host_port.unwrap();
        assert_ne!(host_port, guest_port);
        assert_eq!(web.url.as_deref(), Some(url("box", host_port).as_str()));
        let mut c = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"HELLO");
        // The guest port goes away: the host listener closes.
        let view = fwd.reconcile(&[]);
        assert!(view.is_empty());
        // A child another test forks at this moment holds a copy of the
        // listening socket until its exec: allow a moment for that.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", host_port)).is_ok() {
            assert!(Instant::now() < deadline, "port {host_port} still accepts");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
