//! The "sandbox not running" page. When a sandbox stops, the host ports its
//! guest servers were forwarded to stay open in a small detached process
//! (`keystone agent __placeholder NAME PORT...`, started by the exiting
//! supervisor) that answers every request with an HTTP 503 page naming the
//! sandbox and the command that starts it, instead of a refused
//! connection. The page reloads itself, so a browser tab comes back to the
//! dev server once the sandbox runs again and the port is forwarded anew.
//!
//! It ends when `start` or `destroy` dismisses it (SIGTERM, after checking
//! that the pid is still this sandbox's placeholder), or by itself within
//! a couple of seconds once its pid file is gone or names another process
//! (the sandbox folder was removed). `[proxy] enable = false` turns it off.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::super::registry::SandboxPaths;
use super::super::state::runs_subcommand;

/// The hidden subcommand that runs the placeholder.
pub const PLACEHOLDER_SUBCOMMAND: &str = "__placeholder";

/// How long a client gets to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

fn pid_file(paths: &SandboxPaths) -> PathBuf {
    paths.dir.join("placeholder.pid")
}

/// Starts the placeholder for `ports` of sandbox `name`, detached, and
/// records its pid. Called by the supervisor as it exits.
pub fn spawn(name: &str, paths: &SandboxPaths, ports: &[u16], log: fn(&str)) {
    if ports.is_empty() {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return log(&format!("no placeholder page: {e}")),
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.logs.join("placeholder.log"));
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg(PLACEHOLDER_SUBCOMMAND)
        .arg(name)
        .args(ports.iter().map(u16::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match log_file {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    match cmd.spawn() {
        Ok(child) => {
            let pid = child.id();
            if let Err(e) = std::fs::write(pid_file(paths), format!("{pid}\n")) {
                log(&format!("cannot record the placeholder's pid: {e}"));
            }
            log(&format!(
                "placeholder page on 127.0.0.1 port(s) {ports:?} (pid {pid})"
            ));
            // Serving before the supervisor exits (and `stop` returns).
            let t = Instant::now();
            while TcpStream::connect((Ipv4Addr::LOCALHOST, ports[0])).is_err()
                && t.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Err(e) => log(&format!("cannot start the placeholder page: {e}")),
    }
}

/// The pid in the pid file, if it is a live placeholder of this sandbox.
fn running_placeholder(paths: &SandboxPaths, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(paths))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    runs_subcommand(pid, PLACEHOLDER_SUBCOMMAND, name).then_some(pid)
}

/// Ends the sandbox's placeholder, if one runs, and waits (briefly) until
/// it is gone so that its ports are free again.
pub fn dismiss(paths: &SandboxPaths, name: &str) {
    if let Some(pid) = running_placeholder(paths, name) {
        // SAFETY: kill(2) on a pid just checked to be this sandbox's
        // placeholder.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while runs_subcommand(pid, PLACEHOLDER_SUBCOMMAND, name)
            && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(pid_file(paths));
}

/// The page for sandbox `name` on host port `port`.
fn page(name: &str, port: u16) -> String {
    let name = html_escape(name);
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>Sandbox {name} is not running</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;\
         padding:0 1em;color:#222}}code{{background:#eee;padding:.1em .3em}}</style>\
         </head><body>\n<h1>Sandbox <code>{name}</code> is not running</h1>\n\
         <p>Port {port} forwards a server of this Keystone sandbox, which is stopped.</p>\n\
         <p>Start it with <code>keystone agent start {name}</code> and start the server \
         in it again; this page reloads every 5 seconds.</p>\n</body></html>\n"
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Reads a request head (or what arrives before the timeout) and answers
/// 503 with the page.
fn answer(mut stream: TcpStream, name: &str, port: u16) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + READ_TIMEOUT;
    while head.len() < 16 << 10 && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let body = page(name, port);
    let is_head = head.starts_with(b"HEAD ");
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-store\r\n\
         Retry-After: 5\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if !is_head {
        response.push_str(&body);
    }
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Body of `keystone agent __placeholder NAME PORT...`.
pub fn run(name: &str, paths: &SandboxPaths, ports: &[u16]) -> i32 {
    let me = std::process::id() as i32;
    let mut serving = 0;
    for &port in ports {
        match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            Ok(listener) => {
                serving += 1;
                let name = name.to_string();
                std::thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        answer(stream, &name, port);
                    }
                });
            }
            Err(e) => eprintln!("placeholder for {name}: port {port}: {e}"),
        }
    }
    if serving == 0 {
        return 0;
    }
    // Ends once the pid file no longer names this process.
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let recorded: Option<i32> = std::fs::read_to_string(pid_file(paths))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if recorded != Some(me) {
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn paths(dir: &Path) -> SandboxPaths {
        SandboxPaths {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            state: dir.join("state.json"),
            lock: dir.join("lock"),
            logs: dir.join("logs"),
            disk: dir.join("disk"),
        }
    }

    fn get(port: u16, method: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "{method} /app HTTP/1.1\r\nHost: x.localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_503_with_the_page_until_its_pid_file_goes() {
        let dir = std::env::temp_dir().join(format!("ks-placeholder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = paths(&dir);
        std::fs::write(pid_file(&p), format!("{}\n", std::process::id())).unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let runner = {
            let p = p.clone();
            std::thread::spawn(move || run("my-app", &p, &[port]))
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(5), "never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = get(port, "GET");
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(
            out.contains("Sandbox <code>my-app</code> is not running"),
            "{out}"
        );
        assert!(out.contains("keystone agent start my-app"), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let out = get(port, "HEAD");
        assert!(
            out.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {out}"
        );

        // Not a placeholder process: dismiss leaves it alone but drops the
        // file, and run() ends by itself.
        assert_eq!(running_placeholder(&p, "my-app"), None);
        dismiss(&p, "my-app");
        assert_eq!(runner.join().unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_are_escaped_in_the_page() {
        assert!(page("a<b", 1).contains("a&lt;b"));
    }
}
