//! Coalesced port I/O: guest writes KVM queues in a ring instead of
//! exiting, applied to the devices later by the VMM.
//!
//! The UART's transmit register (port 0x3f8) is the one zone: the Linux
//! 8250 console reads LSR and then writes THR for every character, so
//! each character cost two exits; with THR coalesced it costs one (the
//! LSR read), and on hardware KVM every exit saved is a guest/host round
//! trip. Where KVM lacks `KVM_CAP_COALESCED_PIO` (or the ring page cannot
//! be mapped), nothing is registered and every write exits as before.
//!
//! The rules that keep the guest's view exact:
//! - Order: a queued write happened before anything the guest does after
//!   it, so it is applied before any later exit is handled. Every vCPU
//!   drains the ring before it dispatches an exit (an empty ring costs two
//!   loads). This covers the registers that alias port 0x3f8: with LCR
//!   bit 7 (DLAB) set it is the divisor latch, and LCR (0x3fb) still
//!   exits, so a queued THR byte is applied before the LCR write that
//!   turns it into a divisor write, and a queued divisor byte before the
//!   LCR write that turns DLAB off.
//! - One consumer: the ring is VM-wide (one page for all vCPUs), so
//!   draining takes a VM-wide lock and applies entries while holding it;
//!   a vCPU that finds the ring empty without the lock knows every entry
//!   was already applied, since `first` moves past an entry only after it
//!   was applied.
//! - Latency: a vCPU that writes THR and then halts (HLT stays in the
//!   kernel with an in-kernel irqchip) makes no exit, so the VM's ticker
//!   thread drains every few milliseconds, and the VM drains once more
//!   when it stops, so the console log and its boot markers are complete.
//!
//! Lock order: the ring lock, then a device's lock (inside `Bus::write`);
//! nothing takes them the other way round.

pub mod ring;
#[cfg(test)]
mod ring_tests;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Cap, IoEventAddress, VcpuFd, VmFd};
use log_limit::log_limited;

use crate::devices::bus::Bus;
use crate::vstate::exit_stats::{ExitCount, Tally};
use ring::{RingEntry, RingPage};

/// A range of ports (or MMIO addresses) whose writes KVM coalesces.
pub struct Zone {
    /// Port I/O (true) or MMIO.
    pub pio: bool,
    /// First port or address.
    pub base: u64,
    /// Bytes in the zone.
    pub len: u32,
    /// Name in the accounting (`coalesced <name>`).
    pub name: String,
    writes: Tally,
}

impl Zone {
    /// A port I/O zone of `len` ports at `base`.
    pub fn pio(base: u16, len: u32, name: &str) -> Self {
        Self {
            pio: true,
            base: u64::from(base),
            len,
            name: name.to_string(),
            writes: Tally::default(),
        }
    }

    fn holds(&self, e: &RingEntry, len: usize) -> bool {
        e.pio == self.pio
            && e.addr >= self.base
            && e.addr.saturating_add(len as u64) <= self.base + u64::from(self.len)
    }
}

/// The VM's coalesced writes: the ring, its zones, and where entries go.
pub struct CoalescedIo {
    ring: RingPage,
    /// Held while draining: one consumer at a time.
    consumer: Mutex<()>,
    zones: Vec<Zone>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
}

impl CoalescedIo {
    /// A consumer of `ring` that applies entries in `zones` to the buses.
    pub fn new(ring: RingPage, zones: Vec<Zone>, io_bus: Arc<Bus>, mmio_bus: Arc<Bus>) -> Self {
        Self {
            ring,
            consumer: Mutex::new(()),
            zones,
            io_bus,
            mmio_bus,
        }
    }

