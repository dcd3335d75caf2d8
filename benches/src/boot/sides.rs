//! The columns of the comparison and how each VMM is started for each kind
//! of boot: our VMM (`keystone vm run`, virtio-fs and vsock in-process),
//! QEMU's microvm machine (virtio-fs over vhost-user from a
//! `virtiofsd-lite` process, vsock over vhost-user from our backend in
//! this process) and the peers of `peers.rs`. Every VMM gets the same
//! kernel, command line (`cmdline.rs`), vCPUs and memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vmm::KvmKind;

use super::cmdline::{self, RootWords};
use super::peers::{self, PeerBoot};

/// QEMU's CPU model on a kvm_pvm host: qemu64 plus what our VMM's reduced
/// CPUID template offers (leaf 1 ECX SSE3, SSSE3, x2APIC, TSC-deadline).
/// qemu64 has no XSAVE, POPCNT, BMI or AVX; the command line clears CX16
/// and friends. qemu64 says AuthenticAMD: without XSAVEERPTR (leaf
/// 0x80000008 EBX, which our VMM passes through from the AMD host) the
/// guest sets X86_BUG_FXSAVE_LEAK and runs `fnclex`, which kvm_pvm cannot
/// emulate (measured: KVM internal error, emulation failure).
pub const QEMU_CPU_PVM: &str = "qemu64,+ssse3,+x2apic,+tsc-deadline,+xsaveerptr";

/// QEMU's CPU model for this kind of KVM: the tuned model above on
/// kvm_pvm, the host's own CPU on hardware KVM (as our VMM's `host`
/// template).
pub fn qemu_cpu_for(kind: KvmKind) -> &'static str {
    match kind {
        KvmKind::Pvm => QEMU_CPU_PVM,
        KvmKind::Hardware => "host",
    }
}

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

/// What every boot shares.
pub struct Guest {
    pub kernel: PathBuf,
    /// The busybox root directory (virtio-fs tag `root`).
    pub root_dir: PathBuf,
    /// `--initrd`: the marker boot uses this initramfs instead of the root.
    pub initrd: Option<PathBuf>,
    pub base_cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub timeout_s: u64,
    pub qemu_cpu: String,
}

/// How a VMM is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Keystone,
    Qemu(Accel),
    Firecracker,
    CloudHypervisor,
}

/// One column.
#[derive(Debug, Clone)]
pub struct Vmm {
    /// Its key in the JSON.
    pub key: String,
    pub label: String,
    pub engine: Engine,
    pub program: PathBuf,
}

/// Which boot.
pub enum Boot<'a> {
    /// To the user-space marker on the console.
    Marker,
    /// The guest agent as PID 1 with the root on virtio-fs, until it
    /// answers a ping; `initrd` is the agent initramfs (keystone has its own).
    Agent { initrd: Option<&'a Path> },
}

/// Everything needed to start one boot.
#[derive(Debug, Default)]
pub struct Plan {
    pub args: Vec<OsString>,
    /// The command line given (before the VMM's own device entries).
    pub cmdline: String,
    /// Written before the start (Firecracker's config file).
    pub config_file: Option<(PathBuf, String)>,
    /// A virtiofsd-lite process must serve the root on this socket.
    pub fs_socket: Option<PathBuf>,
    /// Our vsock backend must serve QEMU on this vhost-user socket.
    pub vhost_vsock: Option<PathBuf>,
    /// Where the agent is reached (hybrid vsock).
    pub agent_uds: Option<PathBuf>,
    /// Extra environment for the VMM.
    pub env: Vec<(String, PathBuf)>,
    /// Whether the VMM exits when the guest reboots.
    pub exits_on_reboot: bool,
    /// Stderr text that means the VMM is stuck for good.
    pub fatal_stderr: &'static [&'static str],
}

fn os(v: impl Into<OsString>) -> OsString {
    v.into()
}

