//! The proxy process's own life, one per user (one per state folder): an
//! flock on `proxy.lock` in the state folder (a second proxy exits at
//! once), `{pid, port}` in `proxy.json`, its log `proxy.log` (its stderr,
//! started over past [`MAX_LOG`]), its listeners on the loopback, and the
//! watchdog that ends it once the registry has been empty for
//! [`IDLE_EXIT`], or at once when its state folder is removed.

use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::super::fsutil::{self, FileLock};
use super::super::registry::SandboxStore;
use super::ensure::DEFAULT_PORT;

/// How often the proxy re-reads the sandboxes.
pub const REFRESH: Duration = Duration::from_millis(500);
/// How long the proxy stays with no sandbox registered.
pub const IDLE_EXIT: Duration = Duration::from_secs(180);
/// The most bytes `proxy.log` holds before it starts over.
pub const MAX_LOG: u64 = 1 << 20;
/// `proxy.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub pid: i32,
    pub port: u16,
}

pub(super) struct Files {
    pub lock: PathBuf,
    pub info: PathBuf,
    pub log: PathBuf,
}

pub(super) fn files(store: &SandboxStore) -> Files {
    let root = store.root();
    Files {
        lock: root.join("proxy.lock"),
        info: root.join("proxy.json"),
        log: root.join("proxy.log"),
    }
}

/// The running proxy of this state folder, if one holds the lock: what its
/// `proxy.json` says (`None` inside while it is starting).
pub fn running(store: &SandboxStore) -> Option<Option<ProxyInfo>> {
    let f = files(store);
    match FileLock::try_acquire(&f.lock) {
        Ok(Some(_free)) => None,
        Ok(None) => Some(
            std::fs::read(&f.info)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
        ),
        Err(_) => None,
    }
}

/// The proxy's log sink (see `crate::logging`): writes one line on its
/// stderr, `proxy.log`, starting the file over once it passes [`MAX_LOG`].
pub fn write_line(line: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    static WRITTEN: AtomicU64 = AtomicU64::new(u64::MAX);
    let line = format!("{line}\n");
    let _one = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut size = WRITTEN.load(Ordering::Relaxed);
    if size == u64::MAX {
        size = std::fs::metadata("/proc/self/fd/2").map_or(0, |m| m.len());
    }
    if size + line.len() as u64 > MAX_LOG {
        // On anything but a file this fails and changes nothing.
        let _ = rustix::fs::ftruncate(rustix::stdio::stderr(), 0);
        size = 0;
    }
    let _ = io::stderr().write_all(line.as_bytes());
    WRITTEN.store(size + line.len() as u64, Ordering::Relaxed);
}

/// Why the proxy cannot listen; each says what to do, naming the config
/// file (`config_hint`).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another program holds the port on one of the loopbacks.
    #[error(
        "the dev-server proxy cannot listen on {at}:{port}: another program uses that \
         port; set `[proxy] port` to a free port in {config_hint}, or \
         `[proxy] enable = false`"
    )]
    Taken {
        at: &'static str,
        port: u16,
        config_hint: String,
    },
    /// The port is below 1024, and this user may not listen there.
    #[error(
        "the dev-server proxy may not listen on port {port} (a privileged port); set \
         `[proxy] port = {DEFAULT_PORT}` in {config_hint}"
    )]
    Privileged { port: u16, config_hint: String },
    /// Listening failed otherwise.
    #[error("the dev-server proxy cannot listen on 127.0.0.1:{port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// Listens on 127.0.0.1:`port`, and on [::1]:`port` where the host has
/// IPv6 (browsers may resolve `*.localhost` to either); a port another
/// program holds on either is an error that says what to do.
pub fn bind(port: u16, config_hint: &str) -> Result<Vec<TcpListener>, BindError> {
    let taken = |at| BindError::Taken {
        at,
        port,
        config_hint: config_hint.to_string(),
    };
    let v4 =
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).map_err(|e| {
            match e.kind() {
                io::ErrorKind::AddrInUse => taken("127.0.0.1"),
                io::ErrorKind::PermissionDenied => BindError::Privileged {
                    port,
                    config_hint: config_hint.to_string(),
                },
                _ => BindError::Listen { port, source: e },
            }
        })?;
    let mut listeners = vec![v4];
    match TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(v6) => listeners.push(v6),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(taken("[::1]")),
        Err(_) => {}
    }
    Ok(listeners)
}

/// The lock file's identity, to notice it removed (the state folder went).
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether the proxy should end: its state folder is gone, or no sandbox
/// has been registered for [`IDLE_EXIT`] (`empty_since` tracks that).
pub(super) struct Watchdog {
    lock: PathBuf,
    identity: Option<(u64, u64)>,
    empty_since: Option<Instant>,
    idle_exit: Duration,
}

