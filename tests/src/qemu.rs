//! A QEMU software-emulation (TCG) guest launcher for tests.
//!
//! On this project's machines KVM is trap-and-emulate and slow (see
//! `shared/KVM-HERE.md`), so the bulk of guest user-space tests boot our
//! guest kernel under `qemu-system-x86_64 -M microvm -accel tcg` instead.
//! Guest memory is a shared memfd, so vhost-user backends (virtiofsd-lite,
//! our vsock backend) serve the guest through Unix sockets. The machine has
//! ACPI off, so QEMU appends the `virtio_mmio.device=` entries for its
//! devices to the kernel command line itself (with ACPI on, this kernel
//! hangs early under TCG and finds no devices).
//!
//! A running guest holds the process's guest lock
//! ([`keystone_test_kit::guest_lock`]), so the guests of one test binary
//! run one at a time.
//!
//! ```no_run
//! # use keystone_tests::qemu::QemuGuest;
//! # use std::time::Duration;
//! let mut guest = QemuGuest::builder("/path/to/vmlinux")
//!     .vhost_user_fs("/tmp/root.sock", "root")
//!     .virtiofs_root("root")
//!     .append("init=/init")
//!     .start()
//!     .unwrap();
//! guest.wait_for("SUITE-DONE", Duration::from_secs(180)).unwrap();
//! guest.wait_exit(Duration::from_secs(30)).unwrap();
//! println!("{}", guest.console());
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keystone_test_kit::{guest_lock, last_lines, GuestLock};

/// The QEMU binary the launcher runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// Why QEMU cannot be used here, if it cannot (for `skip!`).
pub fn qemu_missing() -> Option<String> {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("{QEMU} --version failed ({s})")),
        Err(e) => Some(format!(
            "{QEMU} not runnable ({e}); apt-get install qemu-system-x86"
        )),
    }
}

/// The kernel command line every TCG boot gets: serial console, a fixed
/// loops-per-jiffy and a trusted TSC (calibration under TCG is slow and can
/// hang), and reboot/panic that end QEMU (`-no-reboot`). `reboot=t`:
/// microvm has no i8042, and the kernel's keyboard-controller reset
/// attempts cost ~25 s under TCG before it falls back to a triple fault,
/// which ends QEMU at once with `-no-reboot`.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 lpj=5000000 tsc=reliable reboot=t panic=-1 nokaslr lapic_timer_period=10000000";

/// Builder for a [`QemuGuest`]. Every setter is optional except the kernel.
#[derive(Clone, Debug)]
pub struct QemuBuilder {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    memory_mib: u32,
    vcpus: u32,
    cpu: String,
    cmdline: Vec<String>,
    fs: Vec<(PathBuf, String)>,
    extra: Vec<String>,
    console_file: Option<PathBuf>,
    monitor: Option<PathBuf>,
}

impl QemuBuilder {
    /// Guest memory in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1; TCG runs them on one thread each).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// The `-cpu` model (default `qemu64`, which TCG handles fast).
    pub fn cpu(mut self, model: &str) -> Self {
        self.cpu = model.to_string();
        self
    }

    /// Appends words to the kernel command line (after [`BASE_CMDLINE`]).
    pub fn append(mut self, args: &str) -> Self {
        self.cmdline.push(args.to_string());
        self
    }

    /// Boots with this initramfs (`-initrd`, uncompressed is fastest).
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Adds a `vhost-user-fs-device` whose backend listens on `socket`
    /// (QEMU connects as the frontend; the backend must be listening before
    /// [`start`](Self::start)). The guest sees it under `tag`.
    pub fn vhost_user_fs(mut self, socket: impl Into<PathBuf>, tag: &str) -> Self {
        self.fs.push((socket.into(), tag.to_string()));
        self
    }

    /// Mounts the virtio-fs device tagged `tag` as the read-write root.
    /// Add `init=...` with [`append`](Self::append) if `/init` is not wanted.
    pub fn virtiofs_root(self, tag: &str) -> Self {
        self.append(&format!("root={tag} rootfstype=virtiofs rw"))
    }

    /// Raw extra QEMU arguments (e.g. a `vhost-user-vsock-device`).
    pub fn qemu_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Also writes the console to `path` as it comes (for watching a long
    /// run, or one that hangs, while it runs).
    pub fn console_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.console_file = Some(path.into());
        self
    }

