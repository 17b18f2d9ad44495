//! `/demo` on the client listener: a try-it page for the protocol, the JS client it
//! imports, and the two dev-only calls the page needs (a token, joining a conversation).
//!
//! Served only with `diagnostics.demo = true`; otherwise every `/demo` path answers 404, as
//! any unknown path does. The token endpoint hands a token for any user to anyone who
//! asks, which is why the flag is off by default and must stay off in production.
//!
//! The client listener hands a request here when it is a complete plain HTTP request (no
//! WebSocket upgrade) for a `/demo` path ([`is_demo_request`]); the answer is always
//! `Connection: close`, and the whole exchange stays under the listener's
//! `handshake_timeout_ms`, like any upgrade.

use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use serde::Deserialize;

use super::{error, query_param, response};
use crate::auth::{self, MAX_USER_LEN};
use crate::clock::unix_ms;
use crate::ctx::Ctx;
use crate::ids::Key;
use crate::mesh::{ConvMsg, Reply, ShardMsg};
use crate::protocol::MAX_CONV_CHARS;
use crate::store::MemberOp;
use crate::ws::handshake::{self, Refusal};

/// The page. It loads only [`CLIENT_JS`], from `/demo/ringpush.js`.
pub const DEMO_HTML: &str = include_str!("demo.html");

/// The reference JS client (`clients/js/ringpush.js`), as the page imports it.
pub const CLIENT_JS: &str = include_str!("../../clients/js/ringpush.js");

/// What the page may load and connect to: itself and its own origin's WebSocket.
const PAGE_CSP: &str = "Content-Security-Policy: default-src 'none'; script-src 'self' 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'\r\n";

/// Largest body of `POST /demo/join`.
const MAX_BODY: usize = 4096;

/// Lifetime of a demo token unless `ttl` says otherwise, and the longest `ttl` allowed.
const DEFAULT_TTL_SECS: u64 = 3600;
const MAX_TTL_SECS: u64 = 86_400;

/// How long joining a conversation waits for its owner ctx.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `head` holds a complete HTTP request for `/demo` or a path under it. The client
/// listener asks only about requests that are not valid upgrades.
pub fn is_demo_request(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; handshake::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => req.path.is_some_and(|p| {
            let path = p.split('?').next().unwrap_or("");
            path == "/demo" || path.starts_with("/demo/")
        }),
        _ => false,
    }
}

/// One parsed demo request.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    authorization: Option<&'a str>,
    content_length: usize,
    head_len: usize,
}

fn parse(head: &[u8]) -> Option<Request<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; handshake::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut authorization = None;
    let mut content_length = 0;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).ok()?.trim();
        if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok()?;
        }
    }
    Some(Request { method: req.method?, path, query, authorization, content_length, head_len })
}

/// Answers one `/demo` request on the client listener and closes the connection.
pub async fn serve(ctx: &Ctx, stream: &mut TcpStream, head: &[u8]) {
    let answer = if ctx.config.diagnostics.demo {
        answer(ctx, stream, head).await
    } else {
        ctx.metrics.refused(Refusal::NotFound.into());
        Refusal::NotFound.response()
    };
    let _ = stream.write_all(&answer).await;
    let _ = stream.close().await;
}

async fn answer(ctx: &Ctx, stream: &mut TcpStream, head: &[u8]) -> Vec<u8> {
    let Some(req) = parse(head) else {
        return error(400, "bad_request", "malformed HTTP request");
    };
    match (req.method, req.path) {
        ("GET", "/demo" | "/demo/") => {
            response(200, "text/html; charset=utf-8", PAGE_CSP, DEMO_HTML.as_bytes())
        }
        ("GET", "/demo/ringpush.js") => {
            response(200, "text/javascript; charset=utf-8", "", CLIENT_JS.as_bytes())
        }
        ("GET", "/demo/token") => token(ctx, req.query),
        ("POST", "/demo/join") => {
            if req.content_length > MAX_BODY {
                return error(413, "too_large", "request body too large");
            }
            let Some(body) = read_body(stream, head, req.head_len, req.content_length).await else {
                return error(400, "bad_request", "incomplete body");
            };
            join(ctx, req.authorization, &body).await
        }
        (_, "/demo" | "/demo/" | "/demo/ringpush.js" | "/demo/token" | "/demo/join") => {
            error(405, "method_not_allowed", "wrong method for this path")
        }
        _ => error(404, "not_found", "no such path"),
    }
}

