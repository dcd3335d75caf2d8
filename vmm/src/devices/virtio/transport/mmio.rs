//! The virtio-mmio transport (virtio 1.2, section 4.2), version 2 only.
//!
//! [`MmioTransport`] owns the register file of one virtio-mmio device:
//! identification, feature negotiation through the two 32-bit feature
//! windows, the device status state machine, per-queue configuration and the
//! interrupt status. The device model behind it ([`VirtioDevice`]) only sees
//! the outcome: its configuration space accesses, and one
//! [`VirtioDevice::activate`] call with the ready queues once the driver sets
//! `DRIVER_OK`.
//!
//! Notifications do not go through this file on a real VM: the VM builder
//! registers each queue's kick `EventFd` as a KVM ioeventfd on `QueueNotify`
//! (see [`MmioTransport::ioevents`]) and the call `EventFd` as an irqfd (see
//! [`MmioTransport::call_eventfd`]). Every register value here comes from the
//! guest and is treated as untrusted: bad values are logged and ignored.

use log::debug;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::{ActivateContext, QueueConfig, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;
use log_limit::log_limited;

/// Offset of the `QueueNotify` register, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// The virtio-mmio magic value, "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The only transport version implemented (virtio 1.x, no legacy).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest: "KS".
pub const VENDOR_ID: u32 = 0x4b53;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits (virtio 1.2, section 4.2.2).
pub const INT_VRING: u32 = 0x1;
/// The device configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Register offsets (virtio 1.2, table 4.1).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "cannot create an eventfd for the virtio-mmio transport (check the open file limit): {0}"
    )]
    EventFd(std::io::Error),
    #[error("the device has {0} queues; virtio-mmio supports 1 to 65535")]
    QueueCount(usize),
}

/// Guest-programmed state of one queue.
#[derive(Clone, Copy, Debug)]
struct QueueState {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }
}

/// Replaces the low or high 32 bits of `field`.
fn set_half(field: &mut u64, value: u32, high: bool) {
    *field = if high {
        (*field & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*field & !0xffff_ffff) | u64::from(value)
    };
}

