//! The host-side client of the guest agent.
//!
//! [`AgentClient`] opens a fresh byte stream per operation through a
//! [`Connector`] (in production [`hybrid_vsock_connector`], the
//! Firecracker-style `CONNECT <port>\n` handshake on the VMM's vsock Unix
//! socket, described in [`crate::hybrid`] and re-exported here; in tests
//! [`unix_connector`]), says hello, sends one request and runs the
//! conversation described in [`crate::protocol`].
//!
//! Everything it reads comes from the guest, which may be hostile: frames
//! over [`MAX_GUEST_FRAME`] are refused, an agent that accepts a
//! connection and says nothing is given up on after [`HELLO_TIMEOUT`]
//! (unless the connector set a deadline of its own), and collected output
//! ([`AgentClient::exec_request_output`]) stops at [`MAX_COLLECTED`].

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::protocol::{
    expect_guest_frame, printable, read_frame_within, write_frame, write_raw, BootTimes, EgressAsk,
    ExecRequest, ExitStatus, Frame, FrameKind, Hello, ListeningPort, ProtocolError,
    PushFileRequest, RawStreamRequest, Request, Response, TtySize, MAX_GUEST_FRAME, MINOR_EGRESS,
    MINOR_SET_CLOCK, MINOR_TCP_CONNECT, MINOR_TRUST_CERTIFICATES, MINOR_WATCH, STREAM_CHUNK,
};
use crate::relay::{relay, RelayTotals};
use crate::transport::DuplexStream;

pub use crate::hybrid::{
    hybrid_vsock_connect, hybrid_vsock_connect_keeping_deadline, hybrid_vsock_connect_within,
    hybrid_vsock_connector, hybrid_vsock_connector_keeping_deadline, hybrid_vsock_handshake,
    HANDSHAKE_TIMEOUT, MAX_ANSWER_LINE,
};
pub use crate::protocol::WatchEvent;

/// Opens a new byte stream to the agent.
pub type Connector = Box<dyn Fn() -> io::Result<Box<dyn DuplexStream>> + Send + Sync>;

/// Errors seen by the host side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the guest agent: {0}")]
    Connect(io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("guest agent refused the request: {0}")]
    Agent(String),
    #[error("guest agent answered {0:?}, which does not fit the request")]
    UnexpectedResponse(Response),
    #[error("local I/O while streaming to or from the guest: {0}")]
    LocalIo(io::Error),
    #[error("the command's {0} passed the {MAX_COLLECTED}-byte limit of collected output")]
    OutputTooLarge(&'static str),
    #[error(
        "the guest agent (version {agent_version}, protocol 1.{minor}) does not support {what}, \
         which needs protocol 1.{needs}: rebuild the guest image or update keystone"
    )]
    Unsupported {
        what: &'static str,
        agent_version: String,
        minor: u32,
        needs: u32,
    },
}

impl ClientError {
    /// The agent refused the connection or closed it before its hello:
    /// nothing of a request reached it.
    fn is_refusal(&self) -> bool {
        match self {
            ClientError::Connect(e) => e.kind() == io::ErrorKind::ConnectionRefused,
            ClientError::Protocol(ProtocolError::Closed) => true,
            ClientError::Protocol(ProtocolError::Io(e)) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            _ => false,
        }
    }
}

/// Collected output, refusing bytes past [`MAX_COLLECTED`] (the write
/// error ends the command's session).
struct Capped {
    name: &'static str,
    bytes: Vec<u8>,
    over: bool,
}

