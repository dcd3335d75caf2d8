//! What kind of KVM this host has, and what that means for the guest.
//!
//! A hardware KVM (VMX/SVM) runs any guest at native speed. A paravirtual
//! KVM such as `kvm_pvm` (the module present when the host itself is a VM
//! without nested virtualization) emulates the guest kernel in a
//! trap-and-emulate mode: it needs the `baseline` CPUID template and a few
//! kernel command-line options (see [`HostKvm::guest_cmdline_extras`]).

use std::path::Path;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

use crate::arch::x86_64::cpuid::{virt_extension, CpuTemplate, VirtExtension};

/// The kind of `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware-assisted KVM (kvm_intel or kvm_amd).
    Hardware,
    /// Paravirtual KVM (kvm_pvm): the guest kernel is emulated, slowly.
    Pvm,
}

impl KvmKind {
    /// A short name for status output.
    pub fn name(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Pvm => "pvm",
        }
    }
}

/// Errors opening or probing `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0}; is KVM enabled (kvm_intel/kvm_amd/kvm_pvm loaded) and are you in the 'kvm' group?")]
    Open(kvm_ioctls::Error),
    /// The kernel's KVM speaks another API version.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// KVM would not say which CPUID it supports.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

/// What this host's KVM is and can give a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmFacts {
    /// Hardware or paravirtual.
    pub kind: KvmKind,
    /// VMX or SVM, when KVM can give them to a guest.
    pub nested: Option<VirtExtension>,
    /// The CPUID template a guest gets here by default.
    pub template: CpuTemplate,
}

/// Opens `/dev/kvm` and says what it is.
pub fn kvm_facts() -> Result<KvmFacts, KvmError> {
    let host = HostKvm::open()?;
    Ok(KvmFacts {
        kind: host.kind,
        nested: host.nested,
        template: host.recommended_template(),
    })
}

/// The host's KVM, probed once.
pub struct HostKvm {
    /// The open `/dev/kvm`.
    pub kvm: Kvm,
    /// Hardware or paravirtual.
    pub kind: KvmKind,
    /// VMX or SVM, when KVM can give them to a guest (nested virtualization).
    pub nested: Option<VirtExtension>,
    /// What `KVM_GET_SUPPORTED_CPUID` returned.
    pub supported_cpuid: kvm_bindings::CpuId,
}

/// The command-line options a guest kernel needs on a `kvm_pvm` host: no
/// XSAVE, CPU features the emulator lacks cleared, no INT3 self-test, a
/// fixed loops-per-jiffy and TSC (calibration is too slow under emulation),
/// reboot through the keyboard controller, and SYSCALL completion from the
/// page-fault handler (`syscall_via_idt`, from our guest kernel patch).
pub const PVM_GUEST_CMDLINE: &str = "noxsave clearcpuid=cx16,popcnt,smap,fsgsbase,pku,rdpid,rtm,hle,rdrand,rdseed,serialize,invpcid,pcid nosmap no_int3_selftest nokaslr lpj=5000000 tsc=reliable syscall_via_idt";

/// Options every guest of ours gets, whatever the host: reboot through the
/// keyboard controller (the i8042 ends the VM), no waiting after a panic,
/// no port 0x80 writes between PIT/PIC accesses (`io_delay=none`), and no
/// PCI probing (`pci=off`): the VM has no PCI bus, and the probe (the
/// early-quirks scan of bus 0, then the conf1/conf2 checks) was some 80
/// exits to unclaimed ports 0xcf8-0xcff per boot.
pub const COMMON_GUEST_CMDLINE: &str = "reboot=k panic=-1 io_delay=none pci=off";

/// Tells a paravirtual KVM from a hardware one by the loaded module.
pub fn detect_kind(sys_module: &Path) -> KvmKind {
    if sys_module.join("kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

impl HostKvm {
    /// Opens `/dev/kvm` and probes it.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        let nested = virt_extension(supported_cpuid.as_slice());
        Ok(Self {
            kvm,
            kind: detect_kind(Path::new("/sys/module")),
            nested,
            supported_cpuid,
        })
    }

    /// The CPUID template this host needs.
    pub fn recommended_template(&self) -> CpuTemplate {
        match self.kind {
            KvmKind::Hardware => CpuTemplate::Host,
            KvmKind::Pvm => CpuTemplate::Baseline,
        }
    }

    /// Command-line options a guest kernel needs on this host.
    pub fn guest_cmdline_extras(&self) -> &'static str {
        match self.kind {
            KvmKind::Hardware => "",
            KvmKind::Pvm => PVM_GUEST_CMDLINE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_by_module() {
        let dir = std::env::temp_dir().join(format!("vmm-kvm-kind-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(detect_kind(&dir), KvmKind::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(detect_kind(&dir), KvmKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pvm_cmdline_carries_the_workarounds() {
        for opt in [
            "syscall_via_idt",
            "noxsave",
            "no_int3_selftest",
            "lpj=",
            "nokaslr",
        ] {
            assert!(PVM_GUEST_CMDLINE.contains(opt), "{opt}");
        }
        for opt in ["reboot=k", "io_delay=none", "pci=off"] {
            assert!(COMMON_GUEST_CMDLINE.contains(opt), "{opt}");
        }
    }
}
