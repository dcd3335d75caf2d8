//! Memory use of a process from `/proc/PID/status`, split so that guest RAM
//! (shared memfd pages, counted in RssShmem) can be left out.

use serde::Serialize;

/// Resident memory of one process, in KiB.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ProcMemory {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
    /// RssAnon + RssFile: the VMM's own memory, guest RAM excluded.
    pub vmm_rss_kib: u64,
}

/// Reads `/proc/<pid>/status`; `None` if the process is gone.
pub fn read(pid: u32) -> Option<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse(&status))
}

fn parse(status: &str) -> ProcMemory {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (anon, file) = (field("RssAnon:"), field("RssFile:"));
    ProcMemory {
        rss_kib: field("VmRSS:"),
        rss_anon_kib: anon,
        rss_file_kib: file,
        rss_shmem_kib: field("RssShmem:"),
        vmm_rss_kib: anon + file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let s = "Name:\tx\nVmRSS:\t  140000 kB\nRssAnon:\t    3000 kB\nRssFile:\t    1000 kB\nRssShmem:\t  136000 kB\n";
        let m = parse(s);
        assert_eq!(m.rss_kib, 140000);
        assert_eq!(m.vmm_rss_kib, 4000);
        assert_eq!(m.rss_shmem_kib, 136000);
    }

    #[test]
    fn reads_own_process() {
        let m = read(std::process::id()).expect("own /proc status");
        assert!(m.rss_kib > 0);
    }
}
