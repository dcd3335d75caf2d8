//! CPUID for the guest, built from `KVM_GET_SUPPORTED_CPUID` through a named
//! template, plus per-vCPU topology and the nested-virtualization bits.
//!
//! - [`CpuTemplate::Host`]: everything the host's KVM supports.
//! - [`CpuTemplate::Baseline`]: the reduced set a trap-and-emulate host KVM
//!   (kvm_pvm) can run an unmodified kernel with: leaf 1 ECX keeps only
//!   SSE3, SSSE3, x2APIC, TSC-deadline and the hypervisor bit; leaves 7 and
//!   0xD are zeroed (no XSAVE, AVX, BMI, SMAP...); leaf 0x8000_0001 ECX keeps
//!   only LAHF/SAHF.
//!
//! Nested virtualization sets VMX (Intel) or SVM (AMD) when asked for and
//! when the host's supported CPUID offers it; otherwise the bits are cleared.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bits.
pub mod leaf1_ecx {
    pub const SSE3: u32 = 1 << 0;
    pub const VMX: u32 = 1 << 5;
    pub const SSSE3: u32 = 1 << 9;
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
}
/// Leaf 1 EDX bits.
pub mod leaf1_edx {
    pub const HTT: u32 = 1 << 28;
}
/// Leaf 0x8000_0001 ECX bits.
pub mod ext_leaf1_ecx {
    pub const LAHF_LM: u32 = 1 << 0;
    pub const SVM: u32 = 1 << 2;
}

const BASELINE_LEAF1_ECX: u32 = leaf1_ecx::SSE3
    | leaf1_ecx::SSSE3
    | leaf1_ecx::X2APIC
    | leaf1_ecx::TSC_DEADLINE
    | leaf1_ecx::HYPERVISOR;

/// A named CPUID template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything the host KVM supports.
    Host,
    /// The reduced feature set for trap-and-emulate host KVMs.
    Baseline,
}

impl CpuTemplate {
    /// The template's name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
        }
    }
}

impl std::str::FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "baseline" => Ok(CpuTemplate::Baseline),
            other => Err(format!(
                "unknown CPU template '{other}' (expected host, baseline or auto)"
            )),
        }
    }
}

/// Which hardware virtualization extension the supported CPUID offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtExtension {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
}

/// Finds VMX or SVM in the host's supported CPUID.
pub fn virt_extension(supported: &[kvm_cpuid_entry2]) -> Option<VirtExtension> {
    let find = |function| {
        supported
            .iter()
            .find(|e| e.function == function && e.index == 0)
    };
    if find(1).is_some_and(|e| e.ecx & leaf1_ecx::VMX != 0) {
        return Some(VirtExtension::Vmx);
    }
    if find(0x8000_0001).is_some_and(|e| e.ecx & ext_leaf1_ecx::SVM != 0) {
        return Some(VirtExtension::Svm);
    }
    None
}

/// Applies `template` to the host's supported entries, in place.
pub fn apply_template(entries: &mut [kvm_cpuid_entry2], template: CpuTemplate) {
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.ecx |= leaf1_ecx::HYPERVISOR;
        }
        if template == CpuTemplate::Baseline {
            match e.function {
                1 => e.ecx &= BASELINE_LEAF1_ECX | leaf1_ecx::VMX,
                7 | 0xd => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                0x8000_0001 => e.ecx &= ext_leaf1_ecx::LAHF_LM | ext_leaf1_ecx::SVM,
                _ => {}
            }
        }
    }
}

/// Sets or clears the VMX/SVM bits. `enable` is honoured only for the bit
/// the entries already carry (that is, the host offers).
pub fn set_nested(entries: &mut [kvm_cpuid_entry2], enable: bool) {
    for e in entries.iter_mut() {
        match e.function {
            1 if !enable => e.ecx &= !leaf1_ecx::VMX,
            0x8000_0001 if !enable => e.ecx &= !ext_leaf1_ecx::SVM,
            _ => {}
        }
    }
}

fn bits_for(count: u32) -> u32 {
    // Number of bits needed to number `count` items (0 for one item).
    32 - count.saturating_sub(1).leading_zeros()
}

