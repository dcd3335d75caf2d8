//! What the proxy changes in a message on its way: the hop-by-hop
//! headers (those of one connection, not of the message) go, an upgrade's
//! `Connection` and `Upgrade` stay, the request target becomes origin-form
//! with the client's Host kept and `X-Forwarded-*` set; and the pages the
//! proxy answers itself become responses.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};

use super::pages::{self, Page};
use super::server::Body;

/// Headers that belong to one connection, not to the message.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes the hop-by-hop headers, those the Connection header names
/// included, and Upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Whether a request asks to switch protocols (`Connection: upgrade` and
/// an `Upgrade` header).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked && headers.contains_key(header::UPGRADE)
}

/// The request as the guest server gets it: origin-form target, HTTP/1.1,
/// hop-by-hop headers dropped (an upgrade's kept), the client's Host kept
/// (dev servers check it) and `X-Forwarded-*` set.
pub fn outgoing(req: Request<Incoming>, peer: SocketAddr, host: Option<&str>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let upgrade = wants_upgrade(&parts.headers)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(value) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    if let Some(host) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        parts.headers.insert(header::HOST, host.clone());
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Ok(ip) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-for"), ip);
    }
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    Request::from_parts(parts, body)
}

/// A page as a response.
pub fn page_response(page: Page) -> Response<Body> {
    let status = StatusCode::from_u16(page.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = Full::new(Bytes::from(page.html))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if page.reloads && status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(pages::RELOAD_SECONDS),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn connection_headers_go_and_message_headers_stay() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("upgrade", "websocket"),
            ("cookie", "a=b"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["cookie", "content-length"]);
    }

    #[test]
    fn an_upgrade_is_asked_with_both_headers() {
        assert!(wants_upgrade(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!wants_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn a_page_is_html_that_no_one_caches() {
        let r = page_response(pages::not_running("app"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(r.headers()["retry-after"], "5");
        let r = page_response(pages::busy("app"));
        assert!(r.headers().get("retry-after").is_none());
    }
}
