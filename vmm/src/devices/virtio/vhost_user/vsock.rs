//! virtio-vsock over vhost-user: a constructor for [`VhostUserDevice`]
//! (virtio 1.2, section 5.10).
//!
//! The frontend owns the configuration space (`guest_cid`, le64); packets
//! never pass through the VMM: the backend daemon (`vsock-lite`, or any
//! vhost-user vsock backend) reads the rx, tx and event queues.

use std::os::unix::net::UnixStream;

use super::{VhostUserDevice, VhostUserError};
use crate::devices::virtio::device_type;

/// rx, tx and event.
pub const NUM_QUEUES: usize = 3;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;

impl VhostUserDevice {
    /// A virtio-vsock device for the guest at `guest_cid` (rx, tx and event
    /// queues of 256 entries), served by the vhost-user vsock
    /// backend at the other end of `stream`.
    pub fn vsock(stream: UnixStream, guest_cid: u64) -> Result<Self, VhostUserError> {
        Self::new(
            stream,
            device_type::VSOCK,
            NUM_QUEUES,
            QUEUE_SIZE,
            guest_cid.to_le_bytes().to_vec(),
            0,
        )
    }
}
