//! Running one process for an `Exec` or `RawStream` connection.
//!
//! Threads per session: one reads host frames (stdin, resize, signal),
//! one feeds the child's stdin through a bounded channel (so a child that
//! does not read never stalls resize or signals), one per output stream
//! (stdout and stderr, or the terminal master), and the connection thread
//! waits for the child. All frames to the host go through one locked sink;
//! after `Exit` nothing else is written.
//!
//! The child gets its own process group (its own session with a
//! terminal), so `Signal` and a host disconnect reach the whole job.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::users::{self, User};
use super::AgentConfig;
use crate::protocol::{
    read_frame, write_frame, write_raw, ExecRequest, ExitStatus, Frame, FrameKind, ProtocolError,
    Response, TtySize, STREAM_CHUNK,
};
use crate::transport::DuplexStream;

/// The `PATH` a process starts with.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the child exits, output still open (held by a background
/// process) is abandoned once it has been idle this long.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Frames to the host, shared by the session's threads.
struct Sink {
    writer: Box<dyn DuplexStream>,
    closed: bool,
}

type SharedSink = Arc<Mutex<Sink>>;

fn lock(sink: &SharedSink) -> std::sync::MutexGuard<'_, Sink> {
    sink.lock().unwrap_or_else(|e| e.into_inner())
}

/// Output-thread bookkeeping used to decide when output is finished.
#[derive(Default)]
struct OutputActivity {
    /// Bumped after each chunk is forwarded.
    progress: AtomicU64,
    /// Threads currently writing a frame to the host.
    busy: AtomicUsize,
}

enum Input {
    Data(Vec<u8>),
    Eof,
}

/// Runs `req` and streams it over the connection until it exits.
pub fn run_session(
    mut reader: BufReader<Box<dyn DuplexStream>>,
    mut writer: Box<dyn DuplexStream>,
    req: ExecRequest,
    config: &AgentConfig,
) -> Result<(), ProtocolError> {
    let spawned = match spawn(&req, config) {
        Ok(s) => s,
        Err(msg) => {
            log::info!("exec {:?} refused: {msg}", req.argv);
            return write_raw(&mut writer, FrameKind::Error, msg.as_bytes());
        }
    };
    let Spawned {
        mut child,
        stdin,
        outputs,
        master,
    } = spawned;
    let pid = child.id() as i32;
    write_frame(
        &mut writer,
        &Frame::json(FrameKind::Response, &Response::Started { pid }),
    )?;

    let sink: SharedSink = Arc::new(Mutex::new(Sink {
        writer,
        closed: false,
    }));
    let activity = Arc::new(OutputActivity::default());
    let (done_tx, done_rx) = sync_channel::<()>(outputs.len());
    let n_outputs = outputs.len();
    for (kind, source) in outputs {
        let sink = Arc::clone(&sink);
        let activity = Arc::clone(&activity);
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            forward_output(source, kind, &sink, &activity);
            let _ = done_tx.send(());
        });
    }
    drop(done_tx);

    let (in_tx, in_rx) = sync_channel::<Input>(8);
    let is_tty = master.is_some();
    std::thread::spawn(move || feed_stdin(stdin, in_rx, is_tty));

    let exited = Arc::new(AtomicBool::new(false));
    {
        let exited = Arc::clone(&exited);
        let master_fd = master.as_ref().map(|m| m.as_raw_fd());
        // Keep the master open for the resize ioctl as long as the reader runs.
        let master = master;
        std::thread::spawn(move || {
            read_host_frames(&mut reader, &in_tx, master_fd, pid, &exited);
            drop(master);
        });
    }

    let status = child.wait();
    exited.store(true, Ordering::SeqCst);
    wait_for_outputs(&done_rx, n_outputs, &activity);
    let status = match status {
        Ok(s) => ExitStatus {
            code: s.code(),
            signal: s.signal(),
        },
        Err(e) => {
            log::warn!("waiting for pid {pid}: {e}");
            ExitStatus {
                code: None,
                signal: None,
            }
        }
    };
    let mut sink = lock(&sink);
    sink.closed = true;
    write_frame(&mut sink.writer, &Frame::json(FrameKind::Exit, &status))?;
    let _ = sink.writer.shutdown_write();
    Ok(())
}

struct Spawned {
    child: std::process::Child,
    stdin: Box<dyn Write + Send>,
    outputs: Vec<(FrameKind, Box<dyn Read + Send>)>,
    master: Option<OwnedFd>,
}

