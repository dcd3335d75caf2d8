//! A child process in its own process group that is killed (group and all)
//! when dropped, so a failed or timed-out benchmark leaves nothing behind.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use vmm::host::monotonic_ns;

/// A spawned child; see the module docs.
pub struct GroupChild {
    name: String,
    inner: Child,
    status: Option<ExitStatus>,
    /// CLOCK_MONOTONIC ns read just before the spawn.
    pub spawn_ns: u64,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        cmd.process_group(0);
        let spawn_ns = monotonic_ns();
        let inner = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            inner,
            status: None,
            spawn_ns,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// The child's stdout pipe, if it was piped and not yet taken.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.inner.stdout.take()
    }

    /// The exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.inner.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `limit` for the child to exit on its own.
    pub fn wait_for(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the whole process group and reaps the child.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let pgid = self.inner.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group this
        // child leads (we created it with process_group(0)); no memory is
        // involved. If the group is gone the call fails harmlessly.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if self.status.is_none() {
            match self.inner.wait() {
                Ok(s) => self.status = Some(s),
                Err(e) => eprintln!("keystone-benches: cannot reap {}: {e}", self.name),
            }
        }
        self.status
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // Even if the leader has exited, members of its group may remain.
        self.kill();
    }
}
