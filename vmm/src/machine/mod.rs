//! Starting a VM from a [`VmConfig`] (`platform.rs` builds the VM, its
//! devices and vCPUs), and the [`VmHandle`] that waits for, pauses, stops
//! and observes it (`handle.rs`), with the ticker thread that looks after
//! coalesced writes and held console output while it runs (`ticker.rs`).

mod handle;
mod platform;
mod ticker;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::arch::x86_64::cpuid::{CpuTemplate, VirtExtension};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::{boot, mptable, regs};
use crate::config::{NestedMode, VmConfig};
use crate::devices::legacy::{BootEvent, BootTimeline, SERIAL_PORT_COM1};
use crate::vstate::coalesced::{CoalescedIo, Zone};
use crate::vstate::exit::VmExitReason;
use crate::vstate::exit_stats::OtherExits;
use crate::vstate::kvm::{HostKvm, KvmKind, COMMON_GUEST_CMDLINE};
use crate::vstate::memory::create_memfd_memory;
use crate::vstate::vcpu::{install_kick_handler, run_vcpu, RunControl, VcpuContext};
pub use handle::VmHandle;
use handle::{ExitAccounts, VcpuThread};
use platform::{build_platform, validate};
use ticker::{Duties, Ticker};

/// Errors starting a VM. Each says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `/dev/kvm` cannot be opened or queried.
    #[error(transparent)]
    Kvm(#[from] crate::vstate::kvm::KvmError),
    /// The configuration is inconsistent (the message says which setting).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// [`crate::NestedMode::On`] on a host whose KVM cannot nest.
    #[error("nested virtualization was required but this host's KVM offers no VMX/SVM to guests (host KVM: {0}); enable nesting on the host (kvm_intel nested=1 or kvm_amd nested=1) or start without it")]
    NestedUnavailable(&'static str),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// The KVM VM could not be set up.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The kernel or initrd could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The boot vCPU's registers could not be set.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A vCPU could not be created.
    #[error("cannot create vCPU {id}: {source}")]
    Vcpu {
        /// Which vCPU.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU's CPUID could not be set.
    #[error("cannot set CPUID on vCPU {id}: {source}")]
    Cpuid {
        /// Which vCPU.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A device could not be set up (its backend refused, or its settings
    /// are wrong).
    #[error("device {index}: {source}")]
    Device {
        /// The device's place in [`crate::VmConfig::devices`].
        index: usize,
        /// What went wrong.
        source: DeviceError,
    },
    /// Two devices were given overlapping I/O or MMIO ranges.
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::BusError),
    /// More virtio devices than the MMIO window holds.
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// A vCPU thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Why a device could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Its vhost-user backend refused or failed the set-up.
    #[error(transparent)]
    VhostUser(#[from] crate::devices::virtio::vhost_user::VhostUserError),
    /// Its virtio-mmio transport could not be made.
    #[error(transparent)]
    Transport(#[from] crate::devices::virtio::transport::mmio::TransportError),
}

/// What nested virtualization the guest got, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NestedStatus {
    /// The extension the guest sees, if any.
    pub enabled: Option<VirtExtension>,
    /// A human explanation when nesting was asked for but is off.
    pub warning: Option<String>,
}

/// Facts about the started VM that embedders show their users.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VmInfo {
    /// Whether the host's KVM is hardware or paravirtual.
    pub kvm_kind: KvmKind,
    /// The CPUID template the vCPUs got.
    pub cpu_template: CpuTemplate,
    /// Nested virtualization as the VMM set it up.
    pub nested: NestedStatus,
    /// The full command line the kernel got.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

/// How a VM ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VmExit {
    /// Why it stopped.
    pub reason: VmExitReason,
}

/// Logs how long each start-up step took (at debug level).
pub(super) struct StepTimer {
    last: std::cell::Cell<Instant>,
}

impl StepTimer {
    fn new() -> Self {
        Self {
            last: std::cell::Cell::new(Instant::now()),
        }
    }

    pub(super) fn done(&self, what: &str) {
        let now = Instant::now();
        log::debug!("start-up: {what} took {:?}", now - self.last.get());
        self.last.set(now);
    }
}

fn resolve_nested(host: &HostKvm, mode: NestedMode) -> Result<NestedStatus, StartError> {
    match (mode, host.nested) {
        (NestedMode::Off, _) => Ok(NestedStatus {
            enabled: None,
            warning: None,
        }),
        (_, Some(ext)) => Ok(NestedStatus {
            enabled: Some(ext),
            warning: None,
        }),
        (NestedMode::On, None) => Err(StartError::NestedUnavailable(host.kind.name())),
        (NestedMode::Auto, None) => Ok(NestedStatus {
            enabled: None,
            warning: Some(format!(
                "this host's KVM ({}) offers no VMX/SVM to guests; the sandbox runs without nested virtualization",
                host.kind.name()
            )),
        }),
    }
}

/// The kernel command line: the embedder's, ours, what this host's KVM
/// needs (`host_extras`), the vCPUs' TSC frequency as KVM runs it (so the
/// guest skips a calibration that is slow, and fails on a loaded host,
/// leaving a guest whose own KVM cannot run: see `arch::x86_64::tsc`)
/// unless the embedder set one, and the devices.
fn build_cmdline(
    user: &str,
    host_extras: Option<&str>,
    tsc_khz: Option<u32>,
    device_args: &[String],
) -> String {
    let mut parts = vec![user.trim().to_string(), COMMON_GUEST_CMDLINE.to_string()];
    parts.extend(host_extras.map(str::to_string));
    let user_tsc = user
        .split_whitespace()
        .any(|w| w.starts_with("tsc_early_khz="));
    if let (Some(khz), false) = (tsc_khz, user_tsc) {
        parts.push(format!("tsc_early_khz={khz}"));
    }
    parts.extend(device_args.iter().cloned());
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

/// Boots a VM as described by `config`.
///
/// The kernel and initrd are copied into guest memory on a helper thread
/// while this thread creates the VM, its devices and vCPUs.
pub fn start(mut config: VmConfig) -> Result<VmHandle, StartError> {
    let timeline = Arc::new(BootTimeline::new());
    timeline.record(BootEvent::VmmStart);
    if let Some(ns) = config.process_start_ns {
        timeline.record_at(BootEvent::ProcessStart, ns);
    }
    validate(&config)?;

    let step = StepTimer::new();
    let host = HostKvm::open()?;
    step.done("open /dev/kvm");
    let template = config
        .cpu_template
        .unwrap_or_else(|| host.recommended_template());
    let nested = resolve_nested(&host, config.nested)?;
    if let Some(w) = &nested.warning {
        log::info!("{w}");
    }

    let mem = create_memfd_memory(&layout::ram_ranges(config.memory_mib << 20))?;
    step.done("guest memory");

    let kernel_path = config.kernel.clone();
    let initrd_path = config.initrd.clone();
    let (platform, loaded) = std::thread::scope(|scope| {
        let loader = scope.spawn(|| -> Result<_, StartError> {
            let started = Instant::now();
            let kernel = boot::load_kernel(&mem, &kernel_path)?;
            let initrd = match &initrd_path {
                Some(path) => Some(boot::load_initrd(&mem, path, kernel.end)?),
                None => None,
            };
            log::debug!(
                "start-up: kernel and initrd load took {:?} (in parallel)",
                started.elapsed()
            );
            Ok((kernel, initrd))
        });
        let platform = build_platform(
            &host,
            &mem,
            &mut config,
            &timeline,
            template,
            nested.enabled.is_some(),
            &step,
        );
        let loaded = loader.join().unwrap_or_else(|_| {
            Err(StartError::Config(
                "the kernel loader thread panicked".into(),
            ))
        });
        (platform, loaded)
    });
    let platform = platform?;
    let (kernel, initrd) = loaded?;
    step.done("waiting for the kernel load");

    let host_extras = (config.host_cmdline_extras && !host.guest_cmdline_extras().is_empty())
        .then(|| host.guest_cmdline_extras());
    let tsc_khz = platform
        .vcpu_fds
        .first()
        .and_then(|bsp| bsp.get_tsc_khz().ok())
        .filter(|khz| *khz > 0);
    let cmdline = build_cmdline(&config.cmdline, host_extras, tsc_khz, &platform.device_args);
    boot::write_cmdline(&mem, &cmdline)?;
    boot::write_boot_params(&mem, &kernel, cmdline.len(), initrd)?;
    mptable::write_mptable(&mem, config.vcpus)?;
    if let Some(bsp) = platform.vcpu_fds.first() {
        regs::configure_boot_vcpu(bsp, &mem, kernel.entry)?;
    }
    step.done("cmdline, boot params, MP table, boot vCPU");

    install_kick_handler()
        .map_err(|e| StartError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
    let control = Arc::new(RunControl::default());
    let io_bus = Arc::new(platform.io_bus);
    let mmio_bus = Arc::new(platform.mmio_bus);
    let exit = platform.exit;
    let others = Arc::new(OtherExits::default());
    // THR writes go to KVM's ring instead of exiting, where KVM can do it
    // (see `vstate::coalesced`); the 1-byte zone leaves the UART's other
    // registers, LCR included, exiting as before.
    let coalesced = platform.vcpu_fds.first().and_then(|fd| {
        let zones = vec![Zone::pio(SERIAL_PORT_COM1, 1, "io serial")];
        CoalescedIo::register(&platform.vm.fd, fd, zones, io_bus.clone(), mmio_bus.clone())
    });
    let coalesced = coalesced.map(Arc::new);
    let ticker = Ticker::start(Duties {
        coalesced: coalesced.clone(),
        serial: platform.serial.clone(),
    })
    .map_err(StartError::Thread)?;
    let mut threads = Vec::new();
    for (id, fd) in platform.vcpu_fds.into_iter().enumerate() {
        let finished = Arc::new(AtomicBool::new(false));
        let ctx = VcpuContext {
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            control: control.clone(),
            timeline: timeline.clone(),
            others: others.clone(),
            coalesced: coalesced.clone(),
            finished: finished.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_vcpu(id as u8, fd, ctx))
            .map_err(StartError::Thread)?;
        threads.push(VcpuThread { handle, finished });
    }

    let info = VmInfo {
        kvm_kind: host.kind,
        cpu_template: template,
        nested,
        cmdline,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
    };
    Ok(VmHandle {
        info,
        exit,
        control,
        timeline,
        console: platform.console,
        serial: platform.serial,
        threads: Mutex::new(threads),
        exits: ExitAccounts {
            io_bus,
            mmio_bus,
            others,
            coalesced,
        },
        ticker: Mutex::new(Some(ticker)),
        vsock_host_socket: config.vsock_host_socket.take(),
        _transports: platform.transports,
        _vm: platform.vm,
        _mem: mem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_tells_the_guest_its_tsc_frequency() {
        let devices = ["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let c = build_cmdline("console=ttyS0", None, Some(2_600_000), &devices);
        assert_eq!(
            c,
            format!(
                "console=ttyS0 {COMMON_GUEST_CMDLINE} tsc_early_khz=2600000 \
                 virtio_mmio.device=4K@0xd0000000:5"
            )
        );
        let mine = build_cmdline(
            "tsc_early_khz=1000000",
            Some("nokaslr"),
            Some(2_600_000),
            &[],
        );
        assert_eq!(mine.matches("tsc_early_khz").count(), 1, "{mine}");
        assert!(mine.contains("tsc_early_khz=1000000") && mine.contains("nokaslr"));
        assert!(!build_cmdline("", None, None, &[]).contains("tsc_early_khz"));
    }

    #[test]
    fn nested_resolution() {
        let Ok(mut host) = HostKvm::open() else {
            eprintln!("SKIP: /dev/kvm is not usable here");
            return;
        };
        host.nested = None;
        assert!(matches!(
            resolve_nested(&host, NestedMode::On),
            Err(StartError::NestedUnavailable(_))
        ));
        let auto = resolve_nested(&host, NestedMode::Auto).unwrap();
        assert_eq!(auto.enabled, None);
        assert!(auto.warning.unwrap().contains("without nested"));
        host.nested = Some(VirtExtension::Vmx);
        assert_eq!(
            resolve_nested(&host, NestedMode::On).unwrap().enabled,
            Some(VirtExtension::Vmx)
        );
        assert_eq!(
            resolve_nested(&host, NestedMode::Off).unwrap().enabled,
            None
        );
    }
}
