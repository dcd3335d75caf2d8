//! Which engine runs the guest, and the pure parts of launching it: the
//! sandbox folder layout, kernel command lines and QEMU's arguments.

use std::path::{Path, PathBuf};

use vmm::KvmKind;

use super::super::config::{Engine, Network};
use super::super::registry::SandboxPaths;
use super::super::state::NestedStatus;

/// QEMU's system emulator (engine `qemu`).
pub const QEMU: &str = "qemu-system-x86_64";
/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;
/// The guest user commands run as by default (uid/gid 1000 in the rootfs).
pub const GUEST_USER: &str = "agent";
pub const GUEST_UID: u32 = 1000;
/// Where the sandbox's clone appears in the guest.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// The two engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Our VMM on KVM, in the supervisor process.
    Vmm,
    /// `qemu-system-x86_64 -accel tcg`, with our vhost-user daemons.
    Qemu,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Qemu => "qemu",
        }
    }
}

/// What the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` can be opened read-write, and which kind it is.
    pub kvm: Option<KvmKind>,
    /// `qemu-system-x86_64` runs.
    pub qemu: bool,
}

impl HostFacts {
    pub fn detect() -> Self {
        let kvm_ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let qemu = std::process::Command::new(QEMU)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Self {
            kvm: kvm_ok.then(|| vmm::host::detect_kind(Path::new("/sys/module"))),
            qemu,
        }
    }
}

/// The engine picked and why (for the banner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineChoice {
    pub engine: EngineKind,
    pub reason: String,
}

const QEMU_MISSING: &str =
    "qemu-system-x86_64 is not installed (Debian/Ubuntu: apt-get install qemu-system-x86)";
const KVM_MISSING: &str = "/dev/kvm is missing or not accessible (load kvm_intel/kvm_amd, or add yourself to the kvm group)";

/// Why no engine can run the guest on this host (a requirements failure,
/// exit 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoEngine {
    /// `engine = "vmm"`, and no usable `/dev/kvm`.
    #[error(
        "engine vmm needs KVM: {}; or set [backend.microvm] engine = \"qemu\" \
         in ~/.config/keystone/agent.toml to use QEMU's software emulation",
        KVM_MISSING
    )]
    VmmWithoutKvm,
    /// `engine = "qemu"`, and no QEMU.
    #[error("engine qemu needs QEMU: {}", QEMU_MISSING)]
    QemuMissing,
    /// `engine = "auto"`, and neither.
    #[error(
        "no engine can run here: {}, and {} for the fallback engine = \"qemu\"",
        KVM_MISSING,
        QEMU_MISSING
    )]
    Neither,
}

/// Picks the engine for `requested` on `host`.
pub fn choose(requested: Engine, host: &HostFacts) -> Result<EngineChoice, NoEngine> {
    let pick = |engine, reason: &str| {
        Ok(EngineChoice {
            engine,
            reason: reason.to_string(),
        })
    };
    match requested {
        Engine::Vmm => match host.kvm {
            Some(_) => pick(EngineKind::Vmm, "engine = \"vmm\" in the configuration"),
            None => Err(NoEngine::VmmWithoutKvm),
        },
        Engine::Qemu => {
            if host.qemu {
                pick(EngineKind::Qemu, "engine = \"qemu\" in the configuration")
            } else {
                Err(NoEngine::QemuMissing)
            }
        }
        Engine::Auto => match (host.kvm, host.qemu) {
            (Some(KvmKind::Hardware), _) => pick(EngineKind::Vmm, "hardware KVM"),
            (Some(KvmKind::Pvm), true) => pick(
                EngineKind::Qemu,
                "this host's KVM is paravirtual (kvm_pvm): our VMM would emulate the guest \
                 kernel ~30x slower than QEMU's TCG runs it",
            ),
            (Some(KvmKind::Pvm), false) => pick(
                EngineKind::Vmm,
                "paravirtual KVM (kvm_pvm) and no qemu-system-x86_64: our VMM, slow here",
            ),
            (None, true) => pick(
                EngineKind::Qemu,
                "no usable /dev/kvm: QEMU's software emulation",
            ),
            (None, false) => Err(NoEngine::Neither),
        },
    }
}

