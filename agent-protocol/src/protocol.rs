//! The Keystone guest-agent wire protocol, version 1.3.
//!
//! The host reaches the agent over virtio-vsock (guest port
//! [`AGENT_VSOCK_PORT`]); tests use a Unix socket. Either way the transport
//! is a reliable byte stream and everything on it is framed:
//!
//! ```text
//! +----------------+---------+---------------------+
//! | len: u32 (LE)  | kind:u8 | payload (len bytes) |
//! +----------------+---------+---------------------+
//! ```
//!
//! `len` counts the payload only and is at most [`MAX_PAYLOAD`]; a larger
//! length or an unknown `kind` is a protocol error (the peer closes the
//! connection, it never panics). The host accepts at most
//! [`MAX_GUEST_FRAME`] from a guest: the agent sends stream data in
//! [`STREAM_CHUNK`] frames. Control payloads are JSON (serde); stream
//! payloads are raw bytes.
//!
//! | kind | name       | direction    | payload                         |
//! |------|------------|--------------|---------------------------------|
//! | 0x01 | Hello      | both         | JSON [`Hello`]                  |
//! | 0x02 | Request    | host → guest | JSON [`Request`]                |
//! | 0x03 | Response   | guest → host | JSON [`Response`]               |
//! | 0x04 | Error      | guest → host | UTF-8 message                   |
//! | 0x10 | Stdin      | host → guest | raw bytes                       |
//! | 0x11 | StdinEof   | host → guest | empty                           |
//! | 0x12 | Resize     | host → guest | rows u16 LE, cols u16 LE        |
//! | 0x13 | Signal     | host → guest | signal number i32 LE            |
//! | 0x20 | Stdout     | guest → host | raw bytes                       |
//! | 0x21 | Stderr     | guest → host | raw bytes                       |
//! | 0x22 | Exit       | guest → host | JSON [`ExitStatus`]             |
//! | 0x30 | Event      | guest → host | JSON [`WatchEvent`] (minor 1)   |
//! | 0x31 | EgressAsk  | guest → host | JSON [`EgressAsk`] (minor 3)    |
//!
//! # Conversation
//!
//! One operation per connection: the host opens a fresh stream for each.
//!
//! 1. The host sends `Hello`; the guest answers with its own `Hello`. Each
//!    side compares [`Hello::protocol`] with [`PROTOCOL_VERSION`]; on a
//!    mismatch the guest also sends an `Error` frame and closes, and both
//!    sides report [`ProtocolError::VersionMismatch`] ("guest agent speaks
//!    protocol N, this keystone speaks M: rebuild the guest image or update
//!    keystone"). Minor versions are additive and need not match.
//! 2. The host sends one `Request`.
//!    - `Ping`, `ListeningPorts`, `PushFile`, `Shutdown`: the guest answers
//!      one `Response` (or `Error`) and closes.
//!    - `Exec` and `RawStream`: the guest answers `Response::Started` (or
//!      `Error` when the process could not be started), then the stream
//!      phase: the host sends `Stdin`/`StdinEof`/`Resize`/`Signal`, the
//!      guest sends `Stdout`/`Stderr` and finally one `Exit`, then closes.
//!      `RawStream` is `Exec` without a terminal: the host-side handle
//!      ([`crate::client::RawStream`]) exposes the child's stdin/stdout as a
//!      plain byte pipe, but on the wire the bytes stay in `Stdin`/`Stdout`
//!      frames, so raw data and control frames never mix ambiguously.
//!      If the host closes the connection before `Exit`, the guest kills
//!      the process group.
//!    - `Watch` (minor 1): the guest answers `Response::Watching` (or
//!      `Error`), then sends one `Event` frame per [`WatchEvent`] for as
//!      long as the host keeps the connection open; the host sends nothing
//!      more and ends the watch by closing. This is how the host learns
//!      about guest activity without the guest ever opening a connection
//!      (security invariant 2): the connection is the host's, held open.
//!    - `TcpConnect` (minor 2): the guest connects to `port` on its own
//!      loopback (127.0.0.1, then ::1; never another address) and answers
//!      `Response::Connected`, or `Error` ("nothing is listening on guest
//!      port N ..."). After `Connected` the connection carries no more
//!      frames: it is a raw byte relay to that TCP connection in both
//!      directions. A half close travels through (the host's
//!      `shutdown(SHUT_WR)` becomes one on the guest's TCP socket, and the
//!      guest server's end of stream becomes one on the vsock stream); the
//!      relay ends when both directions have ended or either side fails.
//!      This is how the host forwards a guest port: the host accepts a TCP
//!      connection and opens one `TcpConnect` per connection.
//!    - `Egress` (minor 3): the host offers outbound connections. The guest
//!      answers `Response::Done` and from then on sends one `EgressAsk`
//!      frame on this connection for each connection a guest program asks
//!      its HTTP proxy (guest 127.0.0.1:3128) for; the host sends nothing
//!      more on it. The host answers each ask on a new connection of its
//!      own, `EgressAttach { id, refused }`: with `refused` the guest tells
//!      the program why (HTTP 403) and closes; without it the guest answers
//!      `Response::Done` and the connection becomes a raw byte relay
//!      between the program and the host's TCP connection to the target,
//!      as after `TcpConnect`. Every connection is still opened by the
//!      host (security invariant 2); the guest only asks on one the host
//!      holds open, and the host decides where it may go.
//!
//! # Versions
//!
//! - 1.0: `Ping`, `Exec`, `RawStream`, `ListeningPorts`, `PushFile`,
//!   `Shutdown`.
//! - 1.1: `Watch` and the `Event` frame. A 1.0 agent answers a `Watch`
//!   with an `Error` frame (unknown request); the client checks the
//!   agent's [`Hello::minor`] first and reports
//!   [`crate::client::ClientError::Unsupported`] instead of sending it.
//! - 1.2: `TcpConnect` and `Response::Connected`; older agents are
//!   refused the same way.
//! - 1.3: `Egress`, `EgressAttach` and the `EgressAsk` frame.
//! - 1.4: `Response::Pong` carries the guest's [`BootTimes`] when the agent
//!   is the guest's `/init` (older agents leave it out).
//! - 1.5: [`BootTimes::wall_ms`], the guest's wall clock, so that the
//!   host sets it only when it is wrong (older agents leave it 0), and
//!   `SetClock`, which sets it without starting a process.
//! - 1.6: `TrustCertificates`, which adds certificate authorities to the
//!   guest's trust store without starting a process, and `AddMemory` with
//!   `Response::MemoryAdded`, which brings in the memory a guest booted
//!   without (`mem=`).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol major version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The protocol minor version (additive changes only).
pub const PROTOCOL_MINOR: u32 = 6;
/// The first minor version with `Watch` and `Event` frames.
pub const MINOR_WATCH: u32 = 1;
/// The first minor version with `TcpConnect`.
pub const MINOR_TCP_CONNECT: u32 = 2;
/// The first minor version with `Egress` and `EgressAttach`.
pub const MINOR_EGRESS: u32 = 3;
/// The first minor version with `SetClock`.
pub const MINOR_SET_CLOCK: u32 = 5;
/// The first minor version with `TrustCertificates` and `AddMemory`.
pub const MINOR_TRUST_CERTIFICATES: u32 = 6;
const _: () = assert!(
    MINOR_WATCH <= PROTOCOL_MINOR
        && MINOR_TCP_CONNECT <= PROTOCOL_MINOR
        && MINOR_EGRESS <= PROTOCOL_MINOR
        && MINOR_SET_CLOCK <= PROTOCOL_MINOR
        && MINOR_TRUST_CERTIFICATES <= PROTOCOL_MINOR
);
/// The guest vsock port the agent listens on: a privileged one (below
/// 1024), so that no guest user but root may bind it, and its listener is
/// made and held by PID 1, so that it stays taken while a dead agent
/// server is restarted.
pub const AGENT_VSOCK_PORT: u32 = 1023;
/// The largest payload a frame may carry (16 MiB).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// The chunk size used for stream data frames.
pub const STREAM_CHUNK: usize = 64 << 10;
/// The agent's own version (the crate version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of the framing layer and the conversation.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("agent connection I/O: {0}")]
    Io(#[from] io::Error),
    #[error("agent connection closed by the peer")]
    Closed,
    #[error("a frame of {0} bytes is over the limit: the peer is broken or not a keystone agent")]
    FrameTooLarge(usize),
    #[error(
        "unknown frame kind {0:#04x}: the peer speaks a newer protocol or is not a keystone agent"
    )]
    UnknownKind(u8),
    #[error("malformed {kind:?} payload: {detail}")]
    BadPayload { kind: FrameKind, detail: String },
    #[error("unexpected {0:?} frame at this point of the conversation")]
    Unexpected(FrameKind),
    #[error("guest agent speaks protocol {guest}, this keystone speaks {host}: rebuild the guest image or update keystone")]
    VersionMismatch { guest: u32, host: u32 },
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 0x01,
    Request = 0x02,
    Response = 0x03,
    Error = 0x04,
    Stdin = 0x10,
    StdinEof = 0x11,
    Resize = 0x12,
    Signal = 0x13,
    Stdout = 0x20,
    Stderr = 0x21,
    Exit = 0x22,
    Event = 0x30,
    EgressAsk = 0x31,
}

