//! The guest side of `sync --artifacts`: one [`Link`] to the guest agent
//! per transfer, whose connections a [`Watchdog`] shuts down when the
//! transfer's time limit passes (a blocked read then returns), the two
//! `git ls-files` lists read under a size cap, and the tar stream fed to
//! the checks of `tarcheck.rs`.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use keystone_guest_agent::client::{AgentClient, ClientError};
use keystone_guest_agent::protocol::{RawStreamRequest, UserSpec, AGENT_VSOCK_PORT};
use keystone_guest_agent::transport::DuplexStream;

use super::super::super::backend::{BackendError, BackendResult};
use super::super::engine::{GUEST_USER, GUEST_WORKSPACE};
use super::super::guest;
use super::shown;
use super::tarcheck::{self, Limits, Sink, TarError};

/// The guest command that writes the archive of the paths on its stdin
/// (a file that vanished or cannot be read is a warning, not a failure).
pub(super) const TAR_ARGV: [&str; 9] = [
    "tar",
    "--create",
    "--file=-",
    "--format=pax",
    "--no-recursion",
    "--ignore-failed-read",
    "--null",
    "--verbatim-files-from",
    "--files-from=-",
];

/// Most bytes one `git ls-files` in the sandbox may print.
const MAX_LIST: usize = 64 << 20;

/// A buffer that takes at most `max` bytes; past that, writes fail (or,
/// with `drop_excess`, are dropped).
struct Capped {
    buf: Vec<u8>,
    max: usize,
    drop_excess: bool,
}

impl Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.max - self.buf.len();
        if bytes.len() > room && !self.drop_excess {
            return Err(io::Error::other(format!("more than {} bytes", self.max)));
        }
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Shuts down every connection it watches once its time limit passes.
pub struct Watchdog {
    sockets: Arc<Mutex<Vec<UnixStream>>>,
    fired: Arc<AtomicBool>,
    deadline: Instant,
    _cancel: mpsc::Sender<()>,
}

impl Watchdog {
    pub fn start(limit: Duration) -> Watchdog {
        let sockets: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let fired = Arc::new(AtomicBool::new(false));
        let (cancel, wait) = mpsc::channel::<()>();
        let (s, f) = (sockets.clone(), fired.clone());
        // The connections close only once the deadline has passed, so a
        // reader that finds its stream closed then sees the time is up.
        let deadline = Instant::now() + limit;
        std::thread::spawn(move || loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match wait.recv_timeout(left) {
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    f.store(true, Ordering::SeqCst);
                    shut_all(&s);
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        });
        Watchdog {
            sockets,
            fired,
            deadline,
            _cancel: cancel,
        }
    }

    /// Watches `socket` (a clone of it); shuts it at once if time is up.
    pub fn watch(&self, socket: &UnixStream) -> io::Result<()> {
        let clone = socket.try_clone()?;
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(clone);
        if self.fired() {
            shut_all(&self.sockets);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "time is up"));
        }
        Ok(())
    }

    /// When the time limit passes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

fn shut_all(sockets: &Mutex<Vec<UnixStream>>) {
    for s in sockets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// Why the transfer of the artifacts stopped.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The guest agent did not run tar, or did not answer in time.
    #[error("{0}")]
    Link(#[source] BackendError),
    /// The stream broke a rule, or could not be read or landed.
    #[error("{0}")]
    Stream(#[source] TarError),
    /// tar failed; the lines it wrote, escaped.
    #[error("tar in the sandbox failed (exit {code}): {}", .said.join("; "))]
    Tar { code: i32, said: Vec<String> },
}

/// The guest agent, for one transfer under one time limit.
pub struct Link {
    client: AgentClient,
    watchdog: Arc<Watchdog>,
    limit: Duration,
}

impl Link {
    pub fn open(vsock: &Path, limit: Duration) -> Link {
        let watchdog = Arc::new(Watchdog::start(limit));
        let (uds, dog) = (vsock.to_path_buf(), watchdog.clone());
        let client = AgentClient::new(Box::new(move || {
            let s = guest::connect(&uds, AGENT_VSOCK_PORT, Duration::from_secs(30), false)?;
            dog.watch(&s)?;
            Ok(Box::new(s) as Box<dyn DuplexStream>)
        }))
        .retrying(Duration::from_secs(20));
        Link {
            client,
            watchdog,
            limit,
        }
    }

    fn err(&self, what: &str, e: ClientError) -> BackendError {
        if self.watchdog.fired() {
            BackendError::Failed(format!("{what}: no answer within {:?}", self.limit))
        } else {
            guest::agent_err(what, e)
        }
    }

    /// Shuts every connection (a stdin feeder still blocked ends).
    pub fn close(&self) {
        shut_all(&self.watchdog.sockets);
    }

    /// `git -C /workspace ARGS` in the sandbox; its capped stdout.
    pub fn git_list(&self, args: &[&str]) -> BackendResult<Vec<u8>> {
        let mut argv = vec!["git".to_string(), "-C".into(), GUEST_WORKSPACE.into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let what = format!("git {} in the sandbox", args.join(" "));
        let new = |max, drop_excess| Capped {
            buf: Vec::new(),
            max,
            drop_excess,
        };
        let (mut out, mut err) = (new(MAX_LIST, false), new(4096, true));
        let request = guest::request(argv, GUEST_WORKSPACE, None);
        let status = self
            .client
            .exec(request, io::empty(), &mut out, &mut err)
            .map_err(|e| self.err(&what, e))?;
        if !status.success() {
            return Err(BackendError::Failed(format!(
                "{what} failed: {}",
                shown(err.buf.trim_ascii())
            )));
        }
        Ok(out.buf)
    }

    /// Runs tar in the sandbox on `asked` and feeds its stream, checked,
    /// to `sink`. Returns warnings (what tar said, if it still succeeded).
    pub fn tar(
        &self,
        asked: &[String],
        limits: &Limits,
        sink: &mut dyn Sink,
    ) -> Result<Vec<String>, TransferError> {
        let request = RawStreamRequest {
            argv: TAR_ARGV.map(String::from).to_vec(),
            cwd: Some(GUEST_WORKSPACE.into()),
            env: Vec::new(),
            user: Some(UserSpec::Name(GUEST_USER.into())),
        };
        let what = "tar in the sandbox";
        let stream = self
            .client
            .raw_stream(request)
            .map_err(|e| TransferError::Link(self.err(what, e)))?;
        let (mut reader, mut writer) = stream.into_split();
        let list: Vec<u8> = asked.iter().flat_map(|p| p.bytes().chain([0])).collect();
        std::thread::spawn(move || {
            if writer.write_all(&list).is_ok() {
                let _ = writer.close_stdin();
            }
        });
        tarcheck::read_archive(&mut reader, limits, self.watchdog.deadline(), sink)
            .map_err(TransferError::Stream)?;
        let exit = reader
            .wait()
            .map_err(|e| TransferError::Link(self.err(what, e)))?;
        let said: Vec<String> = exit.stderr[..exit.stderr.len().min(4096)]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .take(5)
            .map(|l| format!("{what}: {}", shown(l)))
            .collect();
        match exit.status.code {
            Some(0) | Some(1) => Ok(said),
            _ => Err(TransferError::Tar {
                code: exit.status.code_or_signal(),
                said,
            }),
        }
    }
}