/// One virtio-mmio device: the register file in front of a [`VirtioDevice`].
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<QueueState>,
    kicks: Vec<EventFd>,
    call: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    config_interrupt: bool,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`, creating one kick `EventFd` per queue and the call
    /// `EventFd`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > usize::from(u16::MAX) {
            return Err(TransportError::QueueCount(max_sizes.len()));
        }
        let kicks = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        Ok(Self {
            device,
            mem,
            queues: max_sizes.into_iter().map(QueueState::new).collect(),
            kicks,
            call,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            config_interrupt: false,
            activated: false,
        })
    }

    /// The kick `EventFd` of each queue with the offset of `QueueNotify`
    /// (relative to the device's base) and the datamatch value (the queue
    /// index), for `register_ioevent` at `base + offset`.
    pub fn ioevents(&self) -> impl Iterator<Item = (&EventFd, u64, u32)> {
        self.kicks
            .iter()
            .enumerate()
            .map(|(index, fd)| (fd, QUEUE_NOTIFY_OFFSET, index as u32))
    }

    /// The device's interrupt `EventFd`, for `register_irqfd` on its GSI.
    pub fn call_eventfd(&self) -> &EventFd {
        &self.call
    }

    /// The current device status, as the driver would read it.
    #[cfg(test)]
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated and not reset since.
    #[cfg(test)]
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Tells the driver that the device configuration changed: bumps
    /// `ConfigGeneration`, sets the config interrupt bit and raises the
    /// interrupt. (No device of ours changes its configuration yet.)
    #[cfg(test)]
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise_config_interrupt();
    }

    fn raise_config_interrupt(&mut self) {
        self.config_interrupt = true;
        if let Err(e) = self.call.write(1) {
            log_limited!(
                log::Level::Error,
                "virtio-mmio: cannot raise the config interrupt: {e}"
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn interrupt_status(&self) -> u32 {
        let vring = if self.activated { INT_VRING } else { 0 };
        let config = if self.config_interrupt { INT_CONFIG } else { 0 };
        vring | config
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length and base of all ones means
            // "no such region" (virtio 1.2, section 4.2.2).
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let driver_ok = self.status & status::DRIVER_OK != 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => {
                if value & INT_CONFIG != 0 {
                    self.config_interrupt = false;
                }
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if driver_ok {
                    log_limited!(
                        log::Level::Warn,
                        "virtio-mmio: queue register {offset:#x} written after DRIVER_OK; ignored"
                    );
                    return;
                }
                let queue_sel = self.queue_sel;
                let Some(queue) = self.selected_queue() else {
                    log_limited!(log::Level::Warn, "virtio-mmio: queue register {offset:#x} written with QueueSel {queue_sel} out of range");
                    return;
                };
                Self::write_queue_register(queue, offset, value);
            }
            _ => debug!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    fn write_queue_register(queue: &mut QueueState, offset: u64, value: u32) {
        match offset {
            reg::QUEUE_NUM => {
                if value == 0 || !value.is_power_of_two() || value > u32::from(queue.max_size) {
                    log_limited!(
                        log::Level::Warn,
                        "virtio-mmio: QueueNum {value} is not a power of two up to {}; ignored",
                        queue.max_size
                    );
                } else {
                    // Fits: value <= max_size, a u16.
                    queue.size = value as u16;
                }
            }
            reg::QUEUE_READY => queue.ready = value == 1,
            reg::QUEUE_DESC_LOW => set_half(&mut queue.desc_table, value, false),
            reg::QUEUE_DESC_HIGH => set_half(&mut queue.desc_table, value, true),
            reg::QUEUE_DRIVER_LOW => set_half(&mut queue.avail_ring, value, false),
            reg::QUEUE_DRIVER_HIGH => set_half(&mut queue.avail_ring, value, true),
            reg::QUEUE_DEVICE_LOW => set_half(&mut queue.used_ring, value, false),
            reg::QUEUE_DEVICE_HIGH => set_half(&mut queue.used_ring, value, true),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating =
            self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        if !negotiating {
            log_limited!(
                log::Level::Warn,
                "virtio-mmio: DriverFeatures written outside feature negotiation; ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.acked_features, value, false),
            1 => set_half(&mut self.acked_features, value, true),
            sel => debug!("virtio-mmio: DriverFeatures window {sel} does not exist; ignored"),
        }
    }

    fn notify(&mut self, value: u32) {
        match self.kicks.get(value as usize) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    log_limited!(
                        log::Level::Error,
                        "virtio-mmio: cannot signal the kick of queue {value}: {e}"
                    );
                }
            }
            None => log_limited!(
                log::Level::Warn,
                "virtio-mmio: notify for queue {value}, which does not exist"
            ),
        }
    }

    /// Checks the features the driver acked: only offered ones, and VERSION_1.
    fn features_acceptable(&self) -> bool {
        let unoffered = self.acked_features & !self.device.avail_features();
        if unoffered != 0 {
            log_limited!(log::Level::Warn, "virtio-mmio: driver acked features {unoffered:#x} that were not offered; refusing FEATURES_OK");
            return false;
        }
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            log_limited!(log::Level::Warn, "virtio-mmio: driver did not ack VIRTIO_F_VERSION_1 (legacy drivers are not supported); refusing FEATURES_OK");
            return false;
        }
        true
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device: the driver cannot set or
        // clear it.
        let value =
            (value & 0xff & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if value & old != old {
            log_limited!(log::Level::Warn, "virtio-mmio: driver tried to clear status bits ({old:#x} -> {value:#x}) without a reset; ignored");
            return;
        }
        let added = value & !old;
        let mut new = old;
        if added & status::ACKNOWLEDGE != 0 {
            new |= status::ACKNOWLEDGE;
        }
        if added & status::DRIVER != 0 && new & status::ACKNOWLEDGE != 0 {
            new |= status::DRIVER;
        }
        if added & status::FEATURES_OK != 0
            && new & status::DRIVER != 0
            && self.features_acceptable()
        {
            new |= status::FEATURES_OK;
        }
        if added & status::FAILED != 0 {
            log_limited!(
                log::Level::Warn,
                "virtio-mmio: the driver gave up on the device (status FAILED)"
            );
            new |= status::FAILED;
        }
        let activate = added & status::DRIVER_OK != 0
            && new & status::FEATURES_OK != 0
            && new & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0;
        if activate {
            new |= status::DRIVER_OK;
        }
        if new & added != added {
            log_limited!(
                log::Level::Warn,
                "virtio-mmio: status bits {:#x} refused (status {old:#x}, written {value:#x})",
                added & !new
            );
        }
        self.status = new;
        if activate {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ctx = match self.activate_context() {
            Ok(ctx) => ctx,
            Err(e) => return self.fail_activation(&format!("cannot clone an eventfd: {e}")),
        };
        debug!(
            "virtio-mmio: activating device type {} with features {:#x} and {} queues",
            self.device.device_type(),
            ctx.acked_features,
            ctx.queues.len()
        );
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail_activation(&e.to_string()),
        }
    }

    /// The ready queues in index order, with clones of their kicks.
    fn activate_context(&self) -> std::io::Result<ActivateContext> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for (index, (queue, kick)) in self.queues.iter().zip(&self.kicks).enumerate() {
            if !queue.ready {
                continue;
            }
            queues.push(QueueConfig {
                // Fits: the queue count was checked in `new`.
                index: index as u16,
                size: queue.size,
                desc_table: queue.desc_table,
                avail_ring: queue.avail_ring,
                used_ring: queue.used_ring,
            });
            kicks.push(kick.try_clone()?);
        }
        Ok(ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features,
            queues,
            kicks,
            call: self.call.try_clone()?,
        })
    }

    fn fail_activation(&mut self, why: &str) {
        log_limited!(
            log::Level::Error,
            "virtio-mmio: activation of device type {} failed: {why}; reporting DEVICE_NEEDS_RESET",
            self.device.device_type()
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.raise_config_interrupt();
    }

    fn reset(&mut self) {
        debug!(
            "virtio-mmio: driver reset of device type {}",
            self.device.device_type()
        );
        if self.activated && !self.device.reset() {
            log_limited!(
                log::Level::Error,
                "virtio-mmio: device type {} cannot be reset",
                self.device.device_type()
            );
            self.status = status::DEVICE_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.config_interrupt = false;
        for queue in &mut self.queues {
            *queue = QueueState::new(queue.max_size);
        }
        // Drop kicks that arrived before the reset so a later activation does
        // not see stale notifications. EAGAIN (nothing pending) is expected.
        for kick in &self.kicks {
            let _ = kick.read();
        }
        let _ = self.call.read();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                debug!(
                    "virtio-mmio: {}-byte read at {offset:#x} (registers are 32-bit)",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_register(offset, u32::from_le_bytes(word)),
            Err(_) => debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored (registers are 32-bit)",
                data.len()
            ),
        }
    }
}

/// The Linux command-line argument that declares a virtio-mmio device:
/// `virtio_mmio.device=<size>@<base>:<irq>`.
pub fn device_cmdline_arg(base: u64, size: u64, irq: u32) -> String {
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    let size = if size != 0 && size % MIB == 0 {
        format!("{}M", size / MIB)
    } else if size != 0 && size % KIB == 0 {
        format!("{}K", size / KIB)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
