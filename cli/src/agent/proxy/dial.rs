//! Reaching a guest port: the [`Dial`] trait the server opens guest
//! connections through, and the real one, [`VsockDial`]: the sandbox's
//! hybrid vsock socket (`CONNECT <agent port>`), the agent's hello and a
//! `TcpConnect` request, as every host-side connection to a guest port is
//! made (the guest never connects to the host). That exchange runs on
//! tokio's blocking pool under socket timeouts; the same socket then moves
//! to tokio, with the bytes the agent client had already read ahead
//! ([`Prefixed`]).

use std::future::Future;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use keystone_guest_agent::client::AgentClient;
use keystone_guest_agent::transport::DuplexStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::super::microvm;

/// A byte stream to a guest port.
pub trait GuestIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> GuestIo for T {}

pub type GuestStream = Box<dyn GuestIo>;
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<GuestStream>> + Send>>;

/// Opens connections to guest ports.
pub trait Dial: Send + Sync + 'static {
    /// A connection to `port` in the guest whose agent listens behind the
    /// hybrid vsock socket `vsock`.
    fn dial(&self, vsock: &Path, port: u16) -> Dialing;
}

/// The most bytes a guest server may send before the request; a server
/// that speaks first says a line or two.
const MAX_GREETING: usize = 1 << 20;

/// The real dialer: the guest agent's `TcpConnect` over vsock.
pub struct VsockDial {
    /// How long the vsock and agent handshakes may take, each read.
    pub handshake: Duration,
}

impl Dial for VsockDial {
    fn dial(&self, vsock: &Path, port: u16) -> Dialing {
        let (vsock, handshake) = (vsock.to_path_buf(), self.handshake);
        Box::pin(async move {
            let (stream, pending) =
                tokio::task::spawn_blocking(move || tcp_connect(&vsock, port, handshake))
                    .await
                    .map_err(io::Error::other)??;
            let stream = tokio::net::UnixStream::from_std(stream)?;
            Ok(Box::new(Prefixed::new(pending, stream)) as GuestStream)
        })
    }
}

/// The agent connection of a `TcpConnect` to `port` and the guest bytes
/// already read from it, the socket left non-blocking.
fn tcp_connect(vsock: &Path, port: u16, handshake: Duration) -> io::Result<(UnixStream, Vec<u8>)> {
    // The agent client hides its socket: the connector keeps a second
    // handle on it.
    let kept: Arc<Mutex<Option<UnixStream>>> = Arc::default();
    let client = {
        let (kept, uds) = (Arc::clone(&kept), vsock.to_path_buf());
        AgentClient::new(Box::new(move || {
            let s = microvm::agent_connect(&uds, handshake)?;
            s.set_write_timeout(Some(handshake))?;
            *kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.try_clone()?);
            Ok(Box::new(s) as Box<dyn DuplexStream>)
        }))
    };
    let mut tunnel = client.tcp_connect(port).map_err(|e| {
        let printable = keystone_guest_agent::protocol::printable(e.to_string().as_bytes());
        io::Error::new(io::ErrorKind::ConnectionRefused, printable)
    })?;
    let stream = kept
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(|| io::Error::other("the agent connection was not kept"))?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    // Both handles share one open file: the tunnel now reads what it had
    // buffered, then the socket's queue, until it would block.
    stream.set_nonblocking(true)?;
    let mut pending = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match tunnel.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                if pending.len() > MAX_GREETING {
                    return Err(io::Error::other(
                        "the guest server sent more than 1 MiB before the request",
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    drop(tunnel);
    Ok((stream, pending))
}

/// A stream whose first reads return `pending`.
pub struct Prefixed<S> {
    pending: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(pending: Vec<u8>, inner: S) -> Self {
        Self {
            pending,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.at < me.pending.len() {
            let n = buf.remaining().min(me.pending.len() - me.at);
            buf.put_slice(&me.pending[me.at..me.at + n]);
            me.at += n;
            if me.at == me.pending.len() {
                me.pending = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
