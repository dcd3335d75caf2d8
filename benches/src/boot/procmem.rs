//! Memory use of a process without its guest RAM, the same way for every
//! VMM: guest RAM is a shared memfd in QEMU and ours (RssShmem) but
//! private anonymous memory in Firecracker and in Cloud Hypervisor without
//! `shared=on` (RssAnon), so the split of `/proc/PID/status` alone cannot
//! leave it out. `/proc/PID/smaps` can: every mapping exactly as large as
//! the guest's memory is guest RAM (the VMM's own, or a vhost-user
//! device's mapping of it), and its resident part is subtracted.

use std::io::Read;

use serde::Serialize;

/// `/proc/PID/smaps` is host data, but a VMM can have many mappings.
const SMAPS_CAP: u64 = 16 << 20;

/// Resident memory of one process, in KiB.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ProcMemory {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
    /// Resident pages of the mappings that are guest RAM (smaps).
    pub guest_ram_rss_kib: Option<u64>,
    /// The VMM's own memory: VmRSS minus `guest_ram_rss_kib` (or
    /// RssAnon + RssFile when smaps could not be read).
    pub vmm_rss_kib: u64,
}

/// How `vmm_rss_kib` is computed, for the JSON.
pub const METHOD: &str = "/proc/PID/status VmRSS minus the resident part (smaps Rss) of every mapping whose size equals the guest memory (guest RAM, whether a shared memfd or private anonymous memory, and vhost-user mappings of it); RssAnon + RssFile if smaps cannot be read";

/// Reads the memory of `pid` whose guest has `guest_mib`; `None` if the
/// process is gone.
pub fn read(pid: u32, guest_mib: u64) -> Option<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut smaps = String::new();
    let guest = std::fs::File::open(format!("/proc/{pid}/smaps"))
        .and_then(|f| f.take(SMAPS_CAP).read_to_string(&mut smaps))
        .ok()
        .map(|_| guest_ram_kib(&smaps, guest_mib * 1024));
    Some(parse(&status, guest))
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.strip_prefix(name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn parse(status: &str, guest_ram_rss_kib: Option<u64>) -> ProcMemory {
    let field = |name: &str| status.lines().find_map(|l| kib_field(l, name)).unwrap_or(0);
    let (rss, anon, file) = (field("VmRSS:"), field("RssAnon:"), field("RssFile:"));
    ProcMemory {
        rss_kib: rss,
        rss_anon_kib: anon,
        rss_file_kib: file,
        rss_shmem_kib: field("RssShmem:"),
        guest_ram_rss_kib,
        vmm_rss_kib: match guest_ram_rss_kib {
            Some(g) => rss.saturating_sub(g),
            None => anon + file,
        },
    }
}

/// Sum of `Rss:` over the smaps entries whose `Size:` is `guest_kib`.
fn guest_ram_kib(smaps: &str, guest_kib: u64) -> u64 {
    let mut total = 0;
    let mut size: Option<u64> = None;
    for line in smaps.lines() {
        if let Some(s) = kib_field(line, "Size:") {
            size = Some(s);
        } else if let Some(r) = kib_field(line, "Rss:") {
            if size == Some(guest_kib) {
                total += r;
            }
            size = None;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/vmm
Size:               1024 kB
KernelPageSize:        4 kB
Rss:                 900 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 7 /memfd:guest (deleted)
Size:             131072 kB
Rss:              100000 kB
7f1000000000-7f1008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                5000 kB
7f2000000000-7f2000400000 rw-p 00000000 00:00 0 [heap]
Size:               4096 kB
Rss:                2000 kB
";

    #[test]
    fn guest_ram_is_every_mapping_of_the_guest_size() {
        assert_eq!(guest_ram_kib(SMAPS, 128 * 1024), 105_000);
        assert_eq!(guest_ram_kib(SMAPS, 256 * 1024), 0);
    }

    #[test]
    fn vmm_rss_leaves_guest_ram_out() {
        let s = "Name:\tx\nVmRSS:\t  108000 kB\nRssAnon:\t    7000 kB\nRssFile:\t    1000 kB\nRssShmem:\t  100000 kB\n";
        let m = parse(s, Some(guest_ram_kib(SMAPS, 128 * 1024)));
        assert_eq!(m.vmm_rss_kib, 3000);
        assert_eq!(m.rss_shmem_kib, 100_000);
        assert_eq!(parse(s, None).vmm_rss_kib, 8000);
    }

    #[test]
    fn reads_own_process() {
        let m = read(std::process::id(), 128).expect("own /proc status");
        assert!(m.rss_kib > 0);
        assert_eq!(m.guest_ram_rss_kib, Some(0));
        assert_eq!(m.vmm_rss_kib, m.rss_kib);
    }
}