/// Starts the process; an error is a message for the host.
fn spawn(req: &ExecRequest, config: &AgentConfig) -> Result<Spawned, String> {
    let Some(program) = req.argv.first() else {
        return Err("exec needs a program: argv is empty".into());
    };
    let user = users::resolve(&config.passwd_path, &config.group_path, req.user.as_ref())
        .map_err(|e| e.to_string())?;
    let cwd = match &req.cwd {
        Some(c) => c.clone(),
        None if std::path::Path::new(&user.home).is_dir() => user.home.clone(),
        None => "/".to_string(),
    };
    let fail = |e: io::Error| format!("cannot run {program:?} in {cwd:?}: {e}");
    let Some(helper) = config.spawn_helper.as_ref() else {
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..]).current_dir(&cwd);
        set_environment(&mut cmd, req, &user, config);
        return start(cmd, req.tty, Some(user)).map_err(fail);
    };
    // Checked here so that a missing program is an error for the host, as
    // it is when the server starts the command itself.
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(format!(
            "cannot run {program:?} in {cwd:?}: no such directory"
        ));
    }
    // The PATH the command gets: the request's own (the last one wins, as
    // in the environment below), else the default.
    let path = req
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    if find_program(program, &cwd, path).is_none() {
        return Err(format!(
            "cannot run {program:?} in {cwd:?}: {}",
            io::Error::from(io::ErrorKind::NotFound)
        ));
    }
    for attempt in 1..=HELPER_TRIES {
        let (report_rx, report_tx) = report_pipe().map_err(fail)?;
        let groups: Vec<String> = user.groups.iter().map(|g| g.to_string()).collect();
        let mut cmd = Command::new(helper);
        cmd.arg(SPAWN_HELPER_ARG)
            .arg(report_tx.as_raw_fd().to_string())
            .arg(user.uid.to_string())
            .arg(user.gid.to_string())
            .arg(groups.join(","))
            .arg(if req.tty.is_some() { "tty" } else { "pipes" })
            .arg(&cwd)
            .arg("--")
            .args(&req.argv);
        set_environment(&mut cmd, req, &user, config);
        // Through the helper, std starts it with posix_spawn (no fork of
        // this multi-threaded server: no copy of its page tables, no
        // copy-on-write of its memory); the helper then calls
        // `enter_job_as` itself. The report pipe's write end is
        // inheritable only while the lock is held, so no other command
        // gets it.
        let started = {
            let _only_spawn = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            set_cloexec(&report_tx, false).map_err(fail)?;
            let started = start(cmd, req.tty, None);
            drop(report_tx);
            started.map_err(fail)?
        };
        if reached_exec(report_rx) {
            return Ok(started);
        }
        // The helper died before it ran anything: nothing of the command
        // has happened, so it is started again.
        let mut child = started.child;
        let status = child.wait();
        log::warn!(
            "spawn helper for {program:?} ended before running it ({status:?}), try {attempt} of {HELPER_TRIES}"
        );
    }
    Err(format!(
        "cannot run {program:?}: the spawn helper ended before running it, {HELPER_TRIES} times (see the guest console)"
    ))
}

/// Tries of the spawn helper before a command is refused. The helper is a
/// fresh process that has run none of the command when it fails, so a
/// retry is safe; it exists for hosts whose emulated kernel now and then
/// kills a process as it starts.
const HELPER_TRIES: u32 = 3;

/// Held while a report pipe's write end is inheritable.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn set_environment(cmd: &mut Command, req: &ExecRequest, user: &User, config: &AgentConfig) {
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell);
    if req.tty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    if let Some(egress) = &config.egress {
        // The guest's way out (see `egress`); tools differ in which
        // spelling they read.
        let url = egress.proxy_url();
        for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            cmd.env(k, &url);
        }
        for k in ["no_proxy", "NO_PROXY"] {
            cmd.env(k, "localhost,127.0.0.1,::1");
        }
    }
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
}

/// Starts `cmd`. With `enter_as`, the forked child enters its job and
/// that user itself (see [`enter_job_as`]); without, `cmd` is the spawn
/// helper, which does so on its own.
fn start(mut cmd: Command, tty: Option<TtySize>, enter_as: Option<User>) -> io::Result<Spawned> {
    if let Some(user) = enter_as {
        // SAFETY: `enter_job_as` makes only async-signal-safe system calls
        // on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                enter_job_as(tty.is_some(), user.uid, user.gid, &user.groups).map_err(|(_, e)| e)
            });
        }
    }
    match tty {
        Some(size) => spawn_tty(cmd, size),
        None => spawn_pipes(cmd),
    }
}

