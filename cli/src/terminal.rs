//! Terminal handling: raw mode for the serial console and sessions.

use std::io::IsTerminal;

use rustix::termios::{tcgetattr, tcsetattr, OptionalActions, Termios};

/// Puts stdin in raw mode while alive, if it is a terminal.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Enters raw mode (no-op when stdin is not a terminal).
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self { saved: None };
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = tcsetattr(&stdin, OptionalActions::Now, &raw);
        Self { saved: Some(saved) }
    }

    /// True when the terminal is in raw mode.
    pub fn active(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // Restores the attributes read from the same terminal.
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
    }
}
