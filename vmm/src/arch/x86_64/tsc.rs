//! The host's TSC frequency, for guests that cannot calibrate their own.
//!
//! A Linux guest calibrates its TSC against the PIT at boot. Under QEMU's
//! software emulation (TCG) the guest's TSC is the host's and the PIT is
//! emulated, and on a loaded host that calibration fails ("Unable to
//! calibrate against PIT"): the guest then marks its TSC unstable and
//! runs with no TSC frequency at all. KVM inside such a guest cannot work
//! (every KVM_RUN retries its clock update forever), so a guest that is to
//! run VMs of its own is told the frequency instead (`tsc_early_khz=`).
//!
//! [`host_khz`] measures it: TSC cycles against `CLOCK_MONOTONIC_RAW`
//! over [`WINDOW`], each end read as the pair with the tightest TSC
//! bracket of a few tries, so that a preemption between the two reads does
//! not skew it.

use std::time::Duration;

/// How long the measurement lasts (its error is a few microseconds over
/// this).
pub const WINDOW: Duration = Duration::from_millis(20);

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64 user space (CR4.TSD is
    // not set by Linux); it only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn monotonic_raw_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// One (TSC, nanoseconds) reading: of a few tries, the one whose clock
/// read sits in the narrowest TSC bracket.
fn sample() -> (u64, u128) {
    let mut best = (u64::MAX, 0u64, 0u128);
    for _ in 0..5 {
        let before = rdtsc();
        let ns = monotonic_raw_ns();
        let after = rdtsc();
        let width = after.wrapping_sub(before);
        if width < best.0 {
            best = (width, before + width / 2, ns);
        }
    }
    (best.1, best.2)
}

/// The host's TSC frequency in kHz, or `None` when the measurement makes
/// no sense (a TSC that went backwards, or outside 100 MHz..20 GHz).
pub fn host_khz() -> Option<u32> {
    let (c0, t0) = sample();
    std::thread::sleep(WINDOW);
    let (c1, t1) = sample();
    let cycles = u128::from(c1.checked_sub(c0)?);
    let ns = t1.checked_sub(t0).filter(|ns| *ns > 0)?;
    let khz = u32::try_from((cycles * 1_000_000 + ns / 2) / ns).ok()?;
    (100_000..=20_000_000).contains(&khz).then_some(khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_measurements_agree() {
        let a = host_khz().expect("a TSC here");
        let b = host_khz().expect("a TSC here");
        let diff = a.abs_diff(b) as f64 / a as f64;
        assert!(diff < 0.01, "{a} kHz then {b} kHz");
    }
}
