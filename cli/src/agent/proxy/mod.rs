//! The per-user dev-server proxy: one HTTP/1.1 proxy on one loopback port
//! `P` (`[proxy] port`; default 80 where the user may bind it, else 7300)
//! for every sandbox, routing by the Host header:
//! `http://<port>.<sandbox>.localhost:<P>/` reaches guest port `<port>`,
//! `http://<sandbox>.localhost:<P>/` the sandbox's primary server.
//! Browsers resolve `*.localhost` to the loopback, so nothing needs DNS.
//! A stopped sandbox answers "not running" (503, reloading), an unknown
//! name or port a 404 page listing the running sandboxes' URLs.
//!
//! The proxy reaches a guest port as every host-side connection does: the
//! sandbox's hybrid vsock socket and the agent's `TcpConnect`; the guest
//! never connects to the host and never chooses a host port. Raw TCP to a
//! guest port on a host port is the explicit `keystone agent forward`.
//!
//! - `routing.rs`: Host names and the snapshot of sandboxes;
//! - `pages.rs`: the pages the proxy answers itself (escaped);
//! - `server.rs`: the hyper server: forwarding, upgrades, bounds;
//! - `headers.rs`: what changes in a message on its way;
//! - `dial.rs`: reaching a guest port over vsock;
//! - `ensure.rs`: starting the proxy from a command, its port;
//! - `lifecycle.rs`: the proxy's lock, log, listeners and watchdog;
//! - `daemon.rs`: the `__proxy` process;
//! - `forward_command.rs`: `keystone agent forward`.

mod daemon;
mod dial;
mod ensure;
mod forward_command;
mod headers;
mod lifecycle;
#[cfg(test)]
mod limits_tests;
mod pages;
mod routing;
mod server;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod testkit;

use serde::Serialize;

use super::backend::PortForward;
use super::config::Settings;
use super::microvm;
use super::registry::SandboxStore;

pub use daemon::run;
pub use ensure::listen_port;
pub use forward_command::forward;
pub use routing::url;

/// Makes sure the proxy runs before a command. `start` (`reporting`)
/// says why when it cannot; the other commands start it only when a
/// sandbox is registered, and quietly (`status` shows its state).
pub fn ensure_for_command(store: &SandboxStore, settings: &Settings, reporting: bool) {
    if !settings.proxy_enable {
        return;
    }
    if !reporting && store.registry().map_or(true, |r| r.sandboxes.is_empty()) {
        return;
    }
    if let Err(e) = ensure::ensure(store, settings) {
        if reporting {
            eprintln!(
                "keystone: warning: {e}; until it runs, servers in sandboxes are not \
                 reachable by name"
            );
        }
    }
}

/// What `status` shows of the proxy for one sandbox.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyView {
    /// The proxy's loopback port.
    pub port: u16,
    /// Whether it runs now.
    pub running: bool,
    /// The sandbox's primary URL, `http://<sandbox>.localhost:<port>/`.
    pub url: String,
    /// The guest port that URL reaches now (`null`: none listens).
    pub primary_port: Option<u16>,
}

/// Fills the `url` of a running sandbox's listening `ports` and describes
/// the proxy for it; `None` with `[proxy] enable = false` (then only ports
/// published on the host get a URL). `configured_primary`: the sandbox's
/// recorded `[proxy] primary_port`.
pub fn describe(
    store: &SandboxStore,
    current: &Settings,
    sandbox: &str,
    configured_primary: Option<u16>,
    ports: &mut [PortForward],
) -> Option<ProxyView> {
    if !current.proxy_enable {
        for p in ports.iter_mut() {
            p.url = p.host_port.map(|h| format!("http://127.0.0.1:{h}/"));
            if p.url.is_none() && p.note.is_none() && microvm::is_routable(p) {
                p.note = Some("not reachable from the host: [proxy] enable = false".into());
            }
        }
        return None;
    }
    let running = lifecycle::running(store);
    let port = running
        .as_ref()
        .and_then(|info| info.as_ref().map(|i| i.port))
        .unwrap_or_else(|| listen_port(current));
    let mut routable = Vec::new();
    for p in ports.iter_mut() {
        if microvm::is_routable(p) {
            p.url = Some(url(sandbox, Some(p.guest_port), port));
            routable.push(p.guest_port);
        }
    }
    routable.sort_unstable();
    Some(ProxyView {
        port,
        running: running.is_some(),
        url: url(sandbox, None, port),
        primary_port: routing::primary_port(&routable, configured_primary)
            .filter(|p| routable.contains(p)),
    })
}
