//! Wire tests of the input limits (README "Limits"): each is hit just under (accepted)
//! and just over (refused with the status or close code of PROTOCOL.md), and after each
//! abuse a well-behaved client of the same server is still served. Limits already pinned
//! elsewhere are not repeated here: a 1 TiB frame header and a head that never ends
//! (`core.rs`), over-long `cid` / `conv` and the 1 MiB API body (`im.rs`).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

/// The upgrade head limit of `ws::handshake` (`MAX_REQUEST_BYTES`, `MAX_HEADERS`).
const MAX_REQUEST_BYTES: usize = 8192;
const MAX_HEADERS: usize = 48;
/// `session::MAX_SYNCS_IN_FLIGHT`.
const MAX_SYNCS_IN_FLIGHT: usize = 16;
/// The admin listener's head limit (`api::MAX_HEAD`).
const MAX_API_HEAD: usize = 16 * 1024;
/// Admin connections served at once (`api::MAX_CONNECTIONS`).
const MAX_ADMIN_CONNECTIONS: usize = 1024;

/// Sends are not rate limited here, and a client busy in a test is not dropped as idle.
const LIMITS: &str = "[heartbeat]\nidle_timeout_ms = 10000\n[limits]\nsend_rate_per_sec = 10000\n";

/// An `/echo` client and a `/ws` client of `server` still get answers.
fn assert_still_serves(server: &Server, after: &str) {
    let mut echo = connect(&server.ws_url("/echo"));
    echo.send(Message::text(after)).unwrap();
    assert_eq!(read_message(&mut echo), Message::text(after), "echo after {after}");
    let (mut ws, _) = connect_client(server, "witness", "phone");
    send_text(&mut ws, r#"{"op":"nope","cid":"alive"}"#);
    assert_eq!(read_json(&mut ws)["cid"], "alive", "/ws after {after}");
    assert!(!server.log_contains("panicked"), "a thread panicked after {after}:\n{}", server.log());
}

/// A `/echo` upgrade request padded with an `X-Pad` header to exactly `len` bytes.
fn head_of(len: usize) -> String {
    let base = upgrade_request("/echo", &["X-Pad: "]);
    let pad = len.checked_sub(base.len()).expect("head too short to pad");
    upgrade_request("/echo", &[&format!("X-Pad: {}", "p".repeat(pad))])
}

/// The status line of the answer to `request` (a 101 is read without touching the frames).
fn status_of(server: &Server, request: &[u8]) -> u16 {
    let mut stream = raw_connect(server.client_addr());
    stream.write_all(request).unwrap();
    read_response_head(&mut stream).0
}

/// A client token with these claims, signed with the test secret.
fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign token")
}

fn in_an_hour() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600
}

/// How long the server takes to close `stream` with a close frame; asserts its code.
fn closes_with(stream: &mut std::net::TcpStream, code: u16, what: &str) -> Duration {
    let start = Instant::now();
    assert_eq!(read_until_close(stream).close_code(), code, "{what}");
    start.elapsed()
}

#[test]
fn upgrade_head_size_and_header_count() {
    let server = Server::start("");
    // A complete head of exactly 8 KiB is served; one byte more is 400.
    assert_eq!(status_of(&server, head_of(MAX_REQUEST_BYTES).as_bytes()), 101, "8192-byte head");
    assert_eq!(status_of(&server, head_of(MAX_REQUEST_BYTES + 1).as_bytes()), 400, "8193-byte head");
    assert_still_serves(&server, "a long head");
    // 48 headers are served; 49 are 400. The base request has 5.
    let headers = |n: usize| -> String {
        let extra: Vec<String> = (0..n - 5).map(|i| format!("X-H{i}: v")).collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        upgrade_request("/echo", &extra)
    };
    assert_eq!(status_of(&server, headers(MAX_HEADERS).as_bytes()), 101, "48 headers");
    let resp = raw_http(server.client_addr(), headers(MAX_HEADERS + 1).as_bytes());
    assert_eq!(resp.status, 400, "49 headers: {resp:?}");
    assert!(resp.body.contains("too many headers"), "{resp:?}");
    assert_still_serves(&server, "many headers");
}

