//! Legacy PC devices: 16550 serial, i8042 (reset only) and the boot timer.

pub mod boot_timer;
pub mod console;
pub mod i8042;
pub mod serial;

pub use boot_timer::{BootEvent, BootTimeline, BootTimer, BOOT_TIMER_PORT};
pub use i8042::I8042;
pub use serial::{ConsoleLog, Serial, SERIAL_PORT_COM1};
