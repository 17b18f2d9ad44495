//! Wire tests of the core server against PROTOCOL.md: the upgrade and its refusals, the
//! `hello` and error frames of `/ws`, `/echo`, close codes, heartbeats, drain, the admin
//! listener and the command line. Each test starts its own `ringpush serve` process.

mod common;

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_secs_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An HS256 token with arbitrary claims (expired, not yet valid, wrong secret).
fn sign(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign token")
}

/// Upgrades `/ws` raw as a fresh user.
fn raw_ws(server: &Server, user: &str) -> std::net::TcpStream {
    raw_upgrade(server.client_addr(), &format!("/ws?token={}", server.token(user, "dev", 3600)))
}

/// PROTOCOL.md: refusals are plain HTTP "with a one-line text body".
fn assert_refusal(resp: &HttpResponse, status: u16, what: &str) {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    let body = resp.body.trim_end_matches('\n');
    assert!(!body.is_empty() && !body.contains('\n'), "{what}: body is not one line: {resp:?}");
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{what}: Content-Type {content_type:?}");
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

#[test]
fn handshake_answers_101_with_the_rfc6455_accept_key() {
    let server = Server::start("");
    let mut stream = raw_connect(server.client_addr());
    stream.write_all(upgrade_request("/echo", &[]).as_bytes()).unwrap();
    let (status, head) = read_response_head(&mut stream);
    assert_eq!(status, 101, "{head}");
    assert_eq!(header_value(&head, "sec-websocket-accept").as_deref(), Some(RFC_ACCEPT), "{head}");
    assert!(header_value(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")), "{head}");
    assert!(header_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")), "{head}");
    // The upgraded stream speaks WebSocket right away.
    stream.write_all(&client_frame(true, OP_TEXT, b"after 101")).unwrap();
    let frame = read_frame_skip_pings(&mut stream);
    assert_eq!((frame.opcode, frame.payload.as_slice()), (OP_TEXT, &b"after 101"[..]));
}

#[test]
fn handshake_refuses_malformed_upgrades_with_400() {
    let server = Server::start("");
    let addr = server.client_addr();
    let good = upgrade_request("/echo", &[]);
    let cases = [
        ("missing Upgrade header", good.replace("Upgrade: websocket\r\n", "")),
        (
            "missing Connection: Upgrade",
            good.replace("Connection: Upgrade\r\n", "Connection: keep-alive\r\n"),
        ),
        ("key not 16 bytes of base64", good.replace(RFC_KEY, "c2hvcnQ=")),
        ("key not base64", good.replace(RFC_KEY, "!!not-base64-at-all!!")),
        ("missing key", good.replace(&format!("Sec-WebSocket-Key: {RFC_KEY}\r\n"), "")),
        ("POST", good.replacen("GET", "POST", 1)),
        ("HTTP/1.0", good.replace("HTTP/1.1", "HTTP/1.0")),
        ("garbage bytes", "\x00\x01\x02garbage\x7f\r\n\r\n".to_owned()),
        ("not HTTP at all", "hello there\r\n\r\n".to_owned()),
    ];
    for (what, request) in cases {
        let resp = raw_http(addr, request.as_bytes());
        assert_refusal(&resp, 400, what);
    }
    assert!(server.metric("ringpush_handshakes_refused_total{reason=\"bad_request\"}") >= 9);
    // The same on /ws, before any token is looked at.
    let no_upgrade = upgrade_request("/ws", &[]).replace("Upgrade: websocket\r\n", "");
    assert_refusal(&raw_http(addr, no_upgrade.as_bytes()), 400, "/ws without Upgrade");
}

#[test]
fn handshake_refuses_oversized_or_hostless_requests_with_400() {
    let server = Server::start("");
    let addr = server.client_addr();
    // No Host header (RFC 6455, 4.1 requires one).
    let no_host = upgrade_request("/echo", &[]).replace("Host: localhost\r\n", "");
    assert_refusal(&raw_http(addr, no_host.as_bytes()), 400, "missing Host");
    // A head that is still not complete after 8 KiB + 1 byte.
    let mut huge = upgrade_request("/echo", &[]).trim_end().to_owned();
    huge.push_str("\r\nX-Padding: ");
    while huge.len() < 8193 {
        huge.push('p');
    }
    assert_eq!(huge.len(), 8193);
    assert_refusal(&raw_http(addr, huge.as_bytes()), 400, "8193-byte head");
}

#[test]
fn handshake_accepts_a_request_in_pieces_and_frames_pipelined_after_it() {
    let server = Server::start("");
    let addr = server.client_addr();
    // Byte by byte (TCP_NODELAY: many small segments, many reads on the server).
    let mut stream = raw_connect(addr);
    for b in upgrade_request("/echo", &[]).as_bytes() {
        stream.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(read_response_head(&mut stream).0, 101);
    stream.write_all(&client_frame(true, OP_TEXT, b"after pieces")).unwrap();
    assert_eq!(read_frame_skip_pings(&mut stream).payload, b"after pieces");

    // The request and the first frames in one write.
    let mut stream = raw_connect(addr);
    let mut bytes = upgrade_request("/echo", &[]).into_bytes();
    bytes.extend(client_frame(true, OP_TEXT, b"pipelined 1"));
    bytes.extend(client_frame(true, OP_BINARY, b"pipelined 2"));
    stream.write_all(&bytes).unwrap();
    assert_eq!(read_response_head(&mut stream).0, 101);
    let f1 = read_frame_skip_pings(&mut stream);
    assert_eq!((f1.opcode, f1.payload.as_slice()), (OP_TEXT, &b"pipelined 1"[..]));
    let f2 = read_frame_skip_pings(&mut stream);
    assert_eq!((f2.opcode, f2.payload.as_slice()), (OP_BINARY, &b"pipelined 2"[..]));

    // On /ws the hello still comes first.
    let mut stream = raw_connect(addr);
    let token = server.token("alice", "phone", 3600);
    let mut bytes = upgrade_request(&format!("/ws?token={token}"), &[]).into_bytes();
    bytes.extend(client_frame(true, OP_TEXT, br#"{"op":"early","cid":"e1"}"#));
    stream.write_all(&bytes).unwrap();
    assert_eq!(read_response_head(&mut stream).0, 101);
    let hello: serde_json::Value =
        serde_json::from_slice(&read_frame_skip_pings(&mut stream).payload).unwrap();
    assert_eq!(hello["op"], "hello", "{hello}");
    let err: serde_json::Value = serde_json::from_slice(&read_frame_skip_pings(&mut stream).payload).unwrap();
    assert_eq!((err["code"].as_str(), err["cid"].as_str()), (Some("unknown_op"), Some("e1")), "{err}");

    // A close pipelined after the request is answered too.
    let mut stream = raw_connect(addr);
    let mut bytes = upgrade_request("/echo", &[]).into_bytes();
    bytes.extend(client_close(1000, ""));
    stream.write_all(&bytes).unwrap();
    assert_eq!(read_response_head(&mut stream).0, 101);
    assert_eq!(read_until_close(&mut stream).close_code(), 1000);
    wait_eof(&mut stream, Duration::from_secs(2)).unwrap();
}

#[test]
fn handshake_refuses_bad_tokens_with_401_and_accepts_a_bearer_header() {
    let server = Server::start("");
    let addr = server.client_addr();
    let now = unix_secs();
    let good = server.token("alice", "phone", 3600);
    let expired = sign(SECRET, serde_json::json!({"sub": "alice", "dev": "phone", "exp": now - 30}));
    let not_yet = sign(
        SECRET,
        serde_json::json!({"sub": "alice", "dev": "phone", "exp": now + 3600, "nbf": now + 600}),
    );
    let wrong_secret =
        sign("another-secret-456", serde_json::json!({"sub": "alice", "dev": "phone", "exp": now + 3600}));
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let forged = ringpush::auth::mint("attacker-secret", "mallory", "phone", 3600).unwrap();
        parts[1] = forged.split('.').nth(1).unwrap().to_owned();
        parts.join(".")
    };
    let cases = [
        ("no token", upgrade_request("/ws", &[])),
        ("empty token", upgrade_request("/ws?token=", &[])),
        ("not a JWT", upgrade_request("/ws?token=abc.def", &[])),
        ("bad signature", upgrade_request(&format!("/ws?token={wrong_secret}"), &[])),
        ("tampered payload", upgrade_request(&format!("/ws?token={tampered}"), &[])),
        ("expired", upgrade_request(&format!("/ws?token={expired}"), &[])),
        ("nbf in the future", upgrade_request(&format!("/ws?token={not_yet}"), &[])),
        ("expired, as bearer", upgrade_request("/ws", &[&format!("Authorization: Bearer {expired}")])),
        ("non-bearer scheme", upgrade_request("/ws", &[&format!("Authorization: Basic {good}")])),
    ];
    for (what, request) in cases {
        assert_refusal(&raw_http(addr, request.as_bytes()), 401, what);
    }
    assert!(server.metric("ringpush_handshakes_refused_total{reason=\"unauthorized\"}") >= 9);

    // A good token in `Authorization: Bearer` is accepted (what native apps send).
    let mut req = server.ws_url("/ws").into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {good}").parse().unwrap());
    let (mut ws, resp) = try_connect(req).expect("bearer token refused");
    assert_eq!(resp.status().as_u16(), 101);
    let hello = read_json(&mut ws);
    assert_eq!((hello["op"].as_str(), hello["user"].as_str()), (Some("hello"), Some("alice")), "{hello}");
    // And in the query, raw.
    let mut stream = raw_connect(addr);
    stream.write_all(upgrade_request(&format!("/ws?token={good}"), &[]).as_bytes()).unwrap();
    assert_eq!(read_response_head(&mut stream).0, 101);
}

#[test]
fn handshake_checks_origin_when_allowed_origins_is_set() {
    let server = Server::start(r#"allowed_origins = ["https://good.example"]"#);
    let addr = server.client_addr();
    let path = format!("/ws?token={}", server.token("alice", "web", 3600));
    let bad = upgrade_request(&path, &["Origin: https://evil.example"]);
    assert_refusal(&raw_http(addr, bad.as_bytes()), 403, "bad origin");
    let almost = upgrade_request(&path, &["Origin: https://good.example.evil.example"]);
    assert_refusal(&raw_http(addr, almost.as_bytes()), 403, "origin with the good one as a prefix");
    assert_eq!(server.metric("ringpush_handshakes_refused_total{reason=\"forbidden\"}"), 2);

    let mut stream = raw_connect(addr);
    stream.write_all(upgrade_request(&path, &["Origin: https://good.example"]).as_bytes()).unwrap();
    let (status, head) = read_response_head(&mut stream);
    assert_eq!(status, 101, "{head}");
    let hello = read_frame_skip_pings(&mut stream);
    assert_eq!(hello.opcode, OP_TEXT);
    let hello: serde_json::Value = serde_json::from_slice(&hello.payload).unwrap();
    assert_eq!(hello["op"], "hello");
}

#[test]
fn handshake_answers_404_for_unknown_paths() {
    let server = Server::start("");
    let addr = server.client_addr();
    for path in ["/nope", "/", "/ws/extra", "/echo2"] {
        assert_refusal(&raw_http(addr, upgrade_request(path, &[]).as_bytes()), 404, path);
    }
    // A token does not make an unknown path known.
    let token = server.token("alice", "phone", 60);
    let req = upgrade_request(&format!("/nope?token={token}"), &[]);
    assert_refusal(&raw_http(addr, req.as_bytes()), 404, "/nope with a token");
}

#[test]
fn handshake_answers_404_for_echo_when_diagnostics_echo_is_off() {
    let server = Server::start("[diagnostics]\necho = false");
    let addr = server.client_addr();
    assert_refusal(&raw_http(addr, upgrade_request("/echo", &[]).as_bytes()), 404, "/echo with echo = false");
    // /ws is unaffected.
    let (_ws, hello) = connect_client(&server, "alice", "phone");
    assert_eq!(hello["user"], "alice");
}

#[test]
fn handshake_answers_426_for_other_websocket_versions() {
    let server = Server::start("");
    let addr = server.client_addr();
    for version in ["8", "12", "14"] {
        let req = upgrade_request("/echo", &[])
            .replace("Sec-WebSocket-Version: 13", &format!("Sec-WebSocket-Version: {version}"));
        let resp = raw_http(addr, req.as_bytes());
        assert_refusal(&resp, 426, &format!("version {version}"));
        assert_eq!(resp.header("sec-websocket-version").as_deref(), Some("13"), "{resp:?}");
    }
    assert_eq!(server.metric("ringpush_handshakes_refused_total{reason=\"bad_version\"}"), 3);
}

#[test]
fn handshake_answers_503_at_the_connection_limit() {
    let server = Server::start("shards = 1\n[limits]\nmax_connections = 1");
    let addr = server.client_addr();
    let (mut first, _) = connect_client(&server, "alice", "phone");

    let token = server.token("bob", "phone", 3600);
    let req = upgrade_request(&format!("/ws?token={token}"), &[]);
    let refused = raw_http(addr, req.as_bytes());
    assert_refusal(&refused, 503, "second client");
    // PROTOCOL.md: with a Retry-After, spread so refused clients do not return together.
    let retry: u32 = refused.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((2..=10).contains(&retry), "Retry-After {retry}");
    assert_refusal(&raw_http(addr, upgrade_request("/echo", &[]).as_bytes()), 503, "echo client");
    assert_eq!(server.metric("ringpush_handshakes_refused_total{reason=\"unavailable\"}"), 2);
    // The first connection is unaffected.
    send_text(&mut first, r#"{"op":"nope","cid":"c1"}"#);
    assert_eq!(read_json(&mut first)["code"], "unknown_op");

    // Once it is gone, its slot is free again.
    first.close(None).unwrap();
    finish_close(&mut first, Duration::from_secs(3));
    server.wait_metric("ringpush_connections", Duration::from_secs(3), |v| v == 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut stream = raw_connect(addr);
        stream.write_all(req.as_bytes()).unwrap();
        let (status, head) = read_response_head(&mut stream);
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot of a closed connection was not freed: {head}");
    }
}

#[test]
fn handshake_timeout_drops_slow_clients_and_counts_them() {
    let server = Server::start("");
    let addr = server.client_addr();
    // Half a request, then nothing; and a connection that sends nothing at all.
    let mut half = raw_connect(addr);
    half.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n").unwrap();
    let mut silent = raw_connect(addr);
    let took = wait_eof(&mut half, Duration::from_millis(2500)).expect("half request");
    assert!(took >= Duration::from_millis(350), "dropped after {took:?}, before handshake_timeout_ms = 500");
    assert!(took <= Duration::from_millis(1500), "dropped only after {took:?} (handshake_timeout_ms = 500)");
    wait_eof(&mut silent, Duration::from_millis(1500)).expect("silent connection");
    server.wait_metric(
        "ringpush_handshakes_refused_total{reason=\"timeout\"}",
        Duration::from_secs(2),
        |v| v == 2,
    );
    // A client that is on time is still served.
    let mut ws = connect(&server.ws_url("/echo"));
    ws.send(Message::text("on time")).unwrap();
    assert_eq!(read_message(&mut ws), Message::text("on time"));
}

// ---------------------------------------------------------------------------------------
// /ws frames
// ---------------------------------------------------------------------------------------

#[test]
fn ws_sends_hello_first_with_the_configured_values() {
    let server =
        Server::start("node_id = \"node-a\"\n[heartbeat]\nping_interval_ms = 300\nidle_timeout_ms = 2000");
    let (_ws1, hello) = connect_client(&server, "alice@example.com", "phone-1");
    assert_eq!(hello["op"], "hello");
    assert_eq!(hello["user"], "alice@example.com");
    assert_eq!(hello["device"], "phone-1");
    assert_eq!(hello["node"], "node-a");
    assert_eq!(hello["ping_interval_ms"], 300);
    assert_eq!(hello["idle_timeout_ms"], 2000);
    let conn1 = hello["conn"].as_str().expect("conn is a string").to_owned();
    assert!(!conn1.is_empty());
    let keys: Vec<&String> = hello.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 7, "unexpected fields in hello: {hello}");
    // Another connection of the same (user, device) is allowed and has its own id.
    let (_ws2, hello2) = connect_client(&server, "alice@example.com", "phone-1");
    assert_ne!(hello2["conn"].as_str(), Some(conn1.as_str()), "conn ids must differ");
}

#[test]
fn ws_default_node_id_names_the_bound_client_port() {
    // PROTOCOL.md: `node_id` defaults to "host name + client port" (config/mod.rs: "unique per
    // host and port without any setup"). With `listen = "...:0"` the client port is the one
    // bound, so two nodes on one host must not share a node id.
    let a = Server::start("");
    let b = Server::start("");
    let (_wa, hello_a) = connect_client(&a, "alice", "phone");
    let (_wb, hello_b) = connect_client(&b, "alice", "phone");
    let node_a = hello_a["node"].as_str().expect("node").to_owned();
    let node_b = hello_b["node"].as_str().expect("node").to_owned();
    let port_a = a.client_addr().port();
    assert!(node_a.ends_with(&format!("-{port_a}")), "node {node_a:?} does not name client port {port_a}");
    assert_ne!(node_a, node_b, "two nodes on one host share a default node id");
}

#[test]
fn ws_errors_do_not_end_the_connection() {
    let server = Server::start("");
    let (mut ws, _) = connect_client(&server, "alice", "phone");

    send_text(&mut ws, r#"{"op":"frobnicate","cid":"a1b2"}"#);
    let err = read_json(&mut ws);
    assert_eq!(err["op"], "error", "{err}");
    assert_eq!(err["code"], "unknown_op", "{err}");
    assert_eq!(err["cid"], "a1b2", "{err}");
    assert!(err["message"].is_string(), "{err}");

    send_text(&mut ws, "this is not json");
    let err = read_json(&mut ws);
    assert_eq!((err["op"].as_str(), err["code"].as_str()), (Some("error"), Some("bad_request")), "{err}");
    assert!(err.get("cid").is_none_or(|c| c.is_null()), "no cid was sent: {err}");

    send_text(&mut ws, r#"{"cid":"x9"}"#);
    let err = read_json(&mut ws);
    assert_eq!((err["code"].as_str(), err["cid"].as_str()), (Some("bad_request"), Some("x9")), "{err}");

    send_text(&mut ws, r#"{"op":"frobnicate","cid":"a1b3""#);
    assert_eq!(read_json(&mut ws)["code"], "bad_request");

    // Still open: the next request is answered too.
    send_text(&mut ws, r#"{"op":"other","cid":"last"}"#);
    let err = read_json(&mut ws);
    assert_eq!((err["code"].as_str(), err["cid"].as_str()), (Some("unknown_op"), Some("last")), "{err}");
}

#[test]
fn ws_json_that_is_not_an_object_is_a_bad_request() {
    // PROTOCOL.md: every message is "one JSON object with an `op` field"; `bad_request`
    // is for "unparsable JSON, missing field". A JSON array is not a request.
    let server = Server::start("");
    let (mut ws, _) = connect_client(&server, "alice", "phone");
    for text in ["null", "42", "\"send\"", "[]", r#"["frobnicate","c1"]"#, r#"[{"op":"x"}]"#] {
        send_text(&mut ws, text);
        let err = read_json(&mut ws);
        assert_eq!(
            (err["op"].as_str(), err["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{text}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// /echo
// ---------------------------------------------------------------------------------------

#[test]
fn echo_returns_text_and_binary_as_they_came() {
    let server = Server::start("");
    let mut ws = connect(&server.ws_url("/echo"));
    ws.send(Message::text("héllo, wörld")).unwrap();
    assert_eq!(read_message(&mut ws), Message::text("héllo, wörld"));
    let bytes: Vec<u8> = (0..=255u8).collect();
    ws.send(Message::binary(bytes.clone())).unwrap();
    assert_eq!(read_message(&mut ws), Message::binary(bytes));
    ws.send(Message::text("")).unwrap();
    assert_eq!(read_message(&mut ws), Message::text(""));
}

#[test]
fn echo_reassembles_a_fragmented_message() {
    let server = Server::start("");
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    let mut bytes = client_frame(false, OP_TEXT, b"hello ");
    bytes.extend(client_frame(false, OP_CONT, b"fragmented "));
    // A control frame may come between fragments (RFC 6455, 5.4).
    bytes.extend(client_frame(true, OP_PING, b"mid"));
    bytes.extend(client_frame(true, OP_CONT, b"world"));
    stream.write_all(&bytes).unwrap();

    let pong = read_frame_skip_pings(&mut stream);
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"mid"[..]), "{pong:?}");
    let first = read_frame_skip_pings(&mut stream);
    assert_eq!(first.opcode, OP_TEXT, "{first:?}");
    assert!(!first.masked, "server frames must not be masked");
    let mut text = first.payload.clone();
    let mut fin = first.fin;
    while !fin {
        let next = read_frame_skip_pings(&mut stream);
        assert_eq!(next.opcode, OP_CONT, "{next:?}");
        text.extend_from_slice(&next.payload);
        fin = next.fin;
    }
    assert_eq!(String::from_utf8(text).unwrap(), "hello fragmented world");
}

#[test]
fn echo_returns_a_60_kib_binary_message() {
    let server = Server::start("");
    let mut ws = connect(&server.ws_url("/echo"));
    let big: Vec<u8> = (0..60 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).unwrap();
    match read_message(&mut ws) {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len());
            assert!(got[..] == big[..], "echoed bytes differ");
        }
        other => panic!("expected binary, got {other:?}"),
    }
    // Several in a row, written before any is read.
    for i in 0..4u8 {
        let mut m = big.clone();
        m[0] = i;
        ws.send(Message::binary(m)).unwrap();
    }
    for i in 0..4u8 {
        match read_message(&mut ws) {
            Message::Binary(got) => assert_eq!((got.len(), got[0]), (big.len(), i)),
            other => panic!("expected binary, got {other:?}"),
        }
    }
}

/// Reads until a pong arrives (server heartbeat pings are skipped) and returns its payload.
fn read_pong(ws: &mut Ws) -> Vec<u8> {
    loop {
        match ws.read().expect("read") {
            Message::Pong(payload) => return payload.to_vec(),
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn ping_from_the_client_gets_a_pong_with_the_same_payload() {
    let server = Server::start("");
    let mut echo = connect(&server.ws_url("/echo"));
    echo.send(Message::Ping(b"are you there?".to_vec().into())).unwrap();
    assert_eq!(read_pong(&mut echo), b"are you there?");
    let max = [b'm'; 125];
    echo.send(Message::Ping(max.to_vec().into())).unwrap();
    assert_eq!(read_pong(&mut echo), max);

    let (mut client, _) = connect_client(&server, "alice", "phone");
    client.send(Message::Ping(b"p".to_vec().into())).unwrap();
    assert_eq!(read_pong(&mut client), b"p");
    // Raw on /ws: the hello comes first, then the pong.
    let mut raw = raw_ws(&server, "bob");
    raw.write_all(&client_frame(true, OP_PING, b"raw-123")).unwrap();
    assert_eq!(read_frame_skip_pings(&mut raw).opcode, OP_TEXT);
    let pong = read_frame_skip_pings(&mut raw);
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"raw-123"[..]));
}

// ---------------------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------------------

#[test]
fn close_1000_from_the_client_is_answered_and_the_stream_ends() {
    let server = Server::start("");
    for path in ["ws", "echo"] {
        let mut stream =
            if path == "ws" { raw_ws(&server, "alice") } else { raw_upgrade(server.client_addr(), "/echo") };
        stream.write_all(&client_close(1000, "bye")).unwrap();
        let close = read_until_close(&mut stream);
        assert_eq!(close.close_code(), 1000, "/{path}: {close:?}");
        assert!(!close.masked);
        wait_eof(&mut stream, Duration::from_secs(2)).unwrap_or_else(|e| panic!("/{path}: {e}"));
    }
    // With tungstenite too.
    let (mut ws, _) = connect_client(&server, "bob", "phone");
    ws.close(None).unwrap();
    finish_close(&mut ws, Duration::from_secs(2));
    server.wait_metric("ringpush_connections", Duration::from_secs(2), |v| v == 0);
}

#[test]
fn close_1003_for_binary_on_ws() {
    let server = Server::start("");
    let (mut ws, _) = connect_client(&server, "alice", "phone");
    ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    let close = read_close(&mut ws);
    assert_eq!(code_of(&close), 1003, "{close:?}");
    finish_close(&mut ws, Duration::from_secs(3));
    // Raw: close frame, then the end of the stream.
    let mut stream = raw_ws(&server, "bob");
    stream.write_all(&client_frame(true, OP_BINARY, b"\x00\x01")).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1003);
    stream.write_all(&client_close(1003, "")).unwrap();
    wait_eof(&mut stream, Duration::from_secs(2)).unwrap();
    assert_eq!(server.metric("ringpush_closes_sent_total{code=\"1003\"}"), 2);
}

#[test]
fn close_1002_for_an_unmasked_client_frame() {
    let server = Server::start("");
    for path in ["ws", "echo"] {
        let mut stream =
            if path == "ws" { raw_ws(&server, "alice") } else { raw_upgrade(server.client_addr(), "/echo") };
        stream.write_all(&encode_frame(0x80 | OP_TEXT, None, br#"{"op":"x"}"#)).unwrap();
        assert_eq!(read_until_close(&mut stream).close_code(), 1002, "/{path}");
        wait_eof(&mut stream, Duration::from_secs(3)).unwrap_or_else(|e| panic!("/{path}: {e}"));
    }
}

#[test]
fn close_1002_for_rsv_bits_bad_opcodes_and_bad_control_frames() {
    let server = Server::start("");
    let mask = Some([1, 2, 3, 4]);
    let cases: [(&str, Vec<u8>); 5] = [
        ("RSV1", encode_frame(0x80 | 0x40 | OP_TEXT, mask, b"x")),
        ("RSV3", encode_frame(0x80 | 0x10 | OP_TEXT, mask, b"x")),
        ("reserved opcode 3", encode_frame(0x80 | 0x3, mask, b"x")),
        ("fragmented ping", encode_frame(OP_PING, mask, b"x")),
        ("continuation without a start", encode_frame(0x80 | OP_CONT, mask, b"x")),
    ];
    for (what, frame) in cases {
        let mut stream = raw_ws(&server, "alice");
        stream.write_all(&frame).unwrap();
        assert_eq!(read_until_close(&mut stream).close_code(), 1002, "{what}");
        wait_eof(&mut stream, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // Bad control frames (RFC 6455, 5.5 and 7.4).
    let cases: [(&str, Vec<u8>); 4] = [
        ("ping with a 126-byte payload", client_frame(true, OP_PING, &[b'p'; 126])),
        ("close with a 1-byte payload", client_frame(true, OP_CLOSE, &[3])),
        ("close with code 999", client_close(999, "")),
        ("close with code 1005", client_close(1005, "")),
    ];
    for (what, frame) in cases {
        let mut stream = raw_ws(&server, "bob");
        stream.write_all(&frame).unwrap();
        assert_eq!(read_until_close(&mut stream).close_code(), 1002, "{what}");
        wait_eof(&mut stream, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    stream.write_all(&encode_frame(0x80 | 0x40 | OP_BINARY, mask, b"x")).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1002, "RSV1 on /echo");
}

#[test]
fn close_1007_for_invalid_utf8_text() {
    let server = Server::start("");
    let mut stream = raw_ws(&server, "alice");
    stream.write_all(&client_frame(true, OP_TEXT, &[b'{', 0xff, 0xfe, b'}'])).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1007);
    wait_eof(&mut stream, Duration::from_secs(3)).unwrap();
    // On /echo, with the invalid sequence split over two fragments.
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    let mut bytes = client_frame(false, OP_TEXT, b"ok \xe2\x82");
    bytes.extend(client_frame(true, OP_CONT, b"\x28 bad"));
    stream.write_all(&bytes).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1007);
    // A valid sequence split over fragments is fine.
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    let mut bytes = client_frame(false, OP_TEXT, b"euro \xe2\x82");
    bytes.extend(client_frame(true, OP_CONT, b"\xac!"));
    stream.write_all(&bytes).unwrap();
    let frame = read_frame_skip_pings(&mut stream);
    assert_eq!((frame.opcode, frame.payload.as_slice()), (OP_TEXT, "euro €!".as_bytes()));
}

#[test]
fn close_1009_for_a_message_over_max_message_bytes() {
    let server = Server::start("[limits]\nmax_message_bytes = 1024");
    // One frame over the limit.
    let mut stream = raw_ws(&server, "alice");
    stream.write_all(&client_frame(true, OP_TEXT, &[b'a'; 2000])).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1009);
    wait_eof(&mut stream, Duration::from_secs(3)).unwrap();
    // Fragments each under the limit, together over it.
    let mut stream = raw_ws(&server, "bob");
    let mut bytes = client_frame(false, OP_TEXT, &[b'a'; 700]);
    bytes.extend(client_frame(true, OP_CONT, &[b'a'; 700]));
    stream.write_all(&bytes).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1009, "fragmented");
    // A header announcing a terabyte: refused from the header alone.
    let mut stream = raw_ws(&server, "carol");
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&header).unwrap();
    assert_eq!(read_until_close(&mut stream).close_code(), 1009, "1 TiB header");
    // At the limit is fine.
    let mut ws = connect(&server.ws_url("/echo"));
    ws.send(Message::binary(vec![7u8; 1024])).unwrap();
    assert_eq!(read_message(&mut ws), Message::binary(vec![7u8; 1024]));
    ws.send(Message::binary(vec![7u8; 1025])).unwrap();
    assert_eq!(code_of(&read_close(&mut ws)), 1009, "1025 bytes on /echo");
}

#[test]
fn close_1008_when_the_token_expires() {
    let server =
        Server::start("[heartbeat]\nping_interval_ms = 500\nidle_timeout_ms = 5000\n[auth]\nleeway_secs = 0");
    let exp = unix_secs() + 2;
    let token = sign(SECRET, serde_json::json!({"sub": "alice", "dev": "phone", "exp": exp}));
    let (mut ws, _) = try_connect(server.ws_url(&format!("/ws?token={token}"))).expect("connect");
    assert_eq!(read_json(&mut ws)["op"], "hello");
    // A long-lived connection alongside is not affected.
    let (mut other, _) = connect_client(&server, "bob", "phone");
    let close = read_close(&mut ws);
    let at = unix_secs_f64();
    assert_eq!(code_of(&close), 1008, "{close:?}");
    assert!(at >= exp as f64 - 0.2, "closed at {at:.2}, before exp {exp}");
    assert!(at <= exp as f64 + 3.0, "closed at {at:.2}, more than 3 s after exp {exp}");
    finish_close(&mut ws, Duration::from_secs(2));
    send_text(&mut other, r#"{"op":"still-here","cid":"1"}"#);
    assert_eq!(read_json(&mut other)["code"], "unknown_op");
}

#[test]
fn token_leeway_applies_to_exp_and_nbf() {
    let server =
        Server::start("[heartbeat]\nping_interval_ms = 500\nidle_timeout_ms = 5000\n[auth]\nleeway_secs = 3");
    let addr = server.client_addr();
    let now = unix_secs();
    let claims = |exp: u64, nbf: Option<u64>| {
        let mut c = serde_json::json!({"sub": "alice", "dev": "phone", "exp": exp});
        if let Some(nbf) = nbf {
            c["nbf"] = nbf.into();
        }
        sign(SECRET, c)
    };
    for (what, token) in
        [("expired 5 s ago", claims(now - 5, None)), ("nbf in 10 s", claims(now + 3600, Some(now + 10)))]
    {
        let req = upgrade_request(&format!("/ws?token={token}"), &[]);
        assert_refusal(&raw_http(addr, req.as_bytes()), 401, what);
    }
    // Within the leeway: accepted.
    let (mut early, _) =
        try_connect(server.ws_url(&format!("/ws?token={}", claims(now + 3600, Some(now + 2)))))
            .expect("nbf within the leeway refused");
    assert_eq!(read_json(&mut early)["op"], "hello");
    let exp = now - 1;
    let (mut late, _) = try_connect(server.ws_url(&format!("/ws?token={}", claims(exp, None))))
        .expect("exp within the leeway refused");
    assert_eq!(read_json(&mut late)["op"], "hello");
    // ... and closed with 1008 once exp + leeway has passed.
    let close = read_close(&mut late);
    let at = unix_secs_f64();
    assert_eq!(code_of(&close), 1008, "{close:?}");
    let deadline = (exp + 3) as f64;
    assert!(at >= deadline - 0.2, "closed at {at:.2}, before exp + leeway = {deadline}");
    assert!(at <= deadline + 3.0, "closed at {at:.2}, long after exp + leeway = {deadline}");
    send_text(&mut early, r#"{"op":"x","cid":"early"}"#);
    assert_eq!(read_json(&mut early)["cid"], "early");
}

#[test]
fn sigterm_stops_accepting_and_turns_readyz_503_while_draining() {
    let server = Server::start("[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 5000");
    // A raw client that will not answer the close keeps the drain going for a while.
    let mut stalling = raw_ws(&server, "alice");
    server.sigterm();
    assert_eq!(read_until_close(&mut stalling).close_code(), 1001);
    let ready = server.admin_get("/readyz");
    assert_eq!(ready.status, 503, "/readyz while draining: {ready:?}");
    // New upgrades are not accepted any more: refused, reset, or 503; never a 101.
    let token = server.token("bob", "phone", 60);
    let req = upgrade_request(&format!("/ws?token={token}"), &[]);
    if let Ok(mut stream) = std::net::TcpStream::connect_timeout(&server.client_addr(), IO_TIMEOUT) {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        if stream.write_all(req.as_bytes()).is_ok() {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stream, &mut buf);
            let text = String::from_utf8_lossy(&buf);
            assert!(text.is_empty() || text.starts_with("HTTP/1.1 503"), "upgrade during drain: {text:?}");
        }
    }
    wait_eof(&mut stalling, Duration::from_secs(4)).expect("the stalling client was never dropped");
    let status = server.wait_exit(Duration::from_secs(5)).expect("still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let server = Server::start("[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 5000");
    let mut clients = Vec::new();
    // Connect until both shards hold clients (the kernel spreads them by hash).
    for i in 0..64 {
        clients.push(connect_client(&server, &format!("user{i}"), "phone").0);
        let text = server.metrics();
        let s0 = metric_value(&text, "ringpush_connections{shard=\"0\"}");
        let s1 = metric_value(&text, "ringpush_connections{shard=\"1\"}");
        if clients.len() >= 4 && s0 > 0 && s1 > 0 {
            break;
        }
    }
    let text = server.metrics();
    assert!(
        metric_value(&text, "ringpush_connections{shard=\"0\"}") > 0
            && metric_value(&text, "ringpush_connections{shard=\"1\"}") > 0,
        "could not get clients on both shards:\n{text}"
    );
    let mut echo = connect(&server.ws_url("/echo"));
    echo.send(Message::text("registered")).unwrap();
    assert_eq!(read_message(&mut echo), Message::text("registered"));

    let start = Instant::now();
    server.sigterm();
    let mut hints = std::collections::BTreeSet::new();
    for (i, ws) in clients.iter_mut().enumerate() {
        let close = read_close(ws);
        assert_eq!(code_of(&close), 1001, "client {i}: {close:?}");
        // Each is told when to come back, spread over limits.reconnect_spread_ms.
        let reason = close.as_ref().map(|c| c.reason.to_string()).unwrap_or_default();
        let hint: u64 = reason
            .split("reconnect_after_ms=")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("client {i}: no reconnect_after_ms in {reason:?}"));
        assert!(hint < 10_000, "{reason}");
        hints.insert(hint);
    }
    assert!(hints.len() > clients.len() / 2, "reconnect hints not spread: {hints:?}");
    assert_eq!(code_of(&read_close(&mut echo)), 1001, "echo client");
    for ws in clients.iter_mut().chain(std::iter::once(&mut echo)) {
        finish_close(ws, Duration::from_secs(4));
    }
    let status = server.wait_exit(Duration::from_secs(5).saturating_sub(start.elapsed()));
    let status = status.unwrap_or_else(|| panic!("still running 5 s after SIGTERM"));
    assert!(status.success(), "exit status {status}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Heartbeat
// ---------------------------------------------------------------------------------------

#[test]
fn heartbeat_pings_a_live_client_and_keeps_it() {
    let server = Server::start("");
    let (mut ws, _) = connect_client(&server, "alice", "phone");
    let start = Instant::now();
    let until = start + Duration::from_millis(1500); // idle_timeout_ms = 800
    let mut pings = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        ws.get_mut().set_read_timeout(Some(left)).unwrap();
        match ws.read() {
            // tungstenite queues the pong; it goes out with the next read.
            Ok(Message::Ping(payload)) => {
                pings += 1;
                assert!(payload.len() <= 125);
            }
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                break
            }
            Err(e) => panic!("dropped after {:?} although it answered every ping: {e}", start.elapsed()),
        }
    }
    assert!(pings >= 3, "only {pings} pings in 1.5 s with ping_interval_ms = 200");
    ws.get_mut().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    send_text(&mut ws, r#"{"op":"ping?","cid":"alive"}"#);
    assert_eq!(read_json(&mut ws)["cid"], "alive");
    assert!(server.metric("ringpush_pings_sent_total") >= 3);
    assert_eq!(server.metric("ringpush_idle_drops_total"), 0);
    assert_eq!(server.metric("ringpush_connections"), 1);
}

#[test]
fn heartbeat_drops_a_silent_client_after_idle_timeout() {
    let server = Server::start("");
    let mut stream = raw_ws(&server, "alice");
    let mut echo = raw_upgrade(server.client_addr(), "/echo");
    let (frames, took) =
        frames_until_eof(&mut stream, Duration::from_millis(2500)).expect("silent /ws client");
    assert!(took >= Duration::from_millis(700), "dropped after {took:?}, before idle_timeout_ms = 800");
    assert!(took <= Duration::from_millis(1600), "dropped only after {took:?} (idle_timeout_ms = 800)");
    // PROTOCOL.md: "A client that stops answering is not sent a close".
    assert!(frames.iter().all(|f| f.opcode != OP_CLOSE), "a close frame was sent: {frames:?}");
    let pings = frames.iter().filter(|f| f.opcode == OP_PING).count();
    assert!(pings >= 2, "only {pings} pings before the drop: {frames:?}");
    wait_eof(&mut echo, Duration::from_millis(1500)).expect("silent /echo client");
    server.wait_metric("ringpush_idle_drops_total", Duration::from_secs(2), |v| v == 2);
    server.wait_metric("ringpush_connections", Duration::from_secs(2), |v| v == 0);
    assert!(server.metric("ringpush_pings_sent_total") >= 4);
}

#[test]
fn heartbeat_counts_any_frame_as_a_sign_of_life() {
    let server = Server::start("");
    // A raw client that never answers pings but sends a message every 300 ms.
    let mut stream = raw_upgrade(server.client_addr(), "/echo");
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1800) {
        let mark = Instant::now();
        stream.write_all(&client_frame(true, OP_TEXT, format!("m{n}").as_bytes())).unwrap();
        let echoed = read_frame_skip_pings(&mut stream);
        assert_eq!(echoed.payload, format!("m{n}").into_bytes(), "after {:?}", start.elapsed());
        n += 1;
        // Pace the messages by the server's pings: read until one has arrived.
        while mark.elapsed() < Duration::from_millis(300) {
            match read_frame(&mut stream) {
                Ok(Some(f)) if f.opcode == OP_PING => {}
                other => panic!("expected a server ping, got {other:?}"),
            }
        }
    }
    assert_eq!(server.metric("ringpush_idle_drops_total"), 0);
}

// ---------------------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------------------

#[test]
fn a_misbehaving_client_does_not_disturb_others() {
    let server = Server::start("");
    let addr = server.client_addr();
    let mut good = connect(&server.ws_url("/echo"));
    let (mut good_ws, _) = connect_client(&server, "carol", "phone");
    let round_trip = |ws: &mut Ws, text: &str| {
        ws.send(Message::text(text)).unwrap();
        assert_eq!(read_message(ws), Message::text(text));
    };
    round_trip(&mut good, "before");

    // Garbage instead of an upgrade.
    let resp = raw_http(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n");
    assert_eq!(resp.status, 400);
    round_trip(&mut good, "after garbage request");
    // Garbage after the upgrade.
    let mut bad = raw_upgrade(addr, "/echo");
    bad.write_all(&[0xff; 64]).unwrap();
    wait_eof(&mut bad, Duration::from_secs(3)).unwrap();
    round_trip(&mut good, "after garbage frames");
    // Protocol errors and a big message over the limit, on /ws.
    let mut bad = raw_ws(&server, "mallory");
    bad.write_all(&encode_frame(0x81, None, b"unmasked")).unwrap();
    assert_eq!(read_until_close(&mut bad).close_code(), 1002);
    let (mut bad_ws, _) = connect_client(&server, "mallory", "tablet");
    bad_ws.send(Message::binary(vec![0u8; 10])).unwrap();
    assert_eq!(code_of(&read_close(&mut bad_ws)), 1003);
    // A client that vanishes mid-frame.
    let mut gone = raw_upgrade(addr, "/echo");
    gone.write_all(&client_frame(true, OP_TEXT, &[b'z'; 5000])[..100]).unwrap();
    drop(gone);

    round_trip(&mut good, "after all that");
    send_text(&mut good_ws, r#"{"op":"x","cid":"still"}"#);
    assert_eq!(read_json(&mut good_ws)["cid"], "still");
    assert!(!server.log_contains("panicked"), "a thread panicked:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------

#[test]
fn admin_health_readiness_and_metrics() {
    let server = Server::start("");
    let health = server.admin_get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    let ready = server.admin_get("/readyz");
    assert_eq!(ready.status, 200, "{ready:?}");

    let text = server.metrics();
    for series in [
        "ringpush_connections{shard=\"0\"}",
        "ringpush_connections{shard=\"1\"}",
        "ringpush_handshakes_refused_total{reason=\"timeout\"}",
        "ringpush_pings_sent_total{shard=\"0\"}",
        "ringpush_idle_drops_total{shard=\"0\"}",
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{series} "))), "no {series} in:\n{text}");
    }
    assert!(text.contains("# TYPE ringpush_connections gauge"), "{text}");
    assert_eq!(metric_value(&text, "ringpush_connections"), 0);

    let (mut ws, _) = connect_client(&server, "alice", "phone");
    assert_eq!(server.metric("ringpush_connections"), 1);
    let mut echo = connect(&server.ws_url("/echo"));
    // /echo sends nothing first; an echo proves the session is registered (the 101 is
    // written just before that).
    echo.send(Message::text("x")).unwrap();
    assert_eq!(read_message(&mut echo), Message::text("x"));
    assert_eq!(server.metric("ringpush_connections"), 2);
    assert!(server.metric("ringpush_handshakes_ok_total") >= 2);
    ws.close(None).unwrap();
    finish_close(&mut ws, Duration::from_secs(2));
    echo.close(None).unwrap();
    finish_close(&mut echo, Duration::from_secs(2));
    server.wait_metric("ringpush_connections", Duration::from_secs(2), |v| v == 0);
}

#[test]
fn admin_api_requires_the_key() {
    let server = Server::start("");
    let addr = server.admin_addr();
    for (what, bearer) in
        [("no key", None), ("wrong key", Some("not-the-key")), ("key prefix", Some("test-api"))]
    {
        let resp = http(addr, "GET", "/api/v1/anything", bearer, None);
        assert_eq!(resp.status, 401, "{what}: {resp:?}");
        let body = resp.json();
        assert_eq!(body["error"], "unauthorized", "{what}: {body}");
        assert!(body["message"].is_string(), "{what}: {body}");
    }
    let resp = http(addr, "POST", "/api/v1/push", None, Some(r#"{"users":["u1"],"body":{}}"#));
    assert_eq!(resp.status, 401, "{resp:?}");
    // The client token is not an API key.
    let token = server.token("alice", "phone", 60);
    assert_eq!(http(addr, "GET", "/api/v1/anything", Some(&token), None).status, 401);

    let resp = server.api("GET", "/api/v1/anything", None);
    assert_eq!(resp.status, 404, "{resp:?}");
    assert!(resp.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{resp:?}");
    assert!(resp.json()["error"].is_string(), "{resp:?}");
}

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

fn check_config(contents: &str) -> std::process::Output {
    let dir = TempDir::new("check");
    let path = dir.write("config.toml", contents);
    ringpush_command().arg("check-config").arg("--config").arg(&path).output().expect("run check-config")
}

/// Asserts a failed `check-config` printed exactly one line naming `key`.
fn assert_config_error(contents: &str, key: &str) {
    let out = check_config(contents);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{contents:?} accepted: {out:?}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
    assert!(lines[0].contains(key), "{:?} does not name {key}", lines[0]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"), "{out:?}");
}

#[test]
fn cli_check_config_names_the_wrong_key() {
    assert_config_error("[heartbeat]\nping_interval_ms = 0\n", "heartbeat.ping_interval_ms");
    assert_config_error(
        "[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 500\n",
        "heartbeat.idle_timeout_ms",
    );
    assert_config_error("[limits]\nmax_message_bytes = 10\n", "limits.max_message_bytes");
    assert_config_error("[auth]\nsecret = \"short\"\n", "auth.secret");
}

#[test]
fn cli_check_config_names_an_unknown_key() {
    assert_config_error("[limits]\nmax_conections = 5\n", "max_conections");
    assert_config_error("colour = \"blue\"\n", "colour");
    assert_config_error("[heartbeat]\nping_interval_ms = \"fast\"\n", "heartbeat.ping_interval_ms");
}

#[test]
fn cli_environment_overrides_the_file() {
    let dir = TempDir::new("env");
    let path = dir
        .write("config.toml", "[auth]\nsecret = \"file-secret-0123\"\n[heartbeat]\nping_interval_ms = 200\n");
    let out = ringpush_command()
        .env("RINGPUSH_HEARTBEAT__PING_INTERVAL_MS", "0")
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("heartbeat.ping_interval_ms"), "{stderr:?}");

    // `ringpush token` signs with RINGPUSH_AUTH__SECRET over the file's secret.
    let out = ringpush_command()
        .env("RINGPUSH_AUTH__SECRET", "env-secret-4567")
        .args(["token", "--user", "u1", "--device", "d1", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let verify = |secret: &str| ringpush::auth::Verifier::new(secret, 0).verify(token.trim());
    assert_eq!(verify("env-secret-4567").map(|c| c.sub), Ok("u1".to_owned()));
    assert!(verify("file-secret-0123").is_err());
}

#[test]
fn cli_check_config_accepts_a_good_file() {
    let out = check_config(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\napi_key = \"test-api-key\"\n\
         [auth]\nsecret = \"test-secret-0123\"\n[heartbeat]\nping_interval_ms = 200\nidle_timeout_ms = 800\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{out:?}");
    // An empty file is a working configuration too.
    let out = check_config("");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn cli_token_is_accepted_by_the_server() {
    let server = Server::start("");
    let out = ringpush_command()
        .args(["token", "--user", "dave@example.com", "--device", "laptop-2", "--ttl", "120", "--config"])
        .arg(server.config_path())
        .output()
        .expect("run ringpush token");
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    let mut ws = connect(&server.ws_url(&format!("/ws?token={token}")));
    let hello = read_json(&mut ws);
    assert_eq!(
        (hello["user"].as_str(), hello["device"].as_str()),
        (Some("dave@example.com"), Some("laptop-2"))
    );
    // Without a secret it refuses to mint a token nobody would accept.
    let dir = TempDir::new("token");
    let path = dir.write("nosecret.toml", "");
    let out = ringpush_command()
        .args(["token", "--user", "u", "--device", "d", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn a_connect_storm_past_the_rate_gets_503_with_retry_after() {
    let server = Server::start("shards = 1\n[limits]\nconnect_rate_per_sec = 3\n");
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for i in 0..12 {
        match try_connect(server.ws_url_for(&format!("u{i}"), "phone")) {
            Ok((ws, _)) => accepted.push(ws),
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 503);
                let retry: u32 = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .expect("a Retry-After header");
                assert!((1..=5).contains(&retry), "Retry-After {retry}");
                refused += 1;
            }
            Err(e) => panic!("connect {i}: {e}"),
        }
    }
    // A bucket of one second's worth (3), plus what refills while the storm runs.
    assert!(accepted.len() >= 3 && accepted.len() <= 5, "{} accepted", accepted.len());
    assert_eq!(accepted.len() + refused, 12);
    assert_eq!(server.metric("ringpush_handshakes_refused_total{reason=\"throttled\"}"), refused as u64);
}

#[test]
fn an_address_past_its_connection_cap_gets_503_until_one_closes() {
    let server = Server::start("shards = 1\n[limits]\nmax_connections_per_ip = 2\n");
    let (mut first, _) = connect_client(&server, "u1", "a");
    let (_second, _) = connect_client(&server, "u1", "b");
    match try_connect(server.ws_url_for("u2", "c")) {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).unwrap_or("");
            assert!(retry.parse::<u32>().is_ok_and(|r| (10..=30).contains(&r)), "Retry-After {retry:?}");
        }
        other => panic!("a third connection from 127.0.0.1 was not refused: {:?}", other.map(|_| ())),
    }
    first.close(None).expect("close");
    finish_close(&mut first, Duration::from_secs(2));
    // The place is given back when the server has ended the session.
    server.wait_metric("ringpush_connections", Duration::from_secs(5), |n| n == 1);
    let (_third, hello) = connect_client(&server, "u2", "c");
    assert_eq!(hello["user"], "u2");
}
