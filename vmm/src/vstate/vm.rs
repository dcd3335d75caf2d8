//! The KVM VM: memory slots, the in-kernel irqchip and PIT, and the KVM
//! plumbing devices need (irqfds, ioeventfds).

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::HostKvm;
use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors creating or wiring the VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// The VM could not be created.
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    /// KVM refused a guest memory slot.
    #[error("KVM rejected guest memory slot {slot}: {source}")]
    MemorySlot {
        /// The slot.
        slot: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The in-kernel irqchip or PIT could not be set up.
    #[error("cannot set up the in-kernel {what}: {source}")]
    Irqchip {
        /// Which part.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be registered with KVM.
    #[error("cannot register {what}: {source}")]
    Register {
        /// What it was for.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its memory registered.
pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    /// Creates the VM, registers `mem` and sets up irqchip and PIT.
    pub fn new(host: &HostKvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = host.kvm.create_vm().map_err(VmError::Create)?;
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VM's owner keeps alive for as long as the VM exists.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        let irq = |what| move |source| VmError::Irqchip { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(irq("TSS"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(irq("identity map"))?;
        fd.create_irq_chip().map_err(irq("PIC/IO-APIC"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(irq("PIT"))?;
        Ok(Self { fd })
    }

    /// Routes writes to `evt` into interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Register {
                what: "irqfd",
                source,
            })
    }

    /// Signals `evt` when the guest writes `datamatch` (32-bit) at MMIO `addr`.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Register {
                what: "ioeventfd",
                source,
            })
    }
}