/// QEMU's CPU model for a guest with nested virtualization: TCG emulates
/// AMD SVM with nested paging.
pub const QEMU_NESTED_CPU: &str = "max";
/// QEMU's `-sandbox` setting (its seccomp filter).
pub const QEMU_SECCOMP: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// QEMU's CPU model with nested virtualization hidden.
pub const QEMU_PLAIN_CPU: &str = "max,-svm";

/// What the QEMU engine gives the guest: TCG emulates AMD SVM with nested
/// paging ([`QEMU_NESTED_CPU`]), on any host; `--no-nested` hides it.
pub fn qemu_nested(wanted: bool) -> (NestedStatus, String) {
    if wanted {
        (
            NestedStatus::Enabled,
            format!(
                "SVM emulated by QEMU's TCG (-cpu {QEMU_NESTED_CPU}); /dev/kvm in the guest, \
                 for the kvm group"
            ),
        )
    } else {
        (
            NestedStatus::Disabled,
            format!("SVM hidden from the guest (-cpu {QEMU_PLAIN_CPU})"),
        )
    }
}

/// What our VMM gave the guest, as it reported it.
pub fn vmm_nested(wanted: bool, got: &vmm::NestedStatus) -> (NestedStatus, String) {
    nested_from(wanted, got.enabled, got.warning.as_deref())
}

/// [`vmm_nested`] from its parts: the extension given, the VMM's warning.
fn nested_from(
    wanted: bool,
    enabled: Option<vmm::VirtExtension>,
    warning: Option<&str>,
) -> (NestedStatus, String) {
    match (enabled, warning) {
        (Some(ext), _) => (
            NestedStatus::Enabled,
            format!(
                "{} from the host's KVM; /dev/kvm in the guest, for the kvm group",
                format!("{ext:?}").to_uppercase()
            ),
        ),
        (None, Some(why)) => (NestedStatus::Unavailable, why.to_string()),
        (None, None) if wanted => (
            NestedStatus::Unavailable,
            "the VMM gave the guest no VMX/SVM".to_string(),
        ),
        (None, None) => (
            NestedStatus::Disabled,
            "VMX/SVM cleared from the guest's CPUID".to_string(),
        ),
    }
}

/// The files of one sandbox the backend uses (under its folder).
#[derive(Clone, Debug)]
pub struct Layout {
    /// The sandbox-private clone, shared as `/workspace`.
    pub workspace: PathBuf,
    /// The `state` share: `upper/` and `work/` of the root overlay.
    pub state: PathBuf,
    /// The hybrid vsock socket (`CONNECT <port>\n`).
    pub vsock: PathBuf,
    /// vhost-user sockets (engine qemu) and pid files.
    pub run: PathBuf,
    pub supervisor_log: PathBuf,
    pub console_log: PathBuf,
}

impl Layout {
    pub fn new(paths: &SandboxPaths) -> Self {
        Self {
            workspace: paths.disk.join("workspace"),
            state: paths.disk.join("state"),
            vsock: paths.dir.join("vsock.sock"),
            run: paths.dir.join("run"),
            supervisor_log: paths.logs.join("supervisor.log"),
            console_log: paths.logs.join("console.log"),
        }
    }

    /// The vhost-user socket of a share.
    pub fn fs_socket(&self, share: Share) -> PathBuf {
        let name = format!("fs-{}.sock", share.tag());
        match share {
            // Its own folder, mode 0700 like the run folder (see `run_dir`).
            Share::Workspace => self.workspace_run().join(name),
            Share::Root | Share::State => self.run.join(name),
        }
    }

