//! Further VMMs as columns, named on the command line (`--peer NAME=PATH`)
//! and how each is driven:
//! - `firecracker`: `--no-api --config-file FILE`, the file holding
//!   `boot-source` (kernel_image_path, initrd_path, boot_args), an empty
//!   `drives` list and `machine-config` (vcpu_count, mem_size_mib); the
//!   serial console is its stdout. It has no virtio-fs, so it needs
//!   `--initrd`, and cannot carry the guest agent (its root is on
//!   virtio-fs). It exits when the guest reboots.
//! - `cloud-hypervisor`: `--kernel --initramfs --cmdline --cpus boot=N
//!   --memory size=NM --serial tty --console off`; the virtio-fs root via
//!   `--fs tag=root,socket=S` with `shared=on` memory, the agent's vsock
//!   via `--vsock cid=3,socket=UDS` (the same `CONNECT <port>` handshake
//!   as ours). It boots the guest again on reboot instead of exiting, so
//!   the harness stops it after the milestone.
//! - `qemu`: any other QEMU binary, driven as the built-in QEMU column.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The VMM programs the benchmark knows how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    Firecracker,
    CloudHypervisor,
    Qemu,
}

/// The names `--peer` accepts, in the order of the error message.
pub const KNOWN: &[(&str, PeerKind)] = &[
    ("firecracker", PeerKind::Firecracker),
    ("cloud-hypervisor", PeerKind::CloudHypervisor),
    ("qemu", PeerKind::Qemu),
];

/// One `--peer NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub kind: PeerKind,
    pub program: PathBuf,
}

/// Parses `NAME=PATH` (the clap value parser of `--peer`).
pub fn parse_peer(s: &str) -> Result<Peer, String> {
    let known = || KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let Some((name, path)) = s.split_once('=') else {
        return Err(format!(
            "expected NAME=PATH (NAME one of: {}), got '{s}'",
            known()
        ));
    };
    let Some(&(_, kind)) = KNOWN.iter().find(|(n, _)| *n == name) else {
        return Err(format!(
            "unknown peer '{name}': the benchmark knows how to drive {}",
            known()
        ));
    };
    if path.is_empty() {
        return Err(format!(
            "--peer {name}= needs the path of the {name} binary"
        ));
    }
    Ok(Peer {
        name: name.to_string(),
        kind,
        program: PathBuf::from(path),
    })
}

/// What a peer boots.
pub struct PeerBoot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// vhost-user-fs socket serving the root as tag `root`.
    pub fs_socket: Option<&'a Path>,
    /// Hybrid vsock socket the VMM creates (guest CID 3).
    pub vsock_uds: Option<&'a Path>,
}

/// Firecracker's `--config-file` document.
pub fn firecracker_config(b: &PeerBoot<'_>) -> serde_json::Value {
    let mut boot = serde_json::json!({
        "kernel_image_path": b.kernel.display().to_string(),
        "boot_args": b.cmdline,
    });
    if let Some(initrd) = b.initrd {
        boot["initrd_path"] = initrd.display().to_string().into();
    }
    serde_json::json!({
        "boot-source": boot,
        "drives": [],
        "machine-config": { "vcpu_count": b.vcpus, "mem_size_mib": b.memory_mib },
    })
}

/// Firecracker's arguments for a config file at `config`.
pub fn firecracker_args(config: &Path) -> Vec<OsString> {
    vec!["--no-api".into(), "--config-file".into(), config.into()]
}

