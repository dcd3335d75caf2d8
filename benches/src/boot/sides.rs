//! The two sides of the comparison and how each is started: our VMM
//! (`keystone vm run`, virtio-fs served in-process) and QEMU's microvm
//! machine (virtio-fs over vhost-user from a `virtiofsd-lite` process),
//! with the same kernel, command line, memory and one vCPU.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vmm::vstate::kvm::{COMMON_GUEST_CMDLINE, PVM_GUEST_CMDLINE};

/// QEMU's CPU model: qemu64 plus what our VMM's reduced CPUID template
/// offers (leaf 1 ECX SSE3, SSSE3, x2APIC, TSC-deadline). qemu64 has no
/// XSAVE, POPCNT, BMI or AVX; the command line clears CX16 and friends.
/// qemu64 says AuthenticAMD: without XSAVEERPTR (leaf 0x80000008 EBX,
/// which our VMM passes through from the AMD host) the guest sets
/// X86_BUG_FXSAVE_LEAK and runs `fnclex`, which this KVM cannot emulate
/// (measured: KVM internal error, emulation failure), so it is added.
/// This KVM filters pni and ssse3 out (QEMU warns); x2apic and
/// tsc-deadline stay.
pub const QEMU_CPU: &str = "qemu64,+ssse3,+x2apic,+tsc-deadline,+xsaveerptr";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Files every boot needs.
pub struct Inputs {
    pub keystone: PathBuf,
    pub virtiofsd: PathBuf,
    pub qemu: PathBuf,
    pub qemu_cpu: String,
    pub strace: Option<PathBuf>,
    pub kernel: PathBuf,
    pub root_dir: PathBuf,
    pub memory_mib: u64,
    pub timeout_s: u64,
}

fn os(v: impl Into<OsString>) -> OsString {
    v.into()
}

/// `keystone vm run ...` arguments (ours adds console, root and host options).
pub fn keystone_args(i: &Inputs, timings_json: Option<&Path>) -> Vec<OsString> {
    let mut a = vec![
        os("vm"),
        os("run"),
        os("--kernel"),
        os(&i.kernel),
        os("--root-dir"),
        os(&i.root_dir),
        os("--vcpus"),
        os("1"),
        os("--memory"),
        os(i.memory_mib.to_string()),
        os("--timeout"),
        os(i.timeout_s.to_string()),
    ];
    if let Some(t) = timings_json {
        a.push(os("--timings-json"));
        a.push(os(t));
    }
    a
}

/// QEMU microvm arguments for `accel`, with the root on vhost-user-fs at `socket`.
pub fn qemu_args(i: &Inputs, accel: Accel, cmdline: &str, socket: &Path) -> Vec<OsString> {
    let m = i.memory_mib;
    let mut chardev = os("socket,id=fs0,path=");
    chardev.push(socket);
    vec![
        os("-M"),
        os("microvm,x-option-roms=off,rtc=off,pit=on,pic=on,memory-backend=mem"),
        os("-accel"),
        os(accel.name()),
        os("-cpu"),
        os(&i.qemu_cpu),
        os("-smp"),
        os("1"),
        os("-m"),
        os(format!("{m}M")),
        os("-object"),
        os(format!("memory-backend-memfd,id=mem,size={m}M,share=on")),
        os("-kernel"),
        os(&i.kernel),
        os("-append"),
        os(cmdline),
        os("-nodefaults"),
        os("-no-user-config"),
        os("-display"),
        os("none"),
        os("-monitor"),
        os("none"),
        os("-serial"),
        os("stdio"),
        os("-no-reboot"),
        os("-chardev"),
        chardev,
        os("-device"),
        os("vhost-user-fs-device,chardev=fs0,tag=root"),
    ]
}

/// Our VMM's final command line without its `virtio_mmio.device=` entries:
/// QEMU's microvm adds its own for its devices (auto-kernel-cmdline).
pub fn without_device_args(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|t| !t.starts_with("virtio_mmio.device="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command line ours builds on this kind of host, for when its boot
/// did not print one (same parts, same order as `keystone vm run`).
pub fn fallback_cmdline() -> String {
    let base = format!(
        "console=ttyS0  root=root rootfstype=virtiofs rw init=/init {COMMON_GUEST_CMDLINE}"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        format!("{base} {PVM_GUEST_CMDLINE}")
    } else {
        base
    }
}

/// Shell-quoted command line, for the report.
pub fn display(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=/.,:+@".contains(c))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_device_args() {
        let c = "console=ttyS0 rw virtio_mmio.device=4K@0xd0000000:5 reboot=k";
        assert_eq!(without_device_args(c), "console=ttyS0 rw reboot=k");
    }

    #[test]
    fn quotes_for_display() {
        let s = display(Path::new("/q"), &[os("-append"), os("a b")]);
        assert_eq!(s, "/q -append 'a b'");
    }
}
