//! Reads a VMM's serial console (its stdout) on a thread and timestamps
//! the boot milestones as the harness sees them: the first byte, the
//! kernel's "Run /init as init process" line and the init's marker line.
//! When the marker arrives it samples the memory of the watched processes
//! at once, so both VMMs are measured at the same point of the boot.

use std::collections::VecDeque;
use std::io::Read;
use std::process::ChildStdout;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm::host::monotonic_ns;

use super::procmem::{self, ProcMemory};

/// The kernel's line when it executes the init program.
pub const INIT_EXEC_TEXT: &str = "Run /init as init process";
/// The kernel's line holding the final command line.
pub const CMDLINE_TEXT: &str = "Kernel command line: ";
const TAIL_LINES: usize = 60;
/// The longest console line kept (the guest decides what it prints; the
/// rest of a longer line is dropped).
const LINE_CAP: usize = 16 << 10;

/// What the console showed so far (times are CLOCK_MONOTONIC ns).
#[derive(Debug, Default, Clone)]
pub struct ConsoleState {
    pub first_byte_ns: Option<u64>,
    pub init_exec_ns: Option<u64>,
    pub marker_ns: Option<u64>,
    /// Memory of each watched pid, sampled when the marker arrived.
    pub marker_memory: Vec<Option<ProcMemory>>,
    pub kernel_cmdline: Option<String>,
    pub bytes: u64,
    pub tail: VecDeque<String>,
    pub eof: bool,
}

/// A console being read.
pub struct Console {
    state: Arc<Mutex<ConsoleState>>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Starts reading `out`; `watch` are the pids whose memory is sampled
    /// when a line contains `marker` (`guest_mib`: the guest's memory,
    /// left out of theirs).
    pub fn start(
        out: ChildStdout,
        marker: &str,
        watch: Vec<u32>,
        guest_mib: u64,
    ) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(ConsoleState::default()));
        let marker = marker.to_string();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || read_loop(out, &marker, &watch, guest_mib, &shared))?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    /// A copy of the state now.
    pub fn snapshot(&self) -> ConsoleState {
        lock(&self.state).clone()
    }

    /// Waits for the reader to see end of file (call after the VMM exited
    /// or was killed) and returns the final state.
    pub fn finish(mut self) -> ConsoleState {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

fn lock(m: &Mutex<ConsoleState>) -> MutexGuard<'_, ConsoleState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_loop(
    mut out: ChildStdout,
    marker: &str,
    watch: &[u32],
    guest_mib: u64,
    state: &Mutex<ConsoleState>,
) {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = monotonic_ns();
        let mut st = lock(state);
        st.first_byte_ns.get_or_insert(now);
        st.bytes += n as u64;
        for &b in &buf[..n] {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                line.clear();
                on_text(&mut st, &text, now, marker, (watch, guest_mib));
                st.tail.push_back(text);
                if st.tail.len() > TAIL_LINES {
                    st.tail.pop_front();
                }
            } else {
                if line.len() < LINE_CAP {
                    line.push(b);
                }
            }
        }
        // A milestone whose line has no newline yet still counts now.
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line).to_string();
            if !text.contains(CMDLINE_TEXT) {
                on_text(&mut st, &text, now, marker, (watch, guest_mib));
            }
        }
    }
    lock(state).eof = true;
}

fn on_text(st: &mut ConsoleState, text: &str, now: u64, marker: &str, watch: (&[u32], u64)) {
    if st.init_exec_ns.is_none() && text.contains(INIT_EXEC_TEXT) {
        st.init_exec_ns = Some(now);
    }
    if st.marker_ns.is_none() && text.contains(marker) {
        st.marker_ns = Some(now);
        let (pids, guest_mib) = watch;
        st.marker_memory = pids
            .iter()
            .map(|&pid| procmem::read(pid, guest_mib))
            .collect();
    }
    if st.kernel_cmdline.is_none() {
        if let Some((_, cmd)) = text.split_once(CMDLINE_TEXT) {
            st.kernel_cmdline = Some(cmd.trim().to_string());
        }
    }
}
