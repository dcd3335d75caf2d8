//! The sandbox's three virtio-fs shares and who serves them: the
//! read-only root, the `state` layer (the root overlay's upper half) and
//! the workspace.
//!
//! The guest writes to `state` and `workspace`. When the supervisor runs
//! as root, each of those two is served by a daemon process of its own
//! (`keystone __share`, virtiofsd-lite's namespace sandbox): PID 1 of a new
//! PID namespace, in a mount namespace whose root is the shared folder,
//! so that even a hole in the daemon's confinement of paths cannot name a
//! host file outside it. The read-only root, and every share of a
//! supervisor that is not root (unsharing namespaces needs root), are
//! served by threads of the supervisor, confined by virtiofsd-lite's
//! checks alone.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use rustix::process::{geteuid, getgid, getuid, set_parent_process_death_signal, Signal};

use super::engine::{Layout, Share, GUEST_UID};

/// How long a share daemon process has to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// virtiofsd-lite's settings for one share. While the sandbox runs only
/// the guest changes its shares (the host reaches the workspace through the
/// guest agent, and the root image never changes), so names, attributes and
/// misses may be cached for long: each exec then costs a few FUSE round
/// trips instead of dozens.
pub fn config(share: Share, rootfs: &Path, layout: &Layout) -> virtiofsd_lite::FsConfig {
    let dir = match share {
        Share::Root => rootfs.to_path_buf(),
        Share::State => layout.state.clone(),
        Share::Workspace => layout.workspace.clone(),
    };
    let mut cfg = virtiofsd_lite::FsConfig::new(&dir, share.tag());
    cfg.readonly = share.readonly();
    cfg.cache = virtiofsd_lite::CacheMode::Always;
    let (uid, gid) = (getuid().as_raw(), getgid().as_raw());
    if share == Share::Workspace && !geteuid().is_root() {
        // A daemon that is not root cannot give files to the guest user
        // (root chowns the workspace to it instead, in `clone`): it shows
        // its user's files as the guest user's and makes every guest owner
        // its user, so the agent owns its workspace (git's ownership check
        // passes) and its `chown`s succeed.
        cfg.ids = virtiofsd_lite::IdMaps::unprivileged(uid, gid, GUEST_UID, GUEST_UID);
    }
    cfg
}

/// Whether this share gets a sandboxed daemon process of its own.
fn sandboxed(readonly: bool) -> bool {
    !readonly && geteuid().is_root()
}

/// Something serving one share; dropping it ends it.
pub enum ShareServer {
    /// A thread of this process (it ends when the frontend goes).
    Thread,
    /// virtiofsd-lite in the supervisor, paired with our VMM (held to be
    /// dropped: that stops it).
    Paired {
        _daemon: virtiofsd_lite::FsDaemonHandle,
    },
    /// A sandboxed daemon process.
    Process(Child),
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        if let ShareServer::Process(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Why a share could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot start the {tag} share's daemon")]
    Spawn {
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {tag} share's daemon ended ({status}) before listening")]
    Ended { tag: String, status: String },
    #[error("the {tag} share's daemon did not listen within {LISTEN_TIMEOUT:?}")]
    NoListen { tag: String },
    #[error("virtiofsd-lite {tag}")]
    Daemon {
        tag: String,
        #[source]
        source: virtiofsd_lite::Error,
    },
    #[error("cannot start a virtiofsd-lite thread")]
    Thread(#[source] std::io::Error),
}

/// Serves `cfg` on `socket` for a frontend that connects there (QEMU).
pub fn serve_on_socket(
    cfg: virtiofsd_lite::FsConfig,
    socket: &Path,
) -> Result<ShareServer, ShareError> {
    if sandboxed(cfg.readonly) {
        return spawn_process(&cfg, socket).map(ShareServer::Process);
    }
    let (tag, s) = (cfg.tag.clone(), socket.to_path_buf());
    std::thread::Builder::new()
        .name(format!("fs-{tag}"))
        .spawn(move || {
            if let Err(e) = virtiofsd_lite::serve_listener(&s, cfg) {
                log::info!("virtiofsd-lite {tag}: {e}");
            }
        })
        .map_err(ShareError::Thread)?;
    Ok(ShareServer::Thread)
}

/// Serves `cfg` to our VMM: the frontend's end of the connection, and
/// what serves it. A sandboxed daemon listens on `socket` (in the
/// sandbox's private run folder) until we connect.
pub fn serve_paired(
    cfg: virtiofsd_lite::FsConfig,
    socket: &Path,
) -> Result<(UnixStream, ShareServer), ShareError> {
    let tag = cfg.tag.clone();
    if !sandboxed(cfg.readonly) {
        let (stream, daemon) = virtiofsd_lite::spawn_paired(cfg)
            .map_err(|source| ShareError::Daemon { tag, source })?;
        return Ok((stream, ShareServer::Paired { _daemon: daemon }));
    }
    let mut child = spawn_process(&cfg, socket)?;
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            // Nobody else may connect: the path goes once we are in.
            let _ = std::fs::remove_file(socket);
            return Ok((stream, ShareServer::Process(child)));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ShareError::Ended {
                tag,
                status: status.to_string(),
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(ShareError::NoListen { tag });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts `keystone __share` for `cfg` on `socket`, dying with us.
fn spawn_process(cfg: &virtiofsd_lite::FsConfig, socket: &Path) -> Result<Child, ShareError> {
    let spawn_err = |source| ShareError::Spawn {
        tag: cfg.tag.clone(),
        source,
    };
    let exe = std::env::current_exe().map_err(spawn_err)?;
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(exe);
    cmd.arg("__share")
        .arg("--socket")
        .arg(socket)
        .arg("--dir")
        .arg(&cfg.shared_dir)
        .arg("--tag")
        .arg(&cfg.tag)
        .stdin(Stdio::null());
    // SAFETY: the hook makes one prctl(2) system call, which is
    // async-signal-safe and allocates nothing; the daemon dies with the
    // supervisor.
    unsafe {
        cmd.pre_exec(|| {
            let _ = set_parent_process_death_signal(Some(Signal::KILL));
            Ok(())
        });
    }
    cmd.spawn().map_err(spawn_err)
}

/// `keystone __share`: one writable share, served from a namespace sandbox.
#[derive(Args, Debug)]
pub struct ShareArgs {
    /// Where the vhost-user frontend connects.
    #[arg(long)]
    socket: PathBuf,
    /// The shared folder (the daemon's root).
    #[arg(long)]
    dir: PathBuf,
    /// The tag the guest mounts.
    #[arg(long)]
    tag: String,
}

/// The body of `keystone __share`: must run while the process has one
/// thread (the namespace sandbox forks).
pub fn share_main(args: ShareArgs) -> i32 {
    virtiofsd_lite::raise_fd_limit();
    let mut cfg = virtiofsd_lite::FsConfig::new(&args.dir, &args.tag);
    cfg.cache = virtiofsd_lite::CacheMode::Always;
    match virtiofsd_lite::sandbox::enter_namespaces() {
        Ok(virtiofsd_lite::sandbox::Role::Parent(code)) => code,
        Ok(virtiofsd_lite::sandbox::Role::Daemon) => {
            match virtiofsd_lite::serve_listener_sandboxed(&args.socket, cfg) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("keystone __share {}: {e}", args.tag);
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("keystone __share {}: {e}", args.tag);
            1
        }
    }
}
