//! What Keystone's tests share, written once:
//!
//! - [`skip!`]: the `SKIP: <reason>` line the test harness and CI count,
//!   and the early return, for a test that cannot run on this host;
//! - [`ScratchDir`]: a folder of the test's own, removed when it ends;
//! - [`guest_lock`]: the one lock a test holds while it runs a guest, so
//!   the guests of one test binary boot one at a time;
//! - [`log_tail`] and [`last_lines`]: the end of a log or a console for a
//!   failure message, bounded and with control characters escaped;
//! - [`fnv64`]: a 64-bit FNV-1a checksum, to compare bytes that went
//!   through a guest with what was sent;
//! - [`virtq`]: the driver side of a split virtqueue in guest memory, for
//!   tests that play the guest to a device;
//! - [`git`]: `git` without the repository variables of a git that runs
//!   the tests (`git rebase --exec` in a worktree exports `GIT_DIR`), so
//!   a test's scratch repository stays the test's;
//! - [`vhost_frontend`]: the frontend side of vhost-user for a process
//!   that plays the VMM (shared guest memory, a queue handed over), for
//!   the daemons' protocol tests and the virtio-fs benchmarks.
//!
//! The crate depends on no workspace crate, so any of them may list it
//! under `[dev-dependencies]`. Its helpers panic with a message on what
//! cannot go wrong in a working test host (a scratch folder that cannot be
//! created), as assertions do.

mod guest_lock;
mod log_tail;
mod scratch;
pub mod vhost_frontend;
pub mod virtq;

pub use guest_lock::{guest_lock, GuestLock};
pub use log_tail::{last_lines, log_tail, TAIL_BYTES};
pub use scratch::ScratchDir;

/// `git`, without the variables that would point it at the repository of
/// a git that runs the tests (`git rev-parse --local-env-vars`): under
/// `git rebase --exec` in a worktree, `GIT_DIR` would turn a scratch
/// `git init` into a rewrite of that repository's config.
pub fn git() -> std::process::Command {
    static LOCAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let local = LOCAL.get_or_init(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--local-env-vars"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    });
    let mut cmd = std::process::Command::new("git");
    for var in local.split_whitespace() {
        cmd.env_remove(var);
    }
    cmd
}

/// Prints the skip line the test harness and CI count (`SKIP: <reason>`,
/// on stdout) and returns from the function.
///
/// `skip!("why {x}")` returns `()`, for a test body. With a value and a
/// semicolon first, `skip!(None; "why {x}")`, it returns that value, for a
/// fixture that hands its caller an `Option`:
///
/// ```
/// use keystone_test_kit::skip;
///
/// fn kernel() -> Option<&'static str> {
///     let found = std::path::Path::new("/nonexistent/vmlinux");
///     if !found.is_file() {
///         skip!(None; "no guest kernel at {}", found.display());
///     }
///     Some("vmlinux")
/// }
///
/// #[allow(clippy::needless_return)]
/// fn a_test() {
///     let Some(_kernel) = kernel() else { return };
///     skip!("not reached on this host");
/// }
/// # a_test();
/// ```
#[macro_export]
macro_rules! skip {
    ($value:expr; $($reason:tt)+) => {{
        $crate::skip_line(&format!($($reason)+));
        return $value;
    }};
    ($($reason:tt)+) => {{
        $crate::skip_line(&format!($($reason)+));
        return;
    }};
}

/// Prints the `SKIP: <reason>` line of [`skip!`], the line the test
/// script counts as a skipped test. This crate's own tests of the macro
/// keep their lines instead: they pass, and must not be counted as
/// skipped.
#[doc(hidden)]
pub fn skip_line(reason: &str) {
    #[cfg(test)]
    tests::SKIPPED.with(|s| s.borrow_mut().push(reason.to_string()));
    #[cfg(not(test))]
    println!("SKIP: {reason}");
}

/// Writes `data` to `path`, creating its parent folders first; panics
/// naming the path when either fails (for a test's fixtures).
pub fn write_file(path: &std::path::Path, data: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            panic!("cannot create {}: {e}", parent.display());
        }
    }
    if let Err(e) = std::fs::write(path, data) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// The 64-bit FNV-1a hash of `data`: a cheap checksum for comparing large
/// buffers that went through a guest (not a cryptographic hash).
pub fn fnv64(data: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    data.iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// The reasons [`skip!`] gave on this thread.
        pub(super) static SKIPPED: std::cell::RefCell<Vec<String>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    #[test]
    fn git_drops_the_repository_variables_of_a_calling_git() {
        let cmd = git();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"] {
            assert!(removed.iter().any(|r| r == var), "{var} kept: {removed:?}");
        }
    }

    #[test]
    fn fnv64_gives_the_published_test_vectors() {
        // From the FNV reference test suite (64-bit FNV-1a).
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fnv64_sees_one_changed_byte() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut changed = data.clone();
        changed[2048] ^= 1;
        assert_ne!(fnv64(&data), fnv64(&changed));
        assert_eq!(fnv64(&data), fnv64(&data.clone()));
    }

    fn skips_with_none(skip_it: bool) -> Option<u32> {
        if skip_it {
            skip!(None; "skipped with {}", "a value");
        }
        Some(7)
    }

    fn counts_unless_skipped(skip_it: bool, count: &mut u32) {
        if skip_it {
            skip!("skipped {}", "a test");
        }
        *count += 1;
    }

    #[test]
    fn skip_returns_from_the_function() {
        assert_eq!(skips_with_none(true), None);
        assert_eq!(skips_with_none(false), Some(7));
        let mut count = 0;
        counts_unless_skipped(true, &mut count);
        assert_eq!(count, 0, "the body after a skip ran");
        counts_unless_skipped(false, &mut count);
        assert_eq!(count, 1);
        let reasons = SKIPPED.with(|s| s.borrow().clone());
        assert_eq!(reasons, ["skipped with a value", "skipped a test"]);
    }
}