/// The body after the head: what came with it, then reads until `len` bytes.
async fn read_body(stream: &mut TcpStream, head: &[u8], head_len: usize, len: usize) -> Option<Vec<u8>> {
    let mut body = head[head_len..].to_vec();
    let mut chunk = [0u8; 1024];
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Some(body)
}

/// `GET /demo/token?user=U&device=D[&ttl=SECS]`: a client token signed with `auth.secret`.
fn token(ctx: &Ctx, query: &str) -> Vec<u8> {
    let user = query_param(query, "user").unwrap_or_default();
    let device = query_param(query, "device").unwrap_or_default();
    if !auth::valid_id(&user, MAX_USER_LEN) || !auth::valid_id(&device, auth::MAX_DEVICE_LEN) {
        let why = "user (1-128) and device (1-64) are characters of [A-Za-z0-9._:@-]";
        return error(400, "bad_request", why);
    }
    let ttl = match query_param(query, "ttl").map(|t| t.parse::<u64>()) {
        None => DEFAULT_TTL_SECS,
        Some(Ok(t)) if (1..=MAX_TTL_SECS).contains(&t) => t,
        Some(_) => return error(400, "bad_request", "ttl is 1-86400 seconds"),
    };
    match auth::mint(&ctx.config.auth.secret, &user, &device, ttl) {
        Ok(token) => {
            let exp = unix_ms() / 1000 + ttl;
            let body = serde_json::json!({
                "token": token, "user": user, "device": device, "exp": exp, "ws": "/ws",
            });
            response(200, "application/json", "", body.to_string().as_bytes())
        }
        Err(e) => error(400, "bad_request", &e.to_string()),
    }
}

#[derive(Deserialize)]
struct JoinBody {
    conv: String,
}

/// `POST /demo/join` with `Authorization: Bearer <token>` and `{"conv":"c1"}`: adds the
/// token's user to the conversation, the way `POST /api/v1/conversations/{conv}/members`
/// does (a membership change on the conversation's owner shard).
async fn join(ctx: &Ctx, authorization: Option<&str>, body: &[u8]) -> Vec<u8> {
    let token = authorization.and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let Some(claims) = token.and_then(|t| ctx.verifier.verify(t).ok()) else {
        return error(401, "unauthorized", "missing, invalid or expired token");
    };
    let conv = match serde_json::from_slice::<JoinBody>(body) {
        Ok(b) if auth::valid_id(&b.conv, MAX_CONV_CHARS) => Key::from(b.conv),
        _ => return error(400, "bad_request", "body must be {\"conv\":\"<1-128 of [A-Za-z0-9._:@-]>\"}"),
    };
    let owner = ctx.owner_of(&conv);
    let users = vec![Key::from(claims.sub)];
    let ask =
        |reply| ShardMsg::Conv(ConvMsg::Members { reply, conv: conv.clone(), op: MemberOp::Add, users });
    let asked = glommio::timer::timeout(JOIN_TIMEOUT, async {
        Ok(ctx.mesh.request_via(ask, |msg| ctx.route(owner, msg)).await)
    });
    match asked.await {
        Ok(Some(Reply::Members { count })) => {
            let body = serde_json::json!({ "conv": &*conv, "members": count });
            response(200, "application/json", "", body.to_string().as_bytes())
        }
        _ => error(503, "unavailable", "the conversation's shard or the store did not answer; retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_requests_are_complete_requests_under_demo() {
        assert!(is_demo_request(b"GET /demo HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_demo_request(b"GET /demo/token?user=a HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_demo_request(b"POST /demo/join HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(!is_demo_request(b"GET /demo HTTP/1.1\r\nHost: x\r\n"), "incomplete head");
        assert!(!is_demo_request(b"GET /demonstration HTTP/1.1\r\n\r\n"));
        assert!(!is_demo_request(b"GET /ws HTTP/1.1\r\n\r\n"));
        assert!(!is_demo_request(b"\x00garbage\r\n\r\n"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for text in [DEMO_HTML, CLIENT_JS] {
            assert!(!text.contains("http://") && !text.contains("https://"), "an external URL");
        }
        assert!(DEMO_HTML.contains("/demo/ringpush.js"));
    }
}
