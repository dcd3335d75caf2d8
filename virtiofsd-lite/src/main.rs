//! `virtiofsd-lite`: serve one directory to a vhost-user-fs frontend.
//! Thin: parses the command line (virtiofsd's option names) and calls
//! [`virtiofsd_lite::serve_listener`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use virtiofsd_lite::sandbox::{self, Role};
use virtiofsd_lite::{CacheMode, FileHandles, FsConfig, IdMap, IdMaps, IdRule};

/// How the daemon process is isolated from the rest of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Sandbox {
    /// No extra isolation: confinement comes from how every path is resolved.
    None,
    /// Run as PID 1 of new mount and PID namespaces whose root is the
    /// shared directory (pivot_root, as virtiofsd does); needs root.
    Namespace,
}

/// A small vhost-user-fs daemon serving one directory, confined to it.
#[derive(Parser, Debug)]
#[command(name = "virtiofsd-lite", version)]
struct Args {
    /// vhost-user socket path to listen on.
    #[arg(long)]
    socket_path: PathBuf,
    /// Directory to share.
    #[arg(long)]
    shared_dir: PathBuf,
    /// virtio-fs tag (informational; the frontend presents it).
    #[arg(long, default_value = "keystone")]
    tag: String,
    /// Guest caching: never, auto or always.
    #[arg(long, default_value = "auto")]
    cache: CacheMode,
    /// Let the guest use a writeback cache.
    #[arg(long)]
    writeback: bool,
    /// Keep setuid/setgid bits the guest sets.
    #[arg(long)]
    allow_setuid: bool,
    /// Worker threads hint.
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// Refuse every change to the shared directory (EROFS), as virtiofsd's
    /// `--readonly`.
    #[arg(long)]
    readonly: bool,
    /// Process isolation: "none", or "namespace" (new mount and PID
    /// namespaces with the shared directory as the root; needs root).
    #[arg(long, value_enum, default_value_t = Sandbox::None)]
    sandbox: Sandbox,
    /// Translate UIDs between guest and host, as virtiofsd:
    /// `<kind>:<from>:<to>:<count>` with kind guest, host, squash-guest,
    /// squash-host or map (`map:<guest>:<host>:<count>`), or
    /// `forbid-guest:<from>:<count>`. Repeat for more ranges.
    #[arg(long, value_name = "MAP")]
    translate_uid: Vec<IdRule>,
    /// Same as --translate-uid, for GIDs.
    #[arg(long, value_name = "MAP")]
    translate_gid: Vec<IdRule>,
    /// Nodes past the descriptor budget (half the open-file limit) keep a
    /// kernel file handle: "prefer" where that works, else their parent and
    /// name; "never" always by name; "mandatory" refuses to start without
    /// file handles.
    #[arg(long, default_value = "prefer", value_name = "never|prefer|mandatory")]
    inode_file_handles: FileHandles,
}

fn main() {
    let a = Args::parse();
    let ids = IdMap::new(a.translate_uid).and_then(|uid| {
        let gid = IdMap::new(a.translate_gid)?;
        Ok(IdMaps { uid, gid })
    });
    let ids = ids.unwrap_or_else(|e| {
        eprintln!("virtiofsd-lite: {e}");
        std::process::exit(2);
    });
    virtiofsd_lite::raise_fd_limit();
    let config = FsConfig {
        shared_dir: a.shared_dir,
        tag: a.tag,
        cache: a.cache,
        writeback: a.writeback,
        allow_setuid: a.allow_setuid,
        thread_pool_size: a.thread_pool_size,
        readonly: a.readonly,
        ids,
        file_handles: a.inode_file_handles,
    };
    let result = match a.sandbox {
        Sandbox::None => virtiofsd_lite::serve_listener(&a.socket_path, config),
        // Still single-threaded here, as enter_namespaces requires.
        Sandbox::Namespace => match sandbox::enter_namespaces() {
            Ok(Role::Parent(code)) => std::process::exit(code),
            Ok(Role::Daemon) => virtiofsd_lite::serve_listener_sandboxed(&a.socket_path, config),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("virtiofsd-lite: {e}");
        std::process::exit(1);
    }
}
