//! How many exits a VM took, of which kind, and how long the VMM spent
//! handling them: the measure that boot-time work starts from.
//!
//! Port I/O and MMIO exits are counted per device (each bus range has a
//! [`Tally`], see `devices::bus`), the rest per kind here. Handling time
//! is the time the dispatch of the exit took: the VMM's own share of an
//! exit, not the guest's or KVM's. Writes KVM coalesced instead of exiting
//! are not exits; they are tallied per zone (`coalesced <zone>`, see
//! `vstate::coalesced`) with the time applying them took, which includes
//! the drain that runs before an exit's dispatch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Exits of one kind: how many, and the time spent handling them.
#[derive(Debug, Default)]
pub struct Tally {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl Tally {
    /// Counts one exit that took `handling`.
    pub fn record(&self, handling: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(handling.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The tally as it stands, named `kind`.
    pub fn snapshot(&self, kind: &str) -> ExitCount {
        ExitCount {
            kind: kind.to_string(),
            count: self.count.load(Ordering::Relaxed),
            handling: Duration::from_nanos(self.nanos.load(Ordering::Relaxed)),
        }
    }
}

/// One line of a VM's exit accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitCount {
    /// What exited: `io serial`, `mmio virtio-fs root`, `hlt`, ...
    pub kind: String,
    /// How many times.
    pub count: u64,
    /// The VMM's time handling them, in all.
    pub handling: Duration,
}

/// Port I/O to ports no device claims, per port (so the accounting says
/// which guest probe to cut). At most one entry per port: 64 Ki in all.
#[derive(Debug, Default)]
pub struct UnclaimedPorts {
    ports: Mutex<BTreeMap<u16, (u64, u64)>>,
}

impl UnclaimedPorts {
    /// Counts one exit at `port` that took `handling`.
    pub fn record(&self, port: u16, handling: Duration) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let (count, nanos) = ports.entry(port).or_default();
        *count += 1;
        *nanos = nanos.saturating_add(handling.as_nanos() as u64);
    }

    /// One line per port, `io unclaimed 0x00cf8`, in port order.
    pub fn snapshot(&self) -> Vec<ExitCount> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|(port, (count, nanos))| ExitCount {
                kind: format!("io unclaimed {port:#06x}"),
                count: *count,
                handling: Duration::from_nanos(*nanos),
            })
            .collect()
    }
}

/// The exits that are not a bus access.
#[derive(Debug, Default)]
pub struct OtherExits {
    /// Port I/O to a port no device claims.
    pub io_unclaimed: UnclaimedPorts,
    /// MMIO to an address no device claims.
    pub mmio_unclaimed: Tally,
    /// HLT that came back to us (no in-kernel irqchip halt).
    pub hlt: Tally,
    /// KVM_RUN returned for a signal or an interrupt (`Intr`, `EINTR`).
    pub intr: Tally,
    /// The guest opened its interrupt window.
    pub irq_window: Tally,
    /// An IOAPIC EOI KVM forwarded.
    pub eoi: Tally,
    /// Anything else (system events, errors: the last exits of a VM).
    pub other: Tally,
}

impl OtherExits {
    /// The non-empty tallies.
    pub fn snapshot(&self) -> Vec<ExitCount> {
        let mut all = self.io_unclaimed.snapshot();
        let rest = [
            ("mmio unclaimed", &self.mmio_unclaimed),
            ("hlt", &self.hlt),
            ("intr", &self.intr),
            ("irq window", &self.irq_window),
            ("ioapic eoi", &self.eoi),
            ("other", &self.other),
        ];
        all.extend(
            rest.into_iter()
                .map(|(kind, t)| t.snapshot(kind))
                .filter(|c| c.count > 0),
        );
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_and_empty_kinds_are_left_out() {
        let others = OtherExits::default();
        others.hlt.record(Duration::from_micros(3));
        others.hlt.record(Duration::from_micros(4));
        others.intr.record(Duration::from_micros(1));
        let snap = others.snapshot();
        assert_eq!(snap.len(), 2, "{snap:?}");
        assert_eq!(snap[0].kind, "hlt");
        assert_eq!(snap[0].count, 2);
        assert_eq!(snap[0].handling, Duration::from_micros(7));
        assert_eq!(snap[1].kind, "intr");
    }

    #[test]
    fn unclaimed_ports_are_counted_each_on_its_own() {
        let others = OtherExits::default();
        for port in [0xcfc, 0xcf8, 0xcfc, 0x70] {
            others.io_unclaimed.record(port, Duration::from_micros(2));
        }
        let snap = others.snapshot();
        let kinds: Vec<(&str, u64)> = snap.iter().map(|c| (c.kind.as_str(), c.count)).collect();
        assert_eq!(
            kinds,
            vec![
                ("io unclaimed 0x0070", 1),
                ("io unclaimed 0x0cf8", 1),
                ("io unclaimed 0x0cfc", 2)
            ]
        );
        assert_eq!(snap[2].handling, Duration::from_micros(4));
    }
}