    /// Serves QEMU's human monitor on the Unix socket `path`, for
    /// [`QemuGuest::monitor`] (a guest that hangs can still be asked where
    /// its CPUs are).
    pub fn monitor_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.monitor = Some(path.into());
        self
    }

    /// The full kernel command line this builder passes with `-append`.
    pub fn cmdline(&self) -> String {
        std::iter::once(BASE_CMDLINE.to_string())
            .chain(self.cmdline.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The QEMU argument list (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-M".into(),
            "microvm,x-option-roms=off,rtc=on,pit=on,pic=on,acpi=off,memory-backend=mem".into(),
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            self.cpu.clone(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-object".into(),
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-append".into(),
            self.cmdline(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            match &self.monitor {
                Some(path) => format!("unix:{},server=on,wait=off", path.display()),
                None => "none".into(),
            },
            "-no-reboot".into(),
            "-serial".into(),
            "stdio".into(),
        ];
        if let Some(initrd) = &self.initrd {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        for (i, (socket, tag)) in self.fs.iter().enumerate() {
            a.extend([
                "-chardev".into(),
                format!("socket,id=fs{i},path={}", socket.display()),
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"),
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Starts QEMU, capturing its console (stdout and stderr together),
    /// once no other guest of this process runs.
    pub fn start(self) -> std::io::Result<QemuGuest> {
        let lock = guest_lock();
        let args = self.args();
        let mut child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        let file = match &self.console_file {
            Some(path) => Some(Arc::new(Mutex::new(std::fs::File::create(path)?))),
            None => None,
        };
        for mut pipe in pipes.into_iter().flatten() {
            let sink = console.clone();
            let file = file.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    if let Some(file) = &file {
                        // A copy for watching; the console itself is above.
                        let _ = file.lock().unwrap().write_all(&buf[..n]);
                    }
                }
            }));
        }
        Ok(QemuGuest {
            monitor: self.monitor.clone(),
            child,
            console,
            readers,
            started: Instant::now(),
            status: None,
            args,
            _lock: lock,
        })
    }
}

/// A running QEMU guest; killed on drop.
pub struct QemuGuest {
    child: Child,
    monitor: Option<PathBuf>,
    console: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    status: Option<ExitStatus>,
    args: Vec<String>,
    /// Released after QEMU was killed (fields drop after `drop`).
    _lock: GuestLock,
}

impl QemuGuest {
    /// A builder booting `kernel` (an uncompressed vmlinux; PVH entry).
    pub fn builder(kernel: impl AsRef<Path>) -> QemuBuilder {
        QemuBuilder {
            kernel: kernel.as_ref().to_path_buf(),
            initrd: None,
            memory_mib: 256,
            vcpus: 1,
            cpu: "qemu64".into(),
            cmdline: Vec::new(),
            fs: Vec::new(),
            extra: Vec::new(),
            console_file: None,
            monitor: None,
        }
    }

    /// Everything the console printed so far (lossy UTF-8, `\r` removed).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).replace('\r', "")
    }

    /// The last `lines` lines of the console, escaped, for failure
    /// messages.
    pub fn console_tail(&self, lines: usize) -> String {
        last_lines(&self.console(), lines)
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The QEMU arguments used (for logs).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Waits until the console contains `pattern`; on timeout or QEMU exit
    /// the error carries the console tail.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(pattern) {
                return Ok(());
            }
            if let Some(st) = self.try_status() {
                // Let the readers drain what QEMU wrote last.
                self.join_readers();
                if self.console().contains(pattern) {
                    return Ok(());
                }
                return Err(format!(
                    "QEMU exited ({st}) before {pattern:?}; console tail:\n{}",
                    self.console_tail(60)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{pattern:?} not seen within {timeout:?}; console tail:\n{}",
                    self.console_tail(60)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit (a guest `reboot -f` ends it: `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                self.join_readers();
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "QEMU still running after {timeout:?}; console tail:\n{}",
                    self.console_tail(60)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        self.try_status().is_some()
    }

    /// Kills QEMU now (idempotent).
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_readers();
    }

    /// Runs `command` on QEMU's human monitor (the guest must have been
    /// built with [`QemuBuilder::monitor_socket`]) and returns what it
    /// printed, escaped; waits at most `timeout` for the answer.
    pub fn monitor(&self, command: &str, timeout: Duration) -> Result<String, String> {
        const PROMPT: &str = "(qemu) ";
        let path = self.monitor.as_ref().ok_or("QEMU runs without a monitor")?;
        let mut stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("QEMU's monitor {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        // Reads up to the next prompt: first the banner's, then the answer's.
        let read_to_prompt = |stream: &mut std::os::unix::net::UnixStream| {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(PROMPT.as_bytes()) {
                match stream.read(&mut buf) {
                    Ok(0) => return Err("QEMU's monitor closed".to_string()),
                    Ok(n) if got.len() < 1 << 20 => got.extend_from_slice(&buf[..n]),
                    Ok(_) => return Err("QEMU's monitor said too much".to_string()),
                    Err(e) => return Err(format!("QEMU's monitor: {e}")),
                }
            }
            Ok(got)
        };
        read_to_prompt(&mut stream)?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("QEMU's monitor: {e}"))?;
        let answer = read_to_prompt(&mut stream)?;
        let text = String::from_utf8_lossy(&answer).replace('\r', "");
        let text = text.strip_suffix(PROMPT).unwrap_or(&text);
        // The monitor echoes the command line first.
        let text = text.split_once('\n').map_or("", |(_, rest)| rest);
        Ok(last_lines(text, 200))
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.kill();
    }
}