/// Cloud Hypervisor's arguments.
pub fn cloud_hypervisor_args(b: &PeerBoot<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--kernel".into(), b.kernel.into()];
    if let Some(initrd) = b.initrd {
        a.extend(["--initramfs".into(), initrd.into()]);
    }
    let mut memory = format!("size={}M", b.memory_mib);
    if b.fs_socket.is_some() {
        // vhost-user needs guest memory the daemon can map.
        memory.push_str(",shared=on");
    }
    a.extend([
        "--cmdline".into(),
        b.cmdline.into(),
        "--cpus".into(),
        format!("boot={}", b.vcpus).into(),
        "--memory".into(),
        memory.into(),
        "--serial".into(),
        "tty".into(),
        "--console".into(),
        "off".into(),
    ]);
    if let Some(socket) = b.fs_socket {
        let mut v = OsString::from("tag=root,socket=");
        v.push(socket);
        a.extend(["--fs".into(), v]);
    }
    if let Some(uds) = b.vsock_uds {
        let mut v = OsString::from("cid=3,socket=");
        v.push(uds);
        a.extend(["--vsock".into(), v]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn parses_known_peers_and_names_them_on_error() {
        let p = parse_peer("firecracker=/opt/fc/firecracker").unwrap();
        assert_eq!(p.kind, PeerKind::Firecracker);
        assert_eq!(p.program, PathBuf::from("/opt/fc/firecracker"));
        assert_eq!(
            parse_peer("cloud-hypervisor=ch").unwrap().kind,
            PeerKind::CloudHypervisor
        );
        let e = parse_peer("crosvm=/usr/bin/crosvm").unwrap_err();
        assert!(e.contains("unknown peer 'crosvm'"), "{e}");
        assert!(e.contains("firecracker, cloud-hypervisor, qemu"), "{e}");
        assert!(parse_peer("firecracker").unwrap_err().contains("NAME=PATH"));
        assert!(parse_peer("qemu=").is_err());
    }

    fn boot<'a>(fs: Option<&'a Path>, uds: Option<&'a Path>) -> PeerBoot<'a> {
        PeerBoot {
            kernel: Path::new("/k/vmlinux"),
            initrd: Some(Path::new("/w/init.cpio")),
            cmdline: "console=ttyS0 rdinit=/init",
            vcpus: 2,
            memory_mib: 128,
            fs_socket: fs,
            vsock_uds: uds,
        }
    }

    #[test]
    fn firecracker_config_has_what_firecracker_requires() {
        let c = firecracker_config(&boot(None, None));
        assert_eq!(c["boot-source"]["kernel_image_path"], "/k/vmlinux");
        assert_eq!(c["boot-source"]["initrd_path"], "/w/init.cpio");
        assert_eq!(c["boot-source"]["boot_args"], "console=ttyS0 rdinit=/init");
        assert_eq!(c["machine-config"]["vcpu_count"], 2);
        assert_eq!(c["machine-config"]["mem_size_mib"], 128);
        // Firecracker's config file has no default for drives.
        assert_eq!(c["drives"], serde_json::json!([]));
        assert_eq!(
            strings(&firecracker_args(Path::new("/w/fc.json"))),
            ["--no-api", "--config-file", "/w/fc.json"]
        );
    }

    #[test]
    fn cloud_hypervisor_args_for_an_initramfs() {
        let a = strings(&cloud_hypervisor_args(&boot(None, None)));
        assert_eq!(
            a,
            [
                "--kernel",
                "/k/vmlinux",
                "--initramfs",
                "/w/init.cpio",
                "--cmdline",
                "console=ttyS0 rdinit=/init",
                "--cpus",
                "boot=2",
                "--memory",
                "size=128M",
                "--serial",
                "tty",
                "--console",
                "off"
            ]
        );
    }

    #[test]
    fn cloud_hypervisor_shares_memory_for_virtio_fs_and_adds_vsock() {
        let a = strings(&cloud_hypervisor_args(&boot(
            Some(Path::new("/w/fs.sock")),
            Some(Path::new("/w/v.sock")),
        )));
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("--memory"), "size=128M,shared=on");
        assert_eq!(after("--fs"), "tag=root,socket=/w/fs.sock");
        assert_eq!(after("--vsock"), "cid=3,socket=/w/v.sock");
    }
}
