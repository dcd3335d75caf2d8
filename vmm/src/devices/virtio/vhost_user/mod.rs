//! vhost-user devices: a generic frontend that hands virtqueues to a backend process or thread.
//!
//! [`VhostUserDevice`] is a [`VirtioDevice`] whose queues are processed by a
//! vhost-user backend at the other end of a connected `UnixStream` (for
//! Keystone, one end of a socket pair whose other end a backend thread such
//! as virtiofsd-lite serves). The frontend owns the device identity, the
//! feature allow-list and the device configuration space; the backend gets
//! the guest memory (as memfd file descriptors), the ring addresses and the
//! kick/call eventfds, and from then on talks to the guest directly through
//! KVM's ioeventfds and irqfds.
//!
//! Message flow:
//! - [`VhostUserDevice::new`]: `SET_OWNER`, `GET_FEATURES`, and if the
//!   backend offers `VHOST_USER_F_PROTOCOL_FEATURES`:
//!   `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES` (`REPLY_ACK`, and `MQ`
//!   for multi-queue devices), `GET_QUEUE_NUM` when `MQ` was taken.
//! - [`VirtioDevice::activate`]: `SET_FEATURES`, `SET_MEM_TABLE`, then per
//!   ready queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`,
//!   `SET_VRING_CALL`, `SET_VRING_KICK` and `SET_VRING_ENABLE`.
//! - [`VirtioDevice::reset`]: `GET_VRING_BASE` per started queue.
//!
//! Device-specific constructors live beside this file (see [`fs`]).

pub mod fs;
#[cfg(test)]
mod tests;
pub mod vsock;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

