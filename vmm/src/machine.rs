//! Starting a VM from a [`VmConfig`], and the [`VmHandle`] that waits for,
//! pauses, stops and observes it.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::cpuid::{self, CpuTemplate, VirtExtension};
use crate::arch::x86_64::layout::{self, IRQ_BASE, IRQ_MAX, MMIO_DEVICE_SIZE, VIRTIO_MMIO_START};
use crate::arch::x86_64::{boot, mptable, regs};
use crate::config::{DeviceSpec, NestedMode, SerialOutput, VmConfig};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::legacy::serial::{ConsoleSink, SERIAL_IRQ, SERIAL_PORT_COUNT};
use crate::devices::legacy::{
    i8042, BootEvent, BootTimeline, BootTimer, ConsoleLog, Serial, I8042,
};
use crate::devices::legacy::{BOOT_TIMER_PORT, SERIAL_PORT_COM1};
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::devices::virtio::vhost_user::VhostUserDevice;
use crate::devices::virtio::VirtioDevice;
use crate::vstate::exit::{ExitSignal, VmExitReason};
use crate::vstate::exit_stats::{ExitCount, OtherExits};
use crate::vstate::kvm::{HostKvm, KvmKind, COMMON_GUEST_CMDLINE};
use crate::vstate::memory::{create_memfd_memory, GuestMemoryMmap};
use crate::vstate::vcpu::{
    install_kick_handler, run_vcpu, vcpu_kick_signal, RunControl, VcpuContext,
};
use crate::vstate::vm::Vm;

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
    #[error("device {index}: {message}")]
    Device {
        /// The device's place in [`crate::VmConfig::devices`].
        index: usize,
        /// What went wrong.
        message: String,
    },
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

struct VcpuThread {
    handle: JoinHandle<()>,
    finished: Arc<AtomicBool>,
}

/// A running VM. Dropping it stops the VM and joins its threads.
pub struct VmHandle {
    info: VmInfo,
    exit: Arc<ExitSignal>,
    control: Arc<RunControl>,
    timeline: Arc<BootTimeline>,
    console: Arc<ConsoleLog>,
    serial: Arc<Mutex<Serial>>,
    threads: Mutex<Vec<VcpuThread>>,
    exits: ExitAccounts,
    vsock_host_socket: Option<std::path::PathBuf>,
    // Kept alive for the VM's lifetime; the vCPU threads and vhost-user
    // backends use them. Field order matters: threads are joined in Drop
    // before these are released.
    _transports: Vec<Arc<Mutex<MmioTransport>>>,
    _vm: Vm,
    _mem: GuestMemoryMmap,
}

/// Where a VM's exits are counted: each bus device, and the other kinds.
struct ExitAccounts {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    others: Arc<OtherExits>,
}

impl ExitAccounts {
    fn snapshot(&self) -> Vec<ExitCount> {
        let mut all = self.io_bus.exit_counts("io");
        all.extend(self.mmio_bus.exit_counts("mmio"));
        all.extend(self.others.snapshot());
        all
    }
}

/// Logs how long each start-up step took (at debug level).
struct StepTimer {
    last: std::cell::Cell<Instant>,
}

impl StepTimer {
    fn new() -> Self {
        Self {
            last: std::cell::Cell::new(Instant::now()),
        }
    }

