//! virtiofsd-lite on a listening socket for a QEMU guest, and the checks
//! that it served the guest to the end.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtiofsd_lite::FsConfig;

/// One daemon thread serving a directory on a vhost-user socket.
pub struct FsDaemon {
    /// The socket QEMU connects to.
    pub socket: PathBuf,
    tag: String,
    thread: JoinHandle<Result<(), virtiofsd_lite::Error>>,
}

impl FsDaemon {
    /// Serves `dir` as `tag` on `socket`; returns once the socket listens.
    pub fn start(socket: PathBuf, dir: &Path, tag: &str) -> FsDaemon {
        Self::start_with(socket, FsConfig::new(dir, tag))
    }

    /// Serves `cfg` on `socket`; returns once the socket listens.
    pub fn start_with(socket: PathBuf, cfg: FsConfig) -> FsDaemon {
        let tag = cfg.tag.clone();
        let s = socket.clone();
        let thread = std::thread::spawn(move || virtiofsd_lite::serve_listener(&s, cfg));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                !thread.is_finished() && Instant::now() < deadline,
                "virtiofsd-lite for {tag} did not start listening on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        FsDaemon {
            socket,
            tag: tag.to_string(),
            thread,
        }
    }

    /// Asserts that the daemon returned without error once QEMU went away
    /// (within 10 s); `console_tail` goes into the failure message.
    pub fn assert_ended_cleanly(self, console_tail: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.thread.is_finished(),
            "virtiofsd-lite {} still serving after QEMU exited",
            self.tag
        );
        let r = self.thread.join().expect("daemon thread panicked");
        assert!(
            r.is_ok(),
            "virtiofsd-lite {}: {r:?}\nconsole tail:\n{console_tail}",
            self.tag
        );
    }
}

/// Asserts that every check in `expected` was reported and each verdict
/// is `ok` (`checks`: name to verdict, as the guest printed them).
pub fn assert_checks_pass(
    checks: &std::collections::BTreeMap<String, String>,
    expected: &[&str],
    console_tail: &str,
) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|(_, v)| v.trim() != "ok")
        .map(|(n, v)| format!("{n}: {v}"))
        .collect();
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|n| !checks.contains_key(**n))
        .collect();
    assert!(
        failed.is_empty() && missing.is_empty(),
        "guest checks failed: {failed:#?}\nmissing: {missing:?}\nconsole tail:\n{console_tail}"
    );
}
