//! The i8042 keyboard controller, reduced to what a guest kernel uses to
//! reboot: command 0xFE (pulse the reset line) on port 0x64. With
//! `reboot=k` on the command line, the guest's `reboot` lands here and the
//! VMM stops the VM cleanly.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::vstate::exit::{ExitSignal, VmExitReason};

/// First port of the controller (data register).
pub const I8042_DATA_PORT: u16 = 0x60;
/// Ports covered: 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT_COUNT: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only i8042.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// A controller that reports a reset through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(VmExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert_eq!(exit.reason(), None);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}
