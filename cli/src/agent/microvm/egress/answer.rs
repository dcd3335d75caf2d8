//! The host's answer to one ask: a connection of its own to the guest
//! agent carrying `EgressAttach`, which a guest that never answers cannot
//! hold.
//!
//! The connection is tried once (a refused one is not retried: the ask is
//! simply not answered). Connecting to the VMM's socket, the `CONNECT`
//! handshake, the hellos and the agent's answer must all be done within
//! [`ANSWER_DEADLINE`] of the start; every wait is cut into slices of
//! [`SLICE`] so that a service being stopped ends it at once; and at most
//! [`PREAMBLE_BYTES`] are read before the answer. Once the agent has
//! accepted the attach, the limits are lifted and the connection is a
//! plain relay.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystone_guest_agent::client::{hybrid_vsock_handshake, AgentClient, ClientError, TcpTunnel};
use keystone_guest_agent::protocol::AGENT_VSOCK_PORT;
use keystone_guest_agent::transport::DuplexStream;
use rustix::io::Errno;
use rustix::net::{socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// How long the agent has to take an answer, from the first connect try.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// The longest single wait: how soon a stopped service ends one.
const SLICE: Duration = Duration::from_millis(200);
/// The bytes the agent may send before its answer (handshake, hello,
/// response and a server's first bytes).
const PREAMBLE_BYTES: usize = 64 << 10;
/// The room for a socket path in `sockaddr_un`, its NUL included.
const SUN_PATH_LEN: usize =
    std::mem::size_of::<libc::sockaddr_un>() - std::mem::size_of::<libc::sa_family_t>();

/// What an answer's connection may still use.
struct Limits {
    deadline: Instant,
    bytes_left: AtomicUsize,
    /// The attach was accepted: no limits any more.
    lifted: AtomicBool,
    /// The service ended.
    closed: Arc<AtomicBool>,
}

impl Limits {
    /// The next wait, or why there is none.
    fn slice(&self) -> io::Result<Duration> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other("the egress service stopped"));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the guest agent did not take the answer within {} s",
                    ANSWER_DEADLINE.as_secs()
                ),
            ));
        }
        Ok(left.min(SLICE))
    }
}

/// The connection, within its [`Limits`] until they are lifted.
struct Bounded {
    stream: UnixStream,
    limits: Arc<Limits>,
}

