//! The guest side: accepts connections, runs the hello exchange and
//! dispatches each connection's single request (see [`crate::protocol`]).
//!
//! - [`exec`]: processes with pipes or a pseudo-terminal (`Exec`,
//!   `RawStream`);
//! - [`users`]: `/etc/passwd` and `/etc/group` lookups (no NSS);
//! - [`ports`]: `/proc/net/tcp{,6}` parsing (`ListeningPorts`);
//! - [`files`]: `PushFile` confined under the workspace;
//! - [`init`]: the PID 1 duties (mounts, root switch, reaping, shutdown);
//! - [`watch`]: `Watch`, inotify over the workspace (commits, idleness);
//! - [`tcp`]: `TcpConnect`, a relay to a port on the guest's loopback;
//! - [`egress`]: `Egress`/`EgressAttach`, the guest programs' HTTP proxy
//!   whose connections the host makes;
//! - [`logger`]: logs to `/dev/kmsg` or stderr.

pub mod boot;
pub mod certs;
pub mod crash;
pub mod egress;
pub mod exec;
pub mod files;
pub mod init;
pub mod logger;
pub mod memory;
pub mod ports;
pub mod tcp;
pub mod users;
pub mod watch;

use std::io::{self, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{
    read_frame, write_frame, write_raw, Frame, FrameKind, Hello, ProtocolError, RawStreamRequest,
    Request, Response, AGENT_VERSION,
};
use crate::transport::{AgentListener, DuplexStream};

/// Called on a `Shutdown` request (after the answer went out).
pub type ShutdownHook = Arc<dyn Fn(bool) + Send + Sync>;

/// What the agent serves and where it looks things up.
#[derive(Clone)]
pub struct AgentConfig {
    /// Where `PushFile` paths are confined (`/workspace` in the guest).
    pub workspace_root: PathBuf,
    /// The user database (`/etc/passwd`).
    pub passwd_path: PathBuf,
    /// The group database (`/etc/group`).
    pub group_path: PathBuf,
    /// Where `tcp` and `tcp6` are read (`/proc/net`).
    pub proc_net_dir: PathBuf,
    /// What `Shutdown` does; `None` refuses it (agent not PID 1).
    pub shutdown: Option<ShutdownHook>,
    /// The agent binary, run as `__spawn` to start each command (see
    /// [`exec::spawn_helper_main`]) so that the server never forks; `None`
    /// forks the server (an agent served inside another program).
    pub spawn_helper: Option<PathBuf>,
    /// The guest programs' HTTP proxy (see [`egress`]); `None` serves no
    /// `Egress` and sets no proxy variables for commands.
    pub egress: Option<Arc<egress::Egress>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            workspace_root: PathBuf::from(files::GUEST_WORKSPACE),
            passwd_path: PathBuf::from("/etc/passwd"),
            group_path: PathBuf::from("/etc/group"),
            proc_net_dir: PathBuf::from("/proc/net"),
            shutdown: None,
            spawn_helper: None,
            egress: None,
        }
    }
}

/// Accepts connections forever, one thread per connection.
pub fn serve(listener: &AgentListener, config: AgentConfig) -> io::Result<()> {
    let config = Arc::new(config);
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let config = Arc::clone(&config);
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                if let Err(e) = handle_connection(stream, &config) {
                    log::info!("connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a connection thread: {e}");
        }
    }
}

