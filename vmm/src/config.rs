//! What a VM is made of: the configuration the embedder fills, through
//! [`VmConfig`] directly or the [`VmBuilder`].

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::arch::x86_64::cpuid::CpuTemplate;

/// Whether the guest gets VMX/SVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NestedMode {
    /// Never.
    Off,
    /// When the host offers it; otherwise a warning and no nesting.
    #[default]
    Auto,
    /// Required: starting fails when the host cannot nest.
    On,
}

/// Where the guest's serial console goes (it is always also kept in the
/// in-memory console log).
#[derive(Default)]
#[non_exhaustive]
pub enum SerialOutput {
    /// Only the in-memory log.
    #[default]
    LogOnly,
    /// The host process's stdout.
    Stdout,
    /// Any writer (a file, a pipe).
    Writer(Box<dyn Write + Send>),
}

/// A device served by a vhost-user backend on the other end of `stream`.
#[non_exhaustive]
pub enum DeviceSpec {
    /// virtio-fs (the backend is virtiofsd-lite or virtiofsd).
    VhostUserFs {
        /// The frontend's end of the vhost-user connection.
        stream: UnixStream,
        /// The tag the guest mounts (`mount -t virtiofs TAG`).
        tag: String,
        /// Request queues besides the high-priority one.
        num_request_queues: u32,
        /// Entries per queue.
        queue_size: u16,
    },
    /// virtio-vsock (the backend is `vsock-lite`'s, or vhost-device-vsock).
    VhostUserVsock {
        /// The frontend's end of the vhost-user connection.
        stream: UnixStream,
        /// The guest's CID.
        guest_cid: u64,
    },
    /// Any other vhost-user device.
    VhostUser {
        /// The frontend's end of the vhost-user connection.
        stream: UnixStream,
        /// The virtio device type.
        device_type: u32,
        /// Its queues.
        num_queues: usize,
        /// Entries per queue.
        queue_size: u16,
        /// Its configuration space.
        config: Vec<u8>,
        /// Feature bits offered besides the transport's.
        extra_features: u64,
    },
}

/// The full description of a VM. Fields may be added: start from
/// [`VmConfig::new`] (or use [`VmBuilder`]).
#[non_exhaustive]
pub struct VmConfig {
    /// A vmlinux ELF or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (devices and host-specific options are added).
    pub cmdline: String,
    /// Add the options this host's KVM needs (the kvm_pvm workarounds of [`crate::host::PVM_GUEST_CMDLINE`]).
    pub host_cmdline_extras: bool,
    /// Number of vCPUs (1 to 64).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// CPUID template; `None` picks the one the host needs.
    pub cpu_template: Option<CpuTemplate>,
    /// VMX/SVM for the guest.
    pub nested: NestedMode,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// virtio devices, in the order they appear on the MMIO bus.
    pub devices: Vec<DeviceSpec>,
    /// When the embedding process started (CLOCK_MONOTONIC ns), for the boot timeline.
    pub process_start_ns: Option<u64>,
    /// Where the vsock backend takes host connections (`CONNECT <port>`),
    /// for [`crate::VmHandle::connect_vsock`].
    pub vsock_host_socket: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with defaults: 1 vCPU, 128 MiB, auto template.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyS0".to_string(),
            host_cmdline_extras: true,
            vcpus: 1,
            memory_mib: 128,
            cpu_template: None,
            nested: NestedMode::Auto,
            serial: SerialOutput::LogOnly,
            devices: Vec::new(),
            process_start_ns: None,
            vsock_host_socket: None,
        }
    }
}

/// Builds a [`VmConfig`] fluently and starts it.
///
/// ```no_run
/// let vm = vmm::VmBuilder::new("/path/to/vmlinux")
///     .cmdline("console=ttyS0 rdinit=/init")
///     .initrd("/path/to/initrd")
///     .memory_mib(256)
///     .start()?;
/// let exit = vm.wait();
/// println!("guest stopped: {}", exit.reason);
/// # Ok::<(), vmm::StartError>(())
/// ```
pub struct VmBuilder {
    config: VmConfig,
}

impl VmBuilder {
    /// Starts from [`VmConfig::new`].
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            config: VmConfig::new(kernel),
        }
    }

    /// Sets the kernel command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }

    /// Adds an initramfs.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initrd = Some(path.into());
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.config.vcpus = n;
        self
    }

    /// Sets guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.memory_mib = mib;
        self
    }

    /// Forces a CPUID template.
    pub fn cpu_template(mut self, template: CpuTemplate) -> Self {
        self.config.cpu_template = Some(template);
        self
    }

    /// Sets nested virtualization.
    pub fn nested(mut self, mode: NestedMode) -> Self {
        self.config.nested = mode;
        self
    }

    /// Sends the serial console somewhere besides the log.
    pub fn serial(mut self, out: SerialOutput) -> Self {
        self.config.serial = out;
        self
    }

    /// Adds a device.
    pub fn device(mut self, spec: DeviceSpec) -> Self {
        self.config.devices.push(spec);
        self
    }

    /// Adds a vhost-user virtio-fs device whose backend serves `stream`.
    pub fn vhost_user_fs(self, stream: UnixStream, tag: impl Into<String>) -> Self {
        self.device(DeviceSpec::VhostUserFs {
            stream,
            tag: tag.into(),
            num_request_queues: 1,
            queue_size: 1024,
        })
    }

    /// Adds virtio-vsock for the guest at `guest_cid`, served by the
    /// vhost-user backend at the other end of `stream` (`vsock-lite`'s
    /// `spawn_paired` gives one), whose hybrid host socket is
    /// `host_socket`: host programs reach guest port P by connecting to it
    /// and writing `CONNECT P\n`, as [`crate::VmHandle::connect_vsock`]
    /// does.
    pub fn vhost_user_vsock(
        mut self,
        stream: UnixStream,
        guest_cid: u64,
        host_socket: impl Into<PathBuf>,
    ) -> Self {
        self.config.vsock_host_socket = Some(host_socket.into());
        self.device(DeviceSpec::VhostUserVsock { stream, guest_cid })
    }

    /// The configuration built so far.
    pub fn into_config(self) -> VmConfig {
        self.config
    }

    /// Boots the VM.
    pub fn start(self) -> Result<crate::VmHandle, crate::StartError> {
        crate::start(self.config)
    }
}
