//! The Keystone guest agent, its wire protocol and the host-side client.
//!
//! - [`protocol`]: the versioned framed protocol (spec in its module doc);
//! - [`transport`]: byte streams: the [`transport::DuplexStream`] trait,
//!   AF_VSOCK in the guest, Unix sockets in tests;
//! - [`client`]: [`client::AgentClient`], used by the host (the CLI);
//! - [`relay`]: the two-way byte relay of `TcpConnect` (guest) and of
//!   port forwarding (host);
//! - [`agent`]: the guest side: request handling, processes, PID 1 duties.
//!
//! The binary (`src/bin/keystone-guest-agent.rs`) is the guest's `/init`;
//! `build-static.sh` builds it statically linked for the initramfs.

pub mod agent;
pub mod client;
pub mod protocol;
pub mod relay;
pub mod transport;

pub use client::{
    hybrid_vsock_connector, unix_connector, AgentClient, ClientError, Watch, WatchEvent,
};
pub use protocol::{ExecRequest, ExitStatus, TtySize, UserSpec};
