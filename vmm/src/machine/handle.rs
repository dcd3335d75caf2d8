//! The [`VmHandle`] of a running VM: waits for, pauses, stops and
//! observes it, and on stop joins the vCPU threads, stops the ticker
//! (which drains and flushes a last time) and logs the exit counts.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ticker::Ticker;
use super::{VmExit, VmInfo};
use crate::devices::bus::Bus;
use crate::devices::legacy::{BootEvent, BootTimeline, ConsoleLog, Serial};
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::vstate::coalesced::CoalescedIo;
use crate::vstate::exit::{ExitSignal, VmExitReason};
use crate::vstate::exit_stats::{ExitCount, OtherExits};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{vcpu_kick_signal, RunControl};
use crate::vstate::vm::Vm;

pub(super) struct VcpuThread {
    pub(super) handle: JoinHandle<()>,
    pub(super) finished: Arc<AtomicBool>,
}

/// A running VM. Dropping it stops the VM and joins its threads.
pub struct VmHandle {
    pub(super) info: VmInfo,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) control: Arc<RunControl>,
    pub(super) timeline: Arc<BootTimeline>,
    pub(super) console: Arc<ConsoleLog>,
    pub(super) serial: Arc<Mutex<Serial>>,
    pub(super) threads: Mutex<Vec<VcpuThread>>,
    pub(super) exits: ExitAccounts,
    /// Taken (and stopped) when the vCPUs stop.
    pub(super) ticker: Mutex<Option<Ticker>>,
    pub(super) vsock_host_socket: Option<std::path::PathBuf>,
    // Kept alive for the VM's lifetime; the vCPU threads and vhost-user
    // backends use them. Field order matters: threads are joined in Drop
    // before these are released.
    pub(super) _transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) _vm: Vm,
    pub(super) _mem: GuestMemoryMmap,
}

/// Where a VM's exits are counted: each bus device, and the other kinds.
pub(super) struct ExitAccounts {
    pub(super) io_bus: Arc<Bus>,
    pub(super) mmio_bus: Arc<Bus>,
    pub(super) others: Arc<OtherExits>,
    /// Writes KVM coalesced (not exits; listed as `coalesced ...`).
    pub(super) coalesced: Option<Arc<CoalescedIo>>,
}

impl ExitAccounts {
    fn snapshot(&self) -> Vec<ExitCount> {
        let mut all = self.io_bus.exit_counts("io");
        all.extend(self.mmio_bus.exit_counts("mmio"));
        all.extend(self.others.snapshot());
        all.extend(self.coalesced.iter().flat_map(|c| c.counts()));
        all
    }
}

impl VmHandle {
    /// Facts about the VM (KVM kind, template, nested status, command line).
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The boot timeline.
    pub fn timeline(&self) -> Arc<BootTimeline> {
        self.timeline.clone()
    }

    /// The console log (last MiB of serial output).
    pub fn console(&self) -> Arc<ConsoleLog> {
        self.console.clone()
    }

    /// Sends host input to the guest's serial port; returns bytes accepted.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes)
    }

    /// The exit reason, if the VM already stopped.
    pub fn exit_reason(&self) -> Option<VmExitReason> {
        self.exit.reason()
    }

    /// Waits up to `timeout` for the VM to stop.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExitReason> {
        self.exit.wait_timeout(timeout)
    }

    /// Asks the VM to stop (like pulling the power cord) and waits for it.
    pub fn stop(&self) -> VmExitReason {
        self.exit.request(VmExitReason::Stopped);
        self.join_vcpus();
        self.exit.reason().unwrap_or(VmExitReason::Stopped)
    }

    /// The VM's exits so far, by device (port I/O, MMIO) and by kind, with
    /// the VMM's time handling them. Logged at debug level when the VM
    /// ends.
    pub fn exit_counts(&self) -> Vec<ExitCount> {
        self.exits.snapshot()
    }

    /// A descriptor that becomes readable once the VM has stopped (an
    /// eventfd), for embedders that wait in their own event loop; then
    /// [`VmHandle::exit_reason`] says why.
    pub fn exit_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsRawFd;
        // SAFETY: the eventfd lives as long as the handle (`self.exit`),
        // which the borrow is tied to.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.exit.eventfd().as_raw_fd()) }
    }

    /// Opens a connection to guest vsock `port` through the vsock backend's
    /// host socket ([`crate::VmBuilder::vhost_user_vsock`]), giving the
    /// backend `handshake` to answer. `NotFound` when the VM has no vsock
    /// device with a host socket.
    pub fn connect_vsock(
        &self,
        port: u32,
        handshake: Duration,
    ) -> std::io::Result<std::os::unix::net::UnixStream> {
        let socket = self.vsock_host_socket.as_deref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "this VM has no vsock device with a host socket",
            )
        })?;
        keystone_agent_protocol::client::hybrid_vsock_connect_within(socket, port, handshake)
    }

    /// Pauses all vCPUs; returns once they are parked (or after 5 s).
    ///
    /// Only the vCPUs stop: vhost-user backends (virtio-fs, vsock) keep
    /// serving what the guest queued before the pause, and a vsock backend
    /// keeps taking host connections. Embedders that need a quiescent
    /// device state (a snapshot) must stop those backends themselves.
    pub fn pause(&self) -> bool {
        self.control.set_paused(true);
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let n = threads.len();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            kick(&threads);
            if self.control.wait_parked(n, Duration::from_millis(10)) {
                return true;
            }
        }
        false
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.control.set_paused(false);
    }

    /// Waits for the VM to stop on its own and returns why.
    pub fn wait(self) -> VmExit {
        let reason = loop {
            if let Some(r) = self.exit.wait_timeout(Duration::from_secs(3600)) {
                break r;
            }
        };
        self.join_vcpus();
        VmExit { reason }
    }

    fn join_vcpus(&self) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if threads.is_empty() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads.iter().any(|t| !t.finished.load(Ordering::SeqCst))
            && Instant::now() < deadline
        {
            kick(&threads);
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in threads.drain(..) {
            if t.finished.load(Ordering::SeqCst) {
                let _ = t.handle.join();
            } else {
                log::error!("a vCPU thread did not stop within 5 s; leaking it");
                std::mem::forget(t.handle);
            }
        }
        // The vCPUs are gone: apply what they left in the ring and pass
        // on the console output still held.
        let ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = ticker {
            t.stop();
        }
        self.timeline.record(BootEvent::Exit);
        if log::log_enabled!(log::Level::Debug) {
            for c in self.exits.snapshot() {
                log::debug!(
                    "exits: {:<24} {:>9} handled in {:?}",
                    c.kind,
                    c.count,
                    c.handling
                );
            }
        }
    }
}

fn kick(threads: &[VcpuThread]) {
    for t in threads
        .iter()
        .filter(|t| !t.finished.load(Ordering::SeqCst))
    {
        // SAFETY: the pthread handle belongs to a thread we have not joined;
        // sending it a signal with an installed (empty) handler is harmless.
        unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu_kick_signal()) };
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.exit.request(VmExitReason::Stopped);
        self.join_vcpus();
    }
}
