//! pjdfstest, the POSIX file system conformance suite (its Rust edition
//! from crates.io, built by `scripts/pjdfstest.sh`), run inside a guest on
//! a virtio-fs mount: where to find it, its configuration, and its report.

use std::path::PathBuf;

/// The version `scripts/pjdfstest.sh` builds.
pub const VERSION: &str = "0.2.0";

/// The pjdfstest binary: `$KEYSTONE_PJDFSTEST`, else the script's cache.
pub fn binary() -> Result<PathBuf, String> {
    let path = match std::env::var_os("KEYSTONE_PJDFSTEST") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .ok_or("neither XDG_CACHE_HOME nor HOME is set")?;
            cache.join(format!("keystone/pjdfstest-{VERSION}/bin/pjdfstest"))
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "pjdfstest is not built ({}); run scripts/pjdfstest.sh",
            path.display()
        ))
    }
}

/// The suite's configuration for the Debian guest: users that exist there
/// and the features virtiofsd-lite offers.
pub const CONFIG: &str = "[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}
[settings]
naptime = 0.05
allow_remount = false
[dummy_auth]
entries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"], [\"bin\", \"bin\"]]
";

/// Why a case fails on purpose under virtiofsd-lite's default policy, if
/// it does: the guest may not make device nodes (DESIGN.md invariant 1;
/// every case run on a block or character device creates one first), and
/// setuid/setgid bits are stripped unless the daemon runs with
/// `--allow-setuid`.
pub fn expected_failure(name: &str) -> Option<&'static str> {
    if name.ends_with("::block") || name.ends_with("::char") {
        Some("device nodes are refused")
    } else if name == "chmod::clear_isgid_bit" {
        Some("setgid bits are stripped")
    } else {
        None
    }
}

/// One case's verdict as pjdfstest printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Failed(String),
    Skipped(String),
}

/// Parses pjdfstest's report: a `name   ok|FAILED|skipped` line per case,
/// followed by indented detail lines for failures and skips.
pub fn parse_report(text: &str) -> Vec<(String, Verdict)> {
    let mut out: Vec<(String, Verdict)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, Verdict::Failed(d) | Verdict::Skipped(d))) = out.last_mut() {
                if d.is_empty() {
                    *d = line.trim().to_string();
                }
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(verdict), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if !name.contains("::") {
            continue;
        }
        let v = match verdict {
            "ok" => Verdict::Ok,
            "FAILED" => Verdict::Failed(String::new()),
            "skipped" => Verdict::Skipped(String::new()),
            _ => continue,
        };
        out.push((name.to_string(), v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_verdicts_and_their_first_detail_line() {
        let text = "chmod::ok_case                      ok\n\
                    mknod::x                        FAILED\n\
                    \tTimestamps did not change as expected\n\
                    Backtrace:\n\
                    \x20  0: pjdfstest::main\n\
                    utimensat::y                       skipped\n\
                    \trequires features: utimensat\n\
                    1 2 3\n";
        let r = parse_report(text);
        assert_eq!(
            r,
            vec![
                ("chmod::ok_case".into(), Verdict::Ok),
                (
                    "mknod::x".into(),
                    Verdict::Failed("Timestamps did not change as expected".into())
                ),
                (
                    "utimensat::y".into(),
                    Verdict::Skipped("requires features: utimensat".into())
                ),
            ]
        );
    }

    #[test]
    fn only_policy_refusals_are_expected_to_fail() {
        assert!(expected_failure("mknod::device_files::block").is_some());
        assert!(expected_failure("rename::preserve_metadata::char").is_some());
        assert!(expected_failure("chmod::clear_isgid_bit").is_some());
        assert!(expected_failure("rename::preserve_metadata::regular").is_none());
        assert!(expected_failure("chmod::clear_isgid_bit_x").is_none());
        assert!(CONFIG.contains("[\"nobody\", \"nogroup\"]"));
    }
}
