//! Boot-time register state of the vCPUs: long mode with identity-mapped
//! page tables, flat segments, the Linux 64-bit boot protocol registers, FPU
//! defaults, MSRs and the local APIC's LINT pins.
//!
//! Everything is computed by pure functions (unit-tested with fake memory);
//! [`configure_boot_vcpu`] and [`configure_lapic`] apply it with KVM ioctls.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const EFER_SCE: u64 = 0x1;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;

/// Errors configuring vCPU registers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegsError {
    /// The GDT or page tables could not be written.
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// KVM refused a register set.
    #[error("KVM rejected the vCPU {what}: {source}")]
    Kvm {
        /// Which registers.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM took only some of the boot MSRs.
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// Writes the GDT and an empty IDT, and returns the segment state.
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Writes identity-mapped page tables for the first 4 GiB (2 MiB pages) and
/// points CR3 at them.
pub fn write_page_tables<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for pd in 0..PDE_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(PDPTE_START + pd * 8))?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            mem.write_obj(phys | PRESENT_RW | HUGE, GuestAddress(pd_addr + i * 8))?;
        }
    }
    sregs.cr3 = PML4_START;
    Ok(())
}

/// Sets the control registers for long mode with paging.
pub fn set_long_mode(sregs: &mut kvm_sregs) {
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA | EFER_SCE;
}

/// The general registers of the Linux 64-bit boot protocol: entry point in
/// RIP, boot_params in RSI.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87 and SSE defaults (what a CPU has after FNINIT).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    ]
}

/// Sets up the boot vCPU: segments, page tables, long mode, registers, FPU.
pub fn configure_boot_vcpu<M: GuestMemoryBackend>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: GuestAddress,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    write_gdt(mem, &mut sregs)?;
    write_page_tables(mem, &mut sregs)?;
    set_long_mode(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm("registers"))?;
    Ok(())
}

/// FPU state and MSRs, for every vCPU.
pub fn configure_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(kvm("FPU state"))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would.
pub fn set_lint_pins(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Applies [`set_lint_pins`] to a vCPU's local APIC.
pub fn configure_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    set_lint_pins(&mut state);
    vcpu.set_lapic(&state).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        write_page_tables(&m, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(),
            PDPTE_START | 3
        );
        for pd in 0..PDE_COUNT {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + pd * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + pd * 0x1000) | 3);
        }
        // The entry for 0x4020_0000 (1 GiB + 2 MiB) maps itself.
        let e: u64 = m.read_obj(GuestAddress(PDE_START + 0x1000 + 8)).unwrap();
        assert_eq!(e, 0x4020_0000 | 0x83);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
    }

    #[test]
    fn gdt_and_segments_are_written() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        write_gdt(&m, &mut sregs).unwrap();
        for (i, e) in BOOT_GDT.iter().enumerate() {
            assert_eq!(
                m.read_obj::<u64>(GuestAddress(BOOT_GDT_START + i as u64 * 8))
                    .unwrap(),
                *e
            );
        }
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
    }

    #[test]
    fn long_mode_bits() {
        let mut sregs = kvm_sregs::default();
        set_long_mode(&mut sregs);
        assert_eq!(sregs.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn boot_protocol_registers() {
        let regs = boot_regs(GuestAddress(0x100_0000));
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 2);
        assert_eq!(boot_fpu().fcw, 0x37f);
        assert!(boot_msr_entries()
            .iter()
            .any(|e| e.index == MSR_IA32_MISC_ENABLE && e.data == 1));
    }

    #[test]
    fn lint_pins_route_extint_and_nmi() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0700);
        set_lint_pins(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&state, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
