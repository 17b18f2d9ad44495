//! What ringpush shows a browser: the `/demo` try-it page on the client listener (only with
//! `diagnostics.demo = true`) and the live dashboard on the admin listener (`GET /`, fed by
//! the server-sent events of `GET /events`).
//!
//! Pages, styles and scripts are embedded in the binary (`include_str!`) and load nothing
//! from anywhere else; their `Content-Security-Policy` holds them to that. Both listeners
//! keep their own HTTP handling; this module only answers the requests they hand it.

pub mod dashboard;
pub mod demo;

use crate::http;

/// Headers every page and script of this module is sent with: never cached (the binary
/// is the only source), never sniffed as another type.
const COMMON_HEADERS: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n";

/// A complete `Connection: close` response.
fn response(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    http::response(status, content_type, &[COMMON_HEADERS, extra_headers, http::CLOSE], body)
}

/// `{"error":"<code>","message":"..."}`, the error shape of PROTOCOL.md's HTTP API.
fn error(status: u16, code: &str, message: &str) -> Vec<u8> {
    response(status, "application/json", "", http::error_body(code, message).as_bytes())
}

/// The value of `name` in a query string (`a=1&b=2`), percent-decoded; `None` when absent
/// or not valid UTF-8 once decoded. Pure (the `dashboard_query` fuzz target runs it).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })?;
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                // Two hex digits exactly (`from_str_radix` alone would take a sign: `%+1`).
                let hex = &bytes[i + 1..i + 3];
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percent_escape_is_two_hex_digits() {
        assert_eq!(query_param("a=%41%7a", "a").as_deref(), Some("Az"));
        assert_eq!(query_param("a=%+1", "a"), None);
        assert_eq!(query_param("a=%-1", "a"), None);
        assert_eq!(query_param("a=%g1", "a"), None);
    }

    #[test]
    fn query_params_are_found_and_decoded() {
        assert_eq!(query_param("user=alice&device=lap%20top", "device").as_deref(), Some("lap top"));
        assert_eq!(query_param("user=alice&device=x", "user").as_deref(), Some("alice"));
        assert_eq!(query_param("user=alice", "device"), None);
        assert_eq!(query_param("user", "user").as_deref(), Some(""));
        assert_eq!(query_param("user=%zz", "user"), None);
        assert_eq!(query_param("user=%4", "user").as_deref(), Some("%4"));
    }

    #[test]
    fn pages_are_never_cached_and_close() {
        let text = String::from_utf8(response(200, "text/plain", "X: 1\r\n", b"hi")).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX: 1\r\nConnection: close\r\n\r\nhi"
        );
    }
}
