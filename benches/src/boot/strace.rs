//! Setup time measured from outside, the same way for every VMM: run it
//! under `strace -f -ttt --seccomp-bpf -e trace=execve,ioctl`, wait for the
//! first `KVM_RUN` ioctl, kill it, and take that ioctl's timestamp minus the
//! `execve` timestamp from the same trace. Only execve and ioctl stop the
//! tracee (seccomp filter), so the added cost is one ptrace stop per ioctl.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::child::GroupChild;

/// How long a probe may take to reach its first KVM_RUN.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// The method, as written into the JSON.
pub const METHOD: &str = "strace -f -ttt --seccomp-bpf -e trace=execve,ioctl: first KVM_RUN ioctl entry minus the execve entry, same trace; a separate short run killed at the first KVM_RUN";

/// Result of one probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub setup_ms: Option<f64>,
    /// KVM ioctls the VMM made before its first KVM_RUN.
    pub ioctls_before_run: usize,
    pub error: Option<String>,
}

/// Runs `program args` (with `env` added) under strace until its first KVM_RUN.
pub fn probe(
    strace: &Path,
    program: &Path,
    args: &[OsString],
    env: &[(String, PathBuf)],
    trace_file: &PathBuf,
) -> Probe {
    match run_probe(strace, program, args, env, trace_file) {
        Ok(p) => p,
        Err(e) => Probe {
            setup_ms: None,
            ioctls_before_run: 0,
            error: Some(format!("{e:#}")),
        },
    }
}

fn run_probe(
    strace: &Path,
    program: &Path,
    args: &[OsString],
    env: &[(String, PathBuf)],
    trace_file: &PathBuf,
) -> anyhow::Result<Probe> {
    let _ = std::fs::remove_file(trace_file);
    let mut cmd = Command::new(strace);
    cmd.args([
        "-f",
        "-ttt",
        "--seccomp-bpf",
        "-qq",
        "-e",
        "trace=execve,ioctl",
        "-o",
    ])
    .arg(trace_file)
    .arg("--")
    .arg(program)
    .args(args)
    .envs(env.iter().map(|(k, v)| (k, v)))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = GroupChild::spawn("strace", &mut cmd)?;
    let end = Instant::now() + PROBE_LIMIT;
    let mut text = String::new();
    let outcome = loop {
        text = std::fs::read_to_string(trace_file).unwrap_or(text);
        if let Some(r) = parse(&text) {
            break Ok(r);
        }
        if let Some(status) = child.try_wait()? {
            text = std::fs::read_to_string(trace_file).unwrap_or(text);
            break parse(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "the VMM exited ({status}) before any KVM_RUN; last trace lines: {}",
                    last_lines(&text, 3)
                )
            });
        }
        if Instant::now() >= end {
            break Err(anyhow::anyhow!(
                "no KVM_RUN within {} s under strace",
                PROBE_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill();
    let (setup_ms, ioctls) = outcome?;
    Ok(Probe {
        setup_ms: Some(setup_ms),
        ioctls_before_run: ioctls,
        error: None,
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The first number with a decimal point on a trace line: the -ttt stamp
/// (with -f the pid comes first).
fn stamp(line: &str) -> Option<f64> {
    line.split_whitespace()
        .take(2)
        .find(|t| t.contains('.'))
        .and_then(|t| t.parse().ok())
}

/// (setup ms, KVM ioctls before the run) once the trace holds a KVM_RUN.
fn parse(text: &str) -> Option<(f64, usize)> {
    let exec = text
        .lines()
        .find(|l| l.contains("execve(") && !l.contains("= -1"))
        .and_then(stamp)?;
    let mut kvm_ioctls = 0;
    for line in text.lines() {
        if line.contains("KVM_RUN") {
            // The ioctl's entry line may still be "<unfinished ...>": that
            // is fine, its stamp is the entry.
            return stamp(line).map(|t| ((t - exec) * 1000.0, kvm_ioctls));
        }
        if line.contains("ioctl(") && line.contains("KVM_") {
            kvm_ioctls += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_trace() {
        let t = "100 1700000000.100000 execve(\"/bin/k\", [\"k\"], 0x7ffd /* 3 vars */) = 0\n\
                 100 1700000000.101000 ioctl(3, KVM_CREATE_VM, 0) = 4\n\
                 101 1700000000.112500 ioctl(9, KVM_RUN <unfinished ...>\n";
        let (ms, n) = parse(t).expect("parsed");
        assert!((ms - 12.5).abs() < 0.01, "{ms}");
        assert_eq!(n, 1);
        assert!(parse("100 1.0 execve(\"x\") = 0\n").is_none());
    }
}
