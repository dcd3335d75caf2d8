//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! Each device sits behind its own `Mutex`; the bus itself is immutable once
//! the VM runs, so a vCPU exit takes exactly one lock (the device's). There
//! is no bus-wide lock and no lock is held across two devices, so no lock
//! ordering is needed.

use std::sync::{Arc, Mutex};

use crate::vstate::exit_stats::{ExitCount, Tally};

/// A device on the port I/O or MMIO bus.
///
/// `offset` is relative to the start of the range the device was inserted
/// at. Accesses come straight from the guest: implementations must treat
/// `data` lengths and offsets as untrusted.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`. Unhandled bytes stay 0.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or overlaps one already inserted.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap { base: u64, len: u64 },
}

struct BusRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
    /// The device's name in exit accounting.
    name: String,
    /// The exits its accesses cost.
    exits: Tally,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`, called `name` in exit
    /// accounting.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        name: impl Into<String>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            at,
            BusRange {
                base,
                len,
                device,
                name: name.into(),
                exits: Tally::default(),
            },
        );
        Ok(())
    }

    /// The exit tally of the device at `addr`, if one is there.
    pub fn tally(&self, addr: u64) -> Option<&Tally> {
        self.find(addr).map(|(range, _)| &range.exits)
    }

    /// Each device's exits so far (those that had any), named
    /// `<prefix> <device>`.
    pub fn exit_counts(&self, prefix: &str) -> Vec<ExitCount> {
        self.ranges
            .iter()
            .map(|r| r.exits.snapshot(&format!("{prefix} {}", r.name)))
            .filter(|c| c.count > 0)
            .collect()
    }

    fn find(&self, addr: u64) -> Option<(&BusRange, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = &self.ranges[idx];
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    /// Dispatches a guest read. Returns false when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                // A device that panicked while locked poisons only itself; keep
                // serving the guest with whatever state it left.
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8, "b").unwrap();
        bus.insert(a.clone(), 0x60, 5, "a").unwrap();

        assert!(bus.write(0x3fa, &[7]));
        assert!(bus.write(0x64, &[0xfe]));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3ff, &mut buf));
        assert_eq!(buf, [7]);

        assert!(!bus.read(0x3f7, &mut buf));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x65, &[1]));
        assert_eq!(b.lock().unwrap().writes, vec![(2, vec![7])]);
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(d.clone(), 0x1000, 0x100, "d").unwrap();
        assert!(bus.insert(d.clone(), 0x10ff, 1, "d").is_err());
        assert!(bus.insert(d.clone(), 0xf00, 0x101, "d").is_err());
        assert!(bus.insert(d.clone(), 0x2000, 0, "d").is_err());
        assert!(bus.insert(d.clone(), u64::MAX, 2, "d").is_err());
        bus.insert(d, 0x1100, 0x100, "d").unwrap();
    }
}
