//! The Intel MultiProcessor Specification 1.4 table: tells the guest about
//! its vCPUs, the IO-APIC and how ISA IRQs 0-23 are wired, so SMP guests boot
//! without ACPI tables.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IOAPIC_DEFAULT_PHYS_BASE, IRQ_MAX};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTSRC: u8 = 3;
const ENTRY_LOCALINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

/// The largest vCPU count the table (and the VMM) supports.
pub const MAX_VCPUS: u8 = 64;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    product: [u8; 12],
    oem_ptr: u32,
    oem_size: u16,
    entry_count: u16,
    lapic: u32,
    ext_length: u16,
    ext_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct CpuEntry {
    kind: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    kind: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApicEntry {
    kind: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    address: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    kind: u8,
    irq_type: u8,
    irq_flags: u16,
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

// SAFETY: all of these are packed plain-old-data structs of integers and
// byte arrays: every bit pattern is valid and there is no padding.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for CpuEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MptableError {
    /// More vCPUs than the MP table describes.
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The table could not be written.
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `num_cpus`
/// vCPUs as they are laid out at `base`.
fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut body = Vec::new();
    let mut entries = 0u16;
    for id in 0..num_cpus {
        let cpu = CpuEntry {
            kind: ENTRY_PROCESSOR,
            apic_id: id,
            apic_version: APIC_VERSION,
            flags: CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 },
            signature: CPU_STEPPING,
            features: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        body.extend_from_slice(cpu.as_slice());
        entries += 1;
    }
    let bus = BusEntry {
        kind: ENTRY_BUS,
        bus_id: BUS_ID_ISA,
        bus_type: *b"ISA   ",
    };
    body.extend_from_slice(bus.as_slice());
    let ioapic = IoApicEntry {
        kind: ENTRY_IOAPIC,
        apic_id: ioapic_id,
        apic_version: IOAPIC_VERSION,
        flags: 1,
        address: IOAPIC_DEFAULT_PHYS_BASE as u32,
    };
    body.extend_from_slice(ioapic.as_slice());
    entries += 2;
    for irq in 0..=IRQ_MAX as u8 {
        let int = InterruptEntry {
            kind: ENTRY_IOINTSRC,
            irq_type: INT_TYPE_INT,
            irq_flags: 0, // conforms to the bus: ISA, edge, active high
            src_bus: BUS_ID_ISA,
            src_irq: irq,
            dst_apic: ioapic_id,
            dst_pin: irq,
        };
        body.extend_from_slice(int.as_slice());
        entries += 1;
    }
    for (irq_type, pin) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        let lint = InterruptEntry {
            kind: ENTRY_LOCALINTSRC,
            irq_type,
            irq_flags: 0,
            src_bus: BUS_ID_ISA,
            src_irq: 0,
            dst_apic: 0xff,
            dst_pin: pin,
        };
        body.extend_from_slice(lint.as_slice());
        entries += 1;
    }

    let header_len = std::mem::size_of::<ConfigHeader>();
    let mut header = ConfigHeader {
        signature: *b"PCMP",
        length: (header_len + body.len()) as u16,
        spec: SPEC_REV,
        checksum: 0,
        oem: *b"KEYSTONE",
        product: *b"MICROVM     ",
        entry_count: entries,
        lapic: APIC_DEFAULT_PHYS_BASE as u32,
        ..Default::default()
    };
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&body);
    header.checksum = checksum(&table);
    table[..header_len].copy_from_slice(header.as_slice());

    let fp_len = std::mem::size_of::<FloatingPointer>();
    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        physptr: (base + fp_len as u64) as u32,
        length: 1, // in 16-byte units
        specification: SPEC_REV,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());
    let mut out = fp.as_slice().to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let bytes = build(num_cpus, EBDA_START);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn checksums_and_counts_are_valid() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_mptable(&mem, 4).unwrap();
        let fp: FloatingPointer = mem.read_obj(GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp.signature, b"_MP_");
        assert_eq!(checksum(fp.as_slice()), 0);
        let table_addr = fp.physptr as u64;
        let header: ConfigHeader = mem.read_obj(GuestAddress(table_addr)).unwrap();
        assert_eq!(&header.signature, b"PCMP");
        let len = header.length as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(checksum(&table), 0);
        // 4 CPUs, bus, IO-APIC, 24 IRQs, 2 local interrupts.
        assert_eq!({ header.entry_count }, 4 + 2 + 24 + 2);
        let first_cpu: CpuEntry = mem
            .read_obj(GuestAddress(
                table_addr + std::mem::size_of::<ConfigHeader>() as u64,
            ))
            .unwrap();
        assert_eq!(first_cpu.flags, CPU_ENABLED | CPU_BOOTPROCESSOR);
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            write_mptable(&mem, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(write_mptable(&mem, MAX_VCPUS + 1).is_err());
        write_mptable(&mem, MAX_VCPUS).unwrap();
    }
}
