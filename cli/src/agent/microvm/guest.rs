//! Talking to the guest agent: connections over the hybrid vsock socket,
//! and interactive terminal sessions (attach, ssh).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystone_guest_agent::client::{
    hybrid_vsock_connect_keeping_deadline, hybrid_vsock_connect_within, hybrid_vsock_connector,
    hybrid_vsock_connector_keeping_deadline, AgentClient, ClientError, WatchCloser,
};
use keystone_guest_agent::protocol::{
    ExecRequest, ExitStatus, RawStreamRequest, TtySize, UserSpec, AGENT_VSOCK_PORT,
};

use super::super::backend::BackendError;
use super::engine::GUEST_USER;
use super::readiness::{Readiness, Service};
use crate::terminal::RawMode;

/// Opens `uds` and performs the hybrid vsock handshake for `port` (the
/// protocol crate's, whose answer line is bounded in length), giving up
/// after `handshake` if nobody answers. With `keep_timeout`, the read
/// timeout stays on the stream (for short requests such as a ping).
pub fn connect(
    uds: &Path,
    port: u32,
    handshake: Duration,
    keep_timeout: bool,
) -> io::Result<UnixStream> {
    if keep_timeout {
        hybrid_vsock_connect_keeping_deadline(uds, port, handshake)
    } else {
        hybrid_vsock_connect_within(uds, port, handshake)
    }
}

/// How long a command waits for an agent that refuses connections (the
/// guest's init restarts a crashed agent server within seconds).
const AGENT_RESTART_WAIT: Duration = Duration::from_secs(20);

/// A client for long-running operations (exec, sync).
pub fn client(uds: &Path) -> AgentClient {
    single_try_client(uds).retrying(AGENT_RESTART_WAIT)
}

/// A client for long-lived connections opened while the guest may still
/// be booting: one try per call (the caller paces its retries, since each
/// refused try costs an emulated guest time).
pub fn single_try_client(uds: &Path) -> AgentClient {
    AgentClient::new(hybrid_vsock_connector(uds, AGENT_VSOCK_PORT))
}

/// A long-lived connection the supervisor holds while the guest runs (the
/// auto-sync watch, the egress offer), and what opening it needs.
pub struct Held<'a> {
    /// The service it is, for readiness and log lines.
    pub service: Service,
    /// Set when the supervisor stops.
    pub stop: &'a AtomicBool,
    /// Receives the opened connection's closer, so that a stop ends it.
    pub closer: &'a Mutex<Option<WatchCloser>>,
    pub ready: &'a Readiness,
}

impl Held<'_> {
    /// Opens the connection with `open`: first once the guest agent is up
    /// (no try is made while the guest boots), then until it works,
    /// sleeping `pause(failures)` between tries and logging each new reason
    /// once as "<service>: not open yet". Reports the service up when it
    /// opens, or unavailable when the agent is too old for it. `None` once
    /// `stop` is set, or when the agent is too old.
    pub fn open<T>(
        &self,
        pause: impl Fn(u32) -> Duration,
        mut open: impl FnMut() -> Result<T, ClientError>,
        closer_of: impl Fn(&T) -> WatchCloser,
    ) -> Option<T> {
        let what = self.service.describe();
        if !self.ready.wait_up(Service::Agent, self.stop) {
            return None;
        }
        let mut last_error: Option<String> = None;
        let mut failures = 0;
        while !self.stop.load(Ordering::SeqCst) {
            match open() {
                Ok(held) => {
                    *self.closer.lock().unwrap_or_else(|e| e.into_inner()) = Some(closer_of(&held));
                    if self.stop.load(Ordering::SeqCst) {
                        closer_of(&held).close();
                        return None;
                    }
                    self.ready.up(self.service);
                    return Some(held);
                }
                Err(e @ ClientError::Unsupported { .. }) => {
                    log::info!("{what} is off: {e}");
                    self.ready.unavailable(self.service, &e.to_string());
                    return None;
                }
                Err(e) => {
                    // The guest is rebooting, or the agent refused.
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        log::info!("{what}: not open yet, retrying: {msg}");
                        last_error = Some(msg);
                    }
                    failures += 1;
                    std::thread::sleep(pause(failures));
                }
            }
        }
        None
    }
}

/// A client whose every read times out after `timeout` (ping, status).
pub fn quick_client(uds: &Path, timeout: Duration) -> AgentClient {
    AgentClient::new(hybrid_vsock_connector_keeping_deadline(
        uds,
        AGENT_VSOCK_PORT,
        timeout,
    ))
}

/// A client error as a backend error (exit 3), the client's error kept
/// as its cause.
pub fn agent_err(what: &str, e: ClientError) -> BackendError {
    BackendError::Agent {
        what: what.to_string(),
        source: e,
    }
}

/// The terminal size of stdout (or stdin), if either is a terminal.
pub fn terminal_size() -> Option<TtySize> {
    [rustix::stdio::stdout(), rustix::stdio::stdin()]
        .into_iter()
        .filter_map(|fd| rustix::termios::tcgetwinsize(fd).ok())
        .find(|ws| ws.ws_row > 0)
        .map(|ws| TtySize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        })
}

/// A request running `argv` as the default guest user in `cwd`.
pub fn request(argv: Vec<String>, cwd: &str, user: Option<&str>) -> ExecRequest {
    ExecRequest {
        argv,
        cwd: Some(cwd.to_string()),
        user: Some(UserSpec::Name(user.unwrap_or(GUEST_USER).to_string())),
        ..ExecRequest::default()
    }
}

