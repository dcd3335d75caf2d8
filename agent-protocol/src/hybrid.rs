//! The hybrid vsock handshake: how the host reaches a port of the guest
//! through a VMM's vsock Unix socket (the Firecracker convention).
//!
//! The host connects to the socket, writes `CONNECT <port>\n` and reads one
//! answer line: `OK <n>\n` once a program in the guest accepted the
//! connection; anything else, or a socket closed before the newline, when
//! nobody listens on that port. Every byte after the newline is already the
//! guest's, so the line is read one byte at a time and nothing past it is
//! taken from the socket.
//!
//! The answer comes from the VMM's backend, relaying for a guest that may
//! be hostile: it is read within a deadline ([`HANDSHAKE_TIMEOUT`] unless
//! the caller gives one), a line longer than [`MAX_ANSWER_LINE`] bytes is
//! refused at that length, and an answer is only ever shown escaped.
//! [`hybrid_vsock_handshake`] runs the exchange on any byte stream, for a
//! caller whose stream enforces deadlines of its own.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Connector;
use crate::transport::DuplexStream;

/// How long the vsock backend has to answer `CONNECT` by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest answer line taken, newline excluded (`OK <n>` needs 14).
pub const MAX_ANSWER_LINE: usize = 128;

/// A connector for the VMM's hybrid vsock socket: each connection opens
/// `uds_path` and performs the `CONNECT <port>\n` / `OK <n>\n` handshake
/// within [`HANDSHAKE_TIMEOUT`].
pub fn hybrid_vsock_connector(uds_path: impl Into<PathBuf>, port: u32) -> Connector {
    let path = uds_path.into();
    Box::new(move || Ok(Box::new(hybrid_vsock_connect(&path, port)?) as Box<dyn DuplexStream>))
}

/// A connector like [`hybrid_vsock_connector`] whose streams keep
/// `deadline` as their read timeout, the handshake's included: every read
/// fails after that long without data (for clients that must not wait on
/// a guest that stopped answering).
pub fn hybrid_vsock_connector_keeping_deadline(
    uds_path: impl Into<PathBuf>,
    port: u32,
    deadline: Duration,
) -> Connector {
    let path = uds_path.into();
    Box::new(move || {
        let stream = hybrid_vsock_connect_keeping_deadline(&path, port, deadline)?;
        Ok(Box::new(stream) as Box<dyn DuplexStream>)
    })
}

/// Opens `uds_path` and performs the hybrid vsock handshake for `port`
/// within [`HANDSHAKE_TIMEOUT`].
pub fn hybrid_vsock_connect(uds_path: &Path, port: u32) -> io::Result<UnixStream> {
    hybrid_vsock_connect_within(uds_path, port, HANDSHAKE_TIMEOUT)
}

/// [`hybrid_vsock_connect`] with a deadline of `handshake` for the answer
/// line (a guest port that nobody accepts on never answers); the stream
/// comes back without a read timeout.
pub fn hybrid_vsock_connect_within(
    uds_path: &Path,
    port: u32,
    handshake: Duration,
) -> io::Result<UnixStream> {
    let stream = open(uds_path, port, handshake)?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// [`hybrid_vsock_connect_within`], but the stream keeps `deadline` as its
/// read timeout: any later read fails after that long without data (for
/// short requests such as a ping).
pub fn hybrid_vsock_connect_keeping_deadline(
    uds_path: &Path,
    port: u32,
    deadline: Duration,
) -> io::Result<UnixStream> {
    open(uds_path, port, deadline)
}

/// Connects to `uds_path` and performs the handshake for `port`, reading
/// the answer with `handshake` as the read timeout, which stays set.
fn open(uds_path: &Path, port: u32, handshake: Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds_path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "connecting to the VM's vsock socket {}: {e} (is the sandbox running?)",
                uds_path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(handshake))?;
    hybrid_vsock_handshake(&mut stream, port).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the VM's vsock socket {} did not answer `CONNECT {port}` within {handshake:?}: \
                 the guest may still be starting, or be stuck (see the sandbox's console log)",
                uds_path.display()
            ),
        ),
        _ => e,
    })?;
    Ok(stream)
}

/// Writes `CONNECT <port>\n` to `stream` and reads the answer line,
/// taking no byte past its newline. `Ok` on `OK <n>`; `ConnectionRefused`
/// on any other answer or a closed stream; `InvalidData` on a line longer
/// than [`MAX_ANSWER_LINE`]. Deadlines are the stream's own: a read error
/// is returned as it is.
pub fn hybrid_vsock_handshake<S>(stream: &mut S, port: u32) -> io::Result<()>
where
    S: Read + Write + ?Sized,
{
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_answer_line(stream, port)?;
    if line.starts_with(b"OK ") {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!(
            "the guest agent is not listening on vsock port {port} \
             (answer \"{}\", expected `OK <n>`)",
            line.escape_ascii()
        ),
    ))
}

