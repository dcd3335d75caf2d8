//! The QEMU a supervisor leaves behind, found by its pid file and killed
//! by `stop` (QEMU dies with its supervisor through PDEATHSIG; this is the
//! case where that failed).
//!
//! A pid file can be stale: the pid may since name any process, another
//! user's QEMU or another sandbox's among them. A pid is killed only when
//! everything observable says it is this sandbox's QEMU: it runs as this
//! user, its executable is QEMU's (the file it runs, not the name it gives
//! itself, which `exec -a` chooses), and its arguments hold this sandbox's
//! own vsock socket (`socket,id=vsock,path=<run>/vsock-vhost.sock`), which
//! no other sandbox's QEMU names. Its parent cannot tell: once the
//! supervisor is gone QEMU belongs to init.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::process::Signal;

use super::super::state::send_signal;
use super::engine::{Layout, QEMU};

/// The argument that names this sandbox's vsock device (as `qemu_args`
/// writes it).
fn vsock_argument(layout: &Layout) -> String {
    format!(
        "socket,id=vsock,path={}",
        layout.vsock_vhost_socket().display()
    )
}

/// Whether `pid` is the QEMU that runs this sandbox (see the module
/// documentation).
pub fn runs_this_sandbox(pid: i32, layout: &Layout) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let me = rustix::process::geteuid().as_raw();
    if !std::fs::metadata(&proc_dir).is_ok_and(|m| m.uid() == me) {
        return false;
    }
    let runs_qemu = std::fs::read_link(proc_dir.join("exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|name| name.to_string_lossy().contains(QEMU))
    });
    if !runs_qemu {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let want = vsock_argument(layout);
    cmdline
        .split(|b| *b == 0)
        .skip(1)
        .any(|arg| arg == want.as_bytes())
}

/// Kills the QEMU named by this sandbox's pid file if it is this
/// sandbox's, and removes the file.
pub fn kill(layout: &Layout) {
    let pidfile = layout.qemu_pid();
    let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1)
    else {
        let _ = std::fs::remove_file(&pidfile);
        return;
    };
    if runs_this_sandbox(pid, layout) {
        // The pid runs this sandbox's QEMU as this user (checked just above).
        send_signal(pid, Signal::KILL);
    }
    let _ = std::fs::remove_file(&pidfile);
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::agent::registry::SandboxStore;

    fn layout(dir: &Path, name: &str) -> Layout {
        let l = Layout::new(&SandboxStore::at(dir).paths(name));
        std::fs::create_dir_all(&l.run).unwrap();
        l
    }

    /// A process that stays until its stdin closes, running `program`
    /// under the name `argv0` with `args` after `--`. Returned once its
    /// command line can be read: `spawn` returns when the exec has begun,
    /// and for a moment after that the new program's arguments are not in
    /// place yet (`/proc/PID/cmdline` reads empty).
    fn spawn(program: &Path, argv0: &str, args: &[String]) -> Option<Child> {
        let child = Command::new(program)
            .arg0(argv0)
            .arg("--")
            .arg("-")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let t = Instant::now();
        while std::fs::read(&cmdline).is_ok_and(|c| c.is_empty())
            && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(child)
    }

    /// Whether `child` is still running a moment after a kill could have
    /// reached it.
    fn survives(child: &mut Child) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn end(mut child: Child) {
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_stale_pid_file_kills_no_other_sandboxs_qemu() {
        let Ok(cat) = which("cat") else {
            eprintln!("SKIP: no cat on this host");
            return;
        };
        let dir = std::env::temp_dir().join(format!("ks-leftover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A program whose file is named like QEMU, as QEMU's is.
        let qemu = dir.join(QEMU);
        std::fs::copy(&cat, &qemu).unwrap();
        let (ours, other) = (layout(&dir, "ours"), layout(&dir, "other"));

        // Named qemu-system-x86_64 (`exec -a`), with another sandbox's paths.
        let mut named = spawn(&cat, QEMU, &[vsock_argument(&other)]).unwrap();
        // QEMU's file, serving another sandbox.
        let mut others = spawn(&qemu, QEMU, &[vsock_argument(&other)]).unwrap();
        // Not QEMU, though it names our socket.
        let mut pretender = spawn(&cat, QEMU, &[vsock_argument(&ours)]).unwrap();
        if [&mut named, &mut others, &mut pretender]
            .into_iter()
            .any(|c| c.try_wait().ok().flatten().is_some())
        {
            eprintln!("SKIP: this host's cat does not run under another name");
            return;
        }
        for child in [&mut named, &mut others, &mut pretender] {
            std::fs::write(ours.qemu_pid(), child.id().to_string()).unwrap();
            kill(&ours);
            assert!(survives(child), "pid {} was killed", child.id());
            assert!(!ours.qemu_pid().exists());
        }

        // This sandbox's QEMU is killed.
        let mut mine = spawn(&qemu, QEMU, &[vsock_argument(&ours)]).unwrap();
        std::fs::write(ours.qemu_pid(), mine.id().to_string()).unwrap();
        assert!(runs_this_sandbox(mine.id() as i32, &ours));
        kill(&ours);
        assert!(!survives(&mut mine), "this sandbox's QEMU is still running");

        for child in [named, others, pretender, mine] {
            end(child);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn which(program: &str) -> Result<std::path::PathBuf, ()> {
        let path = std::env::var_os("PATH").ok_or(())?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
