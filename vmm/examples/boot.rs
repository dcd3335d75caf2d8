//! Boot a kernel with the `vmm` library in a few lines.
//!
//! ```text
//! cargo run -p vmm --example boot -- <vmlinux|bzImage> [initrd] [extra cmdline...]
//! ```
//!
//! The serial console goes to stdout; the options this host's KVM needs
//! are added to the command line automatically.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel = args
        .next()
        .ok_or("usage: boot <kernel> [initrd] [cmdline...]")?;
    let initrd = args.next();
    let extra: Vec<String> = args.collect();

    let mut vm = vmm::VmBuilder::new(kernel)
        .cmdline(format!("console=ttyS0 {}", extra.join(" ")))
        .memory_mib(128)
        .vcpus(2)
        .serial(vmm::SerialOutput::Stdout);
    if let Some(initrd) = initrd {
        vm = vm.initrd(initrd);
    }
    let vm = vm.start()?;
    let exit = vm.wait();
    eprintln!("\nguest stopped: {}", exit.reason);
    Ok(())
}
