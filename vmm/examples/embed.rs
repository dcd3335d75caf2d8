//! Embed the VMM with the daemons it is meant to work with: a host
//! directory as the guest's root over virtio-fs (virtiofsd-lite), and
//! virtio-vsock (vsock-lite) through which this process talks to a guest
//! port once the guest is up.
//!
//! ```text
//! cargo run -p vmm --example embed -- <vmlinux> <root-dir> [guest-port]
//! ```
//!
//! The root directory needs an `/init` that listens on the vsock port
//! (Keystone's guest agent listens on 1023); the example connects to it,
//! reports whether the connection was accepted, and stops the VM.

use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: embed <vmlinux> <root-dir> [guest-port]";
    let kernel = args.next().ok_or(usage)?;
    let root = args.next().ok_or(usage)?;
    let port: u32 = args.next().map_or(Ok(1023), |p| p.parse())?;

    // The root file system: virtiofsd-lite on threads of this process.
    let (fs_stream, _fs) =
        virtiofsd_lite::spawn_paired(virtiofsd_lite::FsConfig::new(&root, "root"))?;
    // virtio-vsock: host programs reach guest ports through this socket.
    let host_socket = std::env::temp_dir().join(format!("embed-{}.vsock", std::process::id()));
    let (vsock_stream, _vsock) = vsock_lite::spawn_paired(vsock_lite::VsockConfig {
        guest_cid: 3,
        uds_path: host_socket.clone(),
    })?;

    let vm = vmm::VmBuilder::new(kernel)
        .cmdline("console=ttyS0 root=root rootfstype=virtiofs rw init=/init")
        .memory_mib(256)
        .vcpus(2)
        .vhost_user_fs(fs_stream, "root")
        .vhost_user_vsock(vsock_stream, 3, &host_socket)
        .serial(vmm::SerialOutput::Stdout)
        .start()?;

    // Try the guest port until the guest's init accepts (or a minute).
    let t0 = Instant::now();
    let result = loop {
        match vm.connect_vsock(port, Duration::from_secs(5)) {
            Ok(_stream) => break Ok(t0.elapsed()),
            Err(e) if t0.elapsed() > Duration::from_secs(60) => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    match result {
        Ok(after) => eprintln!("\nguest port {port} accepted a connection after {after:.2?}"),
        Err(e) => eprintln!("\nguest port {port} never accepted: {e}"),
    }
    eprintln!("stopping: {}", vm.stop());
    Ok(())
}