/// The plan for `vmm` and `boot`; files go under `work` named after `tag`.
/// `Err` says why this VMM cannot make this boot.
pub fn plan(vmm: &Vmm, g: &Guest, boot: &Boot<'_>, work: &Path, tag: &str) -> Result<Plan, String> {
    let root = match (boot, &g.initrd) {
        (Boot::Agent { .. }, _) => RootWords::Agent,
        (Boot::Marker, Some(_)) => RootWords::Initramfs,
        (Boot::Marker, None) => RootWords::VirtioFs,
    };
    let cmdline = cmdline::full(&g.base_cmdline, root);
    let initrd: Option<&Path> = match boot {
        Boot::Agent { initrd } => *initrd,
        Boot::Marker => g.initrd.as_deref(),
    };
    let needs_fs = root != RootWords::Initramfs;
    let agent = matches!(boot, Boot::Agent { .. });
    let mut p = Plan {
        cmdline,
        exits_on_reboot: true,
        ..Plan::default()
    };
    if agent {
        p.agent_uds = Some(work.join(format!("{tag}.vsock")));
    }
    match vmm.engine {
        Engine::Keystone => {
            p.args = keystone_args(g, root, &p.cmdline);
            if agent {
                p.args.extend([os("--agent"), os("--vsock-uds")]);
                p.args.extend(p.agent_uds.clone().map(os));
                // Where keystone writes its agent initramfs, for the peers.
                p.env.push(("XDG_CACHE_HOME".into(), work.join("cache")));
            }
        }
        Engine::Qemu(accel) => {
            if agent && initrd.is_none() {
                return Err("no agent initramfs (keystone's agent boot did not write one)".into());
            }
            let fs = needs_fs.then(|| work.join(format!("{tag}.fs.sock")));
            p.args = qemu_args(g, accel, &p.cmdline, initrd, fs.as_deref());
            if agent {
                let vhost = work.join(format!("{tag}.vhost-vsock.sock"));
                let mut chardev = os("socket,id=vsock0,path=");
                chardev.push(&vhost);
                p.args.extend([
                    os("-chardev"),
                    chardev,
                    os("-device"),
                    os("vhost-user-vsock-device,chardev=vsock0"),
                ]);
                p.vhost_vsock = Some(vhost);
            }
            p.fs_socket = fs;
            p.fatal_stderr = &["KVM internal error", "emulation failure"];
        }
        Engine::Firecracker => {
            if agent {
                return Err("Firecracker has no virtio-fs, where the agent's root is".into());
            }
            if needs_fs {
                return Err("Firecracker has no virtio-fs: boot it with --initrd".into());
            }
            let config = work.join(format!("{tag}.firecracker.json"));
            let doc = peers::firecracker_config(&peer_boot(g, &p, initrd, None));
            p.args = peers::firecracker_args(&config);
            p.config_file = Some((config, doc.to_string()));
        }
        Engine::CloudHypervisor => {
            if agent && initrd.is_none() {
                return Err("no agent initramfs (keystone's agent boot did not write one)".into());
            }
            let fs = needs_fs.then(|| work.join(format!("{tag}.fs.sock")));
            p.args = peers::cloud_hypervisor_args(&peer_boot(g, &p, initrd, fs.as_deref()));
            p.fs_socket = fs;
            p.exits_on_reboot = false;
        }
    }
    Ok(p)
}

fn peer_boot<'a>(
    g: &'a Guest,
    p: &'a Plan,
    initrd: Option<&'a Path>,
    fs: Option<&'a Path>,
) -> PeerBoot<'a> {
    PeerBoot {
        kernel: &g.kernel,
        initrd,
        cmdline: &p.cmdline,
        vcpus: g.vcpus,
        memory_mib: g.memory_mib,
        fs_socket: fs,
        vsock_uds: p.agent_uds.as_deref(),
    }
}

/// `keystone vm run ...` for `root` (the agent flags are added by the caller).
fn keystone_args(g: &Guest, root: RootWords, full: &str) -> Vec<OsString> {
    let mut a = vec![os("vm"), os("run"), os("--kernel"), os(&g.kernel)];
    match (root, &g.initrd) {
        (RootWords::Initramfs, Some(initrd)) => a.extend([os("--initrd"), os(initrd)]),
        _ => a.extend([os("--root-dir"), os(&g.root_dir)]),
    }
    a.extend([
        os("--vcpus"),
        os(g.vcpus.to_string()),
        os("--memory"),
        os(g.memory_mib.to_string()),
        os("--timeout"),
        os(g.timeout_s.to_string()),
        os("--no-host-cmdline"),
        os("--cmdline"),
        os(cmdline::keystone_arg(full, root)),
    ]);
    a
}

/// QEMU microvm arguments: guest memory a shared memfd (vhost-user
/// devices map it), the root on vhost-user-fs at `fs` or an initramfs.
fn qemu_args(
    g: &Guest,
    accel: Accel,
    cmdline: &str,
    initrd: Option<&Path>,
    fs: Option<&Path>,
) -> Vec<OsString> {
    let m = g.memory_mib;
    let mut a = vec![
        os("-M"),
        os("microvm,x-option-roms=off,rtc=off,pit=on,pic=on,memory-backend=mem"),
        os("-accel"),
        os(accel.name()),
        os("-cpu"),
        os(match accel {
            // TCG cannot pass the host's CPU through.
            Accel::Tcg if g.qemu_cpu == "host" => "max",
            _ => &g.qemu_cpu,
        }),
        os("-smp"),
        os(g.vcpus.to_string()),
        os("-m"),
        os(format!("{m}M")),
        os("-object"),
        os(format!("memory-backend-memfd,id=mem,size={m}M,share=on")),
        os("-kernel"),
        os(&g.kernel),
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
    ];
    if let Some(initrd) = initrd {
        a.extend([os("-initrd"), os(initrd)]);
    }
    if let Some(socket) = fs {
        let mut chardev = os("socket,id=fs0,path=");
        chardev.push(socket);
        a.extend([
            os("-chardev"),
            chardev,
            os("-device"),
            os("vhost-user-fs-device,chardev=fs0,tag=root"),
        ]);
    }
    a
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
#[path = "sides_tests.rs"]
mod tests;
