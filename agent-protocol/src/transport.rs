//! Byte-stream transports shared by the agent and the client: the
//! [`DuplexStream`] trait (a `Read + Write` stream that can be cloned for a
//! second thread and half-closed), the AF_VSOCK stream and listener the
//! agent uses in production, and [`AgentListener`], which also listens on a
//! Unix socket for tests.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// A bidirectional byte stream to or from the agent.
pub trait DuplexStream: Read + Write + Send + 'static {
    /// A second handle on the same stream (one thread reads, another writes).
    fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>>;
    /// Closes the writing half; the peer reads end of stream.
    fn shutdown_write(&self) -> io::Result<()>;
    /// Closes both halves (unblocks other handles' reads).
    fn shutdown_both(&self) -> io::Result<()>;
    /// The socket's descriptor, for zero-copy relays (`splice`); `None`
    /// when the stream has none.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A socket's receive timeout (`SO_RCVTIMEO`), read through its
/// descriptor (a [`DuplexStream`] may be any of several socket types);
/// `None` when reads block forever.
pub fn read_timeout(fd: RawFd) -> io::Result<Option<std::time::Duration>> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the timeval we own
    // and stores the length it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let t = std::time::Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    Ok((!t.is_zero()).then_some(t))
}

/// Sets a socket's receive timeout (`None`: reads block forever).
pub fn set_read_timeout(fd: RawFd, timeout: Option<std::time::Duration>) -> io::Result<()> {
    let t = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        // At least a microsecond: zero would mean "forever".
        tv_usec: if t.is_zero() && timeout.is_some() {
            1
        } else {
            t.subsec_micros() as libc::suseconds_t
        },
    };
    // SAFETY: setsockopt reads one timeval from the pointer we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DuplexStream for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl DuplexStream for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// A connected AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockStream(OwnedFd);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a valid buffer of the given length on a fd we own.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from a valid buffer of the given length on a fd we own.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VsockStream {
    fn shutdown(&self, how: libc::c_int) -> io::Result<()> {
        // SAFETY: shutdown(2) on a socket fd we own.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), how) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl DuplexStream for VsockStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn DuplexStream>> {
        Ok(Box::new(VsockStream(self.0.try_clone()?)))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(libc::SHUT_WR)
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(libc::SHUT_RDWR)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

/// A listening AF_VSOCK socket (guest side, any CID).
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Binds `VMADDR_CID_ANY:port` and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: addr is a valid sockaddr_vm and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 with null address pointers is allowed.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh fd we now own.
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Where the agent listens: vsock in the guest, a Unix socket in tests.
#[derive(Debug)]
pub enum AgentListener {
    Vsock(VsockListener),
    Unix(UnixListener),
}

impl AgentListener {
    /// Listens on the guest vsock port.
    pub fn vsock(port: u32) -> io::Result<Self> {
        VsockListener::bind(port).map(Self::Vsock)
    }

    /// Listens on a Unix socket path (an existing socket file is replaced).
    pub fn unix(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map(Self::Unix)
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Box<dyn DuplexStream>> {
        match self {
            Self::Vsock(l) => Ok(Box::new(l.accept()?)),
            Self::Unix(l) => Ok(Box::new(l.accept()?.0)),
        }
    }
}
