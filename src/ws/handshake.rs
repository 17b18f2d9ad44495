//! The HTTP/1.1 upgrade of RFC 6455, section 4.2: parse the client's request with
//! `httparse`, check it, and write either the `101` answer or a plain refusal.
//!
//! The request is parsed from bytes the caller accumulated; `parse` answers `Ok(None)`
//! while the head is incomplete, so the caller can keep reading (under its handshake
//! timeout) without this module owning a socket.

use std::net::IpAddr;

use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::config::Cidr;
use crate::http;

/// The GUID of RFC 6455, section 1.3, appended to the client's key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest request head accepted (request line + headers). Browsers send well under 2 KiB;
/// a longer head is refused with 400 before anything else is allocated for it.
pub const MAX_REQUEST_BYTES: usize = 8192;

/// Most headers accepted in one request; more is refused with 400.
pub const MAX_HEADERS: usize = 48;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455, section 4.2.2).
pub fn derive_accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Why an upgrade request is refused, before any WebSocket byte is exchanged.
/// Each maps to one HTTP status of PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request is not a well-formed WebSocket upgrade.
    BadRequest(&'static str),
    /// 401: missing, invalid or expired token.
    Unauthorized(&'static str),
    /// 403: `Origin` not in `allowed_origins`.
    Forbidden,
    /// 404: no such path on the client listener.
    NotFound,
    /// 426: `Sec-WebSocket-Version` is not 13.
    UpgradeRequired,
    /// 503 with `Retry-After`: the connection limit is reached, or the server is draining.
    Unavailable { why: &'static str, retry_after_s: u32 },
    /// 503 with `Retry-After`: too many new connections (node-wide or from the address).
    Throttled { why: &'static str, retry_after_s: u32 },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Unauthorized(_) => 401,
            Refusal::Forbidden => 403,
            Refusal::NotFound => 404,
            Refusal::UpgradeRequired => 426,
            Refusal::Unavailable { .. } | Refusal::Throttled { .. } => 503,
        }
    }

    /// The label used in metrics (`reason="..."`).
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::UpgradeRequired => "bad_version",
            Refusal::Unavailable { .. } => "unavailable",
            Refusal::Throttled { .. } => "throttled",
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Refusal::BadRequest(why) | Refusal::Unauthorized(why) => why,
            Refusal::Unavailable { why, .. } | Refusal::Throttled { why, .. } => why,
            Refusal::Forbidden => "origin not allowed",
            Refusal::NotFound => "not found",
            Refusal::UpgradeRequired => "unsupported Sec-WebSocket-Version; use 13",
        }
    }

    /// The whole HTTP response, ready to write; the connection is closed after it.
    pub fn response(&self) -> Vec<u8> {
        let extra = match self {
            Refusal::UpgradeRequired => "Sec-WebSocket-Version: 13\r\n".to_owned(),
            Refusal::Unavailable { retry_after_s, .. } | Refusal::Throttled { retry_after_s, .. } => {
                format!("Retry-After: {retry_after_s}\r\n")
            }
            _ => String::new(),
        };
        let body = format!("{}\n", self.body());
        http::response(self.status(), http::TEXT, &[http::CLOSE, &extra], body.as_bytes())
    }
}

/// The parts of an upgrade request the server acts on. Borrowed from the read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    /// The path without the query, e.g. `/ws`.
    pub path: &'a str,
    /// The raw query string after `?`, if any.
    pub query: Option<&'a str>,
    /// `Sec-WebSocket-Key`, checked to be 16 bytes of base64.
    pub key: &'a [u8],
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub forwarded_for: Option<&'a str>,
    pub real_ip: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The bearer token: `?token=` in the query (what browsers can send), else
    /// `Authorization: Bearer ...`.
    pub fn token(&self) -> Option<&'a str> {
        let from_query = self.query.and_then(|q| {
            q.split('&').find_map(|pair| pair.strip_prefix("token=")).filter(|t| !t.is_empty())
        });
        from_query.or_else(|| {
            self.authorization.and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
        })
    }

    /// The client address to record: the TCP peer, unless the peer is a trusted proxy;
    /// then the first untrusted address of `X-Forwarded-For` counting from the right (the
    /// one the nearest trusted proxy saw), or `X-Real-IP`. Walking from the right means a
    /// client cannot choose its address by sending a forged `X-Forwarded-For` itself.
    pub fn client_ip(&self, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
        let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
        if !is_trusted(peer) {
            return peer;
        }
        if let Some(xff) = self.forwarded_for {
            let mut last_trusted = None;
            for hop in xff.rsplit(',') {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) if is_trusted(ip) => last_trusted = Some(ip),
                    Ok(ip) => return ip,
                    Err(_) => break,
                }
            }
            if let Some(ip) = last_trusted {
                return ip;
            }
        }
        self.real_ip.and_then(|v| v.trim().parse::<IpAddr>().ok()).unwrap_or(peer)
    }
}

