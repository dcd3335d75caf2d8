//! A tiny `log` backend: `/dev/kmsg` (the kernel log, hence the serial
//! console) when the agent is PID 1, stderr otherwise.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

struct AgentLogger {
    kmsg: Option<Mutex<File>>,
}

impl log::Log for AgentLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // kmsg priorities: 3 err, 4 warning, 6 info, 7 debug.
        let prio = match record.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        };
        match &self.kmsg {
            Some(kmsg) => {
                let line = format!("<{prio}>keystone-agent: {}\n", record.args());
                let mut f = kmsg.lock().unwrap_or_else(|e| e.into_inner());
                let _ = f.write_all(line.as_bytes());
            }
            None => eprintln!("keystone-agent: {}: {}", record.level(), record.args()),
        }
    }

    fn flush(&self) {}
}

/// Installs the logger; `kmsg` picks `/dev/kmsg` when it can be opened.
pub fn init(kmsg: bool, level: log::LevelFilter) {
    let kmsg = kmsg
        .then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .ok()
        })
        .flatten()
        .map(Mutex::new);
    if log::set_logger(Box::leak(Box::new(AgentLogger { kmsg }))).is_ok() {
        log::set_max_level(level);
    }
}