impl FrameKind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Result<Self, ProtocolError> {
        Ok(match b {
            0x01 => Self::Hello,
            0x02 => Self::Request,
            0x03 => Self::Response,
            0x04 => Self::Error,
            0x10 => Self::Stdin,
            0x11 => Self::StdinEof,
            0x12 => Self::Resize,
            0x13 => Self::Signal,
            0x20 => Self::Stdout,
            0x21 => Self::Stderr,
            0x22 => Self::Exit,
            0x30 => Self::Event,
            0x31 => Self::EgressAsk,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: Vec<u8>) -> Self {
        Self { kind, payload }
    }

    /// A frame with a JSON payload.
    pub fn json<T: Serialize>(kind: FrameKind, value: &T) -> Self {
        // Serializing our own plain data types cannot fail.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        Self { kind, payload }
    }

    /// Decodes the JSON payload.
    pub fn parse_json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        // The message may quote the peer's strings.
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::BadPayload {
            kind: self.kind,
            detail: printable(e.to_string().as_bytes()),
        })
    }

    /// A `Resize` frame.
    pub fn resize(size: TtySize) -> Self {
        let mut p = Vec::with_capacity(4);
        p.extend_from_slice(&size.rows.to_le_bytes());
        p.extend_from_slice(&size.cols.to_le_bytes());
        Self::new(FrameKind::Resize, p)
    }

    /// Decodes a `Resize` payload.
    pub fn parse_resize(&self) -> Result<TtySize, ProtocolError> {
        match self.payload[..] {
            [r0, r1, c0, c1] => Ok(TtySize {
                rows: u16::from_le_bytes([r0, r1]),
                cols: u16::from_le_bytes([c0, c1]),
            }),
            _ => Err(self.bad("resize payload must be 4 bytes")),
        }
    }

    /// A `Signal` frame.
    pub fn signal(signo: i32) -> Self {
        Self::new(FrameKind::Signal, signo.to_le_bytes().to_vec())
    }

    /// Decodes a `Signal` payload.
    pub fn parse_signal(&self) -> Result<i32, ProtocolError> {
        match self.payload[..] {
            [a, b, c, d] => Ok(i32::from_le_bytes([a, b, c, d])),
            _ => Err(self.bad("signal payload must be 4 bytes")),
        }
    }

    /// The payload of an `Error` frame as text fit for a terminal (see
    /// [`printable`]).
    pub fn text(&self) -> String {
        printable(&self.payload)
    }

    fn bad(&self, detail: &str) -> ProtocolError {
        ProtocolError::BadPayload {
            kind: self.kind,
            detail: detail.to_string(),
        }
    }
}

