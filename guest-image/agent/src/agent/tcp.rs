//! `TcpConnect`: a connection to a TCP port on the guest's loopback,
//! relayed raw over the agent connection (how the host forwards guest
//! ports). Only 127.0.0.1 and ::1 are ever dialled, so the agent is no
//! general-purpose proxy into whatever network the guest can reach.

use std::io::{BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::protocol::{write_frame, write_raw, Frame, FrameKind, ProtocolError, Response};
use crate::relay::relay;
use crate::transport::DuplexStream;

/// How long a connect to the guest's loopback may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` on 127.0.0.1, then on ::1.
pub fn connect_loopback(port: u16) -> Result<TcpStream, String> {
    let candidates = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut errors = Vec::new();
    for addr in candidates {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(format!(
        "nothing is listening on guest port {port} ({}); start the server in the sandbox, \
         listening on 127.0.0.1, ::1 or all addresses",
        errors.join(", ")
    ))
}

/// Serves a `TcpConnect`: answers, then relays until both sides are done.
pub fn run_tcp_connect(
    reader: BufReader<Box<dyn DuplexStream>>,
    mut writer: Box<dyn DuplexStream>,
    port: u16,
) -> Result<(), ProtocolError> {
    let mut tcp = match connect_loopback(port) {
        Ok(s) => s,
        Err(msg) => return write_raw(&mut writer, FrameKind::Error, msg.as_bytes()),
    };
    let _ = tcp.set_nodelay(true);
    let address = tcp.peer_addr()?;
    write_frame(
        &mut writer,
        &Frame::json(FrameKind::Response, &Response::Connected { address }),
    )?;
    // Bytes the host sent right behind its request are in the reader's
    // buffer: they go first.
    let early = reader.buffer().to_vec();
    drop(reader);
    if !early.is_empty() {
        tcp.write_all(&early)?;
    }
    let totals = relay(writer, Box::new(tcp))?;
    log::debug!(
        "tcp relay to {address} ended: {} bytes in, {} bytes out",
        totals.a_to_b + early.len() as u64,
        totals.b_to_a
    );
    Ok(())
}
