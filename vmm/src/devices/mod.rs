//! Devices the guest sees: the I/O and MMIO buses, legacy PC devices and
//! virtio devices behind the virtio-mmio transport.

pub mod bus;
pub mod legacy;
pub mod virtio;