/// The most characters of a peer's text that [`printable`] keeps.
pub const MAX_SHOWN_TEXT: usize = 4096;

/// Characters that reorder the text around them (Unicode's explicit
/// directional formatting characters and marks): a line holding one can
/// read other than it is.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// A peer's bytes as text that is safe to show on a terminal: invalid
/// UTF-8 replaced, control and bidirectional characters escaped
/// (`\u{1b}`, `\u{202e}`), at most
/// [`MAX_SHOWN_TEXT`] characters followed by how many bytes were left out.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    let (mut shown, mut used) = (0, 0);
    for chunk in bytes.utf8_chunks() {
        let replaced = (!chunk.invalid().is_empty()).then_some(('\u{fffd}', chunk.invalid().len()));
        let chars = chunk.valid().chars().map(|c| (c, c.len_utf8()));
        for (c, len) in chars.chain(replaced) {
            if shown == MAX_SHOWN_TEXT {
                out.push_str(&format!("... ({} more bytes)", bytes.len() - used));
                return out;
            }
            if c.is_control() || is_bidi_control(c) {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            shown += 1;
            used += len;
        }
    }
    out
}

/// Writes one frame with a single `write_all` (header and payload together,
/// so concurrent writers holding a lock never interleave partial frames).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    write_raw(w, frame.kind, &frame.payload)
}

