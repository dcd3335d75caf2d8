//! One host-initiated vsock stream: its Unix stream, state, credit
//! accounting in both directions and the bounded host-bound buffer.
//!
//! Credit (virtio 1.2, section 5.10.6.3): every packet carries the sender's
//! `buf_alloc` and `fwd_cnt`. Towards the guest we may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight
//! ([`Connection::peer_credit`]); host-to-guest bytes are read from the Unix
//! stream only when that credit and an RX buffer exist, so nothing is
//! buffered in that direction. Towards the host we advertise
//! [`CONN_BUF_SIZE`]; guest data the Unix stream cannot take at once waits
//! in `to_host`, which a guest that respects our credit can never grow past
//! that size (one that does not is reset).

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::{op, shutdown, MAX_PAYLOAD};
use log_limit::log_limited;

/// Receive buffer we advertise to the guest per connection (`buf_alloc`),
/// which also bounds the memory a connection holds.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line accepted from a host client.
pub const MAX_LINE: usize = 32;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted on the Unix listener; reading the `CONNECT <port>` line.
    AwaitingLine,
    /// REQUEST queued or sent to the guest; waiting for RESPONSE or RST.
    Connecting,
    /// RESPONSE received and `OK <port>` written: data flows.
    Established,
}

/// Packets a connection wants to send to the guest (bit set).
pub mod pending {
    pub const REQUEST: u8 = 1;
    pub const DATA: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
}

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send RST to the guest and forget the connection.
    Reset,
    /// Forget the connection without telling the guest (it never heard of it).
    Drop,
}