/// Generic virtio features a vhost-user device may offer the guest, if the
/// backend offers them too. Device-specific bits come from the caller.
pub const GENERIC_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// Most queues a device may have: vhost-user's vring file descriptor
/// messages carry the queue index in 8 bits.
pub const MAX_QUEUES: usize = 256;
/// Largest split virtqueue size (virtio 1.2, section 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Errors from the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostUserError {
    /// A vhost-user request to the backend failed.
    #[error("vhost-user {step} failed: {source} (has the backend exited or closed its socket?)")]
    Protocol {
        /// The request.
        step: &'static str,
        /// The error.
        source: vhost::Error,
    },
    /// The backend is not a modern virtio one.
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1 (it offers {0:#x}); only modern virtio backends are supported")]
    NoVersion1(u64),
    /// The backend has fewer queues than the device needs.
    #[error("the device needs {wanted} queues but the vhost-user backend supports only {supported}; start the backend with more queues")]
    TooFewQueues {
        /// Queues the device has.
        wanted: usize,
        /// Queues the backend serves.
        supported: u64,
    },
    /// A queue count out of range.
    #[error("a vhost-user device needs 1 to {MAX_QUEUES} queues, not {0}")]
    QueueCount(usize),
    /// A queue size that is not a power of two in range.
    #[error("queue size {0} is not a power of two between 1 and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    /// A virtio-fs tag the guest could not mount.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes long and contain no NUL byte")]
    InvalidTag(String),
    /// A virtio-fs request queue count out of range.
    #[error("virtio-fs needs 1 to 255 request queues, not {0}")]
    RequestQueueCount(u32),
    /// The driver activated the device with no queue ready.
    #[error("the driver set no queue ready, so there is nothing to hand to the backend")]
    NoQueues,
    /// The driver named a queue the device does not have.
    #[error("queue {0} does not exist on this device")]
    QueueIndex(u16),
    /// The driver set a queue size the device does not allow.
    #[error("queue {index}: size {size} is not a power of two up to the maximum {max}")]
    BadQueueSize {
        /// The queue.
        index: u16,
        /// The size the driver set.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// A ring is not inside guest memory.
    #[error("queue {index}: the {what} at guest address {addr:#x} (+{len:#x} bytes) is misaligned or not inside one guest memory region")]
    RingAddress {
        /// The queue.
        index: u16,
        /// Which ring.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Guest memory a backend cannot map.
    #[error("the guest memory region at {0:#x} is not file-backed, so a vhost-user backend cannot map it; create guest memory with vmm::device::create_memfd_memory")]
    MemoryNotShareable(u64),
    /// More memory regions than vhost-user can pass.
    #[error("guest memory has {0} regions; vhost-user SET_MEM_TABLE takes at most {MAX_ATTACHED_FD_ENTRIES}")]
    TooManyRegions(usize),
    /// The transport handed over a kick eventfd per queue, or should have.
    #[error("activation got {kicks} kick eventfds for {queues} queues")]
    KickCount {
        /// Queues.
        queues: usize,
        /// Kick eventfds.
        kicks: usize,
    },
}

impl From<VhostUserError> for ActivateError {
    fn from(e: VhostUserError) -> Self {
        match e {
            VhostUserError::NoQueues => ActivateError::NoQueues,
            e => ActivateError::VhostUser(e),
        }
    }
}

/// Returns a closure labelling a vhost error with the protocol step.
fn at(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

/// A virtio device whose queues are served by a vhost-user backend.
pub struct VhostUserDevice {
    frontend: Frontend,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    avail_features: u64,
    /// The protocol features acked, or `None` when the backend does not
    /// speak `VHOST_USER_F_PROTOCOL_FEATURES`.
    protocol_features: Option<VhostUserProtocolFeatures>,
    config: Vec<u8>,
    started_queues: Vec<usize>,
}

impl VhostUserDevice {
    /// Connects a device of `device_type` with `num_queues` queues of at most
    /// `queue_size` entries to the backend at the other end of `stream`.
    ///
    /// `config` is the device configuration space the guest reads (the
    /// frontend owns it; guest writes to it are ignored). `extra_features`
    /// are the device-specific feature bits the guest may see, on top of
    /// the generic ones (VERSION_1, EVENT_IDX and the like); only those the backend offers are offered.
    pub fn new(
        stream: UnixStream,
        device_type: u32,
        num_queues: usize,
        queue_size: u16,
        config: Vec<u8>,
        extra_features: u64,
    ) -> Result<Self, VhostUserError> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(VhostUserError::QueueCount(num_queues));
        }
        if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(VhostUserError::QueueSize(queue_size));
        }
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);

        debug!("vhost-user: SET_OWNER (device type {device_type})");
        frontend.set_owner().map_err(at("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(at("GET_FEATURES"))?;
        debug!("vhost-user: GET_FEATURES -> {backend_features:#x}");
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::NoVersion1(backend_features));
        }

        let protocol_features = if backend_features & PROTOCOL_FEATURES_BIT != 0 {
            Some(Self::negotiate_protocol(&mut frontend, num_queues)?)
        } else {
            debug!("vhost-user: backend has no protocol features");
            None
        };

        let allowed = GENERIC_FEATURES | (extra_features & !PROTOCOL_FEATURES_BIT);
        let avail_features = backend_features & allowed;
        debug!("vhost-user: offering features {avail_features:#x} to the guest");
        Ok(Self {
            frontend,
            device_type,
            queue_max_sizes: vec![queue_size; num_queues],
            avail_features,
            protocol_features,
            config,
            started_queues: Vec::new(),
        })
    }

    /// GET/SET_PROTOCOL_FEATURES, taking only what we use, then
    /// GET_QUEUE_NUM when MQ was taken.
    fn negotiate_protocol(
        frontend: &mut Frontend,
        num_queues: usize,
    ) -> Result<VhostUserProtocolFeatures, VhostUserError> {
        let offered = frontend
            .get_protocol_features()
            .map_err(at("GET_PROTOCOL_FEATURES"))?;
        debug!("vhost-user: GET_PROTOCOL_FEATURES -> {offered:?}");
        let mut wanted = VhostUserProtocolFeatures::REPLY_ACK;
        if num_queues > 1 {
            wanted |= VhostUserProtocolFeatures::MQ;
        }
        let acked = offered & wanted;
        debug!("vhost-user: SET_PROTOCOL_FEATURES {acked:?}");
        frontend
            .set_protocol_features(acked)
            .map_err(at("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request without a reply of its own gets an ack, so a
            // backend-side failure surfaces here instead of being lost.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let supported = frontend.get_queue_num().map_err(at("GET_QUEUE_NUM"))?;
            debug!("vhost-user: GET_QUEUE_NUM -> {supported}");
            if supported < num_queues as u64 {
                return Err(VhostUserError::TooFewQueues {
                    wanted: num_queues,
                    supported,
                });
            }
        }
        Ok(acked)
    }

    /// The protocol features negotiated with the backend, if any.
    pub fn protocol_features(&self) -> Option<VhostUserProtocolFeatures> {
        self.protocol_features
    }

    fn start(&mut self, ctx: &ActivateContext) -> Result<(), VhostUserError> {
        if ctx.queues.is_empty() {
            return Err(VhostUserError::NoQueues);
        }
        if ctx.kicks.len() != ctx.queues.len() {
            return Err(VhostUserError::KickCount {
                queues: ctx.queues.len(),
                kicks: ctx.kicks.len(),
            });
        }
        if !self.started_queues.is_empty() {
            self.stop_queues();
        }

        let mut features = ctx.acked_features & self.avail_features;
        if self.protocol_features.is_some() {
            features |= PROTOCOL_FEATURES_BIT;
        }
        debug!("vhost-user: SET_FEATURES {features:#x}");
        self.frontend
            .set_features(features)
            .map_err(at("SET_FEATURES"))?;

        let regions = memory_table(&ctx.mem)?;
        debug!("vhost-user: SET_MEM_TABLE with {} regions", regions.len());
        self.frontend
            .set_mem_table(&regions)
            .map_err(at("SET_MEM_TABLE"))?;

        for (queue, kick) in ctx.queues.iter().zip(&ctx.kicks) {
            let index = queue.index;
            let max = *self
                .queue_max_sizes
                .get(usize::from(index))
                .ok_or(VhostUserError::QueueIndex(index))?;
            let size = queue.size;
            if !size.is_power_of_two() || size > max {
                return Err(VhostUserError::BadQueueSize { index, size, max });
            }
            let n = u64::from(size);
            let vring = VringConfigData {
                queue_max_size: max,
                queue_size: size,
                flags: 0,
                desc_table_addr: ring_host_address(
                    &ctx.mem,
                    index,
                    "descriptor table",
                    queue.desc_table,
                    16 * n,
                    16,
                )?,
                used_ring_addr: ring_host_address(
                    &ctx.mem,
                    index,
                    "used ring",
                    queue.used_ring,
                    6 + 8 * n,
                    4,
                )?,
                avail_ring_addr: ring_host_address(
                    &ctx.mem,
                    index,
                    "available ring",
                    queue.avail_ring,
                    6 + 2 * n,
                    2,
                )?,
                log_addr: None,
            };
            let i = usize::from(index);
            debug!("vhost-user: queue {i}: SET_VRING_NUM {size}");
            self.frontend
                .set_vring_num(i, size)
                .map_err(at("SET_VRING_NUM"))?;
            debug!(
                "vhost-user: queue {i}: SET_VRING_ADDR desc {:#x} avail {:#x} used {:#x}",
                vring.desc_table_addr, vring.avail_ring_addr, vring.used_ring_addr
            );
            self.frontend
                .set_vring_addr(i, &vring)
                .map_err(at("SET_VRING_ADDR"))?;
            debug!("vhost-user: queue {i}: SET_VRING_BASE 0");
            self.frontend
                .set_vring_base(i, 0)
                .map_err(at("SET_VRING_BASE"))?;
            debug!(
                "vhost-user: queue {i}: SET_VRING_CALL fd {}",
                ctx.call.as_raw_fd()
            );
            self.frontend
                .set_vring_call(i, &ctx.call)
                .map_err(at("SET_VRING_CALL"))?;
            debug!(
                "vhost-user: queue {i}: SET_VRING_KICK fd {}",
                kick.as_raw_fd()
            );
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(at("SET_VRING_KICK"))?;
            self.started_queues.push(i);
            if self.protocol_features.is_some() {
                debug!("vhost-user: queue {i}: SET_VRING_ENABLE 1");
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(at("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// GET_VRING_BASE on every started queue, which stops it.
    fn stop_queues(&mut self) {
        for i in std::mem::take(&mut self.started_queues) {
            match self.frontend.get_vring_base(i) {
                Ok(base) => debug!("vhost-user: queue {i}: GET_VRING_BASE -> {base}"),
                Err(e) => warn!("vhost-user: queue {i}: GET_VRING_BASE failed: {e}"),
            }
        }
    }
}

/// The SET_MEM_TABLE entries for `mem`: every region must be file-backed.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    if mem.num_regions() > MAX_ATTACHED_FD_ENTRIES {
        return Err(VhostUserError::TooManyRegions(mem.num_regions()));
    }
    mem.iter()
        .map(|region| {
            let guest_phys_addr = region.start_addr().raw_value();
            let file_offset = region
                .file_offset()
                .ok_or(VhostUserError::MemoryNotShareable(guest_phys_addr))?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VhostUserError::MemoryNotShareable(guest_phys_addr))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file_offset.start(),
                mmap_handle: file_offset.file().as_raw_fd(),
            })
        })
        .collect()
}

/// Translates a ring's guest address to our host virtual address, checking
/// its alignment and that all `len` bytes lie in one region.
fn ring_host_address(
    mem: &GuestMemoryMmap,
    index: u16,
    what: &'static str,
    addr: u64,
    len: u64,
    align: u64,
) -> Result<u64, VhostUserError> {
    let bad = || VhostUserError::RingAddress {
        index,
        what,
        addr,
        len,
    };
    if addr % align != 0 {
        return Err(bad());
    }
    let (region, offset) = mem.to_region_addr(GuestAddress(addr)).ok_or_else(bad)?;
    let end = offset.raw_value().checked_add(len).ok_or_else(bad)?;
    if end > region.len() {
        return Err(bad());
    }
    let host = region.get_host_address(offset).map_err(|_| bad())?;
    Ok(host as u64)
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            *byte = at.and_then(|o| self.config.get(o)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "vhost-user: guest wrote {} bytes to read-only config space at {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        debug!(
            "vhost-user: activating device type {} with {} queues",
            self.device_type,
            ctx.queues.len()
        );
        self.start(&ctx).map_err(|e| {
            // Stop whatever part did start: the transport will not call
            // `reset` for a device whose activation failed.
            self.stop_queues();
            ActivateError::from(e)
        })
    }

    fn reset(&mut self) -> bool {
        debug!("vhost-user: reset of device type {}", self.device_type);
        self.stop_queues();
        true
    }
}
