//! The guest agent binary: `/init` of the guest's initramfs.
//!
//! As PID 1 it does the init duties ([`keystone_guest_agent::agent::init`])
//! and serves on vsock port [`AGENT_VSOCK_PORT`]: PID 1 binds it and keeps
//! the listener for the agent servers it starts, so the port is never free
//! for another guest program to take. Otherwise it only serves, which is
//! how tests and debugging use it:
//!
//! ```text
//! keystone-guest-agent [--listen vsock[:PORT] | --listen unix:PATH] [--workspace DIR]
//! keystone-guest-agent --version
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keystone_guest_agent::agent::{self, init, logger, AgentConfig};
use keystone_guest_agent::protocol::{AGENT_VERSION, AGENT_VSOCK_PORT, PROTOCOL_VERSION};
use keystone_guest_agent::transport::AgentListener;

#[derive(Debug, Clone)]
enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
struct Options {
    listen: Listen,
    workspace: Option<PathBuf>,
}

static OPTIONS: OnceLock<Options> = OnceLock::new();
/// The listener PID 1 made before starting the agent server (inherited by
/// each server it forks).
static LISTENER: OnceLock<AgentListener> = OnceLock::new();

fn bind(listen: &Listen) -> std::io::Result<AgentListener> {
    match listen {
        Listen::Vsock(port) => AgentListener::vsock(*port),
        Listen::Unix(path) => AgentListener::unix(path),
    }
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        listen: Listen::Vsock(AGENT_VSOCK_PORT),
        workspace: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" => {
                println!("keystone-guest-agent {AGENT_VERSION} (protocol {PROTOCOL_VERSION})");
                std::process::exit(0);
            }
            "--listen" => {
                let v = args.next().ok_or("--listen needs a value")?;
                opts.listen = if let Some(path) = v.strip_prefix("unix:") {
                    Listen::Unix(PathBuf::from(path))
                } else if v == "vsock" {
                    Listen::Vsock(AGENT_VSOCK_PORT)
                } else if let Some(port) = v.strip_prefix("vsock:") {
                    Listen::Vsock(
                        port.parse()
                            .map_err(|_| format!("bad vsock port {port:?}"))?,
                    )
                } else {
                    return Err(format!(
                        "--listen takes vsock[:PORT] or unix:PATH, not {v:?}"
                    ));
                };
            }
            "--workspace" => {
                opts.workspace = Some(PathBuf::from(
                    args.next().ok_or("--workspace needs a value")?,
                ));
            }
            // The kernel may pass unknown arguments to init; ignore them as PID 1.
            _ if std::process::id() == 1 => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

/// Binds, tells the boot timer (as PID 1) and serves forever.
fn serve() -> std::io::Result<()> {
    let opts = OPTIONS.get().cloned().ok_or(std::io::ErrorKind::NotFound)?;
    let bound;
    let listener = match LISTENER.get() {
        Some(held) => held,
        None => {
            bound = bind(&opts.listen)?;
            &bound
        }
    };
    let pid1 = std::os::unix::process::parent_id() == 1 && is_init_child();
    if let Err(e) = agent::crash::install() {
        log::warn!("cannot install the crash reporter: {e}");
    }
    let mut config = AgentConfig {
        spawn_helper: Some(PathBuf::from("/proc/self/exe")),
        ..AgentConfig::default()
    };
    if let Some(ws) = opts.workspace {
        config.workspace_root = ws;
    }
    if pid1 {
        // The guest programs' way out, whose connections the host makes.
        let proxy = std::net::SocketAddr::from(([127, 0, 0, 1], agent::egress::PROXY_PORT));
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let network = agent::egress::NetworkSetting::from_cmdline(&cmdline);
        match agent::egress::Egress::listen(proxy, network) {
            Ok(egress) => config.egress = Some(egress),
            Err(e) => log::warn!("no egress proxy on {proxy}: {e}"),
        }
        init::signal_agent_ready();
        config.shutdown = Some(std::sync::Arc::new(|reboot| {
            let sig = if reboot { libc::SIGUSR1 } else { libc::SIGTERM };
            // SAFETY: kill(2) asking PID 1 to shut down.
            unsafe { libc::kill(1, sig) };
        }));
    }
    log::info!("listening on {:?}", opts.listen);
    agent::boot::mark_listening();
    agent::serve(listener, config)
}

static IS_INIT_CHILD: OnceLock<bool> = OnceLock::new();

fn is_init_child() -> bool {
    IS_INIT_CHILD.get().copied().unwrap_or(false)
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == agent::exec::SPAWN_HELPER_ARG)
    {
        agent::exec::spawn_helper_main(&args[2..]);
    }
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("keystone-guest-agent: {e}");
            std::process::exit(2);
        }
    };
    let _ = OPTIONS.set(opts);
    if std::process::id() == 1 {
        agent::boot::mark_init();
        logger::init(true, log::LevelFilter::Info);
        log::info!("keystone-guest-agent {AGENT_VERSION} starting as PID 1");
        init::early_mounts();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Err(e) = init::switch_root(&cmdline) {
            log::error!("switching to the real root failed, staying in the initramfs: {e}");
        }
        agent::boot::mark_root();
        if let Some(name) = init::cmdline_value(&cmdline, "keystone.hostname") {
            init::set_hostname(name);
        }
        match init::share_kvm(Path::new("/etc/group"), Path::new("/dev/kvm")) {
            Ok(true) => log::info!("/dev/kvm: group kvm, mode 0660"),
            Ok(false) => {}
            Err(e) => log::warn!("/dev/kvm: cannot give it to the kvm group: {e}"),
        }
        init::loopback_up();
        match OPTIONS.get().map(|o| bind(&o.listen)) {
            Some(Ok(listener)) => {
                let _ = LISTENER.set(listener);
            }
            Some(Err(e)) => log::error!("cannot listen for the host: {e}; each server tries again"),
            None => {}
        }
        let _ = IS_INIT_CHILD.set(true);
        init::supervise(serve);
    }
    logger::init(false, log::LevelFilter::Info);
    if let Err(e) = serve() {
        eprintln!("keystone-guest-agent: {e}");
        std::process::exit(1);
    }
}
