//! Memory added after boot.
//!
//! A large sandbox boots with part of its memory (`mem=` on the kernel
//! command line): a kernel sets up the page structures of all the memory
//! it boots with before it runs `/init`, which for 8 GiB under emulation
//! takes longer than the rest of the boot. The firmware's memory map
//! (`/sys/firmware/memmap`) still lists all of it, so once the host has
//! its first answer, the agent adds each memory block that the map has and
//! the kernel lacks, through the probe interface
//! (`/sys/devices/system/memory/probe`), and puts it online. Blocks that
//! the map covers only in part are left out, and so is all of it when the
//! kernel has no probe interface (a kernel built without memory hotplug
//! boots with everything, so nothing is missing there).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the kernel shows the memory maps.
#[derive(Debug, Clone)]
pub struct MemorySysfs {
    /// The firmware's map: one folder per range, with `start`, `end`
    /// (inclusive) and `type`.
    pub firmware_map: PathBuf,
    /// The memory block devices, `block_size_bytes` and `probe`.
    pub blocks: PathBuf,
}

impl MemorySysfs {
    /// The guest's own.
    pub fn system() -> Self {
        Self {
            firmware_map: "/sys/firmware/memmap".into(),
            blocks: "/sys/devices/system/memory".into(),
        }
    }
}

/// What [`add_missing`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// Blocks added and online.
    pub blocks: u64,
    /// Their size, bytes.
    pub bytes: u64,
}

/// Reads a sysfs number: hexadecimal with or without `0x` (the memory
/// map's and block size's form).
fn read_hex(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    let digits = text.trim().trim_start_matches("0x");
    u64::from_str_radix(digits, 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The firmware map's RAM ranges, as `[start, end)`.
pub fn ram_ranges(firmware_map: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    for entry in fs::read_dir(firmware_map)? {
        let dir = entry?.path();
        let is_ram = fs::read_to_string(dir.join("type")).is_ok_and(|t| t.trim() == "System RAM");
        if !is_ram {
            continue;
        }
        let start = read_hex(&dir.join("start"))?;
        let end = read_hex(&dir.join("end"))?.saturating_add(1);
        if start < end {
            ranges.push((start, end));
        }
    }
    ranges.sort_unstable();
    Ok(ranges)
}

/// The start addresses of the whole blocks of `block_size` bytes inside
/// `ranges` for which `present` (given a block index) is false, in order.
pub fn missing_blocks(
    ranges: &[(u64, u64)],
    block_size: u64,
    present: impl Fn(u64) -> bool,
) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let Some(first) = start.checked_next_multiple_of(block_size) else {
            continue;
        };
        let mut addr = first;
        while addr.checked_add(block_size).is_some_and(|e| e <= end) {
            if !present(addr / block_size) {
                out.push(addr);
            }
            addr += block_size;
        }
    }
    out
}

/// Adds and onlines every block the firmware map has and the kernel
/// lacks. Stops at the first block that fails (with what was added
/// before it in the log).
pub fn add_missing(sys: &MemorySysfs) -> io::Result<Added> {
    let probe = sys.blocks.join("probe");
    let block_size = read_hex(&sys.blocks.join("block_size_bytes"))?;
    let ranges = ram_ranges(&sys.firmware_map)?;
    let block_dir = |index: u64| sys.blocks.join(format!("memory{index}"));
    let missing = missing_blocks(&ranges, block_size, |i| block_dir(i).exists());
    let mut added = Added::default();
    if missing.is_empty() {
        return Ok(added);
    }
    if !probe.exists() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{} block(s) of memory are missing and the kernel has no memory probe interface",
                missing.len()
            ),
        ));
    }
    for addr in missing {
        fs::write(&probe, format!("0x{addr:x}"))?;
        let state = block_dir(addr / block_size).join("state");
        let now = fs::read_to_string(&state).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("memory block at 0x{addr:x} did not appear after its probe: {e}"),
            )
        })?;
        // A kernel that onlines new memory itself has done so already.
        if now.trim() != "online" {
            fs::write(&state, "online")?;
        }
        added.blocks += 1;
        added.bytes += block_size;
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_test_kit::{write_file, ScratchDir};

    const MIB: u64 = 1 << 20;

    #[test]
    fn whole_missing_blocks_only() {
        let block = 128 * MIB;
        // QEMU microvm with 8 GiB booted with mem=1G: RAM below 3 GiB
        // from 1 MiB (block 0 only in part) and 4 to 9 GiB.
        let ranges = [(MIB, 3072 * MIB), (4096 * MIB, 9216 * MIB)];
        let present = |i: u64| i < 8; // the first GiB
        let missing = missing_blocks(&ranges, block, present);
        assert_eq!(missing.len(), 16 + 40);
        assert_eq!(missing[0], 1024 * MIB);
        assert_eq!(missing[15], 3072 * MIB - block);
        assert_eq!(missing[16], 4096 * MIB);
        assert_eq!(*missing.last().unwrap(), 9216 * MIB - block);
        // A range that ends inside a block leaves that block out.
        assert!(missing_blocks(&[(0, block + MIB)], block, |_| false) == [0]);
        assert!(missing_blocks(&[(u64::MAX - MIB, u64::MAX)], block, |_| false).is_empty());
        assert!(missing_blocks(&ranges, 0, |_| false).is_empty());
    }

    #[test]
    fn the_firmware_maps_ram_is_read_and_the_rest_ignored() {
        let dir = ScratchDir::new("agent-memmap");
        let map = dir.path();
        for (i, start, end, kind) in [
            (0, "0x0", "0x9fbff", "System RAM"),
            (1, "0x9fc00", "0x9ffff", "Reserved"),
            (2, "0x100000", "0xbfffffff", "System RAM"),
            (3, "0x100000000", "0x23fffffff", "System RAM"),
        ] {
            write_file(&map.join(format!("{i}/start")), format!("{start}\n"));
            write_file(&map.join(format!("{i}/end")), format!("{end}\n"));
            write_file(&map.join(format!("{i}/type")), format!("{kind}\n"));
        }
        assert_eq!(
            ram_ranges(map).unwrap(),
            [
                (0, 0xa0000 - 0x400),
                (0x100000, 0xc000_0000),
                (0x1_0000_0000, 0x2_4000_0000)
            ]
        );
    }

    #[test]
    fn probing_adds_and_onlines_each_missing_block() {
        let dir = ScratchDir::new("agent-memprobe");
        let sys = MemorySysfs {
            firmware_map: dir.path().join("memmap"),
            blocks: dir.path().join("memory"),
        };
        write_file(&sys.firmware_map.join("0/start"), "0x0");
        write_file(&sys.firmware_map.join("0/end"), "0x17ffffff");
        write_file(&sys.firmware_map.join("0/type"), "System RAM");
        write_file(&sys.blocks.join("block_size_bytes"), "8000000\n");
        write_file(&sys.blocks.join("memory0/state"), "online\n");
        // Without a probe interface the missing block is an error.
        assert_eq!(
            add_missing(&sys).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        write_file(&sys.blocks.join("probe"), "");
        // A kernel adds `memory1` on the probe; this folder has no kernel
        // behind it, so the block does not appear, which is an error.
        let err = add_missing(&sys).unwrap_err();
        assert!(err.to_string().contains("did not appear"), "{err}");
        assert_eq!(
            fs::read_to_string(sys.blocks.join("probe")).unwrap(),
            "0x8000000"
        );
    }
}
