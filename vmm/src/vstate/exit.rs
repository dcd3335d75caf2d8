//! vCPU exit dispatch and VM exit reasons.
//!
//! [`handle_kvm_exit`] is a free function over a `VcpuExit` and the two
//! buses, so every exit kind is unit-tested without KVM_RUN. The vCPU loop
//! (`vcpu.rs`) stays thin: run, dispatch, and on [`ExitAction::Stop`]
//! snapshot the registers and report through the VM's [`ExitSignal`].

use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Registers worth showing when a guest dies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // The x86 register names say it.
pub struct RegsSnapshot {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
}

impl fmt::Display for RegsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip, self.rsp, self.rflags, self.rax, self.cs, self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExitReason {
    /// The guest rebooted (i8042 reset or a KVM reset event): a clean exit.
    Reset,
    /// The guest powered off: a clean exit.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
    /// A vCPU triple-faulted.
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
        /// Its registers then.
        regs: RegsSnapshot,
    },
    /// KVM could not emulate an instruction (or another internal error).
    InternalError {
        /// Which vCPU.
        vcpu: u8,
        /// KVM's suberror code.
        suberror: u32,
        /// Its registers then.
        regs: RegsSnapshot,
    },
    /// The guest kernel reported a crash (KVM_SYSTEM_EVENT_CRASH).
    GuestCrash {
        /// Which vCPU.
        vcpu: u8,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// Which vCPU.
        vcpu: u8,
        /// KVM's hardware entry failure reason.
        reason: u64,
    },
    /// An exit the VMM does not handle, or a failing KVM_RUN.
    VcpuError {
        /// Which vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
}

impl VmExitReason {
    /// True for exits the guest asked for (reboot, power off) or the host did.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::Shutdown | Self::Stopped)
    }
}

impl fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reset => write!(f, "guest rebooted"),
            Self::Shutdown => write!(f, "guest powered off"),
            Self::Stopped => write!(f, "stopped by the host"),
            Self::TripleFault { vcpu, regs } => write!(f, "vCPU {vcpu} triple fault: {regs}"),
            Self::InternalError {
                vcpu,
                suberror,
                regs,
            } => write!(
                f,
                "vCPU {vcpu}: KVM internal error, suberror {suberror}{}: {regs}",
                if *suberror == 1 {
                    " (instruction emulation failed; try --cpu-template baseline)"
                } else {
                    ""
                }
            ),
            Self::GuestCrash { vcpu } => {
                write!(f, "vCPU {vcpu}: the guest kernel reported a crash")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM failed to enter the guest (hardware reason {reason:#x})"
                )
            }
            Self::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu}: {message}"),
        }
    }
}

