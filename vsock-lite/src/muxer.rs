//! The connection table between guest vsock packets and host Unix streams
//! (Firecracker's "hybrid" vsock host side), as pure logic: no threads and
//! no virtqueues, so a test can play the guest driver directly.
//!
//! - A host process connects to the Unix socket and writes `CONNECT <port>\n`.
//!   Every accepted stream gets a unique local port (>= 1024) at once; the
//!   line turns it into a REQUEST to the guest; RESPONSE writes
//!   `OK <local_port>\n` back and data then flows as RW packets; a guest RST
//!   closes the stream.
//! - The guest can never open a connection to the host (security invariant
//!   2): every guest REQUEST, and every packet for a connection we do not
//!   know, is answered with RST.
//! - Readiness comes from the muxer's own epoll ([`Muxer::epoll_fd`]), which
//!   the backend nests in its event loop. Interest is re-computed after every
//!   change ([`Muxer::rearm`]): a stream is watched for input only while its
//!   data could be sent (guest credit, no read already pending), and for
//!   output only while host-bound bytes wait, so a level-triggered loop never
//!   spins on an event it cannot act on.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{pending, ConnState, Connection, Verdict, CONN_BUF_SIZE};
use super::packet::{op, shutdown, VsockHeader, HOST_CID, TYPE_STREAM};
use log_limit::log_limited;

/// Most connections served at once; further host clients are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RST packets waiting for RX buffers; beyond it they are dropped.
pub const MAX_RST_QUEUE: usize = 1024;
const FIRST_LOCAL_PORT: u32 = 1024;
const LISTENER_TOKEN: u64 = u64::MAX;

/// The vsock connection table of one device.
pub struct Muxer {
    guest_cid: u64,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u32, Connection>,
    /// Local ports of connections with something to send, in order.
    rxq: VecDeque<u32>,
    /// RST packets for connections that are already gone (or never existed).
    rst_queue: VecDeque<VsockHeader>,
    next_port: u32,
}

