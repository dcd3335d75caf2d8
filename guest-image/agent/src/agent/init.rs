//! The PID 1 duties of the agent in the guest's initramfs.
//!
//! Boot: mount /proc, /sys, /dev (devtmpfs), /dev/pts, /tmp and /run; when
//! the kernel command line names `keystone.root=<tag>`, mount that
//! virtio-fs read-only at /run/lower, the writable layer
//! (`keystone.state=<tag>` at /run/state, or a tmpfs when absent or when
//! the overlay refuses it) and the overlay at /run/newroot, the workspace
//! (`keystone.workspace=<tag>`) at /run/newroot/workspace, move /proc,
//! /sys and /dev over and switch into the new root (pivot_root, or the
//! `MS_MOVE` + chroot dance when the old root is the initramfs, which
//! cannot be pivoted). Then the hostname (`keystone.hostname=`) and `lo`.
//!
//! Run: PID 1 forks the server (so the server's own children are waited
//! for by the server) and itself only reaps orphans and waits for
//! SIGTERM/SIGINT (power off) or SIGUSR1 (reboot request from the server's
//! `Shutdown`). A server that dies is restarted.
//!
//! Shutdown: sync, SIGTERM then SIGKILL to everything, unmount the
//! workspace, remount / read-only, sync, `reboot(RB_AUTOBOOT)`. The VMM
//! runs the kernel with `reboot=k` and stops on reboot, so "power off" and
//! "reboot" look the same from here; the host decides whether to boot
//! again.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// The I/O port of the VMM's boot timer.
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// The value meaning "the agent is listening".
pub const BOOT_TIMER_AGENT_READY: u8 = 2;

/// The value of `key=` on a kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// mount(2) with string arguments.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (src, tgt) = (cstr(source)?, cstr(target)?);
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount {source} on {target}: {e}"),
        ));
    }
    Ok(())
}

fn mount_fs(fstype: &str, target: &str, flags: libc::c_ulong, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(fstype, target, Some(fstype), flags, data) {
        log::warn!("{e}");
    }
}

/// Gives PID 1 (and so the agent server) the console as standard input,
/// output and error where the kernel could not (an initramfs without
/// /dev/console), so that panics and crash reports reach the serial log.
fn console_stdio() {
    // SAFETY: open(2) of a constant NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: F_GETFD only queries whether `target` is open.
        if target != fd && unsafe { libc::fcntl(target, libc::F_GETFD) } < 0 {
            // SAFETY: dup2 of a descriptor we opened onto a free slot.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: closes the descriptor opened above, now duplicated.
        unsafe { libc::close(fd) };
    }
}

/// Fresh tmpfs mounts on /tmp (sticky, world-writable) and /run.
fn mount_tmp_and_run() {
    mount_fs(
        "tmpfs",
        "/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
}

/// Mounts the basic pseudo file systems.
pub fn early_mounts() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs("proc", "/proc", nosuid, None);
    mount_fs("sysfs", "/sys", nosuid, None);
    mount_fs("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755"));
    console_stdio();
    mount_fs(
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    mount_tmp_and_run();
}