/// Like [`write_frame`] without building a [`Frame`] first.
pub fn write_raw<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::FrameTooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// The largest frame the host accepts from a guest: an honest agent sends
/// stream data in [`STREAM_CHUNK`] frames and small JSON, so a guest that
/// claims more is refused before it can make the host hold 16 MiB on each
/// of its connections.
pub const MAX_GUEST_FRAME: usize = 1 << 20;

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    read_frame_within(r, MAX_PAYLOAD)
}

/// Reads one frame of at most `limit` payload bytes (see
/// [`MAX_GUEST_FRAME`]); a longer one is [`ProtocolError::FrameTooLarge`].
pub fn read_frame_within<R: Read + ?Sized>(
    r: &mut R,
    limit: usize,
) -> Result<Option<Frame>, ProtocolError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > limit.min(MAX_PAYLOAD) {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    let kind = FrameKind::from_u8(header[4])?;
    // Grown as the bytes arrive: a claimed length costs nothing until the
    // peer sends it.
    let mut payload = Vec::with_capacity(len.min(STREAM_CHUNK));
    Read::take(&mut *r, len as u64).read_to_end(&mut payload)?;
    if payload.len() < len {
        return Err(ProtocolError::Closed);
    }
    Ok(Some(Frame { kind, payload }))
}

/// Reads one frame, treating end of stream as [`ProtocolError::Closed`].
pub fn expect_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, ProtocolError> {
    read_frame(r)?.ok_or(ProtocolError::Closed)
}

/// The host's read of a guest frame: one frame of at most
/// [`MAX_GUEST_FRAME`] bytes, or an error (an end of stream too).
pub fn expect_guest_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, ProtocolError> {
    read_frame_within(r, MAX_GUEST_FRAME)?.ok_or(ProtocolError::Closed)
}

/// The first frame each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Major protocol version; must match.
    pub protocol: u32,
    /// Minor protocol version; additive.
    #[serde(default)]
    pub minor: u32,
    /// The sender's software version (informational).
    pub agent_version: String,
}

impl Hello {
    /// This build's hello.
    pub fn current() -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            minor: PROTOCOL_MINOR,
            agent_version: AGENT_VERSION.to_string(),
        }
    }

    /// Checks a guest hello against this build (host's point of view).
    pub fn check_guest(&self) -> Result<(), ProtocolError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                guest: self.protocol,
                host: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// Checks a host hello against this build (guest's point of view).
    pub fn check_host(&self) -> Result<(), ProtocolError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                guest: PROTOCOL_VERSION,
                host: self.protocol,
            });
        }
        Ok(())
    }
}

