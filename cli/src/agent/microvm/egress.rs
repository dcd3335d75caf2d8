//! The host half of `--network nat`: the guest's programs reach the
//! outside through the guest agent's HTTP proxy, and every connection
//! behind it is made here, by the supervisor, after the sandbox's policy
//! (`netpolicy`) allowed the target.
//!
//! The supervisor holds one `Egress` connection to the agent open while
//! the guest runs (reopened if it drops). For each `EgressAsk` on it, a
//! thread resolves the name on the host, keeps only the addresses the
//! policy allows, connects (10 s per address) and answers with an
//! `EgressAttach` connection of its own that it relays to the TCP
//! connection, or with the reason it will not (which the guest program
//! reads as an HTTP 403). Each refusal is logged in the supervisor log.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystone_guest_agent::client::WatchCloser;

use super::super::backend::SandboxSpec;
use super::super::config::Network;
use super::super::netpolicy::{Cidr, Policy, Verdict};
use super::guest;
use super::readiness::{Readiness, Service};

/// How long one connect to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections relayed at once (more are refused until some end).
const MAX_CONNECTIONS: usize = 256;
/// Pauses before offering again after the offer could not be made: the
/// first, doubled up to the last while the agent keeps refusing (a booting
/// guest pays for every refused try).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// The running service; [`EgressService::stop`] ends it.
pub struct EgressService {
    stop: Arc<AtomicBool>,
    closer: Arc<Mutex<Option<WatchCloser>>>,
}

impl EgressService {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.closer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.close();
        }
    }
}

impl Drop for EgressService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts offering outbound connections to the guest of `spec` unless its
/// network setting is `none`.
pub fn start(spec: &SandboxSpec, vsock: &Path, ready: &Arc<Readiness>) -> Option<EgressService> {
    // `bridge` is not available and means nat (start says so).
    if spec.settings.network == Network::None {
        log::info!("network none: the guest's proxy answers that there is no network");
        return None;
    }
    let allow: Vec<Cidr> = spec
        .settings
        .network_allow
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let policy = Arc::new(Policy::new(allow));
    let service = EgressService {
        stop: Arc::new(AtomicBool::new(false)),
        closer: Arc::new(Mutex::new(None)),
    };
    let (stop, closer) = (Arc::clone(&service.stop), Arc::clone(&service.closer));
    let (uds, ready) = (vsock.to_path_buf(), Arc::clone(ready));
    let spawned = std::thread::Builder::new()
        .name("egress".into())
        .spawn(move || offer_loop(&uds, &policy, &stop, &closer, &ready));
    if let Err(e) = spawned {
        log::warn!("egress: cannot start its thread: {e}");
        return None;
    }
    Some(service)
}

/// The pause after the `failures`-th refused offer: 1, 2, 4, then 8 s.
fn backoff(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(3))
        .min(RETRY_MAX)
}

fn offer_loop(
    uds: &Path,
    policy: &Arc<Policy>,
    stop: &AtomicBool,
    closer: &Mutex<Option<WatchCloser>>,
    ready: &Readiness,
) {
    let held = guest::Held {
        service: Service::Egress,
        stop,
        closer,
        ready,
    };
    let offering = guest::single_try_client(uds);
    let asks_pool = AskPool::new(uds, Arc::clone(policy));
    while !stop.load(Ordering::SeqCst) {
        let Some(asks) = held.open(backoff, || offering.egress(), |a| a.closer()) else {
            return;
        };
        log::info!("egress: offering outbound connections to the guest");
        for ask in asks {
            match ask {
                Ok(ask) => asks_pool.submit(ask),
                Err(e) => {
                    let e = printable(&e.to_string());
                    asks_pool.log(&format!("egress: the offer ended: {e}"));
                    break;
                }
            }
        }
        if !stop.load(Ordering::SeqCst) {
            std::thread::sleep(RETRY_FIRST);
        }
    }
}

mod answer;
mod pool;

use pool::{printable, AskPool, Pending, Shared};

/// Why an ask is refused: what the guest's program reads, and what the
/// supervisor log keeps (with the addresses a name resolved to, which the
/// guest is not told).
#[derive(Debug)]
pub struct Refused {
    pub guest: String,
    pub log: String,
}

impl Refused {
    /// A reason that names nothing the guest does not know already.
    fn plain(reason: String) -> Self {
        Refused {
            log: reason.clone(),
            guest: reason,
        }
    }
}

impl From<NotATarget> for Refused {
    /// The guest knows the name it sent.
    fn from(e: NotATarget) -> Self {
        Refused::plain(e.to_string())
    }
}

/// Where `host:port` may be reached: the allowed addresses, or why none.
pub fn resolve(policy: &Policy, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refused> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Refused::plain(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| match policy.check(a.ip()) {
            Verdict::Allowed => true,
            Verdict::Refused(why) => {
                refused.get_or_insert((a.ip(), why));
                false
            }
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (false, _) => Ok(allowed),
        (true, Some((ip, why))) => Err(Refused {
            guest: format!(
                "refused by the sandbox's network policy: {host} resolves to {why}{}",
                if why.kind.allowable() {
                    "; add its network to [network] allow in agent.toml (the supervisor log \
                     names the address)"
                } else {
                    ", which a sandbox may never reach"
                }
            ),
            log: format!("{host}:{port}: {ip} is {why}"),
        }),
        (true, None) => Err(Refused::plain(format!("{host} has no address"))),
    }
}

/// A connection to the first of `addrs` that answers.
fn connect(addrs: &[SocketAddr], host: &str, port: u16) -> Result<TcpStream, Refused> {
    let mut errors = Vec::new();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => {
                errors.push(format!("{a}: {e}"));
                last = Some(e);
            }
        }
    }
    let last = last.map(|e| e.to_string()).unwrap_or_default();
    Err(Refused {
        guest: format!("cannot connect to {host}:{port}: {last}"),
        log: format!("cannot connect to {host}:{port} ({})", errors.join(", ")),
    })
}

