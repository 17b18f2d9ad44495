//! The HTTP/1.1 responses ringpush writes: status lines, the framing of a complete
//! response, the JSON error body of PROTOCOL.md and the `503` of a full listener.
//!
//! One writer for the admin listener (`api`), the pages (`web`) and the upgrade's refusals
//! (`ws::handshake`), so every answer is framed the same way. Parsing requests stays with
//! each listener; this module imports nothing from the crate.

/// `Content-Type` of plain-text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// The header line of a response after which the connection is closed. Callers place it
/// among their headers, so each answer keeps the header order it has always had.
pub const CLOSE: &str = "Connection: close\r\n";

/// The reason phrase of every status ringpush answers with; empty for any other.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A complete response: status line, `Content-Type`, `Content-Length`, then `headers` in
/// order (each item zero or more whole `Name: value\r\n` lines, [`CLOSE`] among them when
/// the connection ends after it), the blank line and the body.
pub fn response(status: u16, content_type: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    for lines in headers {
        out.extend_from_slice(lines.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// `{"error":"<code>","message":"..."}`, the error shape of PROTOCOL.md's HTTP API
/// (`Content-Type: application/json`).
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "error": code, "message": message }).to_string()
}

/// A `503` that closes the connection and tells the client when to come back, for a
/// listener that has no place left.
pub fn busy(text: &str, retry_after_s: u32) -> Vec<u8> {
    let retry_after = format!("Retry-After: {retry_after_s}\r\n");
    response(503, TEXT, &[&retry_after, CLOSE], format!("{text}\r\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answers_carry_their_exact_length() {
        assert_eq!(
            String::from_utf8(busy("too many event streams", 10)).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 24\r\nRetry-After: 10\r\nConnection: close\r\n\r\ntoo many event streams\r\n"
        );
    }

    #[test]
    fn responses_carry_their_length_and_headers_in_order() {
        let text =
            String::from_utf8(response(200, "text/plain", &["A: 1\r\nB: 2\r\n", CLOSE], b"hi")).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
             A: 1\r\nB: 2\r\nConnection: close\r\n\r\nhi"
        );
        let kept = String::from_utf8(response(404, "application/json", &[], b"{}")).unwrap();
        assert_eq!(
            kept,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn error_bodies_are_protocol_json() {
        assert_eq!(
            error_body("not_found", "no \"such\" path"),
            r#"{"error":"not_found","message":"no \"such\" path"}"#
        );
    }
}