/// Bounds on what a pipe takes from the guest.
#[derive(Clone, Copy, Debug)]
pub struct PipeLimits {
    /// The most bytes it copies.
    pub max_bytes: u64,
    /// The longest the guest may stay silent.
    pub idle: Duration,
}

/// How [`copy_out`] ended.
#[derive(Debug, PartialEq, Eq)]
enum CopyEnd {
    /// The guest's side ended.
    Done,
    /// Our reader went away first.
    OurSideClosed,
}

/// Copies the guest's bytes to `out` until they end, failing past
/// `max` bytes (or when a read fails, a silent guest's timeout included).
fn copy_out(
    from: &mut impl Read,
    out: &mut impl Write,
    max: u64,
    what: &str,
) -> Result<CopyEnd, BackendError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .map_err(|e| BackendError::Failed(format!("{what}: reading from the sandbox: {e}")))?;
        if n == 0 {
            return Ok(CopyEnd::Done);
        }
        total += n as u64;
        if total > max {
            return Err(BackendError::Failed(format!(
                "{what}: the sandbox sent more than {max} bytes; stopped"
            )));
        }
        if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
            return Ok(CopyEnd::OurSideClosed);
        }
    }
}

/// Runs `request` in the guest as a byte pipe between this process's stdin
/// and stdout: the transport command of git's `ext::` URLs
/// (`__git-upload-pack`). Returns
/// the guest process's exit code (its stderr is copied to ours, escaped,
/// when it fails), or 3 when our stdout closes early. `what` names it in
/// errors.
pub fn pipe_stdio(
    vsock: &Path,
    request: RawStreamRequest,
    what: &str,
    limits: Option<PipeLimits>,
) -> Result<i32, BackendError> {
    let stream = client(vsock)
        .raw_stream(request)
        .map_err(|e| agent_err(what, e))?;
    let (mut reader, mut writer) = stream.into_split();
    if let Some(l) = &limits {
        reader
            .set_idle_timeout(Some(l.idle))
            .map_err(|e| agent_err(what, ClientError::LocalIo(e)))?;
    }
    std::thread::spawn(move || {
        let mut stdin = io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = writer.close_stdin();
    });
    let mut stdout = io::stdout().lock();
    let max = limits.as_ref().map_or(u64::MAX, |l| l.max_bytes);
    if copy_out(&mut reader, &mut stdout, max, what)? == CopyEnd::OurSideClosed {
        return Ok(3);
    }
    let exit = reader.wait().map_err(|e| agent_err(what, e))?;
    if !exit.status.success() {
        let said = crate::shown::lines(&String::from_utf8_lossy(exit.stderr.trim_ascii()));
        let _ = writeln!(io::stderr(), "{said}");
    }
    Ok(exit.status.code_or_signal())
}

/// Runs `req` on a pseudo-terminal wired to this terminal (raw mode,
/// resizes followed by polling the window size every 100 ms); returns the
/// process's exit status.
///
/// SECURITY: the guest program's terminal output reaches this terminal
/// byte for byte, escape sequences included: that is what `attach` and
/// `ssh` are (as with `ssh` itself). Nothing else of the guest's is shown
/// raw.
pub fn interactive(client: &AgentClient, mut req: ExecRequest) -> Result<ExitStatus, ClientError> {
    req.tty = Some(terminal_size().unwrap_or(TtySize { rows: 24, cols: 80 }));
    if let Ok(term) = std::env::var("TERM") {
        req.env.push(("TERM".into(), term));
    }
    let session = client.start_exec(req)?;
    let raw = RawMode::enter();
    let done = Arc::new(AtomicBool::new(false));
    {
        let control = session.control();
        std::thread::spawn(move || {
            let mut stdin = io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => {
                        let _ = control.close_stdin();
                        return;
                    }
                    Ok(n) => {
                        if control.send_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    }
    {
        let control = session.control();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut last = terminal_size();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = terminal_size();
                if now != last {
                    if let Some(size) = now {
                        if control.resize(size).is_err() {
                            return;
                        }
                    }
                    last = now;
                }
            }
        });
    }
    let mut stdout = io::stdout();
    let mut stderr = io::stderr();
    let status = session.wait(&mut stdout, &mut stderr);
    done.store(true, Ordering::Relaxed);
    drop(raw);
    status
}

/// A Zellij (or tmux) session name from `sandbox` and `branch` (tmux
/// forbids `.` and `:`; keep it to a safe set).
pub fn session_name(sandbox: &str, branch: &str) -> String {
    let mut s = format!("{sandbox}-{branch}");
    s = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_stops_past_its_byte_limit() {
        let mut out = Vec::new();
        let end = copy_out(&mut &[7u8; 1000][..], &mut out, 1000, "t").unwrap();
        assert_eq!((end, out.len()), (CopyEnd::Done, 1000));
        let err = copy_out(&mut &[7u8; 1001][..], &mut Vec::new(), 1000, "fetch").unwrap_err();
        assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
    }

    #[test]
    fn session_names_are_tmux_safe() {
        assert_eq!(session_name("app-1", "main"), "app-1-main");
        assert_eq!(session_name("app-1", "feat/x.y"), "app-1-feat-x-y");
    }

    #[test]
    fn connect_reports_a_missing_socket() {
        let err = connect(
            Path::new("/nonexistent/vsock.sock"),
            1024,
            Duration::from_millis(100),
            false,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn requests_default_to_the_agent_user() {
        let r = request(vec!["true".into()], "/workspace", None);
        assert_eq!(r.user, Some(UserSpec::Name("agent".into())));
        assert_eq!(r.cwd.as_deref(), Some("/workspace"));
    }
}
