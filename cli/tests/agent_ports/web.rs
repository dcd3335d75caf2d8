//! What the port tests speak: the guest's server (a Perl script: HTTP/1.1
//! with keep-alive, and WebSocket echo on an Upgrade request), and the
//! host side's HTTP and WebSocket over raw TCP, with the Host header set
//! by hand as a browser sets it for `*.localhost`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The guest's server: `perl -e SERVER ADDRESS PORT`. `GET /64` answers
/// 64 bytes, any other path `port <PORT> path <PATH>\n`; a request with
/// `Sec-WebSocket-Key` is upgraded and its frames echoed.
pub const SERVER: &str = r#"
use IO::Socket::INET; use Digest::SHA qw(sha1_base64);
$SIG{CHLD} = 'IGNORE';
my ($addr, $port) = @ARGV;
my $l = IO::Socket::INET->new(LocalAddr => $addr, LocalPort => $port, Listen => 128, ReuseAddr => 1)
    or die "listen $addr:$port: $!";
sub readn { my ($c, $n) = @_; my $buf = '';
    while (length $buf < $n) { my $r = sysread($c, my $b, $n - length $buf); return undef unless $r; $buf .= $b }
    $buf }
sub head { my ($c) = @_; my $h = '';
    while ($h !~ /\r\n\r\n\z/) { sysread($c, my $b, 1) or return undef; $h .= $b; return undef if length $h > 65536 }
    $h }
while (my $c = $l->accept) {
    if (fork() == 0) {
        $c->setsockopt(6, 1, 1);
        while (defined(my $h = head($c))) {
            my ($path) = $h =~ /^\S+ (\S+)/;
            my ($len) = $h =~ /^Content-Length:\s*(\d+)/mi;
            readn($c, $len) if $len;
            if (my ($key) = $h =~ /^Sec-WebSocket-Key:\s*(\S+)/mi) {
                my $accept = sha1_base64($key . "258EAFA5-E914-47DA-95CA-C5AB0DC85B11") . "=";
                syswrite($c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    . "Connection: Upgrade\r\nSec-WebSocket-Accept: $accept\r\n\r\n");
                while (defined(my $fh = readn($c, 2))) {
                    my ($b0, $b1) = unpack("CC", $fh);
                    my ($op, $n) = ($b0 & 15, $b1 & 127);
                    $n = unpack("n", readn($c, 2)) if $n == 126;
                    $n = unpack("Q>", readn($c, 8)) if $n == 127;
                    my $mask = ($b1 & 128) ? readn($c, 4) : "\0\0\0\0";
                    my $data = $n ? readn($c, $n) : "";
                    $data ^= substr($mask x (int($n / 4) + 1), 0, $n);
                    if ($op == 8) { syswrite($c, pack("CC", 0x88, 0)); exit 0 }
                    my $fr = $n < 126 ? pack("CC", 128 | $op, $n)
                        : $n < 65536 ? pack("CCn", 128 | $op, 126, $n) : pack("CCQ>", 128 | $op, 127, $n);
                    syswrite($c, $fr . $data);
                }
                exit 0;
            }
            my $body = $path eq '/64' ? ("x" x 64) : "port $port path $path\n";
            syswrite($c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                . length($body) . "\r\n\r\n" . $body);
        }
        exit 0;
    }
    close $c;
}
"#;

/// Reads a response head (to the blank line) from `s`.
fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
        assert!(head.len() < 65536, "a response head over 64 KiB");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code on a response head's first line.
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `Content-Length` of a response head.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// One request (`Connection: close`) to 127.0.0.1:`port` with `host` as
/// its Host header (none when `None`): (status, head, body).
pub fn http_get(port: u16, host: Option<&str>, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let host_line = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    (
        status_of(&head),
        head,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A kept-alive HTTP connection.
pub struct KeepAlive<S: Read + Write> {
    pub stream: S,
    host: String,
}

impl<S: Read + Write> KeepAlive<S> {
    pub fn new(stream: S, host: &str) -> Self {
        Self {
            stream,
            host: host.to_string(),
        }
    }

    /// `GET path`; the status and body.
    pub fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut self.stream);
        let mut body = vec![0u8; content_length(&head)];
        self.stream.read_exact(&mut body).unwrap();
        (status_of(&head), body)
    }
}

/// Opens a WebSocket on 127.0.0.1:`port` for `host` and `path`; the
/// stream after the server's 101.
pub fn ws_connect(port: u16, host: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert_eq!(status_of(&head), 101, "{head}");
    // The key above is RFC 6455's example: its accept value is known.
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the guest's handshake came through unchanged: {head}"
    );
    s
}

/// Sends one masked text frame.
pub fn ws_send(s: &mut TcpStream, payload: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81u8];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
}

/// Reads one unmasked frame: (opcode, payload).
pub fn ws_recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        len = u64::from_be_bytes(b);
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}
