//! `keystone vm check`: what this host's `/dev/kvm` is, whether it can
//! give VMX/SVM to a guest, and whether it runs a VM at all (the VMM's
//! self-test, [`vmm::probe`], repeated `--runs` times with a deadline each,
//! so that a KVM that sometimes hangs shows up as a count, not a hang).

use std::time::Duration;

use clap::Args;
use vmm::probe::{probe_many, ProbeError};

use crate::exit_code::{self, CodedError};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// How many times to run the self-test VM.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// How long one run may take, in milliseconds, before it counts as hung.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the check; exit 0 when every run worked, 3 when some failed, 4
/// when there is no usable KVM.
pub fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let host = match vmm::host::kvm_facts() {
        Ok(h) => h,
        Err(e) => {
            // The probe's own error says what to do about permissions.
            let why = match vmm::probe::probe(Duration::from_millis(args.timeout_ms)) {
                Err(p @ ProbeError::Open(_)) => p.to_string(),
                _ => e.to_string(),
            };
            return Err(CodedError::error(exit_code::REQUIREMENTS, why));
        }
    };
    let tally = probe_many(args.runs, Duration::from_millis(args.timeout_ms));
    let nested = host.nested.map(|n| format!("{n:?}").to_uppercase());
    if args.json {
        let out = serde_json::json!({
            "kvm": host.kind.name(),
            "nested": nested,
            "runs": tally.runs,
            "ok": tally.ok,
            "timed_out": tally.timed_out,
            "failed": tally.failed,
            "slowest_us": tally.slowest_us,
            "first_failure": tally.first_failure,
        });
        println!("{out}");
    } else {
        println!(
            "KVM: {} ({})",
            host.kind.name(),
            match &nested {
                Some(n) => format!("offers {n} to guests: nested virtualization works"),
                None => "offers no VMX/SVM to guests".to_string(),
            }
        );
        println!(
            "self-test VM: {} of {} runs worked ({} hung past {} ms, {} failed); slowest {:.1} ms",
            tally.ok,
            tally.runs,
            tally.timed_out,
            args.timeout_ms,
            tally.failed,
            tally.slowest_us as f64 / 1000.0
        );
        if let Some(f) = &tally.first_failure {
            println!("first failure: {f}");
        }
    }
    Ok(if tally.ok == tally.runs {
        exit_code::OK
    } else {
        exit_code::OPERATION_FAILED
    })
}
