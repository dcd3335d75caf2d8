//! The guest-physical memory layout used for direct Linux boot.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_7000  boot_params (zero page)
//! 0x0000_0520  IDT (empty)              0x0000_9000  PML4, PDPT at 0xa000,
//! 0x0000_8ff0  initial stack top                     PDs at 0xb000..0xf000
//! 0x0002_0000  kernel command line      0x0009_fc00  MP table (in the EBDA)
//! 0x0010_0000  kernel (HIMEM)           0xd000_0000  MMIO gap (virtio-mmio)
//! 0x1_0000_0000 RAM above the gap, when the guest has more than fits below
//! ```

use vm_memory::GuestAddress;

/// Where the GDT goes.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT goes.
pub const BOOT_IDT_START: u64 = 0x520;
/// The boot_params ("zero page") handed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directories: four, so the identity map covers 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories after `PDE_START`.
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (the kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA, where the MP table lives. RAM below it is free.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The first virtio-mmio device window; each device takes `MMIO_DEVICE_SIZE`.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Local APIC base (fixed by the architecture).
pub const APIC_DEFAULT_PHYS_BASE: u64 = 0xfee0_0000;
/// IO-APIC base.
pub const IOAPIC_DEFAULT_PHYS_BASE: u64 = 0xfec0_0000;
/// KVM's TSS (three pages) and identity map page, just below the IO-APIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
/// KVM's identity map page (one page before the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// The first IRQ handed to virtio-mmio devices (0-4 are legacy devices).
pub const IRQ_BASE: u32 = 5;
/// The last IRQ the IO-APIC offers.
pub const IRQ_MAX: u32 = 23;

// The boot stack sits between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);

/// The RAM ranges for a guest of `size` bytes: below the MMIO gap, then
/// above 4 GiB for what does not fit.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = ram_ranges(8 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(big[0].1 as u64 + big[1].1 as u64, 8 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, PDE_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
            assert!(a.0 + a.1 <= EBDA_START);
        }
    }
}