    /// Registers `zones` with KVM and maps the ring through `vcpu` (any
    /// vCPU of `vm`; the page is VM-wide). `None`, with nothing
    /// registered, where KVM cannot coalesce them: the writes then exit
    /// as before.
    pub fn register(
        vm: &VmFd,
        vcpu: &VcpuFd,
        zones: Vec<Zone>,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
    ) -> Option<Self> {
        // The capability's value is the ring's page offset in the vCPU
        // mapping (0: no coalescing at all).
        let offset = vm.check_extension_int(Cap::CoalescedMmio);
        let pio = vm.check_extension(Cap::CoalescedPio);
        let Ok(offset @ 1..) = u32::try_from(offset) else {
            log::debug!("KVM has no coalesced MMIO; serial output exits per byte");
            return None;
        };
        // Map first: a zone registered without a reader would swallow
        // the guest's writes.
        let ring = match RingPage::map(vcpu, offset) {
            Ok(r) => r,
            Err(e) => {
                log::info!(
                    "cannot map KVM's coalesced I/O ring ({e}); serial output exits per byte"
                );
                return None;
            }
        };
        let mut kept = Vec::new();
        for zone in zones {
            if zone.pio && !pio {
                log::debug!(
                    "KVM has no coalesced port I/O; {} exits per write",
                    zone.name
                );
                continue;
            }
            let addr = match zone.pio {
                true => IoEventAddress::Pio(zone.base),
                false => IoEventAddress::Mmio(zone.base),
            };
            match vm.register_coalesced_mmio(addr, zone.len) {
                Ok(()) => kept.push(zone),
                Err(e) => log::info!(
                    "KVM refused to coalesce {} ({e}); it exits per write",
                    zone.name
                ),
            }
        }
        (!kept.is_empty()).then(|| Self::new(ring, kept, io_bus, mmio_bus))
    }

    /// Applies every write queued so far, in order; returns how many.
    /// Cheap when the ring is empty (no lock taken).
    pub fn drain(&self) -> usize {
        if self.ring.is_empty() {
            return 0;
        }
        let _one_consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        match self.ring.consume(|e| self.apply(e)) {
            Ok(n) => n,
            Err(e) => {
                log_limited!(log::Level::Warn, "{e}");
                0
            }
        }
    }

    fn apply(&self, e: RingEntry) {
        let Some(data) = e.data() else {
            log_limited!(
                log::Level::Warn,
                "coalesced write with a bad length skipped"
            );
            return;
        };
        // Only writes inside a zone we registered reach a device.
        let Some(zone) = self.zones.iter().find(|z| z.holds(&e, data.len())) else {
            log_limited!(
                log::Level::Warn,
                "coalesced write outside the registered zones skipped ({} {:#x})",
                if e.pio { "port" } else { "address" },
                e.addr
            );
            return;
        };
        let t0 = Instant::now();
        let bus = if e.pio { &self.io_bus } else { &self.mmio_bus };
        bus.write(e.addr, data);
        zone.writes.record(t0.elapsed());
    }

    /// Test only: the ring, to fill it as KVM would.
    #[cfg(test)]
    pub fn ring(&self) -> &RingPage {
        &self.ring
    }

    /// The writes applied per zone (`coalesced <zone>`): not exits, but
    /// what would have been.
    pub fn counts(&self) -> Vec<ExitCount> {
        self.zones
            .iter()
            .map(|z| z.writes.snapshot(&format!("coalesced {}", z.name)))
            .filter(|c| c.count > 0)
            .collect()
    }
}

/// Applies what the guest queued before an exit, then handles the exit:
/// the vCPU loop's dispatch (see the ordering rule above). Returns the
/// action and the time the exit itself took to handle (the drain is
/// accounted to the zones).
pub fn drain_then_handle(
    exit: kvm_ioctls::VcpuExit<'_>,
    io_bus: &Bus,
    mmio_bus: &Bus,
    coalesced: Option<&CoalescedIo>,
) -> (crate::vstate::exit::ExitAction, std::time::Duration) {
    if let Some(c) = coalesced {
        c.drain();
    }
    let t0 = Instant::now();
    let action = crate::vstate::exit::handle_kvm_exit(exit, io_bus, mmio_bus);
    (action, t0.elapsed())
}
