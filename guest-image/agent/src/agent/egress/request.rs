//! The egress proxy's view of a program's request: its head read and
//! parsed with `httparse` (the request line, the header names and values
//! checked as HTTP/1.x defines them), the target it names, and for a plain
//! HTTP request the head as it is passed on to the origin server.
//!
//! Only two forms are proxied: `CONNECT host:port` (a tunnel) and an
//! absolute `http://` target. Anything else is a 400 with the reason.

use std::io::Read;
use std::time::Duration;

/// The longest request head the proxy reads.
pub const MAX_HEAD: usize = 16 << 10;
/// The most header lines a head may carry.
const MAX_HEADERS: usize = 64;

/// Where a proxy request goes, and what to send there.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    pub host: String,
    pub port: u16,
    /// `CONNECT`: a tunnel, nothing of the head is passed on. Otherwise the
    /// head the origin server gets (see [`ProxyRequest::parse`]).
    pub forward: Option<Vec<u8>>,
}

/// Reads up to the end of the request head, within `timeout` per read;
/// returns the parsed request and the bytes that came after the head.
pub fn read_request(
    client: &mut (impl Read + ?Sized),
    set_timeout: impl Fn(Option<Duration>),
    timeout: Duration,
) -> Result<(ProxyRequest, Vec<u8>), String> {
    set_timeout(Some(timeout));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let result = loop {
        match ProxyRequest::parse(&buf) {
            Ok(Some((request, len))) => break Ok((request, buf.split_off(len))),
            Ok(None) if buf.len() > MAX_HEAD => {
                break Err(format!("request head longer than {MAX_HEAD} bytes"))
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        match client.read(&mut chunk) {
            Ok(0) => break Err("the request ended before its head did".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(format!("reading the request: {e}")),
        }
    };
    set_timeout(None);
    result
}

impl ProxyRequest {
    /// Parses a request head at the start of `buf`: `None` while it is
    /// incomplete, else the request and the head's length.
    ///
    /// A plain request is passed on in origin form (`/path?query`), with
    /// `Host` added when the program sent none, the hop-by-hop proxy
    /// headers left out and `Connection: close` in: one request per
    /// tunnel, so a kept-alive proxy connection cannot carry a request for
    /// another host to this one.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!("more than {MAX_HEADERS} header lines"))
            }
            Err(e) => return Err(format!("not an HTTP/1.x request head: {e}")),
        };
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Ok(None);
        };
        if method == "CONNECT" {
            let (host, port) = split_authority(target, None)?;
            return Ok(Some((
                Self {
                    host,
                    port,
                    forward: None,
                },
                len,
            )));
        }
        let Some(rest) = target.strip_prefix("http://") else {
            return Err(format!(
                "this is a proxy: ask for an absolute http:// URL or CONNECT host:port (got {target:?})"
            ));
        };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let (host, port) = split_authority(authority, Some(80))?;
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        let mut out = format!("{method} {path} HTTP/1.{minor}\r\n").into_bytes();
        let mut has_host = false;
        for h in req.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive"
            ) {
                continue;
            }
            has_host |= name == "host";
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        if !has_host {
            let authority = authority.rsplit('@').next().unwrap_or(authority);
            out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        Ok(Some((
            Self {
                host,
                port,
                forward: Some(out),
            },
            len,
        )))
    }
}

/// `host:port`, `[v6]:port` or (with a default port) a bare host.
fn split_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("bad host and port {authority:?}");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().map_err(|_| bad())?,
        (None, Some(d)) => d,
        (None, None) => return Err(bad()),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if !valid || port == 0 {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &[u8]) -> Result<ProxyRequest, String> {
        ProxyRequest::parse(head).map(|r| r.expect("a complete head").0)
    }

    fn forwarded(head: &[u8]) -> String {
        String::from_utf8(parse(head).unwrap().forward.unwrap()).unwrap()
    }

    #[test]
    fn proxy_requests_name_their_target() {
        let connect = parse(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            connect,
            Ok(ProxyRequest {
                host: "api.example.com".into(),
                port: 443,
                forward: None
            })
        );
        let get = parse(b"GET http://Example.com/a?b HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((get.host.as_str(), get.port), ("example.com", 80));
        assert!(get.forward.is_some());
        let v6 = parse(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 8443));
        let port = parse(b"GET http://h:8080 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(port.port, 8080);
        for bad in [
            &b"GET /local HTTP/1.1\r\n\r\n"[..],
            b"CONNECT host HTTP/1.1\r\n\r\n",
            b"CONNECT host:0 HTTP/1.1\r\n\r\n",
            b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT bad/host:1 HTTP/1.1\r\n\r\n",
            b"GET https://h/ HTTP/1.1\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
            // A header name with a space, and a bare LF inside a value:
            // the smuggling shapes a hand parser lets through.
            b"GET http://h/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET http://h/ HTTP/2.0\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert_eq!(
            ProxyRequest::parse(b"GET http://h/ HTTP/1.1\r\nHo"),
            Ok(None)
        );
        let (_, len) = ProxyRequest::parse(b"CONNECT h:1 HTTP/1.1\r\n\r\nbody")
            .unwrap()
            .unwrap();
        assert_eq!(len, b"CONNECT h:1 HTTP/1.1\r\n\r\n".len());
    }

    #[test]
    fn plain_requests_lose_proxy_headers_and_keep_alive() {
        let out = forwarded(
            b"GET http://h/ HTTP/1.1\r\nHost: h\r\nProxy-Connection: keep-alive\r\n\
              Connection: keep-alive\r\nProxy-Authorization: x\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let out = forwarded(b"POST http://u@h:81/a/b?c=d HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            out,
            "POST /a/b?c=d HTTP/1.0\r\nContent-Length: 0\r\nHost: h:81\r\nConnection: close\r\n\r\n"
        );
        let out = forwarded(b"GET http://h?x HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("GET /?x HTTP/1.1\r\nHost: h\r\n"), "{out}");
    }

    #[test]
    fn a_head_without_an_end_stops_at_the_cap() {
        let mut endless = std::io::repeat(b'a');
        let head = b"GET http://h/ HTTP/1.1\r\nX: ".to_vec();
        let mut input = std::io::Read::chain(&head[..], &mut endless);
        let err = read_request(&mut input, |_| {}, Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
    }
}
