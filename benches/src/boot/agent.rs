//! "Agent ready": the guest agent answering a ping over vsock, through the
//! hybrid Unix socket of the VMM (ours, Cloud Hypervisor) or of our
//! vhost-user vsock backend (QEMU). The harness tries every few
//! milliseconds from the spawn on; each try is bounded by socket timeouts,
//! and the guest's answer goes through the agent client's own frame-size
//! checks.

use std::path::Path;
use std::time::Duration;

use keystone_guest_agent::client::AgentClient;
use keystone_guest_agent::hybrid::hybrid_vsock_connector_keeping_deadline;
use keystone_guest_agent::protocol::AGENT_VSOCK_PORT;

/// Longest wait for the handshake's answer and any later read.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// A client of the agent behind `uds`: each connection does the protocol
/// crate's hybrid vsock handshake, its reads bounded by [`IO_TIMEOUT`].
pub fn client(uds: &Path) -> AgentClient {
    AgentClient::new(hybrid_vsock_connector_keeping_deadline(
        uds,
        AGENT_VSOCK_PORT,
        IO_TIMEOUT,
    ))
}

/// One try: the agent's version when it answered.
pub fn ping(client: &AgentClient) -> Option<String> {
    client.ping().ok()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

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
