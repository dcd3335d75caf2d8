//! A last word from a crashing agent server: on SIGSEGV or SIGBUS it
//! writes the signal, the faulting address, the instruction and stack
//! pointers and its own address to standard error (the guest console), then dies of the signal
//! as it would have. PID 1 restarts the server; the line says where to look.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// Where the report goes: `/dev/kmsg` (the console) when it opened, else
/// standard error.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Installs the handler for SIGSEGV and SIGBUS in this process.
pub fn install() -> io::Result<()> {
    // SAFETY: open(2) of a constant NUL-terminated path; the descriptor is
    // kept for the life of the process.
    let kmsg = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    REPORT_FD.store(kmsg, Ordering::Relaxed);
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: sigaction is plain old data; all-zero is a valid value
        // that the fields below complete.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_fault;
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESETHAND;
        // SAFETY: an empty mask for a valid sigaction; then installs a
        // handler that only makes async-signal-safe calls.
        let rc = unsafe {
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Appends `v` in hexadecimal to `buf` at `at`; returns the new end.
fn put_hex(buf: &mut [u8], mut at: usize, v: u64) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        if at < buf.len() {
            buf[at] = DIGITS[((v >> (shift * 4)) & 0xf) as usize];
            at += 1;
        }
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let end = (at + s.len()).min(buf.len());
    buf[at..end].copy_from_slice(&s[..end - at]);
    end
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut buf = [0u8; 192];
    let kmsg = REPORT_FD.load(Ordering::Relaxed);
    // A kernel log line of priority "error".
    let mut n = if kmsg >= 0 {
        put(&mut buf, 0, b"<3>")
    } else {
        0
    };
    n = put(&mut buf, n, b"keystone-agent: server crashed: signal ");
    n = put(
        &mut buf,
        n,
        if sig == libc::SIGBUS {
            b"SIGBUS"
        } else {
            b"SIGSEGV"
        },
    );
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { info.as_ref().map_or(0, |i| i.si_addr() as u64) };
    n = put(&mut buf, n, b" addr 0x");
    n = put_hex(&mut buf, n, addr);
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // context, a ucontext_t.
    let regs = unsafe { (ctx as *const libc::ucontext_t).as_ref() }.map(|uc| {
        let g = &uc.uc_mcontext.gregs;
        (
            g[libc::REG_RIP as usize] as u64,
            g[libc::REG_RSP as usize] as u64,
        )
    });
    if let Some((rip, rsp)) = regs {
        n = put(&mut buf, n, b" rip 0x");
        n = put_hex(&mut buf, n, rip);
        n = put(&mut buf, n, b" rsp 0x");
        n = put_hex(&mut buf, n, rsp);
    }
    // The handler's own address places `rip` in the binary (position
    // independent, loaded at a random base).
    n = put(&mut buf, n, b" on_fault 0x");
    n = put_hex(&mut buf, n, on_fault as *const () as u64);
    n = put(&mut buf, n, b"\n");
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for n bytes.
    unsafe { libc::write(if kmsg >= 0 { kmsg } else { 2 }, buf.as_ptr().cast(), n) };
    // Returning re-runs the faulting instruction with the default action
    // restored (SA_RESETHAND): the process dies of the signal.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_text_fill_without_overflowing() {
        let mut buf = [0u8; 24];
        let n = put(&mut buf, 0, b"at 0x");
        let n = put_hex(&mut buf, n, 0xdead_beef);
        assert_eq!(&buf[..n], b"at 0x00000000deadbeef");
        let n = put_hex(&mut buf, n, u64::MAX);
        assert_eq!(n, buf.len());
    }
}