/// Builds and enters the real root when `keystone.root=` is given.
pub fn switch_root(cmdline: &str) -> io::Result<()> {
    let Some(root_tag) = cmdline_value(cmdline, "keystone.root") else {
        log::info!("no keystone.root=: staying in the initramfs");
        return Ok(());
    };
    for d in ["/run/lower", "/run/state", "/run/newroot"] {
        std::fs::create_dir_all(d)?;
    }
    mount(
        root_tag,
        "/run/lower",
        Some("virtiofs"),
        libc::MS_RDONLY,
        None,
    )?;
    let mut upper_ready = false;
    if let Some(state_tag) = cmdline_value(cmdline, "keystone.state") {
        match mount(state_tag, "/run/state", Some("virtiofs"), 0, None) {
            Ok(()) => upper_ready = overlay_on("/run/state").is_ok(),
            Err(e) => log::warn!("{e}"),
        }
        if !upper_ready {
            log::warn!("overlay on the state share failed: falling back to a tmpfs upper layer (changes to / will not persist)");
        }
    }
    if !upper_ready {
        std::fs::create_dir_all("/run/tmpstate")?;
        mount(
            "tmpfs",
            "/run/tmpstate",
            Some("tmpfs"),
            0,
            Some("mode=0755"),
        )?;
        if let Err(e) = overlay_on("/run/tmpstate") {
            log::warn!("overlay with a tmpfs upper failed ({e}): using the read-only root as is");
            mount("/run/lower", "/run/newroot", None, libc::MS_BIND, None)?;
        }
    }
    if let Some(ws_tag) = cmdline_value(cmdline, "keystone.workspace") {
        let _ = std::fs::create_dir_all("/run/newroot/workspace");
        mount(ws_tag, "/run/newroot/workspace", Some("virtiofs"), 0, None)?;
    }
    for d in ["/proc", "/sys", "/dev"] {
        let target = format!("/run/newroot{d}");
        let _ = std::fs::create_dir_all(&target);
        mount(d, &target, None, libc::MS_MOVE, None)?;
    }
    enter_new_root("/run/newroot")?;
    mount_tmp_and_run();
    Ok(())
}

fn overlay_on(state: &str) -> io::Result<()> {
    let (upper, work) = (format!("{state}/upper"), format!("{state}/work"));
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    let opts = format!("lowerdir=/run/lower,upperdir={upper},workdir={work},userxattr");
    mount("overlay", "/run/newroot", Some("overlay"), 0, Some(&opts)).or_else(|_| {
        // Older kernels or file systems without user xattrs.
        let opts = format!("lowerdir=/run/lower,upperdir={upper},workdir={work}");
        mount("overlay", "/run/newroot", Some("overlay"), 0, Some(&opts))
    })
}

fn enter_new_root(new_root: &str) -> io::Result<()> {
    std::env::set_current_dir(new_root)?;
    let dot = cstr(".")?;
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one;
    // both arguments are valid C strings.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } == 0;
    if pivoted {
        // SAFETY: detaching the old root now stacked on "/".
        unsafe { libc::umount2(c"/".as_ptr(), libc::MNT_DETACH) };
    } else {
        // The initramfs (rootfs) cannot be pivoted: move the new root over
        // it instead (what switch_root does).
        mount(".", "/", None, libc::MS_MOVE, None)?;
    }
    // SAFETY: chroot(".") with a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// Sets the hostname.
pub fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe a valid buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        log::warn!("sethostname {name}: {}", io::Error::last_os_error());
    }
}

/// The gid of `name` in a `/etc/group` text.
fn group_id(groups: &str, name: &str) -> Option<libc::gid_t> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1).and_then(|gid| gid.parse().ok()))
            .flatten()
    })
}

/// Gives `/dev/kvm` to the `kvm` group, mode 0660, as udev does on a host:
/// the guest has no udev, and devtmpfs makes the node root's alone, so the
/// agent user (a member of `kvm` in the image) could not run VMs in a
/// sandbox with nested virtualization. Returns whether it did (false: no
/// `/dev/kvm`, the guest has no VMX/SVM; or no `kvm` group).
pub fn share_kvm(group_file: &Path, dev: &Path) -> io::Result<bool> {
    if !dev.exists() {
        return Ok(false);
    }
    let Some(gid) = group_id(&std::fs::read_to_string(group_file)?, "kvm") else {
        return Ok(false);
    };
    std::os::unix::fs::chown(dev, Some(0), Some(gid))?;
    std::fs::set_permissions(dev, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    Ok(true)
}

/// Brings the loopback interface up.
pub fn loopback_up() {
    // SAFETY: a plain datagram socket used only for interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own;
    // ifru_flags is the union member these ioctls use.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req);
        }
        libc::close(fd);
    }
}

/// Tells the VMM's boot timer that the agent listens.
pub fn signal_agent_ready() {
    use std::os::unix::fs::FileExt;
    let res = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .and_then(|f| f.write_at(&[BOOT_TIMER_AGENT_READY], BOOT_TIMER_PORT));
    if let Err(e) = res {
        log::warn!("cannot signal the boot timer through /dev/port: {e}");
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set we own.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
    }
    set
}