impl Capped {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            bytes: Vec::new(),
            over: false,
        }
    }
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_COLLECTED {
            self.over = true;
            return Err(io::Error::other("collected output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The outcome of [`AgentClient::exec_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A client of one guest agent.
pub struct AgentClient {
    connector: Connector,
    retry_for: std::time::Duration,
    hello_timeout: std::time::Duration,
}

/// How long to wait between two tries of a connection the agent refused.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long an agent that accepted a connection has to say hello.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The most output [`AgentClient::exec_request_output`] keeps per stream.
pub const MAX_COLLECTED: usize = 64 << 20;

impl AgentClient {
    /// A client that opens each connection with `connector`.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            retry_for: std::time::Duration::ZERO,
            hello_timeout: HELLO_TIMEOUT,
        }
    }

    /// How long an agent that accepted a connection has to say hello
    /// ([`HELLO_TIMEOUT`] unless set; a connector's own deadline wins).
    pub fn hello_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// Keeps trying for up to `window` when the agent refuses a connection
    /// or closes it before answering the hello: the request has not been
    /// sent then, so trying again is safe, and it carries a command over
    /// the moment the guest's init restarts a crashed agent server.
    pub fn retrying(mut self, window: std::time::Duration) -> Self {
        self.retry_for = window;
        self
    }

    /// Connects, exchanges hellos and sends `request`.
    fn start(&self, request: &Request) -> Result<Connection, ClientError> {
        self.start_needing(request, None)
    }

    /// Like [`Self::start`], but refuses before sending `request` when the
    /// agent's minor version is below `needs` (name, minor version).
    fn start_needing(
        &self,
        request: &Request,
        needs: Option<(&'static str, u32)>,
    ) -> Result<Connection, ClientError> {
        let t0 = std::time::Instant::now();
        let (mut conn, hello) = loop {
            match self.hello() {
                Err(e) if e.is_refusal() && t0.elapsed() + RETRY_PAUSE <= self.retry_for => {
                    std::thread::sleep(RETRY_PAUSE);
                }
                other => break other?,
            }
        };
        let theirs = match hello.kind {
            FrameKind::Hello => hello.parse_json::<Hello>()?,
            FrameKind::Error => return Err(ClientError::Agent(hello.text())),
            other => return Err(ProtocolError::Unexpected(other).into()),
        };
        theirs.check_guest()?;
        if let Some((what, needs)) = needs {
            if theirs.minor < needs {
                let _ = conn.writer.shutdown_both();
                return Err(ClientError::Unsupported {
                    what,
                    agent_version: printable(theirs.agent_version.as_bytes()),
                    minor: theirs.minor,
                    needs,
                });
            }
        }
        write_frame(&mut conn.writer, &Frame::json(FrameKind::Request, request))?;
        Ok(conn)
    }

    /// Connects and exchanges hellos; returns the connection and the
    /// agent's hello frame.
    fn hello(&self) -> Result<(Connection, Frame), ClientError> {
        let stream = (self.connector)().map_err(ClientError::Connect)?;
        let writer = stream.try_clone_box().map_err(ClientError::Connect)?;
        // A deadline for the hello unless the connector chose one.
        let deadline_set = stream.raw_fd().is_some_and(|fd| {
            matches!(crate::transport::read_timeout(fd), Ok(None))
                && crate::transport::set_read_timeout(fd, Some(self.hello_timeout)).is_ok()
        });
        let mut conn = Connection {
            reader: BufReader::with_capacity(256 << 10, stream),
            writer,
        };
        write_frame(
            &mut conn.writer,
            &Frame::json(FrameKind::Hello, &Hello::current()),
        )?;
        let hello = expect_guest_frame(&mut conn.reader);
        if deadline_set {
            if let Some(fd) = conn.writer.raw_fd() {
                crate::transport::set_read_timeout(fd, None).map_err(ClientError::Connect)?;
            }
        }
        Ok((conn, hello?))
    }

    /// Sends a request that gets exactly one response.
    fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let mut conn = self.start(request)?;
        conn.response()
    }

    /// Checks that the agent answers; returns its version.
    pub fn ping(&self) -> Result<String, ClientError> {
        self.pong().map(|(version, _)| version)
    }

    /// The agent's version and, when it is the guest's `/init` (minor 4),
    /// where the guest's boot went.
    pub fn pong(&self) -> Result<(String, Option<BootTimes>), ClientError> {
        match self.call(&Request::Ping)? {
            Response::Pong {
                agent_version,
                boot,
            } => Ok((agent_version, boot)),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// The TCP ports listening in the guest.
    pub fn listening_ports(&self) -> Result<Vec<ListeningPort>, ClientError> {
        match self.call(&Request::ListeningPorts)? {
            Response::ListeningPorts { ports } => Ok(ports),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Writes a file under the guest's `/workspace` (see [`PushFileRequest`]).
    pub fn push_file(&self, path: &str, mode: u32, bytes: &[u8]) -> Result<(), ClientError> {
        let req = Request::PushFile(PushFileRequest {
            path: path.to_string(),
            mode,
            bytes: bytes.to_vec(),
        });
        match self.call(&req)? {
            Response::Done => Ok(()),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Sets the guest's wall clock to `unix_ms` (milliseconds since the
    /// Unix epoch); an agent older than protocol 1.5 gives
    /// [`ClientError::Unsupported`].
    pub fn set_clock(&self, unix_ms: u64) -> Result<(), ClientError> {
        let req = Request::SetClock { unix_ms };
        let mut conn = self.start_needing(&req, Some(("setting the clock", MINOR_SET_CLOCK)))?;
        match conn.response()? {
            Response::Done => Ok(()),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Adds the certificate authorities in `pem` to the guest's trust
    /// store under `name` (see [`Request::TrustCertificates`]); an agent
    /// older than protocol 1.6 gives [`ClientError::Unsupported`].
    pub fn trust_certificates(&self, name: &str, pem: &str) -> Result<(), ClientError> {
        let req = Request::TrustCertificates {
            name: name.to_string(),
            pem: pem.to_string(),
        };
        let needs = Some(("adding certificate authorities", MINOR_TRUST_CERTIFICATES));
        let mut conn = self.start_needing(&req, needs)?;
        match conn.response()? {
            Response::Done => Ok(()),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Brings in the memory the guest booted without (see
    /// [`Request::AddMemory`]); returns how many bytes were added. An agent
    /// older than protocol 1.6 gives [`ClientError::Unsupported`].
    pub fn add_memory(&self) -> Result<u64, ClientError> {
        let needs = Some(("adding memory", MINOR_TRUST_CERTIFICATES));
        let mut conn = self.start_needing(&Request::AddMemory, needs)?;
        match conn.response()? {
            Response::MemoryAdded { bytes } => Ok(bytes),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Asks the guest to shut down (or reboot); the agent answers before
    /// it starts tearing down.
    pub fn shutdown(&self, reboot: bool) -> Result<(), ClientError> {
        match self.call(&Request::Shutdown { reboot })? {
            Response::Done => Ok(()),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }

    /// Starts a process; the caller drives the returned session.
    pub fn start_exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        let mut conn = self.start(&Request::Exec(request))?;
        let pid = conn.started()?;
        Ok(ExecSession {
            pid,
            reader: conn.reader,
            control: ExecControl {
                writer: Arc::new(Mutex::new(conn.writer)),
            },
        })
    }

    /// Runs a process, copying `stdin` to it (from a helper thread, which
    /// is left behind if `stdin` still blocks when the process exits; hence
    /// `'static`) and its output to `stdout` and `stderr`, and returns how
    /// it ended.
    pub fn exec(
        &self,
        request: ExecRequest,
        stdin: impl Read + Send + 'static,
        mut stdout: impl Write,
        mut stderr: impl Write,
    ) -> Result<ExitStatus, ClientError> {
        let session = self.start_exec(request)?;
        let control = session.control();
        std::thread::spawn(move || control.pump_stdin(stdin));
        session.wait(&mut stdout, &mut stderr)
    }

    /// Runs `argv` with empty stdin and collects its output.
    pub fn exec_output<S: AsRef<str>>(&self, argv: &[S]) -> Result<ExecOutput, ClientError> {
        self.exec_request_output(ExecRequest::new(argv))
    }

    /// Runs a full request with empty stdin and collects its output.
    /// Each stream keeps at most [`MAX_COLLECTED`] bytes; more ends the
    /// command ([`ClientError::OutputTooLarge`]).
    pub fn exec_request_output(&self, request: ExecRequest) -> Result<ExecOutput, ClientError> {
        let mut stdout = Capped::new("stdout");
        let mut stderr = Capped::new("stderr");
        let status = self.exec(request, io::empty(), &mut stdout, &mut stderr);
        for stream in [&stdout, &stderr] {
            if stream.over {
                return Err(ClientError::OutputTooLarge(stream.name));
            }
        }
        Ok(ExecOutput {
            status: status?,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
        })
    }

    /// Starts a process whose stdin/stdout become a byte pipe
    /// (`git upload-pack`, `rsync --server`).
    pub fn raw_stream(&self, request: RawStreamRequest) -> Result<RawStream, ClientError> {
        let mut conn = self.start(&Request::RawStream(request))?;
        conn.started()?;
        Ok(RawStream {
            reader: RawStreamReader {
                reader: conn.reader,
                buf: Vec::new(),
                pos: 0,
                stderr: Vec::new(),
                status: None,
            },
            writer: RawStreamWriter {
                writer: conn.writer,
            },
        })
    }

    /// Asks the agent to watch `paths` (see [`Request::Watch`]) and returns
    /// the stream of events; it ends when either side closes. An agent
    /// older than protocol 1.1 gives [`ClientError::Unsupported`].
    pub fn watch(&self, paths: &[String], idle_ms: u64) -> Result<Watch, ClientError> {
        let req = Request::Watch {
            paths: paths.to_vec(),
            idle_ms,
        };
        let mut conn = self.start_needing(&req, Some(("watch", MINOR_WATCH)))?;
        let directories = match conn.response() {
            Ok(Response::Watching { directories }) => directories,
            Ok(other) => return Err(ClientError::UnexpectedResponse(other)),
            Err(e) => return Err(e),
        };
        Ok(Watch {
            events: Events::new(conn, FrameKind::Event, "the watch"),
            directories,
        })
    }
}

impl AgentClient {
    /// Connects to TCP `port` on the guest's loopback (see
    /// [`Request::TcpConnect`]); the returned tunnel is a plain byte
    /// stream to it. An agent older than protocol 1.2 gives
    /// [`ClientError::Unsupported`]; nothing listening gives
    /// [`ClientError::Agent`].
    pub fn tcp_connect(&self, port: u16) -> Result<TcpTunnel, ClientError> {
        let req = Request::TcpConnect { port };
        let mut conn = self.start_needing(&req, Some(("port forwarding", MINOR_TCP_CONNECT)))?;
        let address = match conn.response()? {
            Response::Connected { address } => address,
            other => return Err(ClientError::UnexpectedResponse(other)),
        };
        // Bytes the guest sent right after its answer (a server's greeting)
        // may already sit in the reader's buffer.
        let pending = conn.reader.buffer().to_vec();
        Ok(TcpTunnel {
            stream: conn.writer,
            pending,
            address,
        })
    }
}

impl AgentClient {
    /// Offers outbound connections to the guest (see [`Request::Egress`]):
    /// the returned stream yields the guest programs' asks until either
    /// side closes. An agent older than protocol 1.3 gives
    /// [`ClientError::Unsupported`].
    pub fn egress(&self) -> Result<EgressAsks, ClientError> {
        let mut conn = self.start_needing(&Request::Egress, Some(("networking", MINOR_EGRESS)))?;
        match conn.response()? {
            Response::Done => {}
            other => return Err(ClientError::UnexpectedResponse(other)),
        }
        Ok(Events::new(conn, FrameKind::EgressAsk, "the egress offer"))
    }

    /// Answers the ask `id`: with `refused` it refuses it (`Ok(None)`),
    /// without it returns the guest end of the connection, to relay to the
    /// host's TCP connection to the target (its `guest_address` is
    /// unspecified, 0.0.0.0:0: the guest end is the program's connection to
    /// the proxy).
    pub fn egress_attach(
        &self,
        id: u64,
        refused: Option<String>,
    ) -> Result<Option<TcpTunnel>, ClientError> {
        let refusing = refused.is_some();
        let req = Request::EgressAttach { id, refused };
        let mut conn = self.start_needing(&req, Some(("networking", MINOR_EGRESS)))?;
        match conn.response()? {
            Response::Done if refusing => Ok(None),
            Response::Done => {
                let pending = conn.reader.buffer().to_vec();
                Ok(Some(TcpTunnel {
                    stream: conn.writer,
                    pending,
                    address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                }))
            }
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }
}

/// The asks of an [`AgentClient::egress`] connection.
pub type EgressAsks = Events<EgressAsk>;

/// A byte stream to a TCP port in the guest, from
/// [`AgentClient::tcp_connect`]. Read and write it, or hand it to
/// [`TcpTunnel::relay`].
pub struct TcpTunnel {
    stream: Box<dyn DuplexStream>,
    /// Guest bytes already received, delivered before any further read.
    pending: Vec<u8>,
    address: std::net::SocketAddr,
}

impl TcpTunnel {
    /// The guest address it is connected to (`127.0.0.1:port` or `[::1]:port`).
    pub fn guest_address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Closes the sending half; the guest server reads end of stream.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown_write()
    }

    /// Relays between the tunnel and `peer` (a host TCP connection) until
    /// both directions end; returns (peer -> guest, guest -> peer) totals.
    pub fn relay(self, mut peer: Box<dyn DuplexStream>) -> io::Result<RelayTotals> {
        if !self.pending.is_empty() {
            peer.write_all(&self.pending)?;
        }
        let mut totals = relay(peer, self.stream)?;
        totals.b_to_a += self.pending.len() as u64;
        Ok(totals)
    }
}

impl Read for TcpTunnel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = buf.len().min(self.pending.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        self.stream.read(buf)
    }
}

impl Write for TcpTunnel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// The frames of one long-lived request (`Watch`, `Egress`): an iterator
/// that blocks for the next frame of its kind and ends (`None`) when the
/// connection closes. An error frame or a malformed frame is the last item,
/// and the connection is closed after it.
pub struct Events<T> {
    reader: BufReader<Box<dyn DuplexStream>>,
    closer: WatchCloser,
    kind: FrameKind,
    /// What the connection is, for the error an agent's `Error` frame gives.
    what: &'static str,
    done: bool,
    item: std::marker::PhantomData<fn() -> T>,
}

impl<T> Events<T> {
    fn new(conn: Connection, kind: FrameKind, what: &'static str) -> Self {
        Events {
            reader: conn.reader,
            closer: WatchCloser {
                writer: Arc::new(Mutex::new(conn.writer)),
            },
            kind,
            what,
            done: false,
            item: std::marker::PhantomData,
        }
    }

    /// A handle that closes the connection from another thread.
    pub fn closer(&self) -> WatchCloser {
        self.closer.clone()
    }
}

impl<T: serde::de::DeserializeOwned> Iterator for Events<T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let result = match read_frame_within(&mut self.reader, MAX_GUEST_FRAME) {
            Ok(None) => None,
            Ok(Some(f)) if f.kind == self.kind => match f.parse_json::<T>() {
                Ok(item) => return Some(Ok(item)),
                Err(e) => Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
            },
            Ok(Some(f)) if f.kind == FrameKind::Error => Some(Err(io::Error::other(format!(
                "guest agent ended {}: {}",
                self.what,
                f.text()
            )))),
            Ok(Some(f)) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                ProtocolError::Unexpected(f.kind),
            ))),
            // A connection closed by our own closer (or a stopped VM).
            Err(ProtocolError::Closed) => None,
            Err(ProtocolError::Io(e)) => Some(Err(e)),
            Err(e) => Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
        };
        self.done = true;
        self.closer.close();
        result
    }
}

/// The events of a [`AgentClient::watch`]: an iterator that blocks for the
/// next event and ends (`None`) when the connection closes.
pub struct Watch {
    events: Events<WatchEvent>,
    directories: u64,
}

/// Ends a [`Watch`] or [`Events`] from another thread (its `next` then
/// returns `None`).
#[derive(Clone)]
pub struct WatchCloser {
    writer: Arc<Mutex<Box<dyn DuplexStream>>>,
}

impl WatchCloser {
    /// Closes the connection; the guest stops watching.
    pub fn close(&self) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.shutdown_both();
    }
}

impl Watch {
    /// How many directories the agent watches.
    pub fn directories(&self) -> u64 {
        self.directories
    }

    /// A handle that ends the watch from another thread.
    pub fn closer(&self) -> WatchCloser {
        self.events.closer()
    }
}

impl Iterator for Watch {
    type Item = io::Result<WatchEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        self.events.next()
    }
}

struct Connection {
    reader: BufReader<Box<dyn DuplexStream>>,
    writer: Box<dyn DuplexStream>,
}

impl Connection {
    fn response(&mut self) -> Result<Response, ClientError> {
        let frame = expect_guest_frame(&mut self.reader)?;
        match frame.kind {
            FrameKind::Response => Ok(frame.parse_json()?),
            FrameKind::Error => Err(ClientError::Agent(frame.text())),
            other => Err(ProtocolError::Unexpected(other).into()),
        }
    }

    fn started(&mut self) -> Result<i32, ClientError> {
        match self.response()? {
            Response::Started { pid } => Ok(pid),
            other => Err(ClientError::UnexpectedResponse(other)),
        }
    }
}

/// A running process started by [`AgentClient::start_exec`].
pub struct ExecSession {
    pid: i32,
    reader: BufReader<Box<dyn DuplexStream>>,
    control: ExecControl,
}

/// Sends input and control frames to a running process; cheap to clone.
#[derive(Clone)]
pub struct ExecControl {
    writer: Arc<Mutex<Box<dyn DuplexStream>>>,
}

impl ExecControl {
    fn send(&self, kind: FrameKind, payload: &[u8]) -> Result<(), ProtocolError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_raw(&mut **w, kind, payload)
    }

    /// Sends bytes to the process's stdin.
    pub fn send_stdin(&self, bytes: &[u8]) -> Result<(), ProtocolError> {
        for chunk in bytes.chunks(STREAM_CHUNK) {
            self.send(FrameKind::Stdin, chunk)?;
        }
        Ok(())
    }

    /// Closes the process's stdin (on a terminal: sends ^D).
    pub fn close_stdin(&self) -> Result<(), ProtocolError> {
        self.send(FrameKind::StdinEof, &[])
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, size: TtySize) -> Result<(), ProtocolError> {
        let f = Frame::resize(size);
        self.send(f.kind, &f.payload)
    }

    /// Sends a signal to the process group.
    pub fn signal(&self, signo: i32) -> Result<(), ProtocolError> {
        self.send(FrameKind::Signal, &signo.to_le_bytes())
    }

    /// Copies `stdin` to the process until end of file, then closes it.
    pub fn pump_stdin(&self, mut stdin: impl Read) -> Result<(), ClientError> {
        let mut buf = vec![0u8; STREAM_CHUNK];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::LocalIo(e)),
            };
            self.send(FrameKind::Stdin, &buf[..n])?;
        }
        Ok(self.close_stdin()?)
    }
}

impl ExecSession {
    /// The process id in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A handle for stdin, resize and signals.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Copies the process's output until it exits; returns its status.
    pub fn wait(
        mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        loop {
            let frame = expect_guest_frame(&mut self.reader)?;
            match frame.kind {
                FrameKind::Stdout => {
                    stdout
                        .write_all(&frame.payload)
                        .map_err(ClientError::LocalIo)?;
                    stdout.flush().map_err(ClientError::LocalIo)?;
                }
                FrameKind::Stderr => {
                    stderr
                        .write_all(&frame.payload)
                        .map_err(ClientError::LocalIo)?;
                    stderr.flush().map_err(ClientError::LocalIo)?;
                }
                FrameKind::Exit => return Ok(frame.parse_json()?),
                FrameKind::Error => return Err(ClientError::Agent(frame.text())),
                other => return Err(ProtocolError::Unexpected(other).into()),
            }
        }
    }
}

/// How a raw stream's process ended, with what it wrote to stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExit {
    pub status: ExitStatus,
    pub stderr: Vec<u8>,
}

/// The most stderr a [`RawStream`] keeps.
const RAW_STDERR_LIMIT: usize = 1 << 20;

/// A byte pipe to a guest process: reading gives its stdout, writing feeds
/// its stdin. Split it to read and write from two threads.
pub struct RawStream {
    reader: RawStreamReader,
    writer: RawStreamWriter,
}

/// The reading half of a [`RawStream`].
pub struct RawStreamReader {
    reader: BufReader<Box<dyn DuplexStream>>,
    buf: Vec<u8>,
    pos: usize,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
}

/// The writing half of a [`RawStream`].
pub struct RawStreamWriter {
    writer: Box<dyn DuplexStream>,
}

impl RawStream {
    /// Splits into halves for two threads.
    pub fn into_split(self) -> (RawStreamReader, RawStreamWriter) {
        (self.reader, self.writer)
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&mut self) -> io::Result<()> {
        self.writer.close_stdin()
    }

    /// Drains the rest of stdout and returns the exit status.
    pub fn wait(self) -> Result<RawExit, ClientError> {
        self.reader.wait()
    }
}

impl Read for RawStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for RawStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl RawStreamReader {
    /// Reads the next frame into the buffer; false once the process exited.
    fn fill(&mut self) -> Result<bool, ClientError> {
        loop {
            if self.status.is_some() {
                return Ok(false);
            }
            let frame = expect_guest_frame(&mut self.reader)?;
            match frame.kind {
                FrameKind::Stdout => {
                    self.buf = frame.payload;
                    self.pos = 0;
                    return Ok(true);
                }
                FrameKind::Stderr => {
                    let room = RAW_STDERR_LIMIT.saturating_sub(self.stderr.len());
                    let n = room.min(frame.payload.len());
                    self.stderr.extend_from_slice(&frame.payload[..n]);
                }
                FrameKind::Exit => self.status = Some(frame.parse_json()?),
                FrameKind::Error => return Err(ClientError::Agent(frame.text())),
                other => return Err(ProtocolError::Unexpected(other).into()),
            }
        }
    }

    /// The exit status, once reading reached the end.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Gives up reading (an error) when the guest sends nothing for
    /// `idle` (`None`: waits for ever). Needs a stream with a descriptor.
    pub fn set_idle_timeout(&self, idle: Option<std::time::Duration>) -> io::Result<()> {
        let fd = self.reader.get_ref().raw_fd().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "this stream has no descriptor")
        })?;
        crate::transport::set_read_timeout(fd, idle)
    }

    /// Drains the rest of stdout and returns the exit status.
    pub fn wait(mut self) -> Result<RawExit, ClientError> {
        while self.fill()? {}
        Ok(RawExit {
            status: self.status.unwrap_or(ExitStatus {
                code: None,
                signal: None,
            }),
            stderr: self.stderr,
        })
    }
}

impl Read for RawStreamReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl RawStreamWriter {
    /// Closes the process's stdin.
    pub fn close_stdin(&mut self) -> io::Result<()> {
        write_raw(&mut self.writer, FrameKind::StdinEof, &[]).map_err(io::Error::other)
    }
}

impl Write for RawStreamWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(STREAM_CHUNK);
        write_raw(&mut self.writer, FrameKind::Stdin, &buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connector for an agent listening on a plain Unix socket (tests, or
/// an agent run on the host with `--listen unix:PATH`).
pub fn unix_connector(path: impl Into<PathBuf>) -> Connector {
    let path = path.into();
    Box::new(move || Ok(Box::new(UnixStream::connect(&path)?) as Box<dyn DuplexStream>))
}
