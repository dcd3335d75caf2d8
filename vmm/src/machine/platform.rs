//! The KVM VM with its devices and vCPUs, before the guest is loaded:
//! the legacy devices on the port I/O bus (COM1, the i8042 for reset, the
//! boot timer), the virtio-mmio devices with their ioeventfds and irqfds,
//! and the vCPUs with their CPUID, registers and local APIC.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::CpuId;

use super::{StartError, StepTimer};
use crate::arch::x86_64::cpuid::{self, CpuTemplate};
use crate::arch::x86_64::layout::{IRQ_BASE, IRQ_MAX, MMIO_DEVICE_SIZE, VIRTIO_MMIO_START};
use crate::arch::x86_64::{mptable, regs};
use crate::config::{DeviceSpec, SerialOutput, VmConfig};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::legacy::serial::{ConsoleSink, SERIAL_IRQ, SERIAL_PORT_COUNT};
use crate::devices::legacy::{i8042, BootTimeline, BootTimer, ConsoleLog, Serial, I8042};
use crate::devices::legacy::{BOOT_TIMER_PORT, SERIAL_PORT_COM1};
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::devices::virtio::vhost_user::VhostUserDevice;
use crate::devices::virtio::VirtioDevice;
use crate::vstate::exit::ExitSignal;
use crate::vstate::kvm::HostKvm;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::Vm;

fn vcpu_cpuid(base: &CpuId, template: CpuTemplate, nested: bool, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let entries = cpuid.as_mut_slice();
    cpuid::apply_template(entries, template);
    cpuid::set_nested(entries, nested);
    cpuid::set_topology(entries, id, count);
    cpuid
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
        source: e.into(),
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
pub(super) struct Platform {
    pub(super) vm: Vm,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) console: Arc<ConsoleLog>,
    pub(super) serial: Arc<Mutex<Serial>>,
    pub(super) io_bus: Bus,
    pub(super) mmio_bus: Bus,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) device_args: Vec<String>,
    pub(super) vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
}

pub(super) fn validate(config: &VmConfig) -> Result<(), StartError> {
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
pub(super) fn build_platform(
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
    io_bus.insert(
        serial.clone(),
        u64::from(SERIAL_PORT_COM1),
        SERIAL_PORT_COUNT,
        "serial",
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        u64::from(i8042::I8042_DATA_PORT),
        i8042::I8042_PORT_COUNT,
        "i8042",
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(BootTimer::new(timeline.clone()))),
        u64::from(BOOT_TIMER_PORT),
        1,
        "boot timer",
    )?;

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
                source: e.into(),
            })?;
        for (evt, offset, datamatch) in transport.ioevents() {
            vm.register_mmio_ioevent(evt, base + offset, datamatch)?;
        }
        vm.register_irqfd(transport.call_eventfd(), irq)?;
        let transport = Arc::new(Mutex::new(transport));
        let dev: Arc<Mutex<dyn BusDevice>> = transport.clone();
        mmio_bus.insert(dev, base, MMIO_DEVICE_SIZE, name)?;
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