/// Who runs a process: a user name from the guest's `/etc/passwd` or a
/// numeric uid. JSON: a string or a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UserSpec {
    Uid(u32),
    Name(String),
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Run a process in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, on top of a clean base (`PATH`, `HOME`, `USER`,
    /// `LOGNAME`, `SHELL`, `TERM` for terminals).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The user; the agent's own (root) when absent.
    #[serde(default)]
    pub user: Option<UserSpec>,
    /// Allocate a pseudo-terminal of this size (stdout and stderr then
    /// both arrive as `Stdout`).
    #[serde(default)]
    pub tty: Option<TtySize>,
}

impl ExecRequest {
    /// A request running `argv` as the agent's user with no terminal.
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        Self {
            argv: argv.iter().map(|s| s.as_ref().to_string()).collect(),
            ..Self::default()
        }
    }
}

/// A raw byte pipe to a child (`git upload-pack`, `rsync --server`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawStreamRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub user: Option<UserSpec>,
}

/// Write a file under the guest's `/workspace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushFileRequest {
    /// Relative to `/workspace`, or absolute under `/workspace`; `..`
    /// components are refused.
    pub path: String,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
    /// The contents (JSON array of bytes; fine for `.env`-sized files).
    pub bytes: Vec<u8>,
}

/// What the host asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Exec(ExecRequest),
    RawStream(RawStreamRequest),
    ListeningPorts,
    PushFile(PushFileRequest),
    Shutdown {
        reboot: bool,
    },
    /// Watch directories for changes and branch commits (minor 1).
    ///
    /// `paths` are watched recursively (absolute, or relative to the
    /// workspace; empty means the workspace), skipping `.git/objects` and
    /// never following symbolic links. A path holding a `.git` directory
    /// also reports [`WatchEvent::Commit`] whenever one of its
    /// `.git/refs/heads/*` refs moves to a new commit. With `idle_ms > 0`,
    /// [`WatchEvent::Idle`] follows once no change was seen for `idle_ms`
    /// after the last one (once per burst of changes); `0` turns it off.
    Watch {
        paths: Vec<String>,
        idle_ms: u64,
    },
    /// Connect to `port` on the guest's loopback and relay raw bytes
    /// (minor 2; see the module documentation).
    TcpConnect {
        port: u16,
    },
    /// Offer outbound connections to the guest's programs (minor 3; see
    /// the module documentation).
    Egress,
    /// The host's answer to the `EgressAsk` with this `id` (minor 3).
    EgressAttach {
        id: u64,
        /// Why the host will not make the connection, if it will not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    /// Set the guest's wall clock (`CLOCK_REALTIME`) to `unix_ms`,
    /// milliseconds since the Unix epoch (minor 5). Answered with `Done`,
    /// or an `Error` frame when the agent may not set it.
    SetClock {
        unix_ms: u64,
    },
    /// Trust the certificate authorities in `pem` (PEM `CERTIFICATE`
    /// blocks only; minor 6). The agent keeps them as
    /// `/usr/local/share/ca-certificates/<name>`, where
    /// `update-ca-certificates` finds them, and appends them to the bundle
    /// that curl, git and OpenSSL read, once per `name`: a name that is
    /// already there is answered `Done` with nothing written, so `name`
    /// should identify the content (a hash of it). `name` is a plain file
    /// name ending in `.crt` (letters, digits, `.`, `-`, `_`; no leading
    /// dot). Answered with `Done`, or an `Error` frame.
    TrustCertificates {
        name: String,
        pem: String,
    },
    /// Add the memory that the firmware's memory map has and the kernel
    /// lacks (a guest booted with `mem=` below its size) and put it online
    /// (minor 6). The host asks once the sandbox is ready, so that setting
    /// up that memory's page structures does not delay the start.
    /// Answered with `MemoryAdded` once all of it is online (nothing
    /// missing is `bytes: 0`), or an `Error` frame.
    AddMemory,
}

/// A guest program's wish to reach `host:port` (minor 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressAsk {
    pub id: u64,
    pub host: String,
    pub port: u16,
}

/// What a `Watch` reports, one per `Event` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchEvent {
    /// The branch `refs/heads/<branch>` now points at `head`.
    Commit { branch: String, head: String },
    /// No change for `idle_ms` after the last change.
    Idle,
}

