//! Serving vhost-user on an already connected stream.
//!
//! `vhost-user-backend` 0.24's `VhostUserDaemon` only accepts connections
//! from a `Listener` or connects to a path, and its request handler type is
//! private, so it cannot be handed a pre-connected `UnixStream`. This module
//! bridges instead: it binds a listener in a fresh private (0700) temporary
//! directory, connects to it, removes the path at once, lets the daemon
//! accept that connection, and relays bytes and passed file descriptors
//! (`SCM_RIGHTS`) between the caller's stream and the private connection on
//! two small threads. Only the control channel goes through the relay;
//! guest memory and eventfds are passed through and used directly.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// The most descriptors one vhost-user message carries (and then some).
const MAX_FDS: usize = 64;
const BUF_SIZE: usize = 64 * 1024;
/// Larger bodies than any vhost-user message carries are refused.
const MAX_BODY: usize = 16 << 20;

/// A listener with exactly one pending connection, the private end of a bridge.
pub(crate) fn private_listener() -> io::Result<(UnixListener, UnixStream)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "virtiofsd-lite-{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&path)?;
        let client = UnixStream::connect(&path)?;
        Ok((listener, client))
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Starts relaying between `a` and `b` in both directions.
pub(crate) fn relay(a: UnixStream, b: UnixStream) -> io::Result<Vec<JoinHandle<()>>> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let t1 = std::thread::Builder::new()
        .name("vfsd-bridge-in".into())
        .spawn(move || pump(&a, &b))?;
    let t2 = std::thread::Builder::new()
        .name("vfsd-bridge-out".into())
        .spawn(move || pump(&b2, &a2))?;
    Ok(vec![t1, t2])
}

/// Copies vhost-user messages with their descriptors from `src` to `dst`
/// until EOF or an error, then half-closes `dst`.
///
/// The relay reads one message at a time (12-byte header, then exactly the
/// body its `size` field announces), never past a message boundary, so the
/// descriptors stay attached to the message they were sent with; a plain
/// byte pump could glue a message without descriptors to the next one's.
fn pump(src: &UnixStream, dst: &UnixStream) {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        match relay_one(src.as_raw_fd(), dst.as_raw_fd(), &mut buf) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                log::debug!("vhost-user bridge stopped: {e}");
                break;
            }
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
    let _ = src.shutdown(Shutdown::Read);
}

/// Relays one message; `Ok(false)` at a clean EOF.
fn relay_one(src: RawFd, dst: RawFd, buf: &mut Vec<u8>) -> io::Result<bool> {
    const HDR: usize = 12;
    let mut fds = Vec::new();
    if !recv_exact(src, &mut buf[..HDR], &mut fds)? {
        return Ok(false);
    }
    let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if size > MAX_BODY {
        return Err(io::Error::other(format!(
            "vhost-user message body of {size} bytes is too large"
        )));
    }
    if buf.len() < HDR + size {
        buf.resize(HDR + size, 0);
    }
    if size > 0 && !recv_exact(src, &mut buf[HDR..HDR + size], &mut fds)? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    send_all_with_fds(dst, &buf[..HDR + size], &fds)?;
    Ok(true)
}

/// Fills `buf`, collecting passed descriptors; `Ok(false)` on EOF before any byte.
fn recv_exact(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match recv_with_fds(fd, &mut buf[got..]) {
            Ok((0, _)) if got == 0 => return Ok(false),
            Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((n, mut more)) => {
                got += n;
                fds.append(&mut more);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; we fill in the pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() * 8;
    // SAFETY: `msg` points at live buffers of the sizes it declares.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel just filled, with the
    // CMSG_* helpers that bound every access by msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "too many file descriptors in one vhost-user message",
        ));
    }
    Ok((n as usize, fds))
}

fn send_all_with_fds(fd: RawFd, mut data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut first = true;
    while !data.is_empty() {
        let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: an all-zero msghdr is valid; we fill in the pointers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !raw.is_empty() {
            let len = raw.len() * std::mem::size_of::<RawFd>();
            // SAFETY: `cbuf` has room for CMSG_SPACE(MAX_FDS) bytes, more than
            // CMSG_SPACE(len); the header and data writes stay inside it.
            unsafe {
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    len,
                );
            }
        }
        // SAFETY: `msg` points at live buffers of the sizes it declares.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        first = false;
        data = &data[n as usize..];
    }
    Ok(())
}
