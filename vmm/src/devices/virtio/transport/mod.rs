//! Virtio transports.

pub mod mmio;
