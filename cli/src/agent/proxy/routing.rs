//! Which guest port a request is for: the Host header parsed
//! ([`parse_host`]) and looked up in a snapshot of the sandboxes
//! ([`Routes`], read from the store by [`Routes::load`]).
//!
//! Names, lowest label first, under `localhost` (or the `[proxy] domain`):
//! - `<sandbox>.localhost`: the sandbox's primary server, the guest port
//!   `[proxy] primary_port` names, else the first of devcontainer.json's
//!   `forwardPorts`, else its lowest routable listening port;
//! - `<port>.<sandbox>.localhost`: guest port `<port>`.
//!
//! Case does not matter, a trailing dot and a `:port` suffix are dropped.
//! Anything else (no Host, `localhost`, an IP address, more labels, a label
//! that is not a sandbox name) names no sandbox. Only ports the sandbox's
//! port watch lists as routable are reached (never the guest agent's own,
//! never one below 1024), and only in a sandbox whose supervisor runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::super::config::Settings;
use super::super::devcontainer::applied;
use super::super::microvm;
use super::super::naming;
use super::super::registry::{read_json, SandboxStore};
use super::super::state::{ProcProbe, StateRecord};

/// The most sandboxes one snapshot holds (the registry is the user's, but
/// a page lists them all).
pub const MAX_SANDBOXES: usize = 1000;

/// What a Host header names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostName {
    /// No sandbox: no Host, `localhost` itself, an IP address.
    Nothing,
    /// A name under `localhost` that is no sandbox URL (shown escaped).
    Malformed(String),
    /// Sandbox `name`, guest `port` or its primary server.
    Sandbox { name: String, port: Option<u16> },
}

/// Parses a Host header (or a request target's authority); `domains`
/// are the suffixes sandbox names live under (`localhost` first).
pub fn parse_host(host: Option<&str>, domains: &[&str]) -> HostName {
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return HostName::Nothing;
    };
    if host.starts_with('[') {
        return HostName::Nothing;
    }
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if host.contains(':') {
        return HostName::Nothing;
    }
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let Some(labels) = domains.iter().find_map(|d| {
        host.strip_suffix(d)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
    }) else {
        return if domains.contains(&host) || host.parse::<std::net::IpAddr>().is_ok() {
            HostName::Nothing
        } else {
            HostName::Malformed(host.to_string())
        };
    };
    let malformed = || HostName::Malformed(host.to_string());
    let (port, name) = match labels.split_once('.') {
        None => (None, labels),
        Some((port, name)) => match parse_port(port) {
            Some(port) => (Some(port), name),
            None => return malformed(),
        },
    };
    if naming::validate(name).is_err() {
        return malformed();
    }
    HostName::Sandbox {
        name: name.to_string(),
        port,
    }
}

/// A port label: 1 to 65535, digits only, no leading zero.
fn parse_port(label: &str) -> Option<u16> {
    let digits = !label.is_empty() && label.len() <= 5 && label.bytes().all(|b| b.is_ascii_digit());
    if !digits || label.starts_with('0') {
        return None;
    }
    label.parse().ok()
}

/// The URL of a sandbox's guest `port` (or of its primary server) through
/// the proxy on loopback port `proxy_port`.
pub fn url(sandbox: &str, port: Option<u16>, proxy_port: u16) -> String {
    let host = match port {
        Some(p) => format!("{p}.{sandbox}.localhost"),
        None => format!("{sandbox}.localhost"),
    };
    if proxy_port == 80 {
        format!("http://{host}/")
    } else {
        format!("http://{host}:{proxy_port}/")
    }
}

/// The guest port a sandbox's own name reaches: the configured one, else
/// the lowest of `routable` (ascending).
pub fn primary_port(routable: &[u16], configured: Option<u16>) -> Option<u16> {
    configured.or_else(|| routable.first().copied())
}

/// One sandbox as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRoute {
    /// A live supervisor runs it.
    pub running: bool,
    /// Its hybrid vsock socket.
    pub vsock: PathBuf,
    /// Its routable listening guest ports, ascending.
    pub ports: Vec<u16>,
    /// `[proxy] primary_port` as the sandbox's last start recorded it.
    pub configured_primary: Option<u16>,
}

impl SandboxRoute {
    pub fn primary(&self) -> Option<u16> {
        primary_port(&self.ports, self.configured_primary)
    }
}

