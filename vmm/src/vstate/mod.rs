//! The KVM-facing state of a VM: the host's KVM, guest memory, the VM and
//! its vCPUs, how vCPU exits are dispatched, and the guest writes KVM
//! coalesces instead of exiting.

pub mod coalesced;
pub mod exit;
pub mod exit_stats;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
