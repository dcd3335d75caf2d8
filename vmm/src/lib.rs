//! `vmm`: a minimal KVM virtual machine monitor.
//!
//! Boots a Linux kernel (vmlinux ELF or bzImage) directly, with no firmware,
//! on the host's `/dev/kvm`: guest memory backed by a memfd (so vhost-user
//! backends can map it), one thread per vCPU, an in-kernel irqchip and PIT,
//! a 16550 serial port, an i8042 for reset, a boot timer, and virtio-mmio
//! devices (vhost-user devices such as virtio-fs) announced on the kernel
//! command line.
//!
//! Exits are what a boot costs on hardware KVM, so the VMM avoids them
//! where it can: the serial port's transmit register is coalesced port
//! I/O (KVM queues the guest's writes in a ring instead of exiting, where
//! it has `KVM_CAP_COALESCED_PIO`), the guest's command line turns off
//! probes of hardware the VM lacks (`io_delay=none`, `pci=off`), and
//! [`VmHandle::exit_counts`] says what is left, by device and kind.
//!
//! The library never exits the process and never panics on guest input:
//! every failure is a typed error, and a VM that stops (reset, shutdown,
//! triple fault, emulation failure) is reported through [`VmHandle::wait`].
//!
//! ```no_run
//! let vm = vmm::VmBuilder::new("vmlinux").cmdline("console=ttyS0").start()?;
//! println!("{}", vm.wait().reason);
//! # Ok::<(), vmm::StartError>(())
//! ```

#![deny(missing_docs)]

//! The public surface is what an embedder needs: [`VmBuilder`] (or
//! [`VmConfig`] and [`start`]), the [`VmHandle`] of a running VM, the
//! devices it can be given ([`DeviceSpec`]: vhost-user virtio-fs and
//! vsock, whose backends run outside the VMM), and facts about the host
//! ([`host`]) and its KVM ([`probe`]). KVM, guest memory, boot and device
//! internals stay private.
//!
//! A vCPU is kicked out of KVM_RUN (to pause or stop it) with the
//! real-time signal [`host::vcpu_kick_signal`]: starting a VM installs an
//! empty handler for it in the process, so an embedder must not use that
//! signal for anything else.

mod arch;
mod config;
mod devices;
mod machine;
pub mod probe;
mod vstate;

pub use arch::x86_64::cpuid::{CpuTemplate, VirtExtension};
pub use config::{DeviceSpec, NestedMode, SerialOutput, VmBuilder, VmConfig};
pub use devices::legacy::{BootEvent, BootTimeline, ConsoleLog};
pub use machine::{start, DeviceError, NestedStatus, StartError, VmExit, VmHandle, VmInfo};
pub use vstate::exit::{RegsSnapshot, VmExitReason};
pub use vstate::exit_stats::ExitCount;
pub use vstate::kvm::KvmKind;

/// Facts about this host that embedders show or pass on.
pub mod host {
    pub use crate::arch::x86_64::tsc::host_khz as tsc_khz;
    pub use crate::devices::legacy::boot_timer::monotonic_ns;
    pub use crate::vstate::kvm::{
        detect_kind, kvm_facts, KvmError, KvmFacts, COMMON_GUEST_CMDLINE, PVM_GUEST_CMDLINE,
    };

    /// The real-time signal that kicks a vCPU out of KVM_RUN (SIGRTMIN+1);
    /// a started VM installs an empty handler for it.
    pub fn vcpu_kick_signal() -> i32 {
        crate::vstate::vcpu::vcpu_kick_signal()
    }
}

/// The errors a failed start carries ([`StartError`]'s sources).
pub mod error {
    pub use crate::arch::x86_64::boot::BootError;
    pub use crate::arch::x86_64::mptable::MptableError;
    pub use crate::arch::x86_64::regs::RegsError;
    pub use crate::vstate::kvm::KvmError;
    pub use crate::vstate::memory::MemoryError;
    pub use crate::vstate::vm::VmError;
}

/// The VMM's own virtio device models, for embedders and tests that drive
/// a vhost-user backend without booting a guest.
pub mod device {
    pub use crate::devices::virtio::vhost_user::{VhostUserDevice, VhostUserError};
    pub use crate::devices::virtio::VirtioDevice;
    pub use crate::vstate::memory::{create_memfd_memory, GuestMemoryMmap, MemoryError};
}
