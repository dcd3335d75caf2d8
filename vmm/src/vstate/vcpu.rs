//! vCPU threads: set up CPUID, registers and the local APIC, then run
//! KVM_RUN and hand each exit to [`handle_kvm_exit`].
//!
//! Stopping and pausing: the VM controller sets the shared [`RunControl`]
//! and sends [`vcpu_kick_signal`] to each vCPU thread, repeatedly until the
//! thread acknowledges, so a signal that lands just before KVM_RUN is
//! entered cannot be lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::VcpuFd;

use super::coalesced::{drain_then_handle, CoalescedIo};
use super::exit::{ExitAction, ExitSignal, RegsSnapshot, StopCause, VmExitReason};
use super::exit_stats::{OtherExits, Tally};
use crate::devices::bus::Bus;
use crate::devices::legacy::{BootEvent, BootTimeline};

/// The real-time signal that kicks a vCPU out of KVM_RUN.
pub fn vcpu_kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's (empty) handler; idempotent.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(vcpu_kick_signal(), noop_signal_handler)
}

/// Run/pause/stop state shared by the controller and the vCPU threads.
#[derive(Default)]
pub struct RunControl {
    paused: Mutex<bool>,
    resumed: Condvar,
    pause_acks: Mutex<usize>,
    acked: Condvar,
}

impl RunControl {
    /// Asks vCPUs to pause at their next exit.
    pub fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = paused;
        if !paused {
            self.resumed.notify_all();
        }
    }

    /// True while a pause is requested.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `n` vCPUs are parked (or `timeout`).
    pub fn wait_parked(&self, n: usize, timeout: std::time::Duration) -> bool {
        let acks = self.pause_acks.lock().unwrap_or_else(|e| e.into_inner());
        let (acks, _) = self
            .acked
            .wait_timeout_while(acks, timeout, |a| *a < n)
            .unwrap_or_else(|e| e.into_inner());
        *acks >= n
    }

    fn park(&self, exit: &ExitSignal) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if !*paused {
            return;
        }
        *self.pause_acks.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.acked.notify_all();
        while *paused && exit.reason().is_none() {
            paused = self
                .resumed
                .wait_timeout(paused, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *self.pause_acks.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    }
}

/// Everything a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<RunControl>,
    pub timeline: Arc<BootTimeline>,
    /// Exits that are not a bus access.
    pub others: Arc<OtherExits>,
    /// The VM's coalesced ring, drained before every exit is handled.
    pub coalesced: Option<Arc<CoalescedIo>>,
    /// Set by the thread when it leaves its loop.
    pub finished: Arc<AtomicBool>,
}

fn snapshot(fd: &VcpuFd) -> RegsSnapshot {
    let mut s = RegsSnapshot::default();
    if let Ok(r) = fd.get_regs() {
        s.rip = r.rip;
        s.rsp = r.rsp;
        s.rflags = r.rflags;
        s.rax = r.rax;
    }
    if let Ok(sr) = fd.get_sregs() {
        s.cr0 = sr.cr0;
        s.cr2 = sr.cr2;
        s.cr3 = sr.cr3;
        s.cr4 = sr.cr4;
        s.efer = sr.efer;
        s.cs = sr.cs.selector;
    }
    s
}

fn internal_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills
    // the `internal` member of the exit union; reading a u32 from it is valid.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

fn stop_reason(cause: StopCause, id: u8, fd: &mut VcpuFd) -> VmExitReason {
    match cause {
        StopCause::Reset => VmExitReason::Reset,
        StopCause::Shutdown => VmExitReason::Shutdown,
        StopCause::TripleFault => VmExitReason::TripleFault {
            vcpu: id,
            regs: snapshot(fd),
        },
        StopCause::InternalError => VmExitReason::InternalError {
            vcpu: id,
            suberror: internal_suberror(fd),
            regs: snapshot(fd),
        },
        StopCause::GuestCrash => VmExitReason::GuestCrash { vcpu: id },
        StopCause::FailEntry(reason) => VmExitReason::FailEntry { vcpu: id, reason },
        StopCause::Unhandled(message) => VmExitReason::VcpuError { vcpu: id, message },
    }
}

/// Where an exit is counted: the bus device it reached, its kind, or the
/// unclaimed port it touched.
enum Counter<'a> {
    Tally(&'a Tally),
    UnclaimedPort(u16),
}

impl Counter<'_> {
    fn record(&self, others: &OtherExits, handling: std::time::Duration) {
        match self {
            Counter::Tally(t) => t.record(handling),
            Counter::UnclaimedPort(port) => others.io_unclaimed.record(*port, handling),
        }
    }
}

fn counter_for<'a>(exit: &kvm_ioctls::VcpuExit<'_>, ctx: &'a VcpuContext) -> Counter<'a> {
    use kvm_ioctls::VcpuExit;
    let others = &*ctx.others;
    Counter::Tally(match exit {
        VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => {
            match ctx.io_bus.tally(u64::from(*port)) {
                Some(t) => t,
                None => return Counter::UnclaimedPort(*port),
            }
        }
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
            ctx.mmio_bus.tally(*addr).unwrap_or(&others.mmio_unclaimed)
        }
        VcpuExit::Hlt => &others.hlt,
        VcpuExit::Intr => &others.intr,
        VcpuExit::IrqWindowOpen => &others.irq_window,
        VcpuExit::IoapicEoi(_) => &others.eoi,
        _ => &others.other,
    })
}

/// The body of a vCPU thread: runs until the VM is asked to stop.
pub fn run_vcpu(id: u8, mut fd: VcpuFd, ctx: VcpuContext) {
    if id == 0 {
        ctx.timeline.record(BootEvent::FirstKvmRun);
    }
    loop {
        if ctx.exit.reason().is_some() {
            break;
        }
        if ctx.control.is_paused() {
            ctx.control.park(&ctx.exit);
            continue;
        }
        let action = match fd.run() {
            Ok(exit) => {
                let counter = counter_for(&exit, &ctx);
                // Writes the guest queued before this exit are applied
                // first (`vstate::coalesced`).
                let (action, handling) =
                    drain_then_handle(exit, &ctx.io_bus, &ctx.mmio_bus, ctx.coalesced.as_deref());
                counter.record(&ctx.others, handling);
                action
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked out: loop around and look at the control state.
                ctx.others.intr.record(std::time::Duration::ZERO);
                fd.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => ExitAction::Stop(StopCause::Unhandled(format!("KVM_RUN failed: {e}"))),
        };
        if let ExitAction::Stop(cause) = action {
            let reason = stop_reason(cause, id, &mut fd);
            log::info!("vCPU {id} stopping the VM: {reason}");
            ctx.exit.request(reason);
            break;
        }
    }
    ctx.finished.store(true, Ordering::SeqCst);
}