/// Per-vCPU topology: APIC IDs in leaves 1, 0xB and 0x1F; one thread per
/// core, `vcpu_count` cores in one package.
pub fn set_topology(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, vcpu_count: u8) {
    let id = u32::from(vcpu_id);
    let count = u32::from(vcpu_count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                if count > 1 {
                    e.edx |= leaf1_edx::HTT;
                } else {
                    e.edx &= !leaf1_edx::HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing
                // this cache - 1 (one per core, except shared L3).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((count - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0),
            entry(1, 0, 0x7ffa_3223),
            entry(4, 3, 0),
            entry(7, 0, 0xffff_ffff),
            entry(0xb, 0, 0),
            entry(0xb, 1, 0),
            entry(0xd, 0, 0xffff_ffff),
            entry(0x8000_0001, 0, 0xffff_ffff),
        ]
    }

    fn get(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn baseline_reduces_to_the_emulable_set() {
        let mut e = host();
        apply_template(&mut e, CpuTemplate::Baseline);
        set_nested(&mut e, false);
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ecx & !BASELINE_LEAF1_ECX, 0, "ecx {:#x}", l1.ecx);
        assert_ne!(l1.ecx & leaf1_ecx::HYPERVISOR, 0);
        assert_ne!(l1.ecx & leaf1_ecx::X2APIC, 0);
        let l7 = get(&e, 7, 0);
        assert_eq!((l7.eax, l7.ebx, l7.ecx, l7.edx), (0, 0, 0, 0));
        assert_eq!(get(&e, 0xd, 0).ecx, 0);
        assert_eq!(get(&e, 0x8000_0001, 0).ecx, ext_leaf1_ecx::LAHF_LM);
    }

    #[test]
    fn host_template_keeps_features_and_sets_hypervisor() {
        let mut e = host();
        apply_template(&mut e, CpuTemplate::Host);
        assert_eq!(get(&e, 7, 0).ecx, 0xffff_ffff);
        assert_ne!(get(&e, 1, 0).ecx & leaf1_ecx::HYPERVISOR, 0);
    }

    #[test]
    fn nested_follows_the_host_offer() {
        let mut with_vmx = host();
        with_vmx[1].ecx |= leaf1_ecx::VMX;
        assert_eq!(virt_extension(&with_vmx), Some(VirtExtension::Vmx));
        apply_template(&mut with_vmx, CpuTemplate::Baseline);
        set_nested(&mut with_vmx, true);
        assert_ne!(get(&with_vmx, 1, 0).ecx & leaf1_ecx::VMX, 0);
        set_nested(&mut with_vmx, false);
        assert_eq!(get(&with_vmx, 1, 0).ecx & leaf1_ecx::VMX, 0);
        assert_eq!(get(&with_vmx, 0x8000_0001, 0).ecx & ext_leaf1_ecx::SVM, 0);

        let mut none = host();
        none[1].ecx &= !leaf1_ecx::VMX;
        none[7].ecx &= !ext_leaf1_ecx::SVM;
        assert_eq!(virt_extension(&none), None);
        let mut svm = none.clone();
        svm[7].ecx |= ext_leaf1_ecx::SVM;
        assert_eq!(virt_extension(&svm), Some(VirtExtension::Svm));
    }

    #[test]
    fn topology_numbers_each_vcpu() {
        let mut e = host();
        set_topology(&mut e, 3, 4);
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & leaf1_edx::HTT, 0);
        assert_eq!(get(&e, 0xb, 0).edx, 3);
        assert_eq!(get(&e, 0xb, 1).ebx, 4);
        assert_eq!(get(&e, 0xb, 1).eax, 2);
        assert_eq!(get(&e, 4, 3).eax >> 26, 3);

        let mut one = host();
        set_topology(&mut one, 0, 1);
        assert_eq!(get(&one, 1, 0).edx & leaf1_edx::HTT, 0);
        assert_eq!(get(&one, 0xb, 1).eax, 0);
    }

    #[test]
    fn template_names_parse() {
        assert_eq!("host".parse::<CpuTemplate>(), Ok(CpuTemplate::Host));
        assert_eq!("baseline".parse::<CpuTemplate>(), Ok(CpuTemplate::Baseline));
        assert!("fancy".parse::<CpuTemplate>().is_err());
    }
}
