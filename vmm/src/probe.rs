//! A KVM self-test: can this `/dev/kvm` run a guest at all?
//!
//! [`probe`] makes a fresh VM with one page of memory and one vCPU in real
//! mode, and runs five bytes of code there: `mov al, 'K'`, `out 0x10, al`,
//! `hlt`. A working KVM exits to the VMM with the port write, then with
//! HLT (there is no in-kernel irqchip, so HLT comes back to us). Anything
//! else is reported: the device cannot be opened (permissions: the `kvm`
//! group), an ioctl fails, the vCPU exits some other way, or it does not
//! come back within the deadline (a vCPU that spins in KVM_RUN is kicked
//! out with [`crate::host::vcpu_kick_signal`] so that the probe always returns).
//!
//! It is what `keystone vm check` runs, and what tests run inside nested
//! guests to show that a VM works three levels deep.

use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::vstate::vcpu::{install_kick_handler, vcpu_kick_signal};

/// Where the code goes in guest memory, and where it runs.
const CODE_AT: u64 = 0x1000;
/// `mov al, 'K'; out 0x10, al; hlt`.
const CODE: [u8; 5] = [0xb0, b'K', 0xe6, 0x10, 0xf4];
/// The port the code writes to.
const PORT: u16 = 0x10;
/// Guest memory: two pages.
const MEMORY: usize = 0x2000;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// `/dev/kvm` cannot be opened (the message says why and what to do).
    #[error("cannot open /dev/kvm: {0}{hint}", hint = open_hint(.0))]
    Open(std::io::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// The probe's memory could not be set up.
    #[error("cannot set up the probe's guest memory: {0}")]
    Memory(String),
    /// The vCPU exited in some other way than the OUT and the HLT.
    #[error("the probe's vCPU exited unexpectedly: {0}")]
    Unexpected(String),
    /// KVM_RUN did not return within the deadline.
    #[error("the probe's vCPU did not come back from KVM_RUN within {0:?} (it was kicked out)")]
    TimedOut(Duration),
    /// The vCPU thread could not be started.
    #[error("cannot start the probe's vCPU thread: {0}")]
    Thread(std::io::Error),
}

fn open_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        " (add the user to the kvm group, or run as root)"
    } else if e.kind() == std::io::ErrorKind::NotFound {
        " (no KVM: load kvm_intel or kvm_amd, or enable nested virtualization for this VM)"
    } else {
        ""
    }
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ProbeError {
    move |err| ProbeError::Ioctl { what, err }
}

/// Runs the probe once; `Ok` is how long it took from opening the device
/// to the HLT exit.
pub fn probe(deadline: Duration) -> Result<Duration, ProbeError> {
    let t0 = Instant::now();
    let kvm = Kvm::new().map_err(|e| ProbeError::Open(std::io::Error::from(e)))?;
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    memory
        .write_slice(&CODE, GuestAddress(CODE_AT))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let host = memory
        .get_host_address(GuestAddress(0))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region points at `memory`, which stays mapped until the
    // VM is dropped at the end of this function (the vCPU thread is joined
    // or has stopped touching guest memory before then: see below).
    unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    regs.rip = CODE_AT;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
    install_kick_handler().map_err(|e| ProbeError::Thread(std::io::Error::from(e)))?;

    let (tx, rx) = channel();
    let runner = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let mut seen = Vec::new();
            let outcome = loop {
                match vcpu.run() {
                    Ok(VcpuExit::IoOut(port, data)) => {
                        seen.push(format!("out {port:#x} {data:?}"));
                        if port != PORT || data != [b'K'] {
                            break Err(ProbeError::Unexpected(seen.join(", ")));
                        }
                    }
                    Ok(VcpuExit::Hlt) if seen.len() == 1 => break Ok(()),
                    Ok(other) => {
                        seen.push(format!("{other:?}"));
                        break Err(ProbeError::Unexpected(seen.join(", ")));
                    }
                    Err(e) if e.errno() == libc::EINTR => {
                        break Err(ProbeError::Unexpected("KVM_RUN interrupted".into()))
                    }
                    Err(err) => {
                        break Err(ProbeError::Ioctl {
                            what: "KVM_RUN",
                            err,
                        })
                    }
                }
            };
            let _ = tx.send(outcome);
        })
        .map_err(ProbeError::Thread)?;
    let result = match rx.recv_timeout(deadline) {
        Ok(outcome) => outcome.map(|()| t0.elapsed()),
        Err(RecvTimeoutError::Disconnected) => Err(ProbeError::Unexpected(
            "the vCPU thread ended without a word".into(),
        )),
        Err(RecvTimeoutError::Timeout) => {
            // Kick until KVM_RUN returns (a signal that lands just before
            // the thread re-enters KVM_RUN would be lost).
            while !runner.is_finished() {
                // SAFETY: the thread has not been joined; the kick signal has
                // an installed empty handler, so delivering it only makes
                // KVM_RUN return EINTR.
                unsafe {
                    libc::pthread_kill(
                        std::os::unix::thread::JoinHandleExt::as_pthread_t(&runner),
                        vcpu_kick_signal(),
                    )
                };
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(ProbeError::TimedOut(deadline))
        }
    };
    let _ = runner.join();
    result
}

/// What [`probe_many`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProbeTally {
    /// Runs made.
    pub runs: u32,
    /// Runs that exited as they should.
    pub ok: u32,
    /// Runs that did not come back within the deadline.
    pub timed_out: u32,
    /// Runs that failed otherwise.
    pub failed: u32,
    /// The slowest successful run, in microseconds.
    pub slowest_us: u64,
    /// The first failure, as text.
    pub first_failure: Option<String>,
}

/// Runs the probe `runs` times, each with `deadline`, and counts.
pub fn probe_many(runs: u32, deadline: Duration) -> ProbeTally {
    let mut tally = ProbeTally::default();
    for _ in 0..runs {
        tally.runs += 1;
        match probe(deadline) {
            Ok(took) => {
                tally.ok += 1;
                tally.slowest_us = tally.slowest_us.max(took.as_micros() as u64);
            }
            Err(e) => {
                if matches!(e, ProbeError::TimedOut(_)) {
                    tally.timed_out += 1;
                } else {
                    tally.failed += 1;
                }
                tally.first_failure.get_or_insert_with(|| e.to_string());
                // A device that cannot be opened will not open next time.
                if matches!(e, ProbeError::Open(_)) {
                    break;
                }
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_say_what_to_do() {
        let e = ProbeError::Open(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(e.to_string().contains("kvm group"), "{e}");
        let e = ProbeError::Open(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(e.to_string().contains("no KVM"), "{e}");
    }

    #[test]
    fn the_probe_runs_on_this_hosts_kvm() {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            println!("SKIP: /dev/kvm is not usable here");
            return;
        }
        let tally = probe_many(3, Duration::from_secs(30));
        assert_eq!(tally.ok, 3, "{tally:?}");
    }
}
