//! virtio-vsock over vhost-user: a constructor for [`VhostUserDevice`]
//! (virtio 1.2, section 5.10).
//!
//! The frontend owns the configuration space (`guest_cid`, le64); packets
//! never pass through the VMM: the backend
//! ([`crate::devices::virtio::vsock`]) reads the rx, tx and event queues.

use std::os::unix::net::UnixStream;

use super::{VhostUserDevice, VhostUserError};
use crate::devices::virtio::device_type;
use crate::devices::virtio::vsock::backend::{NUM_QUEUES, QUEUE_SIZE};
use crate::devices::virtio::vsock::vsock_config_space;

impl VhostUserDevice {
    /// A virtio-vsock device for the guest at `guest_cid` (rx, tx and event
    /// queues of 256 entries), served by the vhost-user-vsock backend at the
    /// other end of `stream` (see [`crate::devices::virtio::vsock::spawn_backend`]).
    pub fn vsock(stream: UnixStream, guest_cid: u64) -> Result<Self, VhostUserError> {
        Self::new(
            stream,
            device_type::VSOCK,
            NUM_QUEUES,
            QUEUE_SIZE as u16,
            vsock_config_space(guest_cid),
            0,
        )
    }
}
