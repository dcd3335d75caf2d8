//! `vmm`: a minimal KVM virtual machine monitor.
//!
//! Boots a Linux kernel (vmlinux ELF or bzImage) directly, with no firmware,
//! on the host's `/dev/kvm`: guest memory backed by a memfd (so vhost-user
//! backends can map it), one thread per vCPU, an in-kernel irqchip and PIT,
//! a 16550 serial port, an i8042 for reset, a boot timer, and virtio-mmio
//! devices (vhost-user devices such as virtio-fs) announced on the kernel
//! command line.
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

pub mod arch;
pub mod config;
pub mod devices;
pub mod machine;
pub mod probe;
pub mod vstate;

pub use arch::x86_64::cpuid::{CpuTemplate, VirtExtension};
pub use config::{DeviceSpec, NestedMode, SerialOutput, VmBuilder, VmConfig};
pub use devices::legacy::{BootEvent, BootTimeline, ConsoleLog};
pub use machine::{start, NestedStatus, StartError, VmExit, VmHandle, VmInfo};
pub use vstate::exit::VmExitReason;
pub use vstate::kvm::{HostKvm, KvmKind};