const INIT_SIGNALS: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGPWR,
];

/// PID 1's main loop: forks `server` and supervises it; never returns.
pub fn supervise(server: fn() -> io::Result<()>) -> ! {
    let set = signal_set(&INIT_SIGNALS);
    // SAFETY: blocks signals in this (still single-threaded) process.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut server_pid = fork_server(server, &set);
    loop {
        // SAFETY: waits on a valid set; the siginfo pointer may be null.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match sig {
            libc::SIGCHLD => {
                let reaped = reap_all();
                if let Some((_, status)) = reaped.iter().find(|(pid, _)| *pid == server_pid) {
                    log::error!(
                        "agent server (pid {server_pid}) ended: {}; restarting it",
                        describe_status(*status)
                    );
                    std::thread::sleep(Duration::from_secs(1));
                    server_pid = fork_server(server, &set);
                }
            }
            libc::SIGUSR1 => shutdown(true),
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => shutdown(false),
            _ => {}
        }
    }
}

fn fork_server(server: fn() -> io::Result<()>, set: &libc::sigset_t) -> libc::pid_t {
    // SAFETY: PID 1 is single-threaded here, so the child may run Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: unblocks the signals blocked by the parent.
        unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut()) };
        let code = match server() {
            Ok(()) => 0,
            Err(e) => {
                log::error!("agent server failed: {e}");
                1
            }
        };
        // SAFETY: leave the forked child without running PID 1's state.
        unsafe { libc::_exit(code) };
    }
    if pid < 0 {
        log::error!("fork: {}", io::Error::last_os_error());
    }
    pid
}

/// Reaps every exited child; returns their pids and wait statuses.
fn reap_all() -> Vec<(libc::pid_t, libc::c_int)> {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        reaped.push((pid, status));
    }
}

/// How a child ended, from its wait status.
fn describe_status(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    }
}

/// Stops everything and reboots (the VMM stops on reboot); never returns.
pub fn shutdown(reboot: bool) -> ! {
    log::info!(
        "shutting down ({})",
        if reboot { "reboot" } else { "power off" }
    );
    // SAFETY: sync, kill and waitpid have no memory preconditions.
    unsafe {
        libc::sync();
        libc::kill(-1, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        reap_all();
        // SAFETY: probe whether any child remains.
        if unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } < 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap_all();
    for target in ["/workspace", "/tmp", "/run"] {
        if Path::new(target).exists() {
            if let Ok(t) = cstr(target) {
                // SAFETY: valid C string.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    if let Err(e) = mount("none", "/", None, libc::MS_REMOUNT | libc::MS_RDONLY, None) {
        log::warn!("{e}");
    }
    // SAFETY: final sync and reboot; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    log::error!("reboot failed: {}", io::Error::last_os_error());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kvm_goes_to_the_kvm_group() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("ks-share-kvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (group, dev) = (dir.join("group"), dir.join("kvm"));
        std::fs::write(&group, "root:x:0:\nkvm:x:993:agent\nagent:x:1000:\n").unwrap();
        assert!(
            !super::share_kvm(&group, &dev).unwrap(),
            "no device, nothing to do"
        );
        std::fs::write(&dev, "").unwrap();
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(super::share_kvm(&group, &dev).unwrap());
            let meta = std::fs::metadata(&dev).unwrap();
            assert_eq!((meta.gid(), meta.mode() & 0o777), (993, 0o660));
        } else {
            println!("SKIP: giving a file to another group needs root");
        }
        std::fs::write(&group, "root:x:0:\n").unwrap();
        assert!(!super::share_kvm(&group, &dev).unwrap(), "no kvm group");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "console=ttyS0 reboot=k keystone.root=root keystone.state=st keystone.hostname=box-1 quiet\n";
        assert_eq!(cmdline_value(c, "keystone.root"), Some("root"));
        assert_eq!(cmdline_value(c, "keystone.state"), Some("st"));
        assert_eq!(cmdline_value(c, "keystone.hostname"), Some("box-1"));
        assert_eq!(cmdline_value(c, "keystone.workspace"), None);
        assert_eq!(cmdline_value("a=1 a=2", "a"), Some("2"));
    }
}