/// The answer line without its newline (all of it when the stream closes
/// first); at most [`MAX_ANSWER_LINE`] + 1 bytes are read.
fn read_answer_line<S: Read + ?Sized>(stream: &mut S, port: u32) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(line),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() == MAX_ANSWER_LINE => {
                line.truncate(32);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the answer to `CONNECT {port}` passed {MAX_ANSWER_LINE} bytes without \
                         ending (it begins \"{}\"): the socket is not a VM's hybrid vsock \
                         socket, or its VMM misbehaves; restart the sandbox",
                        line.escape_ascii()
                    ),
                ));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::time::Instant;

    use keystone_test_kit::ScratchDir;

    /// Runs `f` on a thread of its own; fails the test when it has not
    /// returned within `limit` (a read without bound never does).
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("the handshake was still reading after {limit:?}"))
    }

    /// A VMM socket in `dir` whose backend reads the `CONNECT` line, sends
    /// it back on the returned channel and answers with `answer`; `None`
    /// holds the connection without a word.
    fn backend(
        dir: &ScratchDir,
        answer: Option<&'static [u8]>,
    ) -> (PathBuf, mpsc::Receiver<String>) {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut line = String::new();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            match answer {
                Some(answer) => {
                    let _ = stream.write_all(answer);
                }
                None => std::thread::sleep(Duration::from_secs(10)),
            }
        });
        (path, rx)
    }

    #[test]
    fn an_ok_answer_leaves_the_guests_bytes_in_the_stream() {
        let dir = ScratchDir::new("hv-ok");
        let (path, said) = backend(&dir, Some(b"OK 1073741824\nhello"));
        let mut stream = hybrid_vsock_connect_within(&path, 1023, Duration::from_secs(5)).unwrap();
        assert_eq!(said.recv().unwrap(), "CONNECT 1023\n");
        assert_eq!(stream.read_timeout().unwrap(), None);
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
    }

    #[test]
    fn the_deadline_stays_on_the_stream_when_asked() {
        let dir = ScratchDir::new("hv-keep");
        let (path, _said) = backend(&dir, Some(b"OK 5\n"));
        let d = Duration::from_secs(3);
        let stream = hybrid_vsock_connect_keeping_deadline(&path, 1023, d).unwrap();
        assert_eq!(stream.read_timeout().unwrap(), Some(d));
        // The same through a connector, for a client.
        let dir = ScratchDir::new("hv-keep-connector");
        let (path, _said) = backend(&dir, Some(b"OK 5\n"));
        let connect = hybrid_vsock_connector_keeping_deadline(&path, 1023, d);
        let stream = connect().unwrap();
        let fd = stream.raw_fd().expect("a Unix stream has a descriptor");
        assert_eq!(crate::transport::read_timeout(fd).unwrap(), Some(d));
    }

    #[test]
    fn a_refusal_names_the_port_and_shows_the_answer_escaped() {
        let dir = ScratchDir::new("hv-refused");
        let (path, _said) = backend(&dir, Some(b"ERROR no listener \x1b[2J\n"));
        let err = hybrid_vsock_connect(&path, 1023).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("the guest agent is not listening on vsock port 1023"),
            "{msg}"
        );
        assert!(msg.contains(r#""ERROR no listener \x1b[2J""#), "{msg}");
        assert!(!msg.contains('\x1b'), "{msg:?}");
    }

    #[test]
    fn a_socket_closed_before_the_answer_is_a_refusal() {
        let dir = ScratchDir::new("hv-closed");
        let (path, _said) = backend(&dir, Some(b""));
        let err = hybrid_vsock_connect(&path, 1023).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn an_over_long_answer_is_refused_at_the_cap() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let mut answer = b"OK ".to_vec();
        answer.extend([b'7'; 4096]);
        answer.push(b'\n');
        theirs.write_all(&answer).unwrap();
        let err = hybrid_vsock_handshake(&mut ours, 1023).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("passed 128 bytes"), "{err}");
        // What the handshake did not take is still in the socket.
        ours.set_nonblocking(true).unwrap();
        let mut left = Vec::new();
        let _ = ours.read_to_end(&mut left);
        assert_eq!(left.len(), answer.len() - (MAX_ANSWER_LINE + 1));
    }

    #[test]
    fn a_never_ending_answer_line_ends_at_the_cap() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = [b'x'; 4096];
            let mut sent = 0usize;
            while theirs.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let err = within(Duration::from_secs(10), move || {
            let mut ours = ours;
            hybrid_vsock_handshake(&mut ours, 1023)
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // The stream is dropped: the flood ends on a broken pipe.
        let sent = flood.join().unwrap();
        assert!(sent < 16 << 20, "{sent}");
    }

    #[test]
    fn a_silent_backend_is_given_up_on_at_the_deadline() {
        let dir = ScratchDir::new("hv-silent");
        let (path, _said) = backend(&dir, None);
        let t0 = Instant::now();
        let err = within(Duration::from_secs(8), move || {
            hybrid_vsock_connect_within(&path, 1023, Duration::from_millis(300))
        })
        .unwrap_err();
        let took = t0.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("did not answer `CONNECT 1023`"),
            "{err}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_missing_socket_is_not_found_and_named() {
        let path = Path::new("/nonexistent/keystone/vsock.sock");
        let err = hybrid_vsock_connect_within(path, 1023, Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/keystone/vsock.sock"),
            "{err}"
        );
    }
}
