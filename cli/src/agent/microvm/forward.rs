//! The guest's listening ports, watched by the supervisor: every second it
//! asks the guest agent which TCP ports listen and keeps the answer in
//! `run/forwards.json` in the sandbox's folder (a JSON array of
//! [`PortForward`]), which `status`, `attach --web` and the per-user
//! dev-server proxy (`agent/proxy`) read. The file is removed when the
//! supervisor ends. The first answer reports the port watch up to `start`.
//!
//! The host reaches a guest port by name through the proxy
//! (`http://<port>.<sandbox>.localhost:<P>/`), which opens an agent
//! connection with `TcpConnect` per connection; the guest never connects
//! to the host (security invariant 2), and by default no host port is
//! opened for a guest port at all: the guest never chooses a host port.
//!
//! What is routable (see [`not_routed_because`]): ports from 1024 up that
//! listen on the guest's loopback or on all addresses, except the guest
//! agent's own ([`AGENT_OWN_PORTS`], e.g. its HTTP proxy for egress).
//! Ports below 1024 are the guest's system services (a dev server does not
//! need root), and a port bound to one other guest address only cannot be
//! reached through the loopback; both are listed with a note instead.
//!
//! With `[proxy] publish_same_port = true` the supervisor also listens on
//! the host's 127.0.0.1 at each routable port's own number, when that
//! number is free on both 127.0.0.1 and ::1 (`publish.rs`; at most
//! [`MAX_PUBLISHED`]); those listeners close with their guest port and
//! when the supervisor ends.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keystone_guest_agent::protocol::ListeningPort;

use super::super::backend::PortForward;
use super::super::fsutil;
use super::engine::Layout;
use super::guest;
use super::readiness::{Readiness, Service};

mod publish;

pub use publish::{forward_until_interrupted, ForwardError};

/// How often the guest's listening ports are read, at the most.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often they are read at the least, however slow the guest answers.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(15);
/// A poll may take this share of the time between polls, at the most.
const POLL_SHARE: u32 = 20;
/// Guest ports below this are not routed.
pub const FIRST_ROUTED_PORT: u16 = 1024;
/// The guest agent's own listening ports: never routed nor published.
pub const AGENT_OWN_PORTS: &[u16] = &[keystone_guest_agent::agent::egress::PROXY_PORT];
/// The most guest ports published at once (each holds a host listener and
/// a thread; the guest decides how many ports listen).
pub const MAX_PUBLISHED: usize = 64;
/// The most guest ports listed in `forwards.json` (the lowest ones).
pub const MAX_LISTED: usize = 256;

/// The file the supervisor keeps the guest's listening ports in.
pub fn forwards_file(layout: &Layout) -> PathBuf {
    layout.run.join("forwards.json")
}

/// The listening ports of a running sandbox; `None` when its supervisor
/// keeps none (not started, or stopped).
pub fn read_forwards(layout: &Layout) -> Option<Vec<PortForward>> {
    read_file(&forwards_file(layout))
}

/// The most bytes of `forwards.json` read (its writer lists at most
/// [`MAX_LISTED`] ports).
const MAX_FILE: u64 = 1 << 20;

fn read_file(file: &Path) -> Option<Vec<PortForward>> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file)
        .ok()?
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Why a guest port is not routed, or `None` when it is routable.
pub fn not_routed_because(port: u16, addresses: &[IpAddr]) -> Option<String> {
    if AGENT_OWN_PORTS.contains(&port) {
        return Some("not routed: the sandbox's own HTTP proxy for outbound connections".into());
    }
    if port < FIRST_ROUTED_PORT {
        return Some(format!(
            "not routed: a system port (below {FIRST_ROUTED_PORT})"
        ));
    }
    if !addresses
        .iter()
        .any(|a| a.is_loopback() || a.is_unspecified())
    {
        return Some(
            "not routed: it listens on a non-loopback guest address only; \
             listen on 127.0.0.1 or all addresses"
                .to_string(),
        );
    }
    None
}

/// Whether an entry of `forwards.json` is a routable port.
pub fn is_routable(entry: &PortForward) -> bool {
    let address: Option<IpAddr> = entry.guest_address.parse().ok();
    not_routed_because(entry.guest_port, address.as_slice()).is_none()
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

/// The supervisor's port watch; dropping it closes every published port
/// and removes the forwards file.
pub struct PortForwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    file: PathBuf,
}

impl PortForwarder {
    /// Starts polling the guest through the sandbox's vsock socket once
    /// its agent is up; the first answer reports the port watch up in
    /// `ready`. With `publish`, routable ports also get a host listener at
    /// their own number (`[proxy] publish_same_port`).
    pub fn start(layout: &Layout, ready: &Arc<Readiness>, publish: bool) -> Self {
        let file = forwards_file(layout);
        write_file(&file, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let vsock = layout.vsock.clone();
            let file = file.clone();
            let ready = Arc::clone(ready);
            std::thread::Builder::new()
                .name("port-watch".into())
                .spawn(move || {
                    if ready.wait_up(Service::Agent, &stop) {
                        let watch = Watch::new(&vsock, publish);
                        poll_loop(watch, &file, &stop, &ready);
                    }
                })
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("cannot start the port watch: {e}");
                None
            }
        };
        Self { stop, thread, file }
    }

    /// Ends the watch and closes every published port (the guest is going
    /// away); a second call does nothing.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_file(file: &Path, forwards: &[PortForward]) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = fsutil::write_json_atomic(file, &forwards) {
        log::warn!("cannot write {}: {e}", file.display());
    }
}