#[test]
fn urls_and_tokens_are_bounded_by_the_head() {
    let server = Server::start("");
    let token = server.token("alice", "phone", 3600);
    // A long URL (the token plus padding) within the head limit: served.
    let base = upgrade_request(&format!("/ws?token={token}&pad="), &[]);
    let pad = "q".repeat(MAX_REQUEST_BYTES - base.len());
    let fits = upgrade_request(&format!("/ws?token={token}&pad={pad}"), &[]);
    assert_eq!(fits.len(), MAX_REQUEST_BYTES);
    assert_eq!(status_of(&server, fits.as_bytes()), 101, "an 8 KiB head with a long URL");
    // One more byte of URL: 400, before the token is looked at.
    let over = upgrade_request(&format!("/ws?token={token}&pad={pad}q"), &[]);
    assert_eq!(status_of(&server, over.as_bytes()), 400, "URL past the head limit");
    // A token of ~8 KiB is read and refused as invalid (401), in the query and as a bearer.
    let junk = "e".repeat(MAX_REQUEST_BYTES - 400);
    let resp = raw_http(server.client_addr(), upgrade_request(&format!("/ws?token={junk}"), &[]).as_bytes());
    assert_eq!(resp.status, 401, "long junk token: {resp:?}");
    let bearer = format!("Authorization: Bearer {junk}");
    let resp = raw_http(server.client_addr(), upgrade_request("/ws", &[&bearer]).as_bytes());
    assert_eq!(resp.status, 401, "long junk bearer: {resp:?}");
    assert_still_serves(&server, "long URLs and tokens");
}

#[test]
fn user_and_device_ids_past_their_length_are_401() {
    let server = Server::start("");
    let exp = in_an_hour();
    for (sub, dev, status) in [
        ("u".repeat(128), "d".repeat(64), 101),
        ("u".repeat(129), "d".to_owned(), 401),
        ("u".to_owned(), "d".repeat(65), 401),
    ] {
        let token = sign(json!({"sub": sub, "dev": dev, "exp": exp}));
        let request = upgrade_request(&format!("/ws?token={token}"), &[]);
        assert_eq!(status_of(&server, request.as_bytes()), status, "sub {} dev {}", sub.len(), dev.len());
    }
    assert_still_serves(&server, "long ids");
}