fn waiting(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.limits.lifted.load(Ordering::SeqCst) {
            return self.stream.read(buf);
        }
        let left = self.limits.bytes_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the guest agent sent more than {PREAMBLE_BYTES} bytes before its answer"),
            ));
        }
        let want = buf.len().min(left);
        loop {
            self.stream.set_read_timeout(Some(self.limits.slice()?))?;
            match self.stream.read(&mut buf[..want]) {
                Ok(n) => {
                    self.limits.bytes_left.fetch_sub(n, Ordering::SeqCst);
                    return Ok(n);
                }
                Err(e) if waiting(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limits.lifted.load(Ordering::SeqCst) {
            return self.stream.write(buf);
        }
        loop {
            self.stream.set_write_timeout(Some(self.limits.slice()?))?;
            match self.stream.write(buf) {
                Err(e) if waiting(&e) => {}
                done => return done,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DuplexStream for Bounded {
    fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>> {
        Ok(Box::new(Bounded {
            stream: self.stream.try_clone()?,
            limits: Arc::clone(&self.limits),
        }))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Both)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        // Reads that bypass `read` (a relay's splice) only once lifted.
        self.limits
            .lifted
            .load(Ordering::SeqCst)
            .then(|| self.stream.as_raw_fd())
    }
}

/// Answers the ask `id` on a connection of its own: with `refused`, the
/// refusal (`Ok(None)`), without, the guest end of the program's
/// connection to relay (`Ok(Some)`). `closed` ends the wait early.
pub fn answer(
    uds: &Path,
    id: u64,
    refused: Option<String>,
    closed: &Arc<AtomicBool>,
) -> Result<Option<TcpTunnel>, ClientError> {
    let limits = Arc::new(Limits {
        deadline: Instant::now() + ANSWER_DEADLINE,
        bytes_left: AtomicUsize::new(PREAMBLE_BYTES),
        lifted: AtomicBool::new(false),
        closed: Arc::clone(closed),
    });
    let opened: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let client = {
        let (uds, limits, opened) = (uds.to_path_buf(), Arc::clone(&limits), Arc::clone(&opened));
        AgentClient::new(Box::new(move || {
            let stream = open(&uds, &limits)?;
            *opened.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.try_clone()?);
            Ok(Box::new(Bounded {
                stream,
                limits: Arc::clone(&limits),
            }) as Box<dyn DuplexStream>)
        }))
    };
    let answered = client.egress_attach(id, refused)?;
    if answered.is_some() {
        limits.lifted.store(true, Ordering::SeqCst);
        if let Some(stream) = opened.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stream
                .set_read_timeout(None)
                .and_then(|()| stream.set_write_timeout(None))
                .map_err(ClientError::Connect)?;
        }
    }
    Ok(answered)
}

/// Connects to the VMM's socket and does the hybrid vsock handshake for
/// the agent's port, within `limits` (the protocol crate's handshake also
/// caps the answer line).
fn open(uds: &Path, limits: &Arc<Limits>) -> io::Result<UnixStream> {
    let stream = connect(uds, limits)?;
    let mut bounded = Bounded {
        stream: stream.try_clone()?,
        limits: Arc::clone(limits),
    };
    hybrid_vsock_handshake(&mut bounded, AGENT_VSOCK_PORT)?;
    Ok(stream)
}

/// Connects to the Unix socket `path`, trying again while its backlog is
/// full, within `limits` (a blocking connect would wait for a place in the
/// backlog with no limit).
fn connect(path: &Path, limits: &Limits) -> io::Result<UnixStream> {
    if path.as_os_str().as_bytes().len() >= SUN_PATH_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the socket path {} is too long", path.display()),
        ));
    }
    let addr = SocketAddrUnix::new(path)?;
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let fd = socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) | Err(Errno::ISCONN) => break,
            Err(Errno::AGAIN) | Err(Errno::INTR) => {
                std::thread::sleep(limits.slice()?.min(Duration::from_millis(10)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn limits(deadline: Duration) -> Limits {
        Limits {
            deadline: Instant::now() + deadline,
            bytes_left: AtomicUsize::new(PREAMBLE_BYTES),
            lifted: AtomicBool::new(false),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn a_full_backlog_ends_the_connect_at_the_deadline() {
        let dir = std::env::temp_dir().join(format!("ks-answer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        // Fill the listener's backlog (nobody accepts).
        let mut held = Vec::new();
        let t0 = Instant::now();
        let outcome = loop {
            match connect(&path, &limits(Duration::from_millis(300))) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        let took = t0.elapsed();
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
        if outcome.raw_os_error() == Some(libc::EMFILE) {
            eprintln!("SKIP: the descriptor limit is below the listener's backlog");
            return;
        }
        assert_eq!(outcome.kind(), io::ErrorKind::TimedOut, "{outcome}");
        assert!(took < Duration::from_secs(30), "{took:?}");
    }

    #[test]
    fn a_silent_agent_is_given_up_on_when_the_service_stops() {
        let dir = std::env::temp_dir().join(format!("ks-answer-silent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let stopper = {
            let closed = Arc::clone(&closed);
            std::thread::spawn(move || {
                let held = listener.accept();
                std::thread::sleep(Duration::from_millis(300));
                closed.store(true, Ordering::SeqCst);
                held
            })
        };
        let t0 = Instant::now();
        let outcome = answer(&path, 7, Some("no".into()), &closed);
        let took = t0.elapsed();
        let _ = stopper.join();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(outcome.is_err());
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// The ask's answer against a VMM socket whose backend reads the
    /// `CONNECT` line and replies `reply` (sent again and again with
    /// `repeat`), holding the connection open.
    fn answer_against(reply: &'static [u8], repeat: bool) -> (ClientError, Duration) {
        let dir = keystone_test_kit::ScratchDir::new("answer-handshake");
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut connect = [0u8; 13];
            let _ = s.read_exact(&mut connect);
            assert_eq!(&connect, b"CONNECT 1023\n");
            while s.write_all(reply).is_ok() && repeat {}
            std::thread::sleep(Duration::from_secs(5));
        });
        let t0 = Instant::now();
        let outcome = answer(&path, 7, None, &Arc::new(AtomicBool::new(false)));
        (outcome.err().expect("the ask was answered"), t0.elapsed())
    }

    #[test]
    fn a_refused_handshake_names_the_agents_port() {
        let (err, _) = answer_against(b"ERROR no listener\n", false);
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "cannot reach the guest agent: the guest agent is not listening on vsock port 1023"
            ),
            "{msg}"
        );
    }

    #[test]
    fn an_endless_handshake_answer_is_cut_at_its_cap() {
        let (err, took) = answer_against(b"OK 11111111", true);
        assert!(err.to_string().contains("passed 128 bytes"), "{err}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
