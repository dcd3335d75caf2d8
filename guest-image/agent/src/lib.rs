//! The Keystone guest agent: the guest's side of the conversation with the
//! host (request handling, processes, PID 1 duties), in [`agent`].
//!
//! The wire protocol, the transports, the relay and the host-side client
//! are `keystone-agent-protocol`, which the host links too; they are
//! re-exported here under their usual names.
//!
//! The binary (`src/bin/keystone-guest-agent.rs`) is the guest's `/init`;
//! `build-static.sh` builds it statically linked for the initramfs.

pub mod agent;

pub use keystone_agent_protocol::{client, hybrid, protocol, relay, transport};
pub use keystone_agent_protocol::{
    hybrid_vsock_connector, unix_connector, AgentClient, ClientError, Watch, WatchEvent,
};
pub use keystone_agent_protocol::{ExecRequest, ExitStatus, TtySize, UserSpec};