    fn done(&self, what: &str) {
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

fn vcpu_cpuid(base: &CpuId, template: CpuTemplate, nested: bool, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let entries = cpuid.as_mut_slice();
    cpuid::apply_template(entries, template);
    cpuid::set_nested(entries, nested);
    cpuid::set_topology(entries, id, count);
    cpuid
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

/// How a device is named in exit accounting.
fn device_name(spec: &DeviceSpec) -> String {
    match spec {
        DeviceSpec::VhostUserFs { tag, .. } => format!("virtio-fs {tag}"),
        DeviceSpec::VhostUserVsock { .. } => "virtio-vsock".to_string(),
        DeviceSpec::VhostUser { device_type, .. } => format!("vhost-user type {device_type}"),
    }
}

fn make_device(index: usize, spec: DeviceSpec) -> Result<Box<dyn VirtioDevice>, StartError> {
    let err = |e: crate::devices::virtio::vhost_user::VhostUserError| StartError::Device {
        index,
        message: e.to_string(),
    };
    Ok(match spec {
        DeviceSpec::VhostUserFs {
            stream,
            tag,
            num_request_queues,
            queue_size,
        } => Box::new(
            VhostUserDevice::fs(stream, &tag, num_request_queues, queue_size).map_err(err)?,
        ),
        DeviceSpec::VhostUserVsock { stream, guest_cid } => {
            Box::new(VhostUserDevice::vsock(stream, guest_cid).map_err(err)?)
        }
        DeviceSpec::VhostUser {
            stream,
            device_type,
            num_queues,
            queue_size,
            config,
            extra_features,
        } => Box::new(
            VhostUserDevice::new(
                stream,
                device_type,
                num_queues,
                queue_size,
                config,
                extra_features,
            )
            .map_err(err)?,
        ),
    })
}

/// The KVM VM with its devices and vCPUs, before the guest is loaded.
struct Platform {
    vm: Vm,
    exit: Arc<ExitSignal>,
    console: Arc<ConsoleLog>,
    serial: Arc<Mutex<Serial>>,
    io_bus: Bus,
    mmio_bus: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    device_args: Vec<String>,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
}

fn validate(config: &VmConfig) -> Result<(), StartError> {
    if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS {
        return Err(StartError::Config(format!(
            "vcpus must be 1 to {}, not {}",
            mptable::MAX_VCPUS,
            config.vcpus
        )));
    }
    if config.memory_mib < 32 {
        return Err(StartError::Config(format!(
            "memory must be at least 32 MiB, not {}",
            config.memory_mib
        )));
    }
    let max_devices = (IRQ_MAX - IRQ_BASE + 1) as usize;
    if config.devices.len() > max_devices {
        return Err(StartError::TooManyDevices(max_devices));
    }
    Ok(())
}

/// Creates the VM, the legacy and virtio devices and the vCPUs (all but
/// the boot vCPU's registers, which need the kernel's entry point).
fn build_platform(
    host: &HostKvm,
    mem: &GuestMemoryMmap,
    config: &mut VmConfig,
    timeline: &Arc<BootTimeline>,
    template: CpuTemplate,
    nested: bool,
    step: &StepTimer,
) -> Result<Platform, StartError> {
    let vm = Vm::new(host, mem)?;
    step.done("VM, irqchip, PIT");
    let exit = Arc::new(ExitSignal::new().map_err(StartError::EventFd)?);

    // Legacy devices on the port I/O bus.
    let console = Arc::new(ConsoleLog::new());
    let out: Box<dyn std::io::Write + Send> = match std::mem::take(&mut config.serial) {
        SerialOutput::LogOnly => Box::new(std::io::sink()),
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Writer(w) => w,
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq,
        ConsoleSink::new(out, console.clone(), timeline.clone()),
    )));
    let mut io_bus = Bus::new();
    let insert_err = |e: crate::devices::bus::BusError| StartError::Config(e.to_string());
    io_bus
        .insert(
            serial.clone(),
            u64::from(SERIAL_PORT_COM1),
            SERIAL_PORT_COUNT,
            "serial",
        )
        .map_err(insert_err)?;
    io_bus
        .insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            u64::from(i8042::I8042_DATA_PORT),
            i8042::I8042_PORT_COUNT,
            "i8042",
        )
        .map_err(insert_err)?;
    io_bus
        .insert(
            Arc::new(Mutex::new(BootTimer::new(timeline.clone()))),
            u64::from(BOOT_TIMER_PORT),
            1,
            "boot timer",
        )
        .map_err(insert_err)?;

    // virtio-mmio devices.
    let mut mmio_bus = Bus::new();
    let mut transports = Vec::new();
    let mut device_args = Vec::new();
    for (index, spec) in std::mem::take(&mut config.devices).into_iter().enumerate() {
        let name = device_name(&spec);
        let device = make_device(index, spec)?;
        let base = VIRTIO_MMIO_START + index as u64 * MMIO_DEVICE_SIZE;
        let irq = IRQ_BASE + index as u32;
        let transport =
            MmioTransport::new(device, mem.clone()).map_err(|e| StartError::Device {
                index,
                message: e.to_string(),
            })?;
        for (evt, offset, datamatch) in transport.ioevents() {
            vm.register_mmio_ioevent(evt, base + offset, datamatch)?;
        }
        vm.register_irqfd(transport.call_eventfd(), irq)?;
        let transport = Arc::new(Mutex::new(transport));
        let dev: Arc<Mutex<dyn BusDevice>> = transport.clone();
        mmio_bus
            .insert(dev, base, MMIO_DEVICE_SIZE, name)
            .map_err(insert_err)?;
        device_args.push(crate::devices::virtio::transport::mmio::device_cmdline_arg(
            base,
            MMIO_DEVICE_SIZE,
            irq,
        ));
        transports.push(transport);
    }
    step.done("devices");

    let mut vcpu_fds = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| StartError::Vcpu { id, source })?;
        let cpuid = vcpu_cpuid(&host.supported_cpuid, template, nested, id, config.vcpus);
        fd.set_cpuid2(&cpuid)
            .map_err(|source| StartError::Cpuid { id, source })?;
        regs::configure_common(&fd)?;
        regs::configure_lapic(&fd)?;
        vcpu_fds.push(fd);
    }
    step.done("vCPUs");
    Ok(Platform {
        vm,
        exit,
        console,
        serial,
        io_bus,
        mmio_bus,
        transports,
        device_args,
        vcpu_fds,
    })
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
        },
        vsock_host_socket: config.vsock_host_socket.take(),
        _transports: platform.transports,
        _vm: platform.vm,
        _mem: mem,
    })
}