/// A guest's ask that names no host and port; the host name is quoted
/// and shortened, so that a log line stays one line.
#[derive(Debug, thiserror::Error)]
#[error("not a host name and port: {host:?}:{port}")]
pub struct NotATarget {
    /// The first 80 characters of the host name asked for.
    host: String,
    port: u16,
}

/// The guest is not trusted to have checked the name it asks for: a host
/// name or address literal and a port, or why not.
fn check_target(host: &str, port: u16) -> Result<(), NotATarget> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if valid && port != 0 {
        Ok(())
    } else {
        Err(NotATarget {
            host: host.chars().take(80).collect(),
            port,
        })
    }
}

/// Serves one ask, on a worker of the pool: takes a connection slot,
/// resolves and connects, and answers the guest with the connection
/// (relayed from a thread of its own while the slot is held) or with the
/// reason it will not.
fn serve_ask(shared: &Arc<Shared>, ask: Pending) {
    let Pending { id, target, .. } = ask;
    let connected = target.map_err(Refused::from).and_then(|(host, port)| {
        let slot = shared.take_slot().ok_or_else(|| {
            Refused::plain(format!(
                "the sandbox has {MAX_CONNECTIONS} outbound connections open already"
            ))
        })?;
        let addrs = resolve(&shared.policy, &host, port)?;
        Ok((connect(&addrs, &host, port)?, slot, host, port))
    });
    let (tcp, slot, host, port) = match connected {
        Ok(c) => c,
        Err(refused) => {
            let why = printable(&refused.log);
            shared.log.line(&format!("egress refused: {why}"));
            if let Err(e) = answer::answer(&shared.uds, id, Some(refused.guest), &shared.closed) {
                let e = printable(&e.to_string());
                shared
                    .log
                    .line(&format!("egress: answering ask {id} failed: {e}"));
            }
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let tunnel = match answer::answer(&shared.uds, id, None, &shared.closed) {
        Ok(Some(tunnel)) => tunnel,
        Ok(None) => return,
        Err(e) => {
            let e = printable(&e.to_string());
            shared.log.line(&format!("egress to {host}:{port}: {e}"));
            return;
        }
    };
    let relayed = std::thread::Builder::new()
        .name("egress-relay".into())
        .spawn(move || {
            let _slot = slot;
            let _ = tunnel.relay(Box::new(tcp));
        });
    if let Err(e) = relayed {
        shared.log.line(&format!(
            "egress to {host}:{port}: cannot start its relay: {e}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::netpolicy::host::HostNetworks;
    use super::*;

    fn policy(allow: &[&str]) -> Policy {
        let allow = allow.iter().map(|c| c.parse().unwrap()).collect();
        Policy::with_host(allow, HostNetworks::default())
    }

    #[test]
    fn offers_back_off_to_eight_seconds() {
        let secs: Vec<u64> = (1..=6).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn only_names_and_ports_are_looked_up() {
        assert!(check_target("api.example.com", 443).is_ok());
        assert!(check_target("2001:db8::1", 443).is_ok());
        for (host, port) in [("", 80), ("a\nb", 80), ("a b", 80), ("h", 0), ("a/b", 1)] {
            let err = check_target(host, port).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(check_target(&"a".repeat(254), 80).is_err());
    }

    #[test]
    fn names_resolve_to_what_the_policy_allows() {
        let p = policy(&[]);
        let err = resolve(&p, "localhost", 80).unwrap_err();
        assert!(err.guest.contains("the host's loopback"), "{err:?}");
        assert!(err.guest.contains("may never reach"), "{err:?}");
        let err = resolve(&p, "10.1.2.3", 80).unwrap_err();
        assert!(err.guest.contains("[network] allow"), "{err:?}");
        assert!(
            err.log.contains("10.1.2.3:80: 10.1.2.3 is a private"),
            "{err:?}"
        );
        let err = resolve(&p, "169.254.169.254", 80).unwrap_err();
        assert!(err.guest.contains("metadata"), "{err:?}");
        let err = resolve(&p, "2002:a01:203::1", 80).unwrap_err();
        assert!(
            err.guest.contains("private address (carried in an IPv6"),
            "{err:?}"
        );
        assert_eq!(
            resolve(&p, "93.184.216.34", 443).unwrap(),
            vec!["93.184.216.34:443".parse::<SocketAddr>().unwrap()]
        );
        assert!(resolve(&policy(&["10.0.0.0/8"]), "10.1.2.3", 80).is_ok());
    }

    #[test]
    fn the_guest_is_not_told_where_a_refused_name_points() {
        let p = Policy::new(vec![]);
        let mut names = vec!["localhost".to_string()];
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(h.trim().to_string());
        }
        for name in names {
            let Ok(addrs) = (name.as_str(), 80).to_socket_addrs() else {
                continue;
            };
            let Err(refused) = resolve(&p, &name, 80) else {
                continue;
            };
            assert!(refused
                .guest
                .starts_with("refused by the sandbox's network policy: "));
            for a in addrs {
                let a = a.ip().to_string();
                assert!(!refused.guest.contains(&a), "{refused:?} names {a}");
                assert!(refused.log.contains(&a) || refused.log.contains(&name));
            }
        }
    }
}

#[cfg(test)]
mod fake_agent_tests;