/// A TCP socket in LISTEN state in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListeningPort {
    pub port: u16,
    pub address: std::net::IpAddr,
}

/// The guest's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong {
        agent_version: String,
        /// Where the guest's boot went (minor 4; only when the agent is
        /// the guest's `/init`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot: Option<BootTimes>,
    },
    /// The process started; stream frames follow.
    Started {
        pid: i32,
    },
    ListeningPorts {
        ports: Vec<ListeningPort>,
    },
    Done,
    /// The watch is set up; `Event` frames follow.
    Watching {
        /// How many directories are watched.
        directories: u64,
    },
    /// The guest is connected to `address`; raw bytes follow both ways.
    Connected {
        address: std::net::SocketAddr,
    },
    /// The answer to `AddMemory`: how much memory was added.
    MemoryAdded {
        bytes: u64,
    },
}

/// Milestones of the guest's boot, in milliseconds of the guest's
/// `CLOCK_BOOTTIME` (0 is the guest kernel's start). `now_ms`, read as the
/// answer is sent, places the others on the host's clock: the kernel
/// started `now_ms` before the host received the answer (less the
/// transport's latency, well under a millisecond on vsock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BootTimes {
    /// The guest agent began as PID 1 (`/init`).
    pub init_ms: u64,
    /// The sandbox's root (the shares and the overlay) was mounted and
    /// entered.
    pub root_ms: u64,
    /// The agent server began to accept the host's connections.
    pub listening_ms: u64,
    /// When this answer was sent.
    pub now_ms: u64,
    /// The guest's wall clock (`CLOCK_REALTIME`, milliseconds since the
    /// Unix epoch) when this answer was sent; 0 from agents before 1.5.
    #[serde(default)]
    pub wall_ms: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell's view: the code, or 128 + signal (255 when there is
    /// neither, or the signal is not one: 1 to 127).
    pub fn code_or_signal(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) if (1..=127).contains(&s) => 128 + s,
            (None, _) => 255,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) -> Frame {
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).unwrap();
        assert_eq!(buf.len(), 5 + frame.payload.len());
        let mut r = &buf[..];
        let back = read_frame(&mut r).unwrap().unwrap();
        assert!(read_frame(&mut r).unwrap().is_none());
        back
    }

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::new(FrameKind::Stdin, b"hello".to_vec()),
            Frame::new(FrameKind::StdinEof, vec![]),
            Frame::resize(TtySize { rows: 24, cols: 80 }),
            Frame::signal(15),
            Frame::json(FrameKind::Hello, &Hello::current()),
        ] {
            assert_eq!(round_trip(f.clone()), f);
        }
        let r = round_trip(Frame::resize(TtySize { rows: 3, cols: 500 }));
        assert_eq!(r.parse_resize().unwrap(), TtySize { rows: 3, cols: 500 });
        assert_eq!(round_trip(Frame::signal(-9)).parse_signal().unwrap(), -9);
    }

    #[test]
    fn printable_escapes_what_a_terminal_acts_on_and_bidirectional_controls() {
        let shown = printable("ok\u{1b}]52;c;x\u{7}\u{9b}31m\u{202e}gpj.exe\u{2066}\n".as_bytes());
        assert_eq!(
            shown,
            "ok\\u{1b}]52;c;x\\u{7}\\u{9b}31m\\u{202e}gpj.exe\\u{2066}\\n"
        );
        assert_eq!(printable("plain: é ✓".as_bytes()), "plain: é ✓");
    }

    #[test]
    fn boot_times_from_an_agent_before_1_5_have_no_wall_clock() {
        let old = r#"{"init_ms":400,"root_ms":450,"listening_ms":490,"now_ms":500}"#;
        let b: BootTimes = serde_json::from_str(old).unwrap();
        assert_eq!((b.init_ms, b.now_ms, b.wall_ms), (400, 500, 0));
    }

    #[test]
    fn requests_round_trip() {
        let reqs = vec![
            Request::Ping,
            Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/workspace".into()),
                user: Some(UserSpec::Name("dev".into())),
                tty: Some(TtySize { rows: 10, cols: 20 }),
            }),
            Request::Exec(ExecRequest {
                user: Some(UserSpec::Uid(1000)),
                ..ExecRequest::new(&["id"])
            }),
            Request::RawStream(RawStreamRequest {
                argv: vec!["git-upload-pack".into(), ".".into()],
                ..Default::default()
            }),
            Request::ListeningPorts,
            Request::PushFile(PushFileRequest {
                path: ".env".into(),
                mode: 0o600,
                bytes: vec![0, 1, 255],
            }),
            Request::Shutdown { reboot: true },
            Request::SetClock {
                unix_ms: 1_800_000_000_123,
            },
            Request::TrustCertificates {
                name: "keystone-host-0123456789abcdef.crt".into(),
                pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----".into(),
            },
            Request::AddMemory,
            Request::Watch {
                paths: vec!["/workspace".into(), "sub dir".into()],
                idle_ms: 30_000,
            },
            Request::TcpConnect { port: 8082 },
        ];
        for req in reqs {
            let f = round_trip(Frame::json(FrameKind::Request, &req));
            assert_eq!(f.parse_json::<Request>().unwrap(), req);
        }
        let resp = Response::ListeningPorts {
            ports: vec![ListeningPort {
                port: 8080,
                address: "::1".parse().unwrap(),
            }],
        };
        let f = round_trip(Frame::json(FrameKind::Response, &resp));
        assert_eq!(f.parse_json::<Response>().unwrap(), resp);
    }

    #[test]
    fn watch_frames_round_trip() {
        let f = round_trip(Frame::new(FrameKind::Event, b"{}".to_vec()));
        assert_eq!(f.kind, FrameKind::Event);
        for ev in [
            WatchEvent::Commit {
                branch: "feat/x".into(),
                head: "0123456789abcdef0123456789abcdef01234567".into(),
            },
            WatchEvent::Idle,
        ] {
            let f = round_trip(Frame::json(FrameKind::Event, &ev));
            assert_eq!(f.parse_json::<WatchEvent>().unwrap(), ev);
        }
        let wire = serde_json::to_string(&Request::Watch {
            paths: vec![],
            idle_ms: 5,
        })
        .unwrap();
        assert_eq!(wire, r#"{"op":"watch","paths":[],"idle_ms":5}"#);
        let resp = Response::Watching { directories: 3 };
        let f = round_trip(Frame::json(FrameKind::Response, &resp));
        assert_eq!(f.parse_json::<Response>().unwrap(), resp);
        // What a 1.0 agent makes of it: an unknown request, not a panic.
        assert_eq!(FrameKind::from_u8(0x30).unwrap(), FrameKind::Event);
        let bogus = Frame::new(FrameKind::Event, br#"{"event":"reboot"}"#.to_vec());
        assert!(bogus.parse_json::<WatchEvent>().is_err());
    }

    #[test]
    fn tcp_connect_wire_format() {
        let wire = serde_json::to_string(&Request::TcpConnect { port: 3000 }).unwrap();
        assert_eq!(wire, r#"{"op":"tcp_connect","port":3000}"#);
        let resp = Response::Connected {
            address: "[::1]:3000".parse().unwrap(),
        };
        let wire = serde_json::to_string(&resp).unwrap();
        assert_eq!(wire, r#"{"type":"connected","address":"[::1]:3000"}"#);
        let f = round_trip(Frame::json(FrameKind::Response, &resp));
        assert_eq!(f.parse_json::<Response>().unwrap(), resp);
        // A port out of range is a malformed request, not a panic.
        let bad = Frame::new(
            FrameKind::Request,
            br#"{"op":"tcp_connect","port":70000}"#.to_vec(),
        );
        assert!(bad.parse_json::<Request>().is_err());
    }

    #[test]
    fn version_mismatch_message() {
        let guest = Hello {
            protocol: 2,
            minor: 0,
            agent_version: "9.9.9".into(),
        };
        let msg = guest.check_guest().unwrap_err().to_string();
        assert_eq!(
            msg,
            "guest agent speaks protocol 2, this keystone speaks 1: rebuild the guest image or update keystone"
        );
        let host = Hello {
            protocol: 3,
            ..Hello::current()
        };
        let msg = host.check_host().unwrap_err().to_string();
        assert_eq!(
            msg,
            "guest agent speaks protocol 1, this keystone speaks 3: rebuild the guest image or update keystone"
        );
        assert!(Hello::current().check_guest().is_ok());
        // A hello without the minor field (older peer) still parses.
        let f = Frame::new(
            FrameKind::Hello,
            br#"{"protocol":1,"agent_version":"0.0.1"}"#.to_vec(),
        );
        assert_eq!(f.parse_json::<Hello>().unwrap().minor, 0);
    }

    #[test]
    fn peer_text_is_shown_escaped_and_bounded() {
        let f = Frame::new(
            FrameKind::Error,
            b"\x1b[2Jgone\n\xffok \xe2\x9c\x93".to_vec(),
        );
        assert_eq!(f.text(), "\\u{1b}[2Jgone\\n\u{fffd}ok \u{2713}");
        let long = Frame::new(FrameKind::Error, vec![0xff; MAX_PAYLOAD]);
        let text = long.text();
        assert!(text.len() < 4 * MAX_SHOWN_TEXT, "{} bytes", text.len());
        assert!(text.ends_with(&format!("({} more bytes)", MAX_PAYLOAD - MAX_SHOWN_TEXT)));
        // serde's messages quote the peer's strings.
        let bad = Frame::new(
            FrameKind::Response,
            br#"{"type":"\u001b]0;owned\u0007"}"#.to_vec(),
        );
        let msg = bad.parse_json::<Response>().unwrap_err().to_string();
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
    }

    #[test]
    fn exit_status_from_any_signal_number() {
        let killed = |signal| ExitStatus {
            code: None,
            signal: Some(signal),
        };
        assert_eq!(killed(9).code_or_signal(), 137);
        // A lying guest's numbers neither overflow nor read as success.
        for signal in [0, -128, i32::MIN, 128, i32::MAX - 100, i32::MAX] {
            assert_eq!(killed(signal).code_or_signal(), 255, "signal {signal}");
        }
    }

    /// A stream that notes the largest buffer it is asked to fill.
    struct Measuring<'a> {
        bytes: &'a [u8],
        largest: usize,
    }

    impl Read for Measuring<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    #[test]
    fn claimed_length_is_not_allocated_before_it_arrives() {
        let mut wire = (MAX_PAYLOAD as u32).to_le_bytes().to_vec();
        wire.push(FrameKind::Stdout as u8);
        wire.extend_from_slice(b"ten bytes!");
        let mut r = Measuring {
            bytes: &wire,
            largest: 0,
        };
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));
        assert!(r.largest <= STREAM_CHUNK, "a {}-byte buffer", r.largest);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let huge = [0xff, 0xff, 0xff, 0x7f, 0x10];
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(ProtocolError::FrameTooLarge(_))
        ));
        let unknown = [0, 0, 0, 0, 0x99];
        assert!(matches!(
            read_frame(&mut &unknown[..]),
            Err(ProtocolError::UnknownKind(0x99))
        ));
        let short = [5, 0, 0, 0, 0x10, b'a'];
        assert!(matches!(
            read_frame(&mut &short[..]),
            Err(ProtocolError::Closed)
        ));
        let truncated_header = [5, 0];
        assert!(matches!(
            read_frame(&mut &truncated_header[..]),
            Err(ProtocolError::Closed)
        ));
        let bad_json = Frame::new(FrameKind::Request, b"{nope".to_vec());
        assert!(bad_json.parse_json::<Request>().is_err());
        assert!(Frame::new(FrameKind::Resize, vec![1])
            .parse_resize()
            .is_err());
        assert!(Frame::new(FrameKind::Signal, vec![])
            .parse_signal()
            .is_err());
    }
}
