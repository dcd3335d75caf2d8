//! The sandbox's log files, bounded on disk and fit to read with `cat` or
//! `less`: `supervisor.log` (the supervisor's lines, the VMM's and the
//! file daemons' warnings, QEMU's messages) and `console.log` (the
//! guest's serial console).
//!
//! Both are written through a [`CappedLog`]: when a write would take the
//! file past [`ROTATE_AT`] bytes, it becomes `<name>.1` (replacing the one
//! before) and a new file starts, so a log holds at most twice that on
//! disk whatever the guest does. What is written passes through
//! [`LogText`]: control characters escaped, carriage returns dropped.
//!
//! The supervisor's standard output and error become a pipe that a thread
//! copies into the supervisor log ([`capture_output`]), so that every
//! writer in the process and in QEMU, which inherits them, is bounded. The
//! console reaches its log through a Unix socket that QEMU connects to
//! ([`serve_console`]), or as our VMM's serial writer.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rustix::stdio::{dup2_stderr, dup2_stdout};

use crate::shown::LogText;

/// The size at which a log file is rotated.
pub const ROTATE_AT: u64 = 8 << 20;

/// A log file that never grows past its limit (see the module
/// documentation).
pub struct CappedLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    limit: u64,
    text: LogText,
}

impl CappedLog {
    /// Appends to `path`, rotating at [`ROTATE_AT`].
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limit(path, ROTATE_AT)
    }

    fn with_limit(path: &Path, limit: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            limit: limit.max(1),
            text: LogText::default(),
        })
    }

    /// `<name>.1`, where the previous part goes.
    pub fn previous(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".1");
        path.with_file_name(name)
    }

    /// Moves the file to `<name>.1` and starts an empty one.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        // If it cannot be moved (gone, say), it is emptied instead.
        let _ = std::fs::rename(&self.path, Self::previous(&self.path));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.file = Some(file);
        self.size = 0;
        Ok(())
    }

    /// Writes bytes already made fit for the log.
    fn write_text(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.file.is_none() || (self.size > 0 && self.size + bytes.len() as u64 > self.limit)
            {
                self.rotate()?;
            }
            let room = self.limit.saturating_sub(self.size).max(1);
            let n = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let Some(file) = self.file.as_mut() else {
                return Ok(());
            };
            file.write_all(&bytes[..n])?;
            self.size += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut text = Vec::with_capacity(buf.len() + 16);
        self.text.push(buf, &mut text);
        self.write_text(&text)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Copies `from` into `log` until it ends. A write that fails (a full
/// disk) loses its bytes, never the reading: a writer to a pipe nobody
/// reads would block.
fn pump(mut from: impl Read, log: &mut CappedLog) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = log.write(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// This process's standard output and error going to a [`CappedLog`];
/// dropped, it points them at the log file itself (for the process's
/// last lines) and waits a moment for the pipe's bytes to reach the log.
pub struct OutputCapture {
    path: PathBuf,
    done: mpsc::Receiver<()>,
}

/// Sends this process's standard output and error (and its children's,
/// which inherit them) through a pipe into a [`CappedLog`] at `path`.
pub fn capture_output(path: &Path) -> io::Result<OutputCapture> {
    let mut log = CappedLog::open(path)?;
    let (read_end, write_end) = super::readiness::pipe()?;
    // dup2 onto the standard descriptors: the copies do not close on
    // exec, so QEMU inherits them.
    dup2_stdout(&write_end)?;
    dup2_stderr(&write_end)?;
    drop(write_end);
    let (tx, done) = mpsc::channel();
    std::thread::Builder::new()
        .name("log-pump".into())
        .spawn(move || {
            pump(File::from(read_end), &mut log);
            let _ = log.flush();
            let _ = tx.send(());
        })?;
    Ok(OutputCapture {
        path: path.to_path_buf(),
        done,
    })
}

impl Drop for OutputCapture {
    fn drop(&mut self) {
        let direct: io::Result<OwnedFd> = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map(OwnedFd::from);
        let Ok(direct) = direct else { return };
        // dup2 onto the standard descriptors closes this process's copies
        // of the pipe's write end.
        let _ = dup2_stdout(&direct);
        let _ = dup2_stderr(&direct);
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }
}

/// Listens on `socket` for QEMU's console chardev and writes what comes
/// into a [`CappedLog`] at `log`, one connection at a time.
pub fn serve_console(socket: &Path, log: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let mut log = CappedLog::open(log)?;
    std::thread::Builder::new()
        .name("console-log".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(conn) => pump(conn, &mut log),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
#[path = "logfile_tests.rs"]
mod tests;