/// What a command's process does to itself before its exec, as a forked
/// child or as the spawn helper: its own session with the terminal on
/// standard input (`tty`) or its own process group, then, when it runs as
/// root, the user's groups and ids. Async-signal-safe system calls only (it
/// runs between fork and exec); a failure names its step.
fn enter_job_as(
    tty: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: &[libc::gid_t],
) -> Result<(), (&'static str, io::Error)> {
    let failed = |what| Err((what, io::Error::last_os_error()));
    // SAFETY: plain system calls on this process's own session, ids and
    // terminal; `groups` outlives the call.
    unsafe {
        if tty {
            if libc::setsid() < 0 {
                return failed("setsid");
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return failed("terminal");
            }
        } else if libc::setpgid(0, 0) < 0 {
            return failed("process group");
        }
        if libc::geteuid() == 0
            && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0)
        {
            return failed("switching user");
        }
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
fn report_pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe { Ok((File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

fn set_cloexec(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the helper got as far as executing the command: it writes one
/// byte just before `execvp`, and its copy of the pipe closes at the exec
/// (or when it dies).
fn reached_exec(mut report: File) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match report.read(&mut byte) {
            Ok(n) => return n == 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// The first argument that makes the agent binary the spawn helper.
pub const SPAWN_HELPER_ARG: &str = "__spawn";

/// Where `execvp` would find `program` run in `cwd` with `path` as PATH:
/// itself (relative to `cwd`) when it names a path, else the first
/// executable file of that name in a directory of `path`.
fn find_program(program: &str, cwd: &str, path: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::Path::new(cwd).join(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| executable(p))
}

/// The spawn helper: `__spawn REPORT_FD UID GID GROUPS pipes|tty CWD --
/// ARGV...`. Started by the server with posix_spawn, it puts itself in a new process
/// group (`pipes`) or session with its terminal on standard input (`tty`),
/// takes the user's groups and ids when it runs as root, enters `CWD` and
/// executes `ARGV` with the environment it was given. A failure is written
/// to standard error (which the host sees) with exit status 127. One byte
/// on `REPORT_FD` just before the exec tells the server that the helper
/// got that far.
pub fn spawn_helper_main(args: &[std::ffi::OsString]) -> ! {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let fail = |what: &str, e: io::Error| -> ! {
        let _ = writeln!(io::stderr(), "keystone-agent: {what}: {e}");
        std::process::exit(127)
    };
    let (report, args) = match args.split_first() {
        Some((fd, rest)) => (fd.to_str().and_then(|f| f.parse::<i32>().ok()), rest),
        None => (None, args),
    };
    let Some(report) = report else {
        fail("spawn helper", io::Error::from(io::ErrorKind::InvalidInput))
    };
    // The command must not inherit the report pipe.
    let _ = set_cloexec(&report, true);
    let text = |i: usize| args.get(i).and_then(|a| a.to_str()).unwrap_or("");
    let (Ok(uid), Ok(gid)) = (
        text(0).parse::<libc::uid_t>(),
        text(1).parse::<libc::gid_t>(),
    ) else {
        fail("spawn helper", io::Error::from(io::ErrorKind::InvalidInput))
    };
    let groups: Vec<libc::gid_t> = text(2).split(',').filter_map(|g| g.parse().ok()).collect();
    let tty = text(3) == "tty";
    let cwd = args.get(4).cloned().unwrap_or_default();
    let argv: Vec<CString> = args
        .iter()
        .skip(6)
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    if text(5) != "--" || argv.is_empty() {
        fail("spawn helper", io::Error::from(io::ErrorKind::InvalidInput));
    }
    if let Err((what, e)) = enter_job_as(tty, uid, gid, &groups) {
        fail(what, e);
    }
    if let Err(e) = std::env::set_current_dir(&cwd) {
        fail(&format!("entering {}", cwd.to_string_lossy()), e);
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a one-byte write from a live buffer to the report pipe.
    unsafe { libc::write(report, b"x".as_ptr().cast(), 1) };
    // SAFETY: a NUL-terminated program name and a null-terminated array of
    // NUL-terminated arguments, all alive across the call.
    unsafe { libc::execvp(argv[0].as_ptr(), ptrs.as_ptr()) };
    fail(
        &format!("cannot run {:?}", argv[0]),
        io::Error::last_os_error(),
    )
}

fn spawn_pipes(mut cmd: Command) -> io::Result<Spawned> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let missing = || io::Error::other("child pipe missing");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Spawned {
        child,
        stdin: Box::new(stdin),
        outputs: vec![
            (FrameKind::Stdout, Box::new(stdout)),
            (FrameKind::Stderr, Box::new(stderr)),
        ],
        master: None,
    })
}

fn spawn_tty(mut cmd: Command, size: TtySize) -> io::Result<Spawned> {
    let (master, slave) = open_pty(size)?;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    let child = cmd.spawn()?;
    // The command (and with it our copies of the slave) is dropped here,
    // so the master sees EIO once the job closes the terminal.
    drop(cmd);
    let reader = File::from(master.try_clone()?);
    let writer = File::from(master.try_clone()?);
    Ok(Spawned {
        child,
        stdin: Box::new(writer),
        outputs: vec![(FrameKind::Stdout, Box::new(PtyReader(reader)))],
        master: Some(master),
    })
}

/// Opens a pseudo-terminal pair of the given size.
fn open_pty(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: openpty writes two fds into the given ints; name and termios
    // may be null, and ws points to a valid winsize.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded; both fds are fresh and ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on fds we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets a terminal's size (the foreground job gets SIGWINCH).
fn resize(master: i32, size: TtySize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
        log::warn!("resize failed: {}", io::Error::last_os_error());
    }
}

/// A terminal master: EIO (all slaves closed) reads as end of file.
struct PtyReader(File);

impl Read for PtyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            other => other,
        }
    }
}

fn forward_output(
    mut source: Box<dyn Read + Send>,
    kind: FrameKind,
    sink: &SharedSink,
    activity: &OutputActivity,
) {
    let mut buf = vec![0u8; STREAM_CHUNK];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("reading child output: {e}");
                return;
            }
        };
        activity.busy.fetch_add(1, Ordering::SeqCst);
        let sent = {
            let mut sink = lock(sink);
            !sink.closed && write_raw(&mut sink.writer, kind, &buf[..n]).is_ok()
        };
        activity.progress.fetch_add(1, Ordering::SeqCst);
        activity.busy.fetch_sub(1, Ordering::SeqCst);
        if !sent {
            return;
        }
    }
}