    /// The folder of the workspace daemon's socket.
    pub fn workspace_run(&self) -> PathBuf {
        self.run.join("ws")
    }

    /// The vhost-user socket of the vsock device (engine qemu).
    pub fn vsock_vhost_socket(&self) -> PathBuf {
        self.run.join("vsock-vhost.sock")
    }

    /// The socket QEMU writes the guest's console to (engine qemu); the
    /// supervisor writes it into the bounded console log.
    pub fn console_socket(&self) -> PathBuf {
        self.run.join("console.sock")
    }

    /// The QEMU process id, while one runs.
    pub fn qemu_pid(&self) -> PathBuf {
        self.run.join("qemu.pid")
    }

    /// Every Unix socket path, to check against the 107-byte limit.
    pub fn sockets(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Share::ALL.iter().map(|s| self.fs_socket(*s)).collect();
        v.push(self.vsock_vhost_socket());
        v.push(self.vsock.clone());
        v
    }
}

/// The sandbox's three virtio-fs shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// The guest image's root directory, read-only.
    Root,
    /// The root overlay's writable layer (`upper/`, `work/`).
    State,
    /// The sandbox-private clone, at `/workspace`.
    Workspace,
}

impl Share {
    /// Every share, in the order the guest's devices get them.
    pub const ALL: [Share; 3] = [Share::Root, Share::State, Share::Workspace];

    /// The virtio-fs tag the guest mounts (`keystone.<tag>=` names it).
    pub fn tag(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::State => "state",
            Self::Workspace => "workspace",
        }
    }

    /// Whether the guest may only read it.
    pub fn readonly(self) -> bool {
        self == Self::Root
    }
}

/// The longest Unix socket path (sun_path holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Under QEMU TCG: a fixed loops-per-jiffy and trusted TSC (calibration is
/// slow and can hang), triple-fault reboot (microvm has no i8042), and
/// `panic=-1` so a dead guest ends QEMU (`-no-reboot`).
pub const QEMU_BASE_CMDLINE: &str =
    "console=ttyS0 lpj=5000000 tsc=reliable reboot=t panic=-1 nokaslr";

/// The local APIC timer's ticks per jiffy, which both engines know: QEMU's
/// emulated APIC and KVM's in-kernel one count at 1 GHz, and the guest
/// kernel runs at HZ=100 (`keystone.config`). Our kernel's
/// `lapic_timer_period=` (patches/0004) takes it instead of measuring it
/// against the PIT, which costs some 0.3 s of a boot under emulation.
pub const LAPIC_TIMER_PERIOD: &str = "lapic_timer_period=10000000";

/// The vCPUs the QEMU engine gives a guest that asked for `asked`, on a
/// host with `host_cores` cores: at most one per core, since software
/// emulation runs each vCPU on a host thread, and vCPUs beyond the cores
/// only add bring-up and scheduling cost (on a 2-core host, 4 vCPUs
/// boot some 0.1 s slower than 2 and run no faster).
pub fn qemu_vcpus(asked: u32, host_cores: usize) -> u32 {
    let cores = u32::try_from(host_cores).unwrap_or(u32::MAX).max(1);
    asked.clamp(1, cores)
}

/// The host's cores, as this process may use them.
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// What a guest bigger than this boots with, MiB: the rest comes after
/// ready (see [`boot_memory`]).
pub const BOOT_MEMORY_MIB: u32 = 1024;

/// The memory a guest of `memory_mib` boots with, when that is less than
/// all of it: a kernel sets up the page structures of all the memory it
/// boots with before it runs `/init` (some 0.4 s for 8 GiB under QEMU's
/// TCG), so a guest whose kernel can take memory later (`kernel_can`, see
/// `guest_image::kernel::adds_memory_after_boot`) boots with
/// [`BOOT_MEMORY_MIB`] and its agent adds the rest once the sandbox is
/// ready (`AddMemory`).
pub fn boot_memory(memory_mib: u32, kernel_can: bool) -> Option<u32> {
    (kernel_can && memory_mib > BOOT_MEMORY_MIB).then_some(BOOT_MEMORY_MIB)
}