impl Muxer {
    /// A muxer for the guest at `guest_cid`, serving host clients of `listener`.
    pub fn new(guest_cid: u64, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Self {
            guest_cid,
            listener,
            epoll,
            conns: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
        })
    }

    /// The epoll file descriptor that becomes readable when a host stream or
    /// the listener needs attention; then call [`Muxer::handle_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (including ones still reading their line).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host-bound bytes held for all connections (what the guest sent that
    /// the host programs have not read yet): at most
    /// [`CONN_BUF_SIZE`] and an `OK` line per connection.
    pub fn host_backlog_bytes(&self) -> usize {
        self.conns.values().map(Connection::host_backlog_len).sum()
    }

    /// Whether [`Muxer::pop_rx`] may have a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    /// Handles whatever the host side has ready, without blocking.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log_limited!(log::Level::Warn, "vsock: muxer epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == LISTENER_TOKEN {
                self.accept_all();
            } else if let Ok(port) = u32::try_from(ev.data()) {
                self.host_event(port, ev.event_set());
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log_limited!(log::Level::Warn, "vsock: accept on the host socket: {e}");
                    }
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                log_limited!(
                    log::Level::Warn,
                    "vsock: refusing a host client ({} connections)",
                    self.conns.len()
                );
                continue;
            }
            let port = self.alloc_port();
            self.conns.insert(port, Connection::new(stream, port));
            // The line may already be there; read it now rather than on the next wakeup.
            self.host_event(port, EventSet::IN);
        }
    }

    fn alloc_port(&mut self) -> u32 {
        while self.conns.contains_key(&self.next_port) {
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
        }
        let port = self.next_port;
        self.next_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
        port
    }

    fn host_event(&mut self, port: u32, evset: EventSet) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        let mut verdict = Verdict::Keep;
        match conn.state {
            ConnState::AwaitingLine => verdict = conn.read_connect_line(),
            ConnState::Connecting => {}
            ConnState::Established => {
                if evset.contains(EventSet::OUT) || evset.contains(EventSet::ERROR) {
                    verdict = conn.flush_to_host();
                }
                let readable = EventSet::IN | EventSet::HANG_UP | EventSet::ERROR;
                if verdict == Verdict::Keep && evset.intersects(readable) && conn.wants_input() {
                    conn.pending |= pending::DATA;
                }
            }
        }
        self.settle(port, verdict);
    }

    /// Applies `verdict` to the connection at `port`, then queues it for RX
    /// if it has packets pending and re-arms its epoll interest.
    fn settle(&mut self, port: u32, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Drop => {
                log::debug!("vsock: connection {port} dropped");
                self.conns.remove(&port);
                return;
            }
            Verdict::Reset => {
                log::debug!("vsock: connection {port} reset");
                if let Some(conn) = self.conns.remove(&port) {
                    self.queue_rst(header(self.guest_cid, &conn, op::RST));
                }
                return;
            }
        }
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        if conn.pending != 0 && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(port);
        }
        Self::rearm(&self.epoll, conn);
    }

    /// Registers exactly the interest `conn` can act on now.
    fn rearm(epoll: &Epoll, conn: &mut Connection) {
        let mut want = EventSet::empty();
        match conn.state {
            ConnState::AwaitingLine => want |= EventSet::IN,
            ConnState::Connecting => {}
            ConnState::Established => {
                if conn.wants_input() && conn.pending & pending::DATA == 0 {
                    want |= EventSet::IN;
                }
                if conn.has_host_backlog() {
                    want |= EventSet::OUT;
                }
            }
        }
        if want.bits() == conn.registered {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let event = EpollEvent::new(want, u64::from(conn.local_port));
        let result = if conn.registered == 0 {
            epoll.ctl(ControlOperation::Add, fd, event)
        } else if want.is_empty() {
            epoll.ctl(ControlOperation::Delete, fd, event)
        } else {
            epoll.ctl(ControlOperation::Modify, fd, event)
        };
        match result {
            Ok(()) => conn.registered = want.bits(),
            Err(e) => log_limited!(
                log::Level::Warn,
                "vsock: epoll_ctl for port {}: {e}",
                conn.local_port
            ),
        }
    }

    fn queue_rst(&mut self, hdr: VsockHeader) {
        if self.rst_queue.len() < MAX_RST_QUEUE {
            self.rst_queue.push_back(hdr);
        } else {
            log_limited!(
                log::Level::Warn,
                "vsock: RST queue full; dropping RST to port {}",
                hdr.dst_port
            );
        }
    }

    /// Handles one packet the guest sent (already parsed from a TX chain).
    pub fn handle_guest_packet(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            log_limited!(
                log::Level::Warn,
                "vsock: dropping a packet from CID {} to CID {} (guest is CID {})",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        let known = self
            .conns
            .get(&hdr.dst_port)
            .is_some_and(|c| c.peer_port == hdr.src_port && c.state != ConnState::AwaitingLine);
        if hdr.type_ != TYPE_STREAM || hdr.op == op::REQUEST || !known {
            // Includes every guest-initiated connection: refused (invariant 2).
            log::debug!(
                "vsock: guest op {} from port {} to unknown connection {}",
                hdr.op,
                hdr.src_port,
                hdr.dst_port
            );
            if hdr.op != op::RST {
                self.queue_rst(hdr.reply(op::RST));
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&hdr.dst_port) else {
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.awaiting_credit && conn.peer_credit() > 0 {
            conn.awaiting_credit = false;
        }
        log::trace!(
            "vsock: guest op {} len {} for connection {} in {:?}",
            hdr.op,
            payload.len(),
            hdr.dst_port,
            conn.state
        );
        let verdict = match (conn.state, hdr.op) {
            (_, op::RST) => Verdict::Drop,
            (ConnState::Connecting, op::RESPONSE) => {
                conn.state = ConnState::Established;
                conn.push_ok_line();
                conn.flush_to_host()
            }
            (ConnState::Connecting, _) => Verdict::Reset,
            (_, op::RW) if conn.guest_shut_send => Verdict::Reset,
            (_, op::RW) => match conn.push_guest_data(payload) {
                Verdict::Keep => conn.flush_to_host(),
                v => v,
            },
            (_, op::CREDIT_UPDATE) => Verdict::Keep,
            (_, op::CREDIT_REQUEST) => {
                conn.pending |= pending::CREDIT_UPDATE;
                Verdict::Keep
            }
            (_, op::SHUTDOWN) => {
                conn.guest_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                conn.guest_shut_send |= hdr.flags & shutdown::SEND != 0;
                conn.flush_to_host()
            }
            (_, op::RESPONSE) => Verdict::Keep,
            _ => Verdict::Reset,
        };
        self.settle(hdr.dst_port, verdict);
    }

    /// Answers a packet that could not be used (say, its payload was short)
    /// with RST, if it came from our guest and was not an RST itself.
    pub fn reject(&mut self, hdr: &VsockHeader) {
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID && hdr.op != op::RST {
            self.queue_rst(hdr.reply(op::RST));
        }
    }

    /// The next packet for the guest: its header (with `len` set) and the
    /// number of payload bytes written to the front of `buf`. `None` when
    /// nothing can be sent now.
    pub fn pop_rx(&mut self, buf: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return Some((hdr, 0));
        }
        while let Some(port) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&port) else {
                continue;
            };
            conn.in_rxq = false;
            let (packet, verdict) = conn.next_packet(buf);
            let packet = packet.map(|(op, flags, len)| {
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                conn.pending &= !pending::CREDIT_UPDATE;
                let hdr = VsockHeader {
                    flags,
                    len: len as u32,
                    ..header(self.guest_cid, conn, op)
                };
                (hdr, len)
            });
            self.settle(port, verdict);
            if packet.is_some() {
                return packet;
            }
            if let Some(hdr) = self.rst_queue.pop_front() {
                return Some((hdr, 0));
            }
        }
        None
    }
}

/// A header from `conn`'s host port to its guest port, carrying our credit.
fn header(guest_cid: u64, conn: &Connection, op: u16) -> VsockHeader {
    VsockHeader {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_SIZE,
        fwd_cnt: conn.fwd_cnt,
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
