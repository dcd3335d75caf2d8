//! The descriptor limit: `raise_fd_limit` lifts the soft `RLIMIT_NOFILE`
//! to the hard one, and a file system made afterwards keeps node
//! descriptors up to half of it (not half of the usual soft 1024, past
//! which every node would be re-opened from its handle on each request).
//! Its own test binary: it changes the process's limit.

use keystone_test_kit::ScratchDir;
use virtiofsd_lite::{FsConfig, PassthroughFs};

fn limits() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

#[test]
fn the_soft_limit_is_raised_and_sets_the_budget() {
    // Start from a low soft limit, as a login shell gives.
    let (_, hard) = limits();
    let low = libc::rlimit {
        rlim_cur: hard.min(1024),
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);

    let now = virtiofsd_lite::raise_fd_limit();
    assert_eq!(limits(), (hard, hard));
    assert_eq!(now, hard);

    let dir = ScratchDir::new("vfsd-fdlimit");
    let fs = PassthroughFs::new(&FsConfig::new(dir.path(), "t")).unwrap();
    let want = usize::try_from(hard / 2)
        .unwrap_or(usize::MAX)
        .clamp(64, 65536);
    assert_eq!(fs.inodes().fd_budget(), want);
}