/// Waits until every output stream ended, or went idle for
/// [`OUTPUT_GRACE`] after the child exited (a background job holds it).
fn wait_for_outputs(done: &Receiver<()>, count: usize, activity: &OutputActivity) {
    let mut remaining = count;
    let mut last_progress = activity.progress.load(Ordering::SeqCst);
    let mut idle_since = Instant::now();
    while remaining > 0 {
        match done.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => remaining -= 1,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let progress = activity.progress.load(Ordering::SeqCst);
                if progress != last_progress || activity.busy.load(Ordering::SeqCst) > 0 {
                    last_progress = progress;
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= OUTPUT_GRACE {
                    return;
                }
            }
        }
    }
}

fn feed_stdin(mut stdin: Box<dyn Write + Send>, input: Receiver<Input>, is_tty: bool) {
    let mut broken = false;
    for item in input {
        match item {
            Input::Data(bytes) if !broken => {
                broken = stdin.write_all(&bytes).is_err();
            }
            Input::Data(_) => {}
            Input::Eof if is_tty => {
                // ^D: end of input for a terminal in canonical mode.
                let _ = stdin.write_all(&[4]);
            }
            Input::Eof => return,
        }
    }
}

fn read_host_frames(
    reader: &mut BufReader<Box<dyn DuplexStream>>,
    input: &std::sync::mpsc::SyncSender<Input>,
    master: Option<i32>,
    pid: i32,
    exited: &AtomicBool,
) {
    loop {
        let frame = match read_frame(reader) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                if !exited.load(Ordering::SeqCst) {
                    log::info!("host went away; killing process group {pid}");
                    // SAFETY: kill(2) on the child's own process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                return;
            }
        };
        match frame.kind {
            FrameKind::Stdin => {
                let _ = input.send(Input::Data(frame.payload));
            }
            FrameKind::StdinEof => {
                let _ = input.send(Input::Eof);
            }
            FrameKind::Resize => match (frame.parse_resize(), master) {
                (Ok(size), Some(fd)) => resize(fd, size),
                (Err(e), _) => log::warn!("{e}"),
                (Ok(_), None) => {}
            },
            FrameKind::Signal => match frame.parse_signal() {
                Ok(signo) if !exited.load(Ordering::SeqCst) => {
                    // SAFETY: kill(2) on the child's own process group.
                    unsafe { libc::kill(-pid, signo) };
                }
                Ok(_) => {}
                Err(e) => log::warn!("{e}"),
            },
            other => log::warn!("ignoring unexpected {other:?} frame during exec"),
        }
    }
}
