//! A two-way byte relay between two streams: the guest agent's half of a
//! `TcpConnect` (vsock <-> guest TCP) and the host's port forwarder (host
//! TCP <-> vsock) both use it.
//!
//! One thread per direction. Where both ends have a descriptor the bytes
//! move with `splice(2)` through a pipe (no copy through user space);
//! where the kernel cannot splice a socket (`EINVAL`, e.g. AF_VSOCK on
//! older kernels) the direction falls back to `read`/`write` with a
//! 256 KiB buffer. An end of stream on one side becomes a half close
//! (`shutdown(SHUT_WR)`) on the other, so protocols that half-close keep
//! working; an error on either side closes both streams, which ends the
//! other direction too.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::transport::DuplexStream;

/// The copy buffer of the `read`/`write` fallback.
const COPY_BUFFER: usize = 256 << 10;
/// The most bytes one `splice` call moves.
const SPLICE_CHUNK: usize = 1 << 20;

/// What a finished relay moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayTotals {
    /// Bytes from the first stream to the second.
    pub a_to_b: u64,
    /// Bytes from the second stream to the first.
    pub b_to_a: u64,
}

/// Relays bytes between `a` and `b` in both directions until both
/// directions have ended; returns the byte counts. Errors end the relay
/// (both streams are shut down) and are not reported: to the peers they
/// look like a closed connection, as on a direct one.
pub fn relay(a: Box<dyn DuplexStream>, b: Box<dyn DuplexStream>) -> io::Result<RelayTotals> {
    let a2 = a.try_clone_box()?;
    let b2 = b.try_clone_box()?;
    let other = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || pump(b2, a2))?;
    let a_to_b = pump(a, b);
    let b_to_a = other.join().unwrap_or(0);
    Ok(RelayTotals { a_to_b, b_to_a })
}

/// Copies `from` to `to` until end of stream (then half-closes `to`) or
/// an error (then closes both); returns the bytes moved.
fn pump(mut from: Box<dyn DuplexStream>, mut to: Box<dyn DuplexStream>) -> u64 {
    let mut moved = 0u64;
    let result = match (from.raw_fd(), to.raw_fd()) {
        (Some(src), Some(dst)) => match splice_all(src, dst, &mut moved) {
            Err(SpliceError::Unsupported(pending)) => to.write_all(&pending).and_then(|()| {
                moved += pending.len() as u64;
                copy_all(&mut *from, &mut *to, &mut moved)
            }),
            Err(SpliceError::Io(e)) => Err(e),
            Ok(()) => Ok(()),
        },
        _ => copy_all(&mut *from, &mut *to, &mut moved),
    };
    match result {
        Ok(()) => {
            let _ = to.shutdown_write();
        }
        Err(_) => {
            let _ = from.shutdown_both();
            let _ = to.shutdown_both();
        }
    }
    moved
}

fn copy_all(from: &mut dyn Read, to: &mut dyn Write, moved: &mut u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        *moved += n as u64;
    }
}

enum SpliceError {
    /// The kernel cannot splice these descriptors; the bytes already
    /// pulled into the pipe must still be written.
    Unsupported(Vec<u8>),
    Io(io::Error),
}

impl From<io::Error> for SpliceError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A bigger pipe moves more per call; the default (64 KiB) is fine too.
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure is harmless.
    unsafe {
        libc::fcntl(
            w.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            SPLICE_CHUNK as libc::c_int,
        )
    };
    Ok((r, w))
}

fn splice(src: RawFd, dst: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice between descriptors the caller keeps open; null
        // offsets are required for sockets and pipes.
        let n = unsafe {
            libc::splice(
                src,
                std::ptr::null_mut(),
                dst,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Drains `len` bytes the pipe holds with plain reads.
fn drain_pipe(pipe_r: RawFd, mut len: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    while len > 0 {
        // SAFETY: reads into the valid remainder of `out`.
        let n = unsafe { libc::read(pipe_r, out[at..].as_mut_ptr().cast(), len) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        at += n as usize;
        len -= n as usize;
    }
    out.truncate(at);
    Ok(out)
}

fn splice_all(src: RawFd, dst: RawFd, moved: &mut u64) -> Result<(), SpliceError> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        let n = match splice(src, pipe_w.as_raw_fd(), SPLICE_CHUNK) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(SpliceError::Unsupported(Vec::new()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut left = n;
        while left > 0 {
            match splice(pipe_r.as_raw_fd(), dst, left) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => {
                    left -= m;
                    *moved += m as u64;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(SpliceError::Unsupported(drain_pipe(
                        pipe_r.as_raw_fd(),
                        left,
                    )?))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    /// A stream with no descriptor, to take the copy path.
    struct NoFd(UnixStream);

    impl Read for NoFd {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for NoFd {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl DuplexStream for NoFd {
        fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>> {
            Ok(Box::new(NoFd(self.0.try_clone()?)))
        }
        fn shutdown_write(&self) -> io::Result<()> {
            self.0.shutdown(std::net::Shutdown::Write)
        }
        fn shutdown_both(&self) -> io::Result<()> {
            self.0.shutdown(std::net::Shutdown::Both)
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Sends `data` in at `outer`, half-closes, and reads what comes back
    /// through a far end that echoes.
    fn echo_through(outer: &mut dyn DuplexStream, data: &[u8]) -> Vec<u8> {
        let mut writer = outer.try_clone_box().unwrap();
        let owned = data.to_vec();
        let t = std::thread::spawn(move || {
            writer.write_all(&owned).unwrap();
            writer.shutdown_write().unwrap();
        });
        let mut back = Vec::new();
        outer.read_to_end(&mut back).unwrap();
        t.join().unwrap();
        back
    }

    fn echo_server(mut s: impl Read + Write) {
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    }

    #[test]
    fn tcp_to_unix_both_ways_with_half_close() {
        // client --tcp--> [relay] --unix--> echo
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (relay_unix, far_unix) = UnixStream::pair().unwrap();
        std::thread::spawn(move || echo_server(far_unix));
        let relay_thread = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            relay(Box::new(tcp), Box::new(relay_unix)).unwrap()
        });
        let mut client = TcpStream::connect(addr).unwrap();
        let data = pattern(3 << 20);
        let back = echo_through(&mut client, &data);
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes came back changed");
        let totals = relay_thread.join().unwrap();
        assert_eq!(totals.a_to_b, data.len() as u64);
        assert_eq!(totals.b_to_a, data.len() as u64);
    }

    #[test]
    fn copy_fallback_without_descriptors() {
        let (outer, relay_a) = UnixStream::pair().unwrap();
        let (relay_b, far) = UnixStream::pair().unwrap();
        std::thread::spawn(move || echo_server(far));
        let t = std::thread::spawn(move || {
            relay(Box::new(NoFd(relay_a)), Box::new(NoFd(relay_b))).unwrap()
        });
        let mut outer = outer;
        let data = pattern(1 << 20);
        assert!(echo_through(&mut outer, &data) == data);
        assert_eq!(t.join().unwrap().b_to_a, data.len() as u64);
    }

    #[test]
    fn a_reset_on_one_side_ends_both_directions() {
        let (outer, relay_a) = UnixStream::pair().unwrap();
        let (relay_b, far) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(Box::new(relay_a), Box::new(relay_b)).unwrap());
        // The far side goes away without reading; the outer side must see
        // its connection end rather than hang.
        drop(far);
        let mut outer = outer;
        let mut buf = [0u8; 16];
        assert_eq!(outer.read(&mut buf).unwrap(), 0);
        let _ = outer.write_all(b"late");
        drop(outer);
        t.join().unwrap();
    }
}
