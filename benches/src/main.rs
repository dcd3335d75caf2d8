//! `keystone-benches`: benchmarks for Keystone that print JSON.
//!
//! `keystone-benches boot` boots the same kernel, command line and root
//! (virtio-fs or an initramfs) with our VMM (`keystone vm run`), QEMU's
//! microvm machine and any peer given (Firecracker, Cloud Hypervisor,
//! another QEMU), side by side, and reports setup time, boot milestones,
//! agent readiness, VMM memory and exit per run (see `boot/mod.rs`); with
//! `--rig`, inside a hardware-style KVM. The JSON goes to stdout (and
//! `--out`), a short table to stderr.

mod boot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keystone-benches",
    version,
    about = "Keystone benchmarks (JSON output)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot benchmark: our VMM against QEMU microvm and other peers on the same KVM.
    Boot(boot::BootArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot(args) => boot::run(args),
    };
    if let Err(err) = result {
        eprintln!("keystone-benches: error: {err:#}");
        std::process::exit(1);
    }
}