/// State of one host-initiated stream.
pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// Bytes of the `CONNECT` line read so far.
    pub line: Vec<u8>,
    /// Host-bound bytes not yet written to the Unix stream.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (`OK` line), not guest data.
    to_host_prefix: usize,
    /// Guest bytes written to the Unix stream (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// The host closed its write side (we read EOF).
    pub host_eof: bool,
    /// The guest will send no more data.
    pub guest_shut_send: bool,
    /// The guest will receive no more data.
    pub guest_shut_rcv: bool,
    write_shut: bool,
    /// Host data is readable but the guest has no credit: wait for it.
    pub awaiting_credit: bool,
    /// Bit set of [`pending`] packets.
    pub pending: u8,
    /// Whether the port is in the muxer's RX queue.
    pub in_rxq: bool,
    /// Interest currently registered with the muxer's epoll (raw bits).
    pub registered: u32,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32) -> Self {
        Self {
            stream,
            local_port,
            peer_port: 0,
            state: ConnState::AwaitingLine,
            line: Vec::new(),
            to_host: VecDeque::new(),
            to_host_prefix: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            write_shut: false,
            awaiting_credit: false,
            pending: 0,
            in_rxq: false,
            registered: 0,
        }
    }

    /// Bytes the guest can still take (0 when a lying guest's counters make
    /// no sense).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether guest-to-host bytes are waiting for the Unix stream.
    pub fn has_host_backlog(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Host-bound bytes waiting for the Unix stream (our `OK` line
    /// included): at most [`CONN_BUF_SIZE`] plus that line.
    pub fn host_backlog_len(&self) -> usize {
        self.to_host.len()
    }

    /// Queues our `OK <port>\n` line for the host.
    pub fn push_ok_line(&mut self) {
        let line = format!("OK {}\n", self.local_port);
        self.to_host_prefix += line.len();
        self.to_host.extend(line.as_bytes());
    }

    /// Queues guest data for the host; `Reset` if the guest overran the
    /// credit we gave it.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Verdict {
        let buffered = self.to_host.len() - self.to_host_prefix;
        if buffered + data.len() > CONN_BUF_SIZE as usize {
            log_limited!(
                log::Level::Warn,
                "vsock: guest port {} overran its credit ({} + {} bytes); resetting",
                self.peer_port,
                buffered,
                data.len()
            );
            return Verdict::Reset;
        }
        self.to_host.extend(data);
        Verdict::Keep
    }

    /// Writes as much of `to_host` as the Unix stream takes; half-closes it
    /// once the guest has shut its send side and everything is written.
    pub fn flush_to_host(&mut self) -> Verdict {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.to_host_prefix);
                    self.to_host_prefix -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host stream of port {}: {e}", self.local_port);
                    return Verdict::Reset;
                }
            }
        }
        if self.to_host.is_empty() && self.guest_shut_send && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CONN_BUF_SIZE / 2 {
            self.pending |= pending::CREDIT_UPDATE;
        }
        self.close_verdict()
    }

    /// `Reset` once both directions are finished and nothing is left to write.
    pub fn close_verdict(&self) -> Verdict {
        let guest_done = self.guest_shut_send && (self.guest_shut_rcv || self.host_eof);
        if guest_done && self.to_host.is_empty() {
            Verdict::Reset
        } else {
            Verdict::Keep
        }
    }

    /// Whether host input could be forwarded now (credit aside).
    pub fn wants_input(&self) -> bool {
        !self.host_eof && !self.guest_shut_rcv && !self.awaiting_credit
    }

    /// Reads the `CONNECT <port>` line one byte at a time, so no data after
    /// it is consumed before the guest accepts the connection.
    pub fn read_connect_line(&mut self) -> Verdict {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Verdict::Drop,
                Ok(_) if byte[0] == b'\n' => {
                    let Some(port) = Self::parse_connect_line(&self.line) else {
                        log_limited!(
                            log::Level::Warn,
                            "vsock: bad host request line {:?}",
                            String::from_utf8_lossy(&self.line)
                        );
                        return Verdict::Drop;
                    };
                    self.line = Vec::new();
                    self.peer_port = port;
                    self.state = ConnState::Connecting;
                    self.pending |= pending::REQUEST;
                    return Verdict::Keep;
                }
                Ok(_) if self.line.len() >= MAX_LINE => return Verdict::Drop,
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Verdict::Keep,
                Err(_) => return Verdict::Drop,
            }
        }
    }

    /// Produces the next packet for the guest as (op, flags, payload length
    /// written to the front of `buf`), reading host data within credit.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> (Option<(u16, u32, usize)>, Verdict) {
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            return (Some((op::REQUEST, 0, 0)), Verdict::Keep);
        }
        if self.pending & pending::DATA != 0 {
            self.pending &= !pending::DATA;
            let room = (self.peer_credit() as usize)
                .min(buf.len())
                .min(MAX_PAYLOAD);
            if room == 0 {
                self.awaiting_credit = true;
                return (Some((op::CREDIT_REQUEST, 0, 0)), Verdict::Keep);
            }
            loop {
                match self.stream.read(&mut buf[..room]) {
                    Ok(0) => {
                        self.host_eof = true;
                        if self.close_verdict() == Verdict::Reset {
                            return (None, Verdict::Reset);
                        }
                        return (Some((op::SHUTDOWN, shutdown::SEND, 0)), Verdict::Keep);
                    }
                    Ok(n) => {
                        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                        return (Some((op::RW, 0, n)), Verdict::Keep);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return (None, Verdict::Reset),
                }
            }
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            return (Some((op::CREDIT_UPDATE, 0, 0)), Verdict::Keep);
        }
        (None, Verdict::Keep)
    }

    /// Parses a complete `CONNECT <port>` line (without the newline).
    pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
        let text = std::str::from_utf8(line).ok()?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        let port = text.strip_prefix("CONNECT ")?;
        port.trim().parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(Connection::parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(Connection::parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(Connection::parse_connect_line(b"CONNECT"), None);
        assert_eq!(Connection::parse_connect_line(b"connect 1"), None);
        assert_eq!(Connection::parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(Connection::parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(Connection::parse_connect_line(&[0xff, 0xfe]), None);
    }

    #[test]
    fn credit_never_underflows() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 1024);
        c.peer_buf_alloc = 100;
        c.tx_cnt = 60;
        c.peer_fwd_cnt = 10;
        assert_eq!(c.peer_credit(), 50);
        c.peer_fwd_cnt = 70; // guest claims more than we sent
        assert_eq!(c.peer_credit(), 0);
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4; // wrapped counters
        assert_eq!(c.peer_credit(), 90);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, 1024);
        let chunk = vec![0u8; CONN_BUF_SIZE as usize];
        assert_eq!(c.push_guest_data(&chunk), Verdict::Keep);
        assert_eq!(c.push_guest_data(b"x"), Verdict::Reset);
    }
}
