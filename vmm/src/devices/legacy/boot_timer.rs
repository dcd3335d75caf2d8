//! Boot-time measurement, by the VMM rather than guessed.
//!
//! [`BootTimeline`] records the first time each [`BootEvent`] happens, as
//! `CLOCK_MONOTONIC` nanoseconds, so a harness that spawned the VMM can
//! subtract its own spawn time. Events come from three places:
//! - the VMM itself (process start as given by the embedder, first KVM_RUN,
//!   VM exit);
//! - the serial console (first byte the kernel prints; the kernel's
//!   "Run /init as init process" line), see [`super::serial`];
//! - the guest, writing to the [`BootTimer`] I/O port: 1 when user space
//!   starts, 2 when the guest agent is ready (`printf '\001' | dd
//!   of=/dev/port bs=1 seek=1088 count=1`).

use std::sync::Mutex;

use crate::devices::bus::BusDevice;

/// The I/O port of the boot timer (0x440, 1088).
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// A point in the boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootEvent {
    /// The embedding process started (given by the embedder).
    ProcessStart,
    /// `Vm::start` was called.
    VmmStart,
    /// The boot vCPU entered KVM_RUN for the first time.
    FirstKvmRun,
    /// The kernel printed its first byte on the serial console.
    KernelStart,
    /// The kernel announced it is running init.
    InitExec,
    /// The guest wrote 1 to the boot timer port (user space is up).
    Userspace,
    /// The guest wrote 2 to the boot timer port (the guest agent is ready).
    AgentReady,
    /// The VM stopped.
    Exit,
}

impl BootEvent {
    /// All events, in boot order.
    pub const ALL: [BootEvent; 8] = [
        BootEvent::ProcessStart,
        BootEvent::VmmStart,
        BootEvent::FirstKvmRun,
        BootEvent::KernelStart,
        BootEvent::InitExec,
        BootEvent::Userspace,
        BootEvent::AgentReady,
        BootEvent::Exit,
    ];

    /// A stable snake_case name, used in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            BootEvent::ProcessStart => "process_start",
            BootEvent::VmmStart => "vmm_start",
            BootEvent::FirstKvmRun => "first_kvm_run",
            BootEvent::KernelStart => "kernel_start",
            BootEvent::InitExec => "init_exec",
            BootEvent::Userspace => "userspace",
            BootEvent::AgentReady => "agent_ready",
            BootEvent::Exit => "exit",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Current `CLOCK_MONOTONIC` time in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// First occurrence of each boot event.
#[derive(Debug, Default)]
pub struct BootTimeline {
    events: Mutex<[Option<u64>; 8]>,
}

impl BootTimeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `event` now, unless it was already recorded.
    pub fn record(&self, event: BootEvent) {
        self.record_at(event, monotonic_ns());
    }

    /// Records `event` at `ns` (CLOCK_MONOTONIC), unless already recorded.
    pub fn record_at(&self, event: BootEvent, ns: u64) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events[event.index()].get_or_insert(ns);
    }

    /// When `event` happened, if it did.
    pub fn get(&self, event: BootEvent) -> Option<u64> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())[event.index()]
    }

    /// Milliseconds from `from` to `to`, if both happened.
    pub fn millis_between(&self, from: BootEvent, to: BootEvent) -> Option<f64> {
        let (a, b) = (self.get(from)?, self.get(to)?);
        Some((b as f64 - a as f64) / 1e6)
    }

    /// All recorded events in boot order.
    pub fn recorded(&self) -> Vec<(BootEvent, u64)> {
        BootEvent::ALL
            .iter()
            .filter_map(|e| self.get(*e).map(|t| (*e, t)))
            .collect()
    }
}

/// The guest-facing boot timer port.
pub struct BootTimer {
    timeline: std::sync::Arc<BootTimeline>,
}

impl BootTimer {
    /// A port that records into `timeline`.
    pub fn new(timeline: std::sync::Arc<BootTimeline>) -> Self {
        Self { timeline }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        match data.first() {
            Some(1) => self.timeline.record(BootEvent::Userspace),
            Some(2) => self.timeline.record(BootEvent::AgentReady),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn records_first_occurrence_only() {
        let t = BootTimeline::new();
        t.record_at(BootEvent::KernelStart, 10);
        t.record_at(BootEvent::KernelStart, 20);
        t.record_at(BootEvent::FirstKvmRun, 4);
        assert_eq!(t.get(BootEvent::KernelStart), Some(10));
        assert_eq!(
            t.millis_between(BootEvent::FirstKvmRun, BootEvent::KernelStart),
            Some(6e-6)
        );
        assert_eq!(t.get(BootEvent::Userspace), None);
        let order: Vec<_> = t.recorded().into_iter().map(|(e, _)| e).collect();
        assert_eq!(order, vec![BootEvent::FirstKvmRun, BootEvent::KernelStart]);
    }

    #[test]
    fn guest_port_values_map_to_events() {
        let t = Arc::new(BootTimeline::new());
        let mut port = BootTimer::new(t.clone());
        port.write(0, &[7]);
        port.write(1, &[1]);
        assert_eq!(t.get(BootEvent::Userspace), None);
        port.write(0, &[]);
        port.write(0, &[1]);
        assert!(t.get(BootEvent::Userspace).is_some());
        assert!(t.get(BootEvent::AgentReady).is_none());
        port.write(0, &[2]);
        assert!(t.get(BootEvent::AgentReady).is_some());
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
