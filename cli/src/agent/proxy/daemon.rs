//! The proxy process itself, `keystone agent __proxy PORT`: it takes the
//! lock of its state folder, listens on the loopback, says `listening
//! PORT` (or `running`, or `error: ...`) on its first line for the command
//! that started it, then serves on a small tokio runtime, re-reading the
//! sandboxes every `REFRESH`, until its watchdog ends it. It logs to its
//! stderr, `proxy.log` in the state folder, which starts over past
//! [`MAX_LOG`](lifecycle::MAX_LOG).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::super::config::Settings;
use super::super::registry::SandboxStore;
use super::lifecycle::{self, bind};
use super::{dial, routing, server};

/// Body of `keystone agent __proxy PORT`: serves until the state folder
/// goes or no sandbox is registered for a while; a second proxy of the
/// same state folder exits at once.
pub fn run(store: &SandboxStore, settings: &Settings, port: u16) -> i32 {
    crate::logging::daemon("proxy", lifecycle::write_line, log::LevelFilter::Info);
    let say = |line: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let (lock, watchdog) = match lifecycle::lock(store) {
        Ok(Some(held)) => held,
        Ok(None) => {
            say("running");
            return 0;
        }
        Err(e) => {
            say(&format!("error: cannot take the proxy's lock: {e}"));
            return 3;
        }
    };
    let var = |k: &str| std::env::var(k).ok();
    let hint = super::super::config::default_path(&var)
        .map_or_else(|| "agent.toml".to_string(), |p| p.display().to_string());
    let listeners = match bind(port, &hint) {
        Ok(l) => l,
        Err(why) => {
            log::info!("{}", &why);
            say(&format!("error: {why}"));
            return 3;
        }
    };
    lifecycle::record(store, port);
    log::info!("listening on 127.0.0.1:{port} (pid {})", std::process::id());
    say(&format!("listening {port}"));
    detach_stdout();
    let code = match serve(store, settings, port, listeners, watchdog) {
        Ok(()) => 0,
        Err(e) => {
            log::info!("stopped: {e}");
            3
        }
    };
    lifecycle::forget(store);
    drop(lock);
    code
}

/// Points stdout at /dev/null: the command that read the first line has
/// gone, and nothing is to be written there again.
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
    }
}

/// The suffixes sandbox names live under: `localhost` and `[proxy] domain`.
fn domains(settings: &Settings) -> Vec<String> {
    let mut d = vec!["localhost".to_string()];
    if settings.proxy_domain != "localhost" {
        d.push(settings.proxy_domain.clone());
    }
    d
}

fn serve(
    store: &SandboxStore,
    settings: &Settings,
    port: u16,
    listeners: Vec<std::net::TcpListener>,
    mut watchdog: lifecycle::Watchdog,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("keystone-proxy")
        .enable_io()
        .enable_time()
        .build()?;
    let store = store.clone();
    let limits = server::Limits::default();
    let dial = Box::new(dial::VsockDial {
        handshake: limits.handshake,
    });
    let domains = domains(settings);
    let result = runtime.block_on(async move {
        let routes = routing::Routes::load(&store).unwrap_or_default();
        let proxy = server::Proxy::new(routes, dial, limits, port, domains);
        for l in listeners {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(Arc::clone(&proxy).serve(l));
        }
        loop {
            tokio::time::sleep(lifecycle::REFRESH).await;
            let s = store.clone();
            let loaded = tokio::task::spawn_blocking(move || routing::Routes::load(&s))
                .await
                .ok()
                .flatten();
            if let Some(why) = watchdog.should_end(loaded.as_ref().map(|r| r.sandboxes.len())) {
                log::info!("exiting: {why}");
                return Ok(());
            }
            if let Some(routes) = loaded {
                proxy.set_routes(routes);
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