impl Watchdog {
    fn new(lock: PathBuf, idle_exit: Duration) -> Self {
        Self {
            identity: identity(&lock),
            lock,
            empty_since: None,
            idle_exit,
        }
    }

    /// Why to end now, if so; `sandboxes`: how many are registered, when
    /// the registry could be read.
    pub(super) fn should_end(&mut self, sandboxes: Option<usize>) -> Option<&'static str> {
        if identity(&self.lock) != self.identity {
            return Some("the state folder was removed");
        }
        match sandboxes {
            Some(0) => {
                let since = *self.empty_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= self.idle_exit).then_some("no sandbox is registered")
            }
            Some(_) => {
                self.empty_since = None;
                None
            }
            None => None,
        }
    }
}

/// Takes the proxy's lock (`None`: another proxy holds it), with the
/// watchdog that ends this one.
pub(super) fn lock(store: &SandboxStore) -> io::Result<Option<(FileLock, Watchdog)>> {
    let f = files(store);
    Ok(FileLock::try_acquire(&f.lock)?.map(|l| (l, Watchdog::new(f.lock, IDLE_EXIT))))
}

/// Records this proxy in `proxy.json`.
pub(super) fn record(store: &SandboxStore, port: u16) {
    let info = ProxyInfo {
        pid: std::process::id() as i32,
        port,
    };
    if let Err(e) = fsutil::write_json_atomic(&files(store).info, &info) {
        log::warn!("cannot write proxy.json: {e}");
    }
}

/// Removes `proxy.json` if it still names this process.
pub(super) fn forget(store: &SandboxStore) {
    let path = files(store).info;
    let ours = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProxyInfo>(&b).ok())
        .is_some_and(|i| i.pid == std::process::id() as i32);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_test_kit::ScratchDir;

    #[test]
    fn a_taken_port_is_an_error_that_says_what_to_do() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = bind(port, "/home/u/.config/keystone/agent.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("another program uses that port"), "{err}");
        assert!(
            err.contains("`[proxy] port`") && err.contains("agent.toml"),
            "{err}"
        );
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let port = v6.local_addr().unwrap().port();
            let err = bind(port, "agent.toml").unwrap_err().to_string();
            assert!(err.contains(&format!("[::1]:{port}")), "{err}");
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "nothing is left listening on 127.0.0.1"
            );
        }
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listeners = bind(free, "agent.toml").unwrap();
        assert!(listeners
            .iter()
            .all(|l| l.local_addr().unwrap().ip().is_loopback()));
    }

    #[test]
    fn one_proxy_per_state_folder() {
        let dir = ScratchDir::new("proxy-lock");
        let store = SandboxStore::at(dir.path().join("keystone"));
        assert_eq!(running(&store), None);
        let (held, _watchdog) = lock(&store).unwrap().expect("the lock is free");
        assert!(
            lock(&store).unwrap().is_none(),
            "a second proxy exits at once"
        );
        assert_eq!(
            running(&store),
            Some(None),
            "running, proxy.json not written yet"
        );
        record(&store, 7301);
        let info = running(&store).flatten().unwrap();
        assert_eq!(
            info,
            ProxyInfo {
                pid: std::process::id() as i32,
                port: 7301
            }
        );
        forget(&store);
        assert_eq!(running(&store), Some(None));
        drop(held);
        assert_eq!(running(&store), None);
    }

    #[test]
    fn the_proxy_ends_when_idle_or_when_its_folder_goes() {
        let dir = ScratchDir::new("proxy-watchdog");
        let store = SandboxStore::at(dir.path().join("keystone"));
        let (_held, _) = lock(&store).unwrap().unwrap();
        let mut w = Watchdog::new(files(&store).lock, Duration::from_millis(200));
        assert_eq!(w.should_end(Some(0)), None, "not yet idle for long");
        assert_eq!(w.should_end(Some(1)), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(w.should_end(Some(0)), None, "a sandbox reset the clock");
        assert_eq!(
            w.should_end(None),
            None,
            "an unreadable registry changes nothing"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(w.should_end(Some(0)), Some("no sandbox is registered"));
        let mut w = Watchdog::new(files(&store).lock, IDLE_EXIT);
        assert_eq!(w.should_end(Some(3)), None);
        std::fs::remove_dir_all(dir.path().join("keystone")).unwrap();
        assert_eq!(w.should_end(Some(3)), Some("the state folder was removed"));
    }
}