/// The guest kernel command line for `engine`. Our VMM adds its own host
/// options (`reboot=k`, the kvm_pvm workarounds) to it. `keystone.network`
/// lets the guest agent's proxy tell a sandbox without network from one
/// whose network is not up yet. `tsc_khz` (the host's TSC frequency, which
/// is the guest's under QEMU's TCG) spares the guest a calibration that
/// fails on a loaded host and leaves it with no TSC, and then with a KVM
/// whose every KVM_RUN hangs (see `vmm::arch::x86_64::tsc`).
/// `boot_memory_mib` (from [`boot_memory`]) limits what the guest boots
/// with (`mem=`), and puts the page structures of what is added later in
/// that memory itself.
pub fn guest_cmdline(
    engine: EngineKind,
    hostname: &str,
    network: Network,
    tsc_khz: Option<u32>,
    boot_memory_mib: Option<u32>,
) -> String {
    let base = match engine {
        EngineKind::Qemu => QEMU_BASE_CMDLINE,
        EngineKind::Vmm => "console=ttyS0",
    };
    let tsc = tsc_khz
        .map(|khz| format!(" tsc_early_khz={khz}"))
        .unwrap_or_default();
    let memory = boot_memory_mib
        .map(|mib| format!(" mem={mib}M memory_hotplug.memmap_on_memory=1"))
        .unwrap_or_default();
    let base = format!("{base} {LAPIC_TIMER_PERIOD}{memory}");
    // `bridge` is not available and means nat (start says so).
    let network = match network {
        Network::None => "none",
        Network::Nat | Network::Bridge => "nat",
    };
    format!(
        "{base}{tsc} quiet keystone.root=root keystone.state=state \
         keystone.workspace=workspace keystone.hostname={hostname} keystone.network={network}"
    )
}

/// Everything QEMU needs to boot a sandbox.
#[derive(Clone, Debug)]
pub struct QemuPlan {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Whether the guest sees SVM (see [`qemu_nested`]).
    pub nested: bool,
    pub cmdline: String,
    /// (vhost-user socket, tag) per virtio-fs share.
    pub shares: Vec<(PathBuf, String)>,
    pub vsock_socket: PathBuf,
    /// Where the supervisor listens for the serial console.
    pub console_socket: PathBuf,
}