#[test]
fn a_frame_header_over_the_message_limit_is_1009_without_its_payload() {
    let server = Server::start("[limits]\nmax_message_bytes = 1024");
    // A text frame announcing 1025 bytes, none of them sent: closed right away.
    for path in ["/echo", &format!("/ws?token={}", server.token("alice", "phone", 3600))] {
        let mut stream = raw_upgrade(server.client_addr(), path);
        let mut header = vec![0x81, 0x80 | 126];
        header.extend_from_slice(&1025u16.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        stream.write_all(&header).unwrap();
        let took = closes_with(&mut stream, 1009, path);
        assert!(took < Duration::from_secs(1), "{path}: closed after {took:?}");
    }
    // Fragments adding up to exactly 1024 bytes pass; to 1025, 1009.
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    let mut bytes = client_frame(false, OP_TEXT, &[b'a'; 512]);
    bytes.extend(client_frame(true, OP_CONT, &[b'a'; 512]));
    stream.write_all(&bytes).unwrap();
    let frame = read_frame_skip_pings(&mut stream);
    assert_eq!((frame.opcode, frame.payload.len()), (OP_TEXT, 1024));
    let mut bytes = client_frame(false, OP_TEXT, &[b'a'; 512]);
    bytes.extend(client_frame(false, OP_CONT, &[]));
    bytes.extend(client_frame(true, OP_CONT, &[b'a'; 513]));
    stream.write_all(&bytes).unwrap();
    closes_with(&mut stream, 1009, "fragments totalling 1025 bytes");
    assert_still_serves(&server, "oversized frames");
}

#[test]
fn a_control_frame_over_125_bytes_is_1002_from_its_header() {
    let server = Server::start("");
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    // A ping of 125 bytes is answered.
    stream.write_all(&client_frame(true, OP_PING, &[b'p'; 125])).unwrap();
    let pong = read_frame_skip_pings(&mut stream);
    assert_eq!((pong.opcode, pong.payload.len()), (OP_PONG, 125));
    // A ping announcing 126 bytes, none sent (within the message limit): 1002 right away.
    stream.write_all(&[0x89, 0x80 | 126, 0, 126, 1, 2, 3, 4]).unwrap();
    let took = closes_with(&mut stream, 1002, "126-byte ping header");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    assert_still_serves(&server, "an oversized ping");
}

#[test]
fn bodies_nested_past_64_levels_or_with_infinite_numbers_are_bad_requests() {
    let server = Server::start(LIMITS);
    server.set_members("deep", &["alice", "bob"]);
    let (mut alice, _) = connect_client(&server, "alice", "phone");
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    send_text(&mut bob, r#"{"op":"sync","conv":"deep","cid":"s"}"#);
    assert_eq!(read_json(&mut bob)["op"], "synced");
    // Bodies are forwarded byte for byte, so every receiving client parses them: 64
    // levels pass (under the ~128 of common parsers), 65 do not.
    let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
    let body = nest(64);
    send_text(&mut alice, &format!(r#"{{"op":"send","conv":"deep","cid":"d1","body":{body}}}"#));
    let ack = read_json(&mut alice);
    assert_eq!((ack["op"].as_str(), ack["cid"].as_str()), (Some("ack"), Some("d1")), "{ack}");
    match read_message(&mut bob) {
        Message::Text(text) => assert!(text.as_str().contains(&body), "bob got another body"),
        other => panic!("bob got {other:?}"),
    }
    for (cid, body) in [("d2", nest(65)), ("d3", nest(30_000)), ("d4", "[1,-3e4449]".to_string())] {
        send_text(&mut alice, &format!(r#"{{"op":"send","conv":"deep","cid":"{cid}","body":{body}}}"#));
        let error = read_json(&mut alice);
        assert_eq!(
            (error["code"].as_str(), error["cid"].as_str()),
            (Some("bad_request"), Some(cid)),
            "{error}"
        );
    }
    // 30 000 levels (60 KB, under the 64 KiB message limit) in an unknown field are
    // skipped without recursion; unbalanced nesting is a bad_request.
    let junk = format!(r#"{{"op":"nope","cid":"j","x":{}}}"#, nest(30_000));
    send_text(&mut alice, &junk);
    assert_eq!(read_json(&mut alice)["code"], "unknown_op");
    let unbalanced = format!(r#"{{"op":"send","conv":"deep","cid":"u","body":{}}}"#, "[".repeat(30_000));
    send_text(&mut alice, &unbalanced);
    assert_eq!(read_json(&mut alice)["code"], "bad_request");
    // The API's bodies get the same check.
    let posted = format!(r#"{{"from":"sys","body":{}}}"#, nest(65));
    let answer = server.api_expect("POST", "/api/v1/conversations/deep/messages", Some(&posted), 400);
    assert_eq!(answer["error"], "bad_request", "{answer}");
    assert_still_serves(&server, "deep JSON");
}

#[test]
fn syncs_past_the_in_flight_bound_get_rate_limited_and_live_traffic_resumes() {
    let server = Server::start(LIMITS);
    server.set_members("c1", &["alice"]);
    let mut stream =
        raw_upgrade(server.client_addr(), &format!("/ws?token={}", server.token("alice", "phone", 3600)));
    // 1200 syncs in one write (about 50 KB): the session reads them all before any is
    // answered.
    let n = 1200;
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.extend(client_frame(
            true,
            OP_TEXT,
            format!(r#"{{"op":"sync","conv":"c1","cid":"s{i}"}}"#).as_bytes(),
        ));
    }
    stream.write_all(&bytes).unwrap();
    let (mut synced, mut limited) = (0, 0);
    while synced + limited < n {
        let frame = read_frame_skip_pings(&mut stream);
        let v: Value = serde_json::from_slice(&frame.payload).unwrap();
        match v["op"].as_str() {
            Some("hello") => {}
            Some("synced") => synced += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(v["cid"].as_str().is_some_and(|c| c.starts_with('s')), "{v}");
                limited += 1;
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    assert!(synced >= MAX_SYNCS_IN_FLIGHT, "{synced} synced, {limited} refused");
    assert!(limited > 0 && limited <= n - MAX_SYNCS_IN_FLIGHT, "{synced} synced, {limited} refused");
    // Every sync was answered: live messages of c1 flow again, once each.
    let seq = server.post_message("c1", "system", &json!("live"));
    let frame = read_frame_skip_pings(&mut stream);
    let v: Value = serde_json::from_slice(&frame.payload).unwrap();
    assert_eq!((v["op"].as_str(), v["seq"].as_u64()), (Some("msg"), Some(seq)), "{v}");
    assert_still_serves(&server, "a sync storm");
}

#[test]
fn api_head_over_16_kib_is_400_and_the_listener_keeps_serving() {
    let server = Server::start("");
    let request = |pad: usize| {
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n", "p".repeat(pad))
    };
    let fixed = request(0).len();
    // Just under the limit: served.
    let resp = raw_http(server.admin_addr(), request(MAX_API_HEAD - 1 - fixed).as_bytes());
    assert_eq!(resp.status, 200, "{resp:?}");
    // A head that is not complete at 16 KiB: 400 without waiting for the rest (exactly
    // 16 KiB is sent, so the server closes with nothing unread and no reset).
    let mut stream = raw_connect(server.admin_addr());
    stream.write_all(&request(MAX_API_HEAD).as_bytes()[..MAX_API_HEAD]).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // A body announced over 1 MiB is refused on a kept-alive connection too, before any
    // of it is sent; the request before it was served.
    let mut stream = raw_connect(server.admin_addr());
    let two = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /api/v1/broadcast HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n",
        (1 << 20) + 1
    );
    stream.write_all(two.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 ") && answer.contains("HTTP/1.1 413 "), "{answer}");
    assert_eq!(server.api("GET", "/api/v1/conversations/c1", None).status, 200);
}

#[test]
fn admin_connections_past_1024_get_503_and_a_freed_place_is_served_again() {
    let server = Server::start("");
    let admin = server.admin_addr();
    let keep_alive = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held: Vec<std::net::TcpStream> = (0..MAX_ADMIN_CONNECTIONS).map(|_| raw_connect(admin)).collect();
    // The listener accepts in order: by the time it takes the next one, all of these hold
    // their places. It refuses at once, before any request.
    let mut refused = raw_connect(admin);
    let mut answer = String::new();
    refused.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 ") && answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
    // The connections it holds are served as usual.
    let stream = held.last_mut().unwrap();
    stream.write_all(keep_alive).unwrap();
    let (status, _) = read_response_head(stream);
    assert_eq!(status, 200);
    // A place given back is taken by the next connection.
    drop(held.swap_remove(0));
    let status_now = || {
        let mut stream = raw_connect(admin);
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).split_whitespace().nth(1).map(str::to_owned)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_now().as_deref() != Some("200") {
        assert!(Instant::now() < deadline, "a closed admin connection's place was never given back");
    }
    drop(held);
    assert_eq!(server.api("GET", "/api/v1/conversations/c1", None).status, 200);
}

#[test]
fn an_api_call_without_the_key_is_401_before_its_body_is_read() {
    let server = Server::start("");
    // A body of 1 MiB announced and never sent: without the key the answer comes from the
    // head alone (a server reading the body first would wait for it until KEEP_ALIVE).
    let mut stream = raw_connect(server.admin_addr());
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let head = format!("POST /api/v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    // A wrong key too; the right one is served.
    let wrong = "POST /api/v1/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\
                 Content-Length: 10\r\nConnection: close\r\n\r\n";
    let resp = raw_http(server.admin_addr(), wrong.as_bytes());
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(server.api("GET", "/api/v1/conversations/c1", None).status, 200);
}
