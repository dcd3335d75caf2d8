//! Facts about the host and the inputs that go into the report: which KVM
//! this is and whether it offers nested virtualization, the date, and the
//! identity (sha256) of the kernel and initramfs files.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use vmm::host::detect_kind;
use vmm::KvmKind;

/// The KVM kind here (kvm_pvm's module present or not).
pub fn kvm_kind() -> KvmKind {
    detect_kind(Path::new("/sys/module"))
}

pub fn kind_name(kind: KvmKind) -> &'static str {
    match kind {
        KvmKind::Hardware => "hardware",
        KvmKind::Pvm => "pvm",
    }
}

/// Which module provides `/dev/kvm`, in words.
fn kvm_words(kind: KvmKind) -> String {
    match kind {
        KvmKind::Pvm => {
            "kvm_pvm (paravirtual KVM: guest kernel code is emulated, 50-100x slower)".into()
        }
        KvmKind::Hardware => ["kvm_amd", "kvm_intel"]
            .iter()
            .find(|m| Path::new("/sys/module").join(m).exists())
            .map_or("hardware KVM".into(), |m| m.to_string()),
    }
}

/// The host's nested-virtualization state: the module parameter and
/// whether KVM offers VMX/SVM to a guest (its supported CPUID).
fn nested() -> Value {
    let param = ["kvm_amd", "kvm_intel"].iter().find_map(|m| {
        std::fs::read_to_string(format!("/sys/module/{m}/parameters/nested"))
            .ok()
            .map(|v| format!("{m}.nested={}", v.trim()))
    });
    let offered = match vmm::host::kvm_facts() {
        Ok(h) => json!(h.nested.map(|e| format!("{e:?}"))),
        Err(e) => json!(format!("cannot probe /dev/kvm: {e}")),
    };
    json!({ "module_parameter": param, "offered_to_guests": offered })
}

/// The `host` block of the report.
pub fn describe() -> Value {
    let kind = kvm_kind();
    json!({
        "kvm_kind": kind_name(kind),
        "kvm": kvm_words(kind),
        "nested": nested(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// Path, size and sha256 of a file (the sha256 from `sha256sum`).
pub fn file_identity(path: &Path) -> Value {
    let sha256 = Command::new("sha256sum")
        .arg(path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .map(str::to_string)
        });
    json!({
        "path": path.display().to_string(),
        "bytes": std::fs::metadata(path).map(|m| m.len()).ok(),
        "sha256": sha256,
    })
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc(secs)
}

/// Seconds since 1970 as a UTC date and time (proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Shift the epoch to 0000-03-01 so that leap days end each 4-, 100-
    // and 400-year cycle.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn identity_of_a_known_file() {
        let p = std::env::temp_dir().join(format!("ks-bench-id-{}", std::process::id()));
        std::fs::write(&p, b"abc").unwrap();
        let id = file_identity(&p);
        let _ = std::fs::remove_file(&p);
        assert_eq!(id["bytes"], 3);
        assert_eq!(
            id["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn kind_names() {
        assert_eq!(kind_name(KvmKind::Hardware), "hardware");
        assert_eq!(kind_name(KvmKind::Pvm), "pvm");
    }
}