/// Serves one connection: hello, one request, its answer or stream.
pub fn handle_connection(
    stream: Box<dyn DuplexStream>,
    config: &AgentConfig,
) -> Result<(), ProtocolError> {
    let mut writer = stream.try_clone_box()?;
    let mut reader = BufReader::with_capacity(256 << 10, stream);

    let Some(first) = read_frame(&mut reader)? else {
        return Ok(());
    };
    if first.kind != FrameKind::Hello {
        let err = ProtocolError::Unexpected(first.kind);
        send_error(&mut writer, &err.to_string());
        return Err(err);
    }
    let theirs: Hello = first.parse_json()?;
    write_frame(
        &mut writer,
        &Frame::json(FrameKind::Hello, &Hello::current()),
    )?;
    if let Err(e) = theirs.check_host() {
        log::error!("{e}");
        send_error(&mut writer, &e.to_string());
        return Err(e);
    }

    let Some(frame) = read_frame(&mut reader)? else {
        return Ok(());
    };
    if frame.kind != FrameKind::Request {
        let err = ProtocolError::Unexpected(frame.kind);
        send_error(&mut writer, &err.to_string());
        return Err(err);
    }
    let request: Request = match frame.parse_json() {
        Ok(r) => r,
        Err(e) => {
            send_error(&mut writer, &e.to_string());
            return Err(e);
        }
    };
    match request {
        Request::Ping => respond(
            &mut writer,
            &Response::Pong {
                agent_version: AGENT_VERSION.to_string(),
                boot: boot::times(),
            },
        ),
        Request::ListeningPorts => match ports::listening_ports(&config.proc_net_dir) {
            Ok(ports) => respond(&mut writer, &Response::ListeningPorts { ports }),
            Err(e) => fail(&mut writer, &format!("reading listening ports: {e}")),
        },
        Request::PushFile(req) => match files::push_file(&config.workspace_root, &req) {
            Ok(()) => respond(&mut writer, &Response::Done),
            Err(e) => fail(&mut writer, &e.to_string()),
        },
        Request::Shutdown { reboot } => match &config.shutdown {
            Some(hook) => {
                respond(&mut writer, &Response::Done)?;
                let _ = writer.shutdown_both();
                hook(reboot);
                Ok(())
            }
            None => fail(
                &mut writer,
                "shutdown is only available when the agent runs as PID 1",
            ),
        },
        Request::SetClock { unix_ms } => match boot::set_clock(unix_ms) {
            Ok(()) => respond(&mut writer, &Response::Done),
            Err(e) => fail(&mut writer, &format!("setting the clock: {e}")),
        },
        Request::AddMemory => match memory::add_missing(&memory::MemorySysfs::system()) {
            Ok(added) => {
                if added.blocks > 0 {
                    log::info!(
                        "memory: added {} MiB in {} block(s)",
                        added.bytes >> 20,
                        added.blocks
                    );
                }
                respond(&mut writer, &Response::MemoryAdded { bytes: added.bytes })
            }
            Err(e) => fail(&mut writer, &format!("adding memory: {e}")),
        },
        Request::TrustCertificates { name, pem } => {
            match certs::trust(&certs::TrustStore::system(), &name, &pem) {
                Ok(()) => respond(&mut writer, &Response::Done),
                Err(e) => fail(&mut writer, &e.to_string()),
            }
        }
        Request::Watch { paths, idle_ms } => {
            watch::run_watch(reader, writer, &paths, idle_ms, config)
        }
        Request::TcpConnect { port } => tcp::run_tcp_connect(reader, writer, port),
        Request::Egress => match &config.egress {
            Some(egress) => egress.run_control(reader, writer),
            None => fail(&mut writer, "this agent serves no egress proxy"),
        },
        Request::EgressAttach { id, refused } => match &config.egress {
            Some(egress) => egress.run_attach(reader, writer, id, refused),
            None => fail(&mut writer, "this agent serves no egress proxy"),
        },
        Request::Exec(req) => exec::run_session(reader, writer, req, config),
        Request::RawStream(RawStreamRequest {
            argv,
            cwd,
            env,
            user,
        }) => {
            let req = crate::protocol::ExecRequest {
                argv,
                env,
                cwd,
                user,
                tty: None,
            };
            exec::run_session(reader, writer, req, config)
        }
    }
}

fn respond(w: &mut Box<dyn DuplexStream>, response: &Response) -> Result<(), ProtocolError> {
    write_frame(w, &Frame::json(FrameKind::Response, response))
}

fn fail(w: &mut Box<dyn DuplexStream>, message: &str) -> Result<(), ProtocolError> {
    write_raw(w, FrameKind::Error, message.as_bytes())
}

fn send_error(w: &mut Box<dyn DuplexStream>, message: &str) {
    let _ = fail(w, message);
}
