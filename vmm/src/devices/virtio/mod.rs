//! Virtio devices and the virtio-mmio transport.
//!
//! A device model implements [`VirtioDevice`] and never sees MMIO
//! registers: [`transport::mmio::MmioTransport`] owns the register file,
//! feature negotiation and queue configuration, and calls
//! [`VirtioDevice::activate`] once the driver sets `DRIVER_OK`.
//!
//! Notifications bypass the VMM's vCPU loop: each queue's kick `EventFd` is
//! registered as a KVM ioeventfd on the transport's `QueueNotify` register
//! (datamatch = queue index), and the device's call `EventFd` is a KVM irqfd
//! on its GSI. A vhost-user backend therefore gets kicks and raises
//! interrupts without a VM exit reaching this process.

pub mod transport;
pub mod vhost_user;

use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// `VIRTIO_F_VERSION_1`: every device we offer is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The guest-programmed layout of one virtqueue, as the transport saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Index of the queue in the device.
    pub index: u16,
    /// Size the driver chose (a power of two, at most the device's maximum).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
}

/// Everything a device needs to start processing queues.
pub struct ActivateContext {
    /// Guest memory (memfd-backed, so it can be shared with a backend).
    pub mem: GuestMemoryMmap,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The queues the driver set ready, in index order.
    pub queues: Vec<QueueConfig>,
    /// One kick `EventFd` per entry of `queues` (already an ioeventfd).
    pub kicks: Vec<EventFd>,
    /// The device's interrupt `EventFd` (already an irqfd on its GSI).
    pub call: EventFd,
}

/// Errors a device may return from activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set no queue ready")]
    NoQueues,
    #[error("vhost-user backend: {0}")]
    VhostUser(#[source] vhost_user::VhostUserError),
    /// A device of the embedder's own failed; the source says why.
    #[error("{0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2, section 5: 26 for virtio-fs, 19 for vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device once the driver sets `DRIVER_OK`.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device on a driver reset. Returns false if it cannot be
    /// reset (the transport then reports `DEVICE_NEEDS_RESET`).
    fn reset(&mut self) -> bool;
}