/// Parses and checks an upgrade request head.
///
/// `Ok(None)`: not complete yet, read more (the caller enforces `MAX_REQUEST_BYTES`).
/// `Ok(Some((request, head_len)))`: a valid upgrade; bytes after `head_len` belong to the
/// WebSocket stream. Path routing, origin, token and capacity are the caller's checks.
pub fn parse(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_REQUEST_BYTES {
                return Err(Refusal::BadRequest("request head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::BadRequest("too many headers")),
        Err(_) => return Err(Refusal::BadRequest("malformed HTTP request")),
    };
    if head_len > MAX_REQUEST_BYTES {
        return Err(Refusal::BadRequest("request head too large"));
    }
    if req.method != Some("GET") {
        return Err(Refusal::BadRequest("a WebSocket upgrade is a GET"));
    }
    if req.version != Some(1) {
        return Err(Refusal::BadRequest("a WebSocket upgrade needs HTTP/1.1"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };

    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version = None;
    let mut key = None;
    let mut origin = None;
    let mut authorization = None;
    let mut forwarded_for = None;
    let mut real_ip = None;
    let mut host = false;
    for h in req.headers.iter() {
        let value =
            std::str::from_utf8(h.value).map_err(|_| Refusal::BadRequest("header value is not UTF-8"));
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value?, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(value?, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(value?.trim());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value.trim_ascii());
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value?.trim());
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value?);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(value?);
        } else if name.eq_ignore_ascii_case("x-real-ip") {
            real_ip = Some(value?);
        } else if name.eq_ignore_ascii_case("host") {
            host = true;
        }
    }
    if !upgrade || !connection_upgrade {
        return Err(Refusal::BadRequest("expected Upgrade: websocket and Connection: Upgrade"));
    }
    if version != Some("13") {
        return Err(Refusal::UpgradeRequired);
    }
    if !host {
        return Err(Refusal::BadRequest("missing Host header"));
    }
    let key = key.ok_or(Refusal::BadRequest("missing Sec-WebSocket-Key"))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !matches!(decoded, Ok(ref k) if k.len() == 16) {
        return Err(Refusal::BadRequest("Sec-WebSocket-Key is not 16 bytes of base64"));
    }
    let request = Request { path, query, key, origin, authorization, forwarded_for, real_ip };
    Ok(Some((request, head_len)))
}

/// The `101 Switching Protocols` answer for an accepted request.
pub fn accept_response(key: &[u8]) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key)
    )
    .into_bytes()
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?token=abc&x=1 HTTP/1.1\r\nHost: example.com\r\n\
        Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn accept_key_matches_rfc6455_example() {
        // RFC 6455, section 1.3.
        assert_eq!(derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_a_good_request() {
        let (req, len) = parse(GOOD.as_bytes()).unwrap().unwrap();
        assert_eq!(len, GOOD.len());
        assert_eq!(req.path, "/ws");
        assert_eq!(req.token(), Some("abc"));
        assert_eq!(req.key, b"dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn partial_then_complete() {
        assert!(parse(&GOOD.as_bytes()[..40]).unwrap().is_none());
    }

    #[test]
    fn refusals() {
        let v12 = GOOD.replace("Version: 13", "Version: 12");
        assert_eq!(parse(v12.as_bytes()).unwrap_err(), Refusal::UpgradeRequired);
        let no_upgrade = GOOD.replace("Upgrade: websocket\r\n", "");
        assert_eq!(parse(no_upgrade.as_bytes()).unwrap_err().status(), 400);
        let bad_key = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=");
        assert_eq!(parse(bad_key.as_bytes()).unwrap_err().status(), 400);
        let post = GOOD.replace("GET", "POST");
        assert_eq!(parse(post.as_bytes()).unwrap_err().status(), 400);
        let huge = vec![b'a'; MAX_REQUEST_BYTES + 1];
        assert_eq!(parse(&huge).unwrap_err().status(), 400);
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n").unwrap_err().status(), 400);
    }

    #[test]
    fn bearer_header_token() {
        let req = GOOD
            .replace("/ws?token=abc&x=1", "/ws")
            .replace("Host: example.com\r\n", "Host: example.com\r\nAuthorization: Bearer xyz\r\n");
        let (req, _) = parse(req.as_bytes()).unwrap().unwrap();
        assert_eq!(req.token(), Some("xyz"));
    }

    #[test]
    fn client_ip_trusts_only_trusted_peers() {
        let text = GOOD.replace(
            "Host: example.com\r\n",
            "Host: h\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.0.0.2\r\n",
        );
        let (req, _) = parse(text.as_bytes()).unwrap().unwrap();
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(req.client_ip(proxy, &trusted), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(req.client_ip(stranger, &trusted), stranger);
    }

    #[test]
    fn refusal_responses_are_http() {
        let r = Refusal::UpgradeRequired.response();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 "));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
    }
}
