//! Starting the proxy from a command: [`ensure`] starts `keystone agent
//! __proxy PORT` (`daemon.rs`) detached, in a session of its own, when no
//! proxy holds the state folder's lock or one runs on another port than
//! the configuration now says, and waits for its first line: `listening
//! PORT`, `running` (another one won the lock), or `error: ...` (the port
//! is taken: it never falls back to another one).

use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::super::config::Settings;
use super::super::registry::SandboxStore;
use super::super::state::{runs_subcommand, send_signal};
use super::lifecycle::{files, running, ProxyInfo};

/// The hidden subcommand that runs the proxy.
pub const SUBCOMMAND: &str = "__proxy";
/// The port used where this user may not bind port 80.
pub const DEFAULT_PORT: u16 = 7300;
/// How long [`ensure`] waits for a new proxy's first line.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Why the proxy does not run.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Refused(String),
    #[error("cannot start the dev-server proxy: {0}")]
    Spawn(io::Error),
    #[error("the dev-server proxy did not start; see {}", .0.display())]
    NoAnswer(PathBuf),
}

/// The proxy's loopback port under `settings`: `[proxy] port`, else 80
/// where this user may bind it, else [`DEFAULT_PORT`].
pub fn listen_port(settings: &Settings) -> u16 {
    settings.proxy_port.unwrap_or_else(|| {
        if may_bind_privileged(80) {
            80
        } else {
            DEFAULT_PORT
        }
    })
}

/// Whether this process may bind `port` below 1024: root, a lowered
/// `ip_unprivileged_port_start`, or `CAP_NET_BIND_SERVICE`.
fn may_bind_privileged(port: u16) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    if start.is_ok_and(|s| s.trim().parse::<u32>().is_ok_and(|n| u32::from(port) >= n)) {
        return true;
    }
    const CAP_NET_BIND_SERVICE: u32 = 10;
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_NET_BIND_SERVICE) != 0)
    })
}

/// Makes sure the proxy runs on the configured port; its port, or `None`
/// with `[proxy] enable = false`.
pub fn ensure(store: &SandboxStore, settings: &Settings) -> Result<Option<u16>, ProxyError> {
    if !settings.proxy_enable {
        return Ok(None);
    }
    let want = listen_port(settings);
    match running(store) {
        Some(Some(info)) if info.port != want => stop(store, &info),
        Some(_) => return Ok(Some(want)),
        None => {}
    }
    spawn(store, want).map(Some)
}

/// Ends a proxy that runs on a port the configuration no longer names.
fn stop(store: &SandboxStore, info: &ProxyInfo) {
    if runs_subcommand(info.pid, SUBCOMMAND, &info.port.to_string()) {
        // The pid was just checked to run this proxy.
        send_signal(info.pid, Signal::TERM);
    }
    let t = Instant::now();
    while running(store).is_some() && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(store: &SandboxStore, port: u16) -> Result<u16, ProxyError> {
    let f = files(store);
    let _ = std::fs::create_dir_all(store.root());
    let exe = std::env::current_exe().map_err(ProxyError::Spawn)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&f.log)
        .map_err(ProxyError::Spawn)?;
    let (ours, theirs) = UnixStream::pair().map_err(ProxyError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg(SUBCOMMAND)
        .arg(port.to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .stderr(Stdio::from(log));
    // SAFETY: setsid(2) is an async-signal-safe system call; the hook
    // allocates nothing (an OS error is a number in an `io::Error`).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(ProxyError::Spawn)?;
    // Our copy of the child's end goes, so its exit reads as end of file.
    drop(cmd);
    let _ = ours.set_read_timeout(Some(READY_WAIT));
    let mut line = String::new();
    let _ = BufReader::new(io::Read::take(ours, 4096)).read_line(&mut line);
    let line = line.trim();
    let answer = if let Some(p) = line.strip_prefix("listening ") {
        p.parse().map_err(|_| ProxyError::NoAnswer(f.log.clone()))
    } else if line == "running" {
        Ok(port)
    } else if let Some(why) = line.strip_prefix("error: ") {
        Err(ProxyError::Refused(why.to_string()))
    } else {
        Err(ProxyError::NoAnswer(f.log.clone()))
    };
    if answer.is_err() || line == "running" {
        // It exits right after saying so: reap it.
        let t = Instant::now();
        while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_the_configured_one_or_a_fixed_default() {
        let mut s = Settings::default();
        let default = listen_port(&s);
        assert!(default == 80 || default == DEFAULT_PORT, "{default}");
        if rustix::process::geteuid().is_root() {
            assert_eq!(default, 80, "root may bind port 80");
        }
        assert_eq!(listen_port(&s), default, "never a random port");
        s.proxy_port = Some(8123);
        assert_eq!(listen_port(&s), 8123);
    }
}
