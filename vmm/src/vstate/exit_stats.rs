//! How many exits a VM took, of which kind, and how long the VMM spent
//! handling them: the measure that boot-time work starts from.
//!
//! Port I/O and MMIO exits are counted per device (each bus range has a
//! [`Tally`], see `devices::bus`), the rest per kind here. Handling time
//! is the time from KVM_RUN's return to the dispatch's end: the VMM's own
//! share of an exit, not the guest's or KVM's.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// The exits that are not a bus access.
#[derive(Debug, Default)]
pub struct OtherExits {
    /// Port I/O to a port no device claims.
    pub io_unclaimed: Tally,
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
        [
            ("io unclaimed", &self.io_unclaimed),
            ("mmio unclaimed", &self.mmio_unclaimed),
            ("hlt", &self.hlt),
            ("intr", &self.intr),
            ("irq window", &self.irq_window),
            ("ioapic eoi", &self.eoi),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(kind, t)| t.snapshot(kind))
        .filter(|c| c.count > 0)
        .collect()
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
}