impl VmHandle {
    /// Facts about the VM (KVM kind, template, nested status, command line).
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The boot timeline.
    pub fn timeline(&self) -> Arc<BootTimeline> {
        self.timeline.clone()
    }

    /// The console log (last MiB of serial output).
    pub fn console(&self) -> Arc<ConsoleLog> {
        self.console.clone()
    }

    /// Sends host input to the guest's serial port; returns bytes accepted.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes)
    }

    /// The exit reason, if the VM already stopped.
    pub fn exit_reason(&self) -> Option<VmExitReason> {
        self.exit.reason()
    }

    /// Waits up to `timeout` for the VM to stop.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExitReason> {
        self.exit.wait_timeout(timeout)
    }

    /// Asks the VM to stop (like pulling the power cord) and waits for it.
    pub fn stop(&self) -> VmExitReason {
        self.exit.request(VmExitReason::Stopped);
        self.join_vcpus();
        self.exit.reason().unwrap_or(VmExitReason::Stopped)
    }

    /// The VM's exits so far, by device (port I/O, MMIO) and by kind, with
    /// the VMM's time handling them. Logged at debug level when the VM
    /// ends.
    pub fn exit_counts(&self) -> Vec<ExitCount> {
        self.exits.snapshot()
    }

    /// A descriptor that becomes readable once the VM has stopped (an
    /// eventfd), for embedders that wait in their own event loop; then
    /// [`VmHandle::exit_reason`] says why.
    pub fn exit_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the eventfd lives as long as the handle (`self.exit`),
        // which the borrow is tied to.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.exit.eventfd().as_raw_fd()) }
    }

    /// Opens a connection to guest vsock `port` through the vsock backend's
    /// host socket ([`crate::VmBuilder::vhost_user_vsock`]), giving the
    /// backend `handshake` to answer. `NotFound` when the VM has no vsock
    /// device with a host socket.
    pub fn connect_vsock(
        &self,
        port: u32,
        handshake: Duration,
    ) -> std::io::Result<std::os::unix::net::UnixStream> {
        let socket = self.vsock_host_socket.as_deref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "this VM has no vsock device with a host socket",
            )
        })?;
        keystone_agent_protocol::client::hybrid_vsock_connect_within(socket, port, handshake)
    }

    /// Pauses all vCPUs; returns once they are parked (or after 5 s).
    ///
    /// Only the vCPUs stop: vhost-user backends (virtio-fs, vsock) keep
    /// serving what the guest queued before the pause, and a vsock backend
    /// keeps taking host connections. Embedders that need a quiescent
    /// device state (a snapshot) must stop those backends themselves.
    pub fn pause(&self) -> bool {
        self.control.set_paused(true);
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let n = threads.len();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            kick(&threads);
            if self.control.wait_parked(n, Duration::from_millis(10)) {
                return true;
            }
        }
        false
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.control.set_paused(false);
    }

    /// Waits for the VM to stop on its own and returns why.
    pub fn wait(self) -> VmExit {
        let reason = loop {
            if let Some(r) = self.exit.wait_timeout(Duration::from_secs(3600)) {
                break r;
            }
        };
        self.join_vcpus();
        VmExit { reason }
    }

    fn join_vcpus(&self) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if threads.is_empty() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads.iter().any(|t| !t.finished.load(Ordering::SeqCst))
            && Instant::now() < deadline
        {
            kick(&threads);
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in threads.drain(..) {
            if t.finished.load(Ordering::SeqCst) {
                let _ = t.handle.join();
            } else {
                log::error!("a vCPU thread did not stop within 5 s; leaking it");
                std::mem::forget(t.handle);
            }
        }
        self.timeline.record(BootEvent::Exit);
        if log::log_enabled!(log::Level::Debug) {
            for c in self.exits.snapshot() {
                log::debug!(
                    "exits: {:<24} {:>9} handled in {:?}",
                    c.kind,
                    c.count,
                    c.handling
                );
            }
        }
    }
}

fn kick(threads: &[VcpuThread]) {
    for t in threads
        .iter()
        .filter(|t| !t.finished.load(Ordering::SeqCst))
    {
        // SAFETY: the pthread handle belongs to a thread we have not joined;
        // sending it a signal with an installed (empty) handler is harmless.
        unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu_kick_signal()) };
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.exit.request(VmExitReason::Stopped);
        self.join_vcpus();
    }
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