/// The first reason any part of the VM gives for stopping, with a way to
/// wait for it. Later requests are ignored.
pub struct ExitSignal {
    reason: Mutex<Option<VmExitReason>>,
    cond: Condvar,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal that nothing requested yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` if it is the first, and wakes waiters.
    pub fn request(&self, reason: VmExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            self.cond.notify_all();
            let _ = self.evt.write(1);
        }
    }

    /// The reason, once one was given.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a reason.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExitReason> {
        let slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, _) = self
            .cond
            .wait_timeout_while(slot, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        slot.clone()
    }

    /// An `EventFd` that becomes readable when a reason is given (for
    /// embedders with an event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why the dispatcher wants the vCPU to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    Reset,
    Shutdown,
    TripleFault,
    InternalError,
    GuestCrash,
    FailEntry(u64),
    Unhandled(String),
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// Stop the VM.
    Stop(StopCause),
}

/// Handles one vCPU exit: port and MMIO accesses go to the buses, the
/// rest decides whether the VM goes on.
pub fn handle_kvm_exit(exit: VcpuExit<'_>, io_bus: &Bus, mmio_bus: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !io_bus.read(u64::from(port), data) {
                // Nothing there: an ISA bus floats high.
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !io_bus.write(u64::from(port), data) {
                log::trace!("unhandled port write {port:#x} {data:02x?}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio_bus.read(addr, data) {
                log::debug!("unhandled MMIO read at {addr:#x}");
                data.fill(0);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio_bus.write(addr, data) {
                log::debug!("unhandled MMIO write at {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {
            ExitAction::Continue
        }
        VcpuExit::Shutdown => ExitAction::Stop(StopCause::TripleFault),
        VcpuExit::InternalError => ExitAction::Stop(StopCause::InternalError),
        VcpuExit::FailEntry(reason, _cpu) => ExitAction::Stop(StopCause::FailEntry(reason)),
        VcpuExit::SystemEvent(kind, _data) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(StopCause::Shutdown),
            KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(StopCause::Reset),
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Stop(StopCause::GuestCrash),
            other => ExitAction::Stop(StopCause::Unhandled(format!("system event {other}"))),
        },
        other => ExitAction::Stop(StopCause::Unhandled(format!("unexpected exit {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::Arc;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Echo>>, Arc<Mutex<Echo>>) {
        let pio = Arc::new(Mutex::new(Echo(vec![])));
        let mmio = Arc::new(Mutex::new(Echo(vec![])));
        let mut io_bus = Bus::new();
        io_bus.insert(pio.clone(), 0x3f8, 8, "pio").unwrap();
        let mut mmio_bus = Bus::new();
        mmio_bus
            .insert(mmio.clone(), 0xd000_0000, 0x1000, "mmio")
            .unwrap();
        (io_bus, mmio_bus, pio, mmio)
    }

    #[test]
    fn port_io_reaches_the_device_or_floats_high() {
        let (io, mmio, pio, _) = buses();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_kvm_exit(VcpuExit::IoIn(0x3fd, &mut data), &io, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0x45]);
        let mut data = [0u8; 2];
        handle_kvm_exit(VcpuExit::IoIn(0x80, &mut data), &io, &mmio);
        assert_eq!(data, [0xff, 0xff]);
        handle_kvm_exit(VcpuExit::IoOut(0x3f8, b"A"), &io, &mmio);
        handle_kvm_exit(VcpuExit::IoOut(0x999, b"B"), &io, &mmio);
        assert_eq!(pio.lock().unwrap().0, vec![(0, b"A".to_vec())]);
    }

    #[test]
    fn mmio_reaches_the_device_or_reads_zero() {
        let (io, mmio, _, dev) = buses();
        let mut data = [0xaau8; 4];
        handle_kvm_exit(VcpuExit::MmioRead(0xd000_0070, &mut data), &io, &mmio);
        assert_eq!(data, [0xb0; 4]);
        let mut data = [0xaau8; 4];
        handle_kvm_exit(VcpuExit::MmioRead(0xc000_0000, &mut data), &io, &mmio);
        assert_eq!(data, [0; 4]);
        handle_kvm_exit(VcpuExit::MmioWrite(0xd000_0050, &[1, 0, 0, 0]), &io, &mmio);
        assert_eq!(dev.lock().unwrap().0, vec![(0x50, vec![1, 0, 0, 0])]);
    }

    #[test]
    fn terminal_exits_stop_the_vm() {
        let (io, mmio, _, _) = buses();
        let stop = |e| handle_kvm_exit(e, &io, &mmio);
        assert_eq!(
            stop(VcpuExit::Shutdown),
            ExitAction::Stop(StopCause::TripleFault)
        );
        assert_eq!(
            stop(VcpuExit::InternalError),
            ExitAction::Stop(StopCause::InternalError)
        );
        assert_eq!(
            stop(VcpuExit::FailEntry(7, 0)),
            ExitAction::Stop(StopCause::FailEntry(7))
        );
        assert_eq!(
            stop(VcpuExit::SystemEvent(1, &[])),
            ExitAction::Stop(StopCause::Shutdown)
        );
        assert_eq!(
            stop(VcpuExit::SystemEvent(2, &[])),
            ExitAction::Stop(StopCause::Reset)
        );
        assert_eq!(
            stop(VcpuExit::SystemEvent(3, &[])),
            ExitAction::Stop(StopCause::GuestCrash)
        );
        assert!(matches!(
            stop(VcpuExit::SystemEvent(9, &[])),
            ExitAction::Stop(StopCause::Unhandled(_))
        ));
        assert!(matches!(
            stop(VcpuExit::Unknown),
            ExitAction::Stop(StopCause::Unhandled(_))
        ));
        assert_eq!(stop(VcpuExit::Hlt), ExitAction::Continue);
        assert_eq!(stop(VcpuExit::Intr), ExitAction::Continue);
    }

    #[test]
    fn exit_signal_keeps_the_first_reason() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.wait_timeout(Duration::from_millis(1)), None);
        s.request(VmExitReason::Reset);
        s.request(VmExitReason::Stopped);
        assert_eq!(s.reason(), Some(VmExitReason::Reset));
        assert_eq!(
            s.wait_timeout(Duration::from_secs(1)),
            Some(VmExitReason::Reset)
        );
        assert_eq!(s.eventfd().read().unwrap(), 1);
        assert!(VmExitReason::Reset.is_clean());
        let crash = VmExitReason::InternalError {
            vcpu: 0,
            suberror: 1,
            regs: RegsSnapshot::default(),
        };
        assert!(!crash.is_clean());
        assert!(crash.to_string().contains("emulation failed"));
    }
}
