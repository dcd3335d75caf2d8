//! "Agent ready": the guest agent answering a ping over vsock, through the
//! hybrid Unix socket of the VMM (ours, Cloud Hypervisor) or of our
//! vhost-user vsock backend (QEMU). The harness tries every few
//! milliseconds from the spawn on; each try is bounded by socket timeouts,
//! and the guest's answer goes through the agent client's own frame-size
//! checks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keystone_guest_agent::client::AgentClient;
use keystone_guest_agent::protocol::AGENT_VSOCK_PORT;
use keystone_guest_agent::transport::DuplexStream;

/// Longest wait for any one read or write on the socket.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// The handshake answer (`OK <port>\n`) is short.
const ANSWER_CAP: usize = 64;

/// Opens `uds`, asks for the agent's port and returns the stream once the
/// other side said `OK`.
fn connect(uds: &Path) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < ANSWER_CAP {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    if answer.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "the guest agent is not listening yet",
        ))
    }
}

/// A client of the agent behind `uds`.
pub fn client(uds: &Path) -> AgentClient {
    let uds: PathBuf = uds.to_path_buf();
    AgentClient::new(Box::new(move || {
        connect(&uds).map(|s| Box::new(s) as Box<dyn DuplexStream>)
    }))
}

/// One try: the agent's version when it answered.
pub fn ping(client: &AgentClient) -> Option<String> {
    client.ping().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the VMM's hybrid socket that refuses the port.
    #[test]
    fn a_refusal_is_no_answer_and_a_missing_socket_too() {
        let dir = std::env::temp_dir().join(format!("ks-bench-agent-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        assert!(ping(&client(&uds)).is_none());
        let listener = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let want = format!("CONNECT {AGENT_VSOCK_PORT}\n");
            let mut line = vec![0u8; want.len()];
            s.read_exact(&mut line).unwrap();
            assert_eq!(line, want.as_bytes());
            s.write_all(b"NO\n").unwrap();
        });
        assert!(ping(&client(&uds)).is_none());
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
