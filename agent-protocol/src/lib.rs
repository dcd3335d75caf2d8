//! What the Keystone host and its guest agent share: the wire protocol,
//! the transports, the relay and the host-side client. Both sides link
//! this crate; the guest agent binary (`keystone-guest-agent`) holds only
//! the guest's side of the conversation.
//!
//! - [`protocol`]: the versioned framed protocol (the specification is its
//!   module documentation), the agent's vsock port, the frame limits;
//! - [`transport`]: byte streams: the [`transport::DuplexStream`] trait,
//!   AF_VSOCK in the guest, Unix sockets in tests, socket deadlines;
//! - [`client`]: [`client::AgentClient`], used by the host;
//! - [`hybrid`]: the hybrid vsock handshake (`CONNECT <port>\n`,
//!   `OK <n>\n`) that reaches a guest port through a VMM's vsock socket,
//!   its answer bounded in time and length (re-exported by [`client`]);
//! - [`relay`]: the two-way byte relay of `TcpConnect` (guest) and of the
//!   host's forwards.

pub mod client;
pub mod hybrid;
pub mod protocol;
pub mod relay;
pub mod transport;

pub use client::{
    hybrid_vsock_connector, unix_connector, AgentClient, ClientError, Watch, WatchEvent,
};
pub use protocol::{ExecRequest, ExitStatus, TtySize, UserSpec, AGENT_VSOCK_PORT};