/// What a request reaches.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// Guest `port` of a running sandbox.
    Guest {
        sandbox: &'a str,
        vsock: &'a std::path::Path,
        port: u16,
    },
    /// A registered sandbox that is not running.
    NotRunning { sandbox: &'a str },
    /// A running sandbox where nothing routable listens at `port` (`None`:
    /// no primary server yet).
    NotListening { sandbox: &'a str, port: Option<u16> },
    /// No sandbox by that name, or no name at all.
    Unknown,
}

/// A snapshot of the registered sandboxes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    pub sandboxes: BTreeMap<String, SandboxRoute>,
}

impl Routes {
    /// Reads the registry, each sandbox's state (with the liveness check),
    /// recorded settings and listening ports. `None` when the registry
    /// cannot be read.
    pub fn load(store: &SandboxStore) -> Option<Routes> {
        let registry = store.registry().ok()?;
        let mut sandboxes = BTreeMap::new();
        for name in registry.sandboxes.keys().take(MAX_SANDBOXES) {
            if naming::validate(name).is_err() {
                continue;
            }
            let paths = store.paths(name);
            let running =
                StateRecord::load_checked(&paths, name, &ProcProbe).is_ok_and(|r| r.is_active());
            let configured_primary = read_json::<Settings>(&paths.config)
                .ok()
                .flatten()
                .and_then(|s| s.proxy_primary_port)
                .or_else(|| applied::read(&paths).and_then(|d| d.primary_port));
            let ports = if running {
                microvm::routable_ports(&paths)
            } else {
                Vec::new()
            };
            sandboxes.insert(
                name.clone(),
                SandboxRoute {
                    running,
                    vsock: microvm::vsock_path(&paths),
                    ports,
                    configured_primary,
                },
            );
        }
        Some(Routes { sandboxes })
    }

