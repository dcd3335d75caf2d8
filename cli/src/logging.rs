//! The one logging path of every `keystone` process: the `log` facade's
//! records from this crate and from the libraries it runs (the VMM,
//! virtiofsd-lite, vsock-lite), at the level `--log-level` sets, each
//! escaped (records quote the guest: its names, chains, requests).
//!
//! A command writes `[LEVEL target] text` on its standard error. A daemon
//! (the sandbox supervisor, the dev-server proxy) switches to its log's
//! lines with [`daemon`]: `[time] <name>: text` for its own records and
//! `[time] <library>: text` for a library's, through the daemon's sink
//! (which bounds its log file).

use std::sync::OnceLock;

/// Where a daemon's lines go, and what its own records are called.
#[cfg_attr(test, allow(dead_code))]
struct Daemon {
    name: &'static str,
    sink: fn(&str),
}

struct Logger {
    daemon: OnceLock<Daemon>,
}

static LOGGER: Logger = Logger {
    daemon: OnceLock::new(),
};

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = crate::shown::line(&record.args().to_string());
        #[cfg(test)]
        capture::record(record.target(), &text);
        #[cfg(not(test))]
        match self.daemon.get() {
            None => eprintln!("{}", terminal_line(record.level(), record.target(), &text)),
            Some(d) => (d.sink)(&daemon_line(d.name, record.target(), &text)),
        }
    }

    fn flush(&self) {}
}

/// A command's line: this crate's information, warnings and errors as
/// `keystone` says everything else, a library's and the debugging
/// records with their level and target.
fn terminal_line(level: log::Level, target: &str, text: &str) -> String {
    let ours = target.split("::").next() == Some(env!("CARGO_CRATE_NAME"));
    match level {
        log::Level::Info if ours => format!("keystone: {text}"),
        log::Level::Warn if ours => format!("keystone: warning: {text}"),
        log::Level::Error if ours => format!("keystone: error: {text}"),
        _ => format!("[{level} {target}] {text}"),
    }
}

/// `[time] <source>: text`, the source being the daemon for this crate's
/// records and the library (`vmm`, `virtiofsd_lite`, ...) for others.
fn daemon_line(name: &str, target: &str, text: &str) -> String {
    let krate = target.split("::").next().unwrap_or(target);
    let source = if krate == env!("CARGO_CRATE_NAME") {
        name
    } else {
        krate
    };
    format!("[{}] {source}: {text}", crate::agent::fsutil::now_rfc3339())
}

/// Routes records at or above `level` to stderr (`main` calls it first).
pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// This process is the daemon `name`: its lines go to `sink`, and its log
/// keeps at least `floor` (a daemon's log is where its work is told).
pub fn daemon(name: &'static str, sink: fn(&str), floor: log::LevelFilter) {
    let _ = LOGGER.daemon.set(Daemon { name, sink });
    if log::max_level() < floor {
        log::set_max_level(floor);
    }
}

/// The supervisor's sink: its standard error, which the supervisor points
/// at its bounded log file.
pub fn stderr_line(line: &str) {
    eprintln!("{line}");
}

/// What the tests read of the log: the lines of the calling thread, and
/// how many records each target wrote (the test build writes nothing).
#[cfg(test)]
pub mod capture {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Mutex;

    thread_local! {
        static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }
    static COUNTS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

    /// Routes this process's records here (once), at every level up to info.
    pub fn install() {
        if log::set_logger(&super::LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    }

    /// Starts keeping the calling thread's lines.
    pub fn this_thread() {
        install();
        LINES.with(|l| *l.borrow_mut() = Some(Vec::new()));
    }

    /// The calling thread's lines since the last call.
    pub fn take() -> Vec<String> {
        LINES.with(|l| {
            l.borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        })
    }

    /// How many records `target` wrote so far.
    pub fn count(target: &str) -> usize {
        let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .as_ref()
            .and_then(|c| c.get(target))
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn record(target: &str, text: &str) {
        LINES.with(|l| {
            if let Some(lines) = l.borrow_mut().as_mut() {
                lines.push(text.to_string());
            }
        });
        let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
        *counts
            .get_or_insert_with(HashMap::new)
            .entry(target.to_string())
            .or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_lines_name_their_source_and_hold_nothing_raw() {
        let ours = daemon_line("supervisor", "keystone::agent::microvm::egress", "x");
        assert!(ours.ends_with("] supervisor: x"), "{ours}");
        let vmm = daemon_line("supervisor", "vmm::devices::legacy::serial", "y");
        assert!(vmm.ends_with("] vmm: y"), "{vmm}");
        let text = crate::shown::line(crate::shown::HOSTILE);
        assert!(crate::shown::terminal_safe(&daemon_line(
            "proxy", "keystone", &text
        )));
    }

    #[test]
    fn command_lines_speak_as_keystone_and_name_libraries() {
        let ours = env!("CARGO_CRATE_NAME");
        assert_eq!(
            terminal_line(log::Level::Warn, &format!("{ours}::agent"), "x"),
            "keystone: warning: x"
        );
        assert_eq!(
            terminal_line(log::Level::Info, "vmm::machine", "y"),
            "[INFO vmm::machine] y"
        );
    }
}
