//! `virtiofsd-lite`: serve one directory to a vhost-user-fs frontend.
//! Thin: parses the command line (virtiofsd's option names) and calls
//! [`virtiofsd_lite::serve_listener`].

use std::path::PathBuf;

use clap::Parser;
use virtiofsd_lite::{CacheMode, FsConfig};

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
}

fn main() {
    let a = Args::parse();
    let config = FsConfig {
        shared_dir: a.shared_dir,
        tag: a.tag,
        cache: a.cache,
        writeback: a.writeback,
        allow_setuid: a.allow_setuid,
        thread_pool_size: a.thread_pool_size,
    };
    if let Err(e) = virtiofsd_lite::serve_listener(&a.socket_path, config) {
        eprintln!("virtiofsd-lite: {e}");
        std::process::exit(1);
    }
}
