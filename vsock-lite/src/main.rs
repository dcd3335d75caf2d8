//! `vsock-lite`: serve one vhost-user vsock frontend (QEMU's
//! `vhost-user-vsock-device`) on a socket, with the guest's ports reached
//! through a hybrid Unix socket (`CONNECT <port>\n`).

use std::path::PathBuf;

use clap::Parser;

/// A vhost-user vsock backend: the host connects to guest ports through
/// `--uds-path`; the guest cannot connect to the host.
#[derive(Parser)]
#[command(name = "vsock-lite", version)]
struct Args {
    /// Where the vhost-user frontend connects.
    #[arg(long)]
    socket_path: PathBuf,
    /// Where host programs connect to reach guest ports.
    #[arg(long)]
    uds_path: PathBuf,
    /// The guest's CID (3 to 4294967294).
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
}

fn main() {
    let a = Args::parse();
    let config = vsock_lite::VsockConfig {
        guest_cid: a.guest_cid,
        uds_path: a.uds_path,
    };
    if let Err(e) = vsock_lite::serve_listener(&a.socket_path, config) {
        eprintln!("vsock-lite: {e}");
        std::process::exit(1);
    }
}
