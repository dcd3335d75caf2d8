//! x86_64: memory layout, boot protocol, CPU registers, CPUID and MP table.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod kernel_image;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod tsc;