    /// What `host` reaches.
    pub fn resolve(&self, host: &HostName) -> Resolved<'_> {
        let HostName::Sandbox { name, port } = host else {
            return Resolved::Unknown;
        };
        let Some((sandbox, route)) = self.sandboxes.get_key_value(name) else {
            return Resolved::Unknown;
        };
        if !route.running {
            return Resolved::NotRunning { sandbox };
        }
        match port.or_else(|| route.primary()) {
            Some(p) if route.ports.contains(&p) => Resolved::Guest {
                sandbox,
                vsock: &route.vsock,
                port: p,
            },
            other => Resolved::NotListening {
                sandbox,
                port: other,
            },
        }
    }

    /// The running sandboxes with their URLs (primary first), for pages.
    pub fn listing(&self, proxy_port: u16) -> Vec<(String, Vec<String>)> {
        self.sandboxes
            .iter()
            .filter(|(_, r)| r.running)
            .map(|(name, r)| {
                let mut urls = vec![url(name, None, proxy_port)];
                urls.extend(r.ports.iter().map(|p| url(name, Some(*p), proxy_port)));
                (name.clone(), urls)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &[&str] = &["localhost"];

    fn sandbox(name: &str, port: Option<u16>) -> HostName {
        HostName::Sandbox {
            name: name.into(),
            port,
        }
    }

    #[test]
    fn host_names_give_sandbox_and_port() {
        let p = |h: &str| parse_host(Some(h), LOCAL);
        assert_eq!(p("app-1a2b3c.localhost"), sandbox("app-1a2b3c", None));
        assert_eq!(p("8000.app.localhost:7300"), sandbox("app", Some(8000)));
        assert_eq!(p("8000.App.LOCALHOST:7300"), sandbox("app", Some(8000)));
        assert_eq!(p("8000.app.localhost."), sandbox("app", Some(8000)));
        assert_eq!(p("8000.app.localhost.:80"), sandbox("app", Some(8000)));
        assert_eq!(p("app.localhost:"), sandbox("app", None));
        assert_eq!(p("65535.app.localhost"), sandbox("app", Some(65535)));
        // A sandbox named by digits only is reached by its one label.
        assert_eq!(p("8000.localhost"), sandbox("8000", None));
        assert_eq!(p("1.8000.localhost"), sandbox("8000", Some(1)));
    }

    #[test]
    fn hosts_that_name_no_sandbox() {
        let p = |h: &str| parse_host(Some(h), LOCAL);
        assert_eq!(parse_host(None, LOCAL), HostName::Nothing);
        assert_eq!(parse_host(Some("  "), LOCAL), HostName::Nothing);
        assert_eq!(p("localhost:7300"), HostName::Nothing);
        assert_eq!(p("LOCALHOST."), HostName::Nothing);
        assert_eq!(p("127.0.0.1:7300"), HostName::Nothing);
        assert_eq!(p("[::1]:7300"), HostName::Nothing);
        assert_eq!(p("[::1]"), HostName::Nothing);
        assert_eq!(p("::1"), HostName::Nothing);
        for bad in [
            "0.app.localhost",
            "08000.app.localhost",
            "65536.app.localhost",
            "x.app.localhost",
            "1.2.app.localhost",
            "-app.localhost",
            "app_1.localhost",
            "a<b>.localhost",
            ".localhost",
            "example.com",
            "app.localhost.evil.com",
            "applocalhost",
        ] {
            assert!(
                matches!(p(bad), HostName::Malformed(_) | HostName::Nothing),
                "{bad}: {:?}",
                p(bad)
            );
        }
    }

    #[test]
    fn the_configured_domain_works_too() {
        let domains = &["localhost", "sandbox.local"];
        assert_eq!(
            parse_host(Some("3000.app.Sandbox.Local:80"), domains),
            sandbox("app", Some(3000))
        );
        assert_eq!(
            parse_host(Some("sandbox.local"), domains),
            HostName::Nothing
        );
    }

    fn routes() -> Routes {
        let mut r = Routes::default();
        r.sandboxes.insert(
            "web".into(),
            SandboxRoute {
                running: true,
                vsock: PathBuf::from("/s/web/vsock.sock"),
                ports: vec![3000, 8000],
                configured_primary: None,
            },
        );
        r.sandboxes.insert(
            "api".into(),
            SandboxRoute {
                running: true,
                vsock: PathBuf::from("/s/api/vsock.sock"),
                ports: vec![4000, 5173],
                configured_primary: Some(5173),
            },
        );
        r.sandboxes.insert(
            "off".into(),
            SandboxRoute {
                running: false,
                vsock: PathBuf::from("/s/off/vsock.sock"),
                ports: vec![],
                configured_primary: None,
            },
        );
        r
    }

    #[test]
    fn requests_resolve_to_guest_ports_or_pages() {
        let r = routes();
        let guest = |sandbox, port| Resolved::Guest {
            sandbox,
            vsock: std::path::Path::new(if sandbox == "web" {
                "/s/web/vsock.sock"
            } else {
                "/s/api/vsock.sock"
            }),
            port,
        };
        assert_eq!(r.resolve(&sandbox("web", None)), guest("web", 3000));
        assert_eq!(r.resolve(&sandbox("web", Some(8000))), guest("web", 8000));
        assert_eq!(r.resolve(&sandbox("api", None)), guest("api", 5173));
        assert_eq!(
            r.resolve(&sandbox("web", Some(3128))),
            Resolved::NotListening {
                sandbox: "web",
                port: Some(3128)
            }
        );
        assert_eq!(
            r.resolve(&sandbox("off", Some(3000))),
            Resolved::NotRunning { sandbox: "off" }
        );
        assert_eq!(r.resolve(&sandbox("gone", None)), Resolved::Unknown);
        assert_eq!(r.resolve(&HostName::Nothing), Resolved::Unknown);
        let mut idle = routes();
        idle.sandboxes.get_mut("web").unwrap().ports.clear();
        assert_eq!(
            idle.resolve(&sandbox("web", None)),
            Resolved::NotListening {
                sandbox: "web",
                port: None
            }
        );
    }

    #[test]
    fn urls_and_listing() {
        assert_eq!(
            url("app", Some(8000), 7300),
            "http://8000.app.localhost:7300/"
        );
        assert_eq!(url("app", None, 80), "http://app.localhost/");
        let listing = routes().listing(7300);
        assert_eq!(listing.len(), 2, "stopped sandboxes are not listed");
        assert_eq!(listing[0].0, "api");
        assert_eq!(
            listing[1].1,
            [
                "http://web.localhost:7300/",
                "http://3000.web.localhost:7300/",
                "http://8000.web.localhost:7300/"
            ]
        );
    }
}