/// The watch's state between polls.
struct Watch<'a> {
    vsock: &'a Path,
    /// The host listeners, when ports are published.
    published: Option<publish::Publisher<'a>>,
}

impl<'a> Watch<'a> {
    fn new(vsock: &'a Path, publish: bool) -> Self {
        Self {
            vsock,
            published: publish.then(|| publish::Publisher::new(vsock)),
        }
    }

    /// The view of the guest's ports (publishing them when asked).
    fn reconcile(&mut self, listening: &[ListeningPort]) -> Vec<PortForward> {
        let wanted = by_port(listening);
        if wanted.len() > MAX_LISTED {
            log::info!(
                "the guest listens on {} ports: listing the lowest {MAX_LISTED}",
                wanted.len()
            );
        }
        let listed: BTreeMap<u16, Vec<IpAddr>> = wanted.into_iter().take(MAX_LISTED).collect();
        if let Some(p) = &mut self.published {
            p.close_gone(&listed);
        }
        let mut view = Vec::new();
        for (port, addresses) in &listed {
            let mut entry = PortForward {
                guest_port: *port,
                guest_address: shown_address(addresses),
                host_port: None,
                url: None,
                note: not_routed_because(*port, addresses),
            };
            if entry.note.is_none() {
                if let Some(p) = &mut self.published {
                    match p.publish(*port) {
                        Ok(host_port) => entry.host_port = Some(host_port),
                        Err(why) => entry.note = Some(why.to_string()),
                    }
                }
            }
            view.push(entry);
        }
        view
    }

    fn close_all(&mut self) {
        if let Some(p) = &mut self.published {
            p.close_gone(&BTreeMap::new());
        }
    }
}

/// The time between two polls when one took `took`: a poll costs the
/// guest kernel time (where KVM emulates it, a large share of a second),
/// so a slow answer spaces the next poll out to keep that share at
/// 1/[`POLL_SHARE`].
fn poll_interval(took: Duration) -> Duration {
    (took * POLL_SHARE).clamp(POLL_INTERVAL, MAX_POLL_INTERVAL)
}

fn poll_loop(mut watch: Watch<'_>, file: &Path, stop: &AtomicBool, ready: &Readiness) {
    let vsock = watch.vsock;
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
                    let view = watch.reconcile(&ports);
                    if view != written {
                        write_file(file, &view);
                        written = view;
                    }
                    ready.up(Service::Ports);
                }
                Err(e) if reached && !failing => {
                    failing = true;
                    log::warn!("cannot read the guest's listening ports: {e}");
                }
                Err(_) => {}
            }
        }
        let interval = poll_interval(t.elapsed());
        while !stop.load(Ordering::SeqCst) && t.elapsed() < interval {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    watch.close_all();
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

    pub(super) fn lp(port: u16, addr: &str) -> ListeningPort {
        ListeningPort {
            port,
            address: addr.parse().unwrap(),
        }
    }

    #[test]
    fn which_guest_ports_are_routed() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let other: IpAddr = "10.0.2.15".parse().unwrap();
        assert_eq!(not_routed_because(3000, &[lo]), None);
        assert_eq!(not_routed_because(8082, &[any6]), None);
        assert_eq!(not_routed_because(5000, &[other, lo]), None);
        assert!(not_routed_because(22, &[lo])
            .unwrap()
            .contains("below 1024"));
        assert!(not_routed_because(5000, &[other])
            .unwrap()
            .contains("non-loopback"));
        assert!(not_routed_because(3128, &[lo])
            .unwrap()
            .contains("own HTTP proxy"));
        let grouped = by_port(&[lp(3000, "127.0.0.1"), lp(3000, "::1"), lp(22, "0.0.0.0")]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(shown_address(&grouped[&3000]), "127.0.0.1");
    }

    #[test]
    fn by_default_no_host_port_is_opened_for_a_guest_port() {
        // A port no test binds: had the watch opened a host listener for
        // it, 127.0.0.1 would accept there.
        let guest_port = 47391;
        let mut watch = Watch::new(Path::new("/nonexistent/vsock.sock"), false);
        let view = watch.reconcile(&[
            lp(guest_port, "127.0.0.1"),
            lp(5432, "0.0.0.0"),
            lp(3128, "127.0.0.1"),
            lp(81, "0.0.0.0"),
        ]);
        assert_eq!(view.len(), 4, "{view:?}");
        assert!(view.iter().all(|v| v.host_port.is_none()), "{view:?}");
        let routable: Vec<u16> = view
            .iter()
            .filter(|v| is_routable(v))
            .map(|v| v.guest_port)
            .collect();
        assert_eq!(routable, [5432, guest_port]);
        assert!(std::net::TcpStream::connect(("127.0.0.1", guest_port)).is_err());
    }

    #[test]
    fn a_guest_with_many_ports_gets_a_bounded_list() {
        let mut watch = Watch::new(Path::new("/nonexistent/vsock.sock"), false);
        let ports: Vec<ListeningPort> = (0..MAX_LISTED as u16 + 50)
            .map(|i| lp(20000 + i, "127.0.0.1"))
            .collect();
        let view = watch.reconcile(&ports);
        assert_eq!(view.len(), MAX_LISTED);
        assert_eq!(view[0].guest_port, 20000);
    }
}