/// QEMU's argument list (without the program) for `plan`.
pub fn qemu_args(plan: &QemuPlan) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "microvm,x-option-roms=off,rtc=on,pit=on,pic=on,acpi=off,memory-backend=mem",
        "-accel",
        "tcg",
        "-cpu",
        if plan.nested {
            QEMU_NESTED_CPU
        } else {
            QEMU_PLAIN_CPU
        },
        "-smp",
        &plan.vcpus.to_string(),
        "-m",
        &format!("{}M", plan.memory_mib),
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            plan.memory_mib
        ),
        "-kernel",
        &plan.kernel.display().to_string(),
        "-initrd",
        &plan.initrd.display().to_string(),
        "-append",
        &plan.cmdline,
        "-nodefaults",
        "-no-user-config",
        // QEMU's seccomp filter: the process that emulates a hostile guest
        // may not exec, fork, change its privileges or use obsolete calls.
        "-sandbox",
        QEMU_SECCOMP,
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-chardev",
        &format!("socket,id=console,path={}", plan.console_socket.display()),
        "-serial",
        "chardev:console",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, (socket, tag)) in plan.shares.iter().enumerate() {
        a.push("-chardev".into());
        a.push(format!("socket,id=fs{i},path={}", socket.display()));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"));
    }
    a.push("-chardev".into());
    a.push(format!(
        "socket,id=vsock,path={}",
        plan.vsock_socket.display()
    ));
    a.push("-device".into());
    a.push("vhost-user-vsock-device,chardev=vsock".into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_qemu_on_kvm_pvm_and_vmm_on_hardware() {
        let pvm = HostFacts {
            kvm: Some(KvmKind::Pvm),
            qemu: true,
        };
        let c = choose(Engine::Auto, &pvm).unwrap();
        assert_eq!(c.engine, EngineKind::Qemu);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
        let hw = HostFacts {
            kvm: Some(KvmKind::Hardware),
            qemu: true,
        };
        assert_eq!(choose(Engine::Auto, &hw).unwrap().engine, EngineKind::Vmm);
        assert_eq!(choose(Engine::Qemu, &hw).unwrap().engine, EngineKind::Qemu);
        let nothing = HostFacts {
            kvm: None,
            qemu: false,
        };
        let err = choose(Engine::Auto, &nothing).unwrap_err().to_string();
        assert!(
            err.contains("/dev/kvm") && err.contains("engine = \"qemu\""),
            "{err}"
        );
        let err = choose(Engine::Vmm, &nothing).unwrap_err().to_string();
        assert!(
            err.contains("/dev/kvm") && err.contains("engine = \"qemu\""),
            "{err}"
        );
        assert!(choose(Engine::Qemu, &nothing)
            .unwrap_err()
            .to_string()
            .contains("qemu-system-x86"));
        let no_kvm = HostFacts {
            kvm: None,
            qemu: true,
        };
        assert_eq!(
            choose(Engine::Auto, &no_kvm).unwrap().engine,
            EngineKind::Qemu
        );
    }

    #[test]
    fn nested_is_what_the_engine_set() {
        assert_eq!(qemu_nested(true).0, NestedStatus::Enabled);
        assert!(qemu_nested(true).1.contains("TCG"));
        assert_eq!(qemu_nested(false).0, NestedStatus::Disabled);
        let (s, how) = nested_from(true, Some(vmm::VirtExtension::Svm), None);
        assert_eq!(s, NestedStatus::Enabled);
        assert!(how.starts_with("SVM from the host's KVM"), "{how}");
        let pvm = "this host's KVM (pvm) offers no VMX/SVM to guests";
        let (s, how) = nested_from(true, None, Some(pvm));
        assert_eq!(s, NestedStatus::Unavailable);
        assert!(how.contains("pvm"), "{how}");
        assert_eq!(nested_from(true, None, None).0, NestedStatus::Unavailable);
        assert_eq!(nested_from(false, None, None).0, NestedStatus::Disabled);
    }

    #[test]
    fn cmdlines_name_the_shares_and_hostname() {
        let q = guest_cmdline(
            EngineKind::Qemu,
            "app-1",
            Network::Nat,
            Some(2_600_000),
            None,
        );
        for want in [
            "reboot=t",
            "lpj=5000000",
            "keystone.root=root",
            "keystone.state=state",
            "keystone.workspace=workspace",
            "keystone.hostname=app-1",
            "keystone.network=nat",
            "tsc_early_khz=2600000",
            LAPIC_TIMER_PERIOD,
        ] {
            assert!(q.contains(want), "{q} lacks {want}");
        }
        let v = guest_cmdline(EngineKind::Vmm, "app-1", Network::None, None, None);
        assert!(v.contains("keystone.network=none"), "{v}");
        assert!(
            guest_cmdline(EngineKind::Vmm, "a", Network::Bridge, None, None)
                .contains("keystone.network=nat")
        );
        assert!(!v.contains("reboot=t") && v.contains("keystone.root=root"));
        assert!(!q.contains("mem=") && !v.contains("mem="));
        let small = guest_cmdline(EngineKind::Qemu, "a", Network::Nat, None, Some(1024));
        assert!(small.contains(" mem=1024M memory_hotplug.memmap_on_memory=1"));
    }

    #[test]
    fn only_a_bigger_guest_whose_kernel_can_boots_with_less() {
        assert_eq!(boot_memory(8192, true), Some(BOOT_MEMORY_MIB));
        assert_eq!(
            boot_memory(BOOT_MEMORY_MIB + 1, true),
            Some(BOOT_MEMORY_MIB)
        );
        assert_eq!(boot_memory(BOOT_MEMORY_MIB, true), None);
        assert_eq!(boot_memory(512, true), None);
        assert_eq!(boot_memory(8192, false), None);
    }

    #[test]
    fn qemu_gives_at_most_a_vcpu_per_host_core() {
        assert_eq!(qemu_vcpus(4, 2), 2);
        assert_eq!(qemu_vcpus(2, 16), 2);
        assert_eq!(qemu_vcpus(1, 1), 1);
        assert_eq!(qemu_vcpus(0, 4), 1);
        assert_eq!(qemu_vcpus(8, 0), 1);
    }

    #[test]
    fn the_lapic_timer_period_matches_the_kernels_tick() {
        // 1 GHz APIC timer / HZ ticks per second: the period is right only
        // for the HZ that the guest kernel's recipe sets.
        let config = include_str!("../../../../guest-image/kernel/keystone.config");
        let hz: u64 = config
            .lines()
            .find_map(|l| {
                l.strip_prefix("CONFIG_HZ_")?
                    .strip_suffix("=y")?
                    .parse()
                    .ok()
            })
            .expect("keystone.config sets CONFIG_HZ_<n>=y");
        let period = 1_000_000_000 / hz;
        assert_eq!(LAPIC_TIMER_PERIOD, format!("lapic_timer_period={period}"));
        for engine in [EngineKind::Qemu, EngineKind::Vmm] {
            let line = guest_cmdline(engine, "a", Network::Nat, None, None);
            assert!(line.contains(LAPIC_TIMER_PERIOD), "{line}");
        }
        let patches = include_str!(
            "../../../../guest-image/kernel/patches/0004-x86-apic-lapic_timer_period-param.patch"
        );
        assert!(patches.contains("early_param(\"lapic_timer_period\""));
    }

    #[test]
    fn qemu_args_have_shared_memory_devices_and_console() {
        let plan = QemuPlan {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            memory_mib: 1024,
            vcpus: 2,
            nested: true,
            cmdline: "console=ttyS0".into(),
            shares: vec![("/r/fs-root.sock".into(), "root".into())],
            vsock_socket: "/r/vsock-vhost.sock".into(),
            console_socket: "/r/console.sock".into(),
        };
        let a = qemu_args(&plan).join(" ");
        for want in [
            "-accel tcg",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-cpu max ",
            "-smp 2",
            "-m 1024M",
            "memory-backend-memfd,id=mem,size=1024M,share=on",
            "acpi=off",
            "-kernel /k/vmlinux",
            "-initrd /k/initrd",
            "-no-reboot",
            "socket,id=console,path=/r/console.sock",
            "-serial chardev:console",
            "socket,id=fs0,path=/r/fs-root.sock",
            "vhost-user-fs-device,chardev=fs0,tag=root",
            "socket,id=vsock,path=/r/vsock-vhost.sock",
            "vhost-user-vsock-device,chardev=vsock",
        ] {
            assert!(a.contains(want), "{a} lacks {want}");
        }
        let hidden = qemu_args(&QemuPlan {
            nested: false,
            ..plan
        })
        .join(" ");
        assert!(hidden.contains("-cpu max,-svm "), "{hidden}");
    }

    #[test]
    fn layout_keeps_state_apart_from_the_workspace() {
        let paths = super::super::super::registry::SandboxStore::at("/s").paths("n");
        let l = Layout::new(&paths);
        assert!(l.workspace.ends_with("disk/workspace"));
        assert!(l.state.ends_with("disk/state"));
        assert!(!l.state.starts_with(&l.workspace));
        assert_eq!(l.sockets().len(), 5);
    }
}
