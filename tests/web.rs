//! Wire tests of what a browser gets: the `/demo` page and its dev-only calls on the client
//! listener (only with `diagnostics.demo = true`), and the dashboard with its server-sent
//! events on the admin listener. The pages themselves are exercised in Chromium by
//! `clients/js/browser-test/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const DEMO: &str = "[diagnostics]\ndemo = true";

/// A plain HTTP request to the client listener with extra headers and an optional body.
fn request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    try_http(server.client_addr(), method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn get(server: &Server, path: &str) -> HttpResponse {
    request(server, "GET", path, &[], None)
}

/// A token from the demo endpoint.
fn demo_token(server: &Server, user: &str, device: &str) -> String {
    let resp = get(server, &format!("/demo/token?user={user}&device={device}"));
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()["token"].as_str().expect("token").to_owned()
}

fn demo_join(server: &Server, token: &str, conv: &str) -> HttpResponse {
    let auth = format!("Bearer {token}");
    let body = json!({ "conv": conv }).to_string();
    request(server, "POST", "/demo/join", &[("Authorization", &auth)], Some(&body))
}

// ---------------------------------------------------------------------------------------
// /demo on the client listener
// ---------------------------------------------------------------------------------------

#[test]
fn demo_paths_are_404_unless_demo_mode_is_on() {
    let server = Server::start("");
    for path in ["/demo", "/demo/", "/demo/ringpush.js", "/demo/token?user=alice&device=laptop"] {
        let resp = get(&server, path);
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
        assert!(resp.header("content-type").unwrap_or_default().starts_with("text/plain"), "{resp:?}");
    }
    let resp = request(&server, "POST", "/demo/join", &[], Some("{\"conv\":\"c1\"}"));
    assert_eq!(resp.status, 404, "{resp:?}");
    // Upgrades to a demo path are unknown paths too; other plain requests are still 400.
    let upgrade = raw_http(server.client_addr(), upgrade_request("/demo", &[]).as_bytes());
    assert_eq!(upgrade.status, 404, "{upgrade:?}");
    assert_eq!(get(&server, "/ws").status, 400);
    assert_eq!(get(&server, "/demonstration").status, 400);
    assert!(server.metric("ringpush_handshakes_refused_total{reason=\"not_found\"}") >= 6);
}

#[test]
fn demo_mode_serves_the_page_and_the_js_client() {
    let server = Server::start(DEMO);
    let page = get(&server, "/demo");
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
    let csp = page.header("content-security-policy").expect("a CSP header");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(page.body.contains("from '/demo/ringpush.js'"), "the page imports the client");
    assert!(!page.body.contains("http://") && !page.body.contains("https://"), "no external assets");
    assert_eq!(get(&server, "/demo/").status, 200);

    let js = get(&server, "/demo/ringpush.js");
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type").as_deref(), Some("text/javascript; charset=utf-8"));
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/ringpush.js"))
        .expect("read clients/js/ringpush.js");
    assert_eq!(js.body, source, "the served client is clients/js/ringpush.js as built");

    let missing = get(&server, "/demo/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "not_found");
    assert_eq!(request(&server, "POST", "/demo", &[], Some("{}")).status, 405);
    assert_eq!(get(&server, "/demo/join").status, 405);
    // Page requests are not refused upgrades.
    assert_eq!(server.metric("ringpush_handshakes_refused_total"), 0);
}

#[test]
fn the_demo_token_endpoint_gives_a_token_that_connects() {
    let server = Server::start(DEMO);
    let resp = get(&server, "/demo/token?user=alice&device=laptop");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type").as_deref(), Some("application/json"));
    let body = resp.json();
    assert_eq!((body["user"].as_str(), body["device"].as_str()), (Some("alice"), Some("laptop")));
    assert_eq!(body["ws"], "/ws");
    let exp = body["exp"].as_u64().expect("exp");
    let now = unix_ms() / 1000;
    assert!((now + 3590..=now + 3610).contains(&exp), "an hour by default: {exp} vs {now}");

    let token = body["token"].as_str().expect("token");
    let mut ws = connect(&server.ws_url(&format!("/ws?token={token}")));
    let hello = read_json(&mut ws);
    assert_eq!((hello["op"].as_str(), hello["user"].as_str()), (Some("hello"), Some("alice")));
    assert_eq!(hello["device"], "laptop");

    let short = get(&server, "/demo/token?user=bob&device=p%2E1&ttl=30").json();
    assert_eq!(short["device"], "p.1", "query values are percent-decoded");
    assert!(short["exp"].as_u64().unwrap() <= now + 31);

    for bad in [
        "/demo/token?user=alice",
        "/demo/token?device=laptop",
        "/demo/token?user=al%20ice&device=laptop",
        "/demo/token?user=alice&device=laptop&ttl=0",
        "/demo/token?user=alice&device=laptop&ttl=86401",
        "/demo/token?user=alice&device=laptop&ttl=soon",
    ] {
        let resp = get(&server, bad);
        assert_eq!(resp.status, 400, "{bad}: {resp:?}");
        assert_eq!(resp.json()["error"], "bad_request");
    }
}

#[test]
fn demo_join_makes_the_token_user_a_member_like_the_api_does() {
    let server = Server::start(DEMO);
    let alice = demo_token(&server, "alice", "laptop");
    let bob = demo_token(&server, "bob", "phone");
    // Bob is already connected when Alice and he join: membership reaches his session.
    let mut bob_ws = connect(&server.ws_url(&format!("/ws?token={bob}")));
    assert_eq!(read_json(&mut bob_ws)["op"], "hello");

    let joined = demo_join(&server, &alice, "c1");
    assert_eq!(joined.status, 200, "{joined:?}");
    assert_eq!(joined.json(), json!({ "conv": "c1", "members": 1 }));
    assert_eq!(demo_join(&server, &bob, "c1").json(), json!({ "conv": "c1", "members": 2 }));
    assert_eq!(demo_join(&server, &bob, "c1").json()["members"], 2, "joining twice changes nothing");
    assert_eq!(server.conversation("c1")["members"], json!(["alice", "bob"]));

    let mut alice_ws = connect(&server.ws_url(&format!("/ws?token={alice}")));
    assert_eq!(read_json(&mut alice_ws)["op"], "hello");
    let ack = send_acked(&mut alice_ws, "c1", "m1", &json!({ "text": "hi bob" }));
    assert_eq!(ack["seq"], 1);
    let msg = read_op(&mut bob_ws, "msg");
    assert_eq!((msg["seq"].as_u64(), msg["from"].as_str()), (Some(1), Some("alice")));

    let no_token = request(&server, "POST", "/demo/join", &[], Some("{\"conv\":\"c1\"}"));
    assert_eq!(no_token.status, 401, "{no_token:?}");
    let forged = demo_join(&server, "not.a.token", "c1");
    assert_eq!(forged.status, 401);
    assert_eq!(demo_join(&server, &alice, "bad conv").status, 400);
    let auth = format!("Bearer {alice}");
    let junk = request(&server, "POST", "/demo/join", &[("Authorization", &auth)], Some("[1,2]"));
    assert_eq!(junk.status, 400);
    let huge = format!("{{\"conv\":\"c1\",\"pad\":\"{}\"}}", "x".repeat(5000));
    let too_big = request(&server, "POST", "/demo/join", &[("Authorization", &auth)], Some(&huge));
    assert_eq!(too_big.status, 413);
}

// ---------------------------------------------------------------------------------------
// The dashboard on the admin listener
// ---------------------------------------------------------------------------------------

#[test]
fn the_dashboard_page_is_served_without_a_key_and_loads_nothing_from_elsewhere() {
    let server = Server::start("");
    let page = server.admin_get("/");
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    assert!(page.body.contains("new EventSource('/events')"));
    assert!(page.body.contains("Content-Security-Policy"));
    assert!(!page.body.contains("http://") && !page.body.contains("https://"), "no external assets");
    // Unknown admin paths are still 404, the API still wants its key.
    assert_eq!(server.admin_get("/nope").status, 404);
    assert_eq!(server.admin_get("/api/v1/presence/alice").status, 401);
}

/// An open `GET /events` stream on the admin listener.
struct Events {
    reader: BufReader<TcpStream>,
}

impl Events {
    fn open(server: &Server, query: &str) -> Events {
        let mut stream = raw_connect(server.admin_addr());
        let req = format!("GET /events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(req.as_bytes()).expect("send request");
        let (status, head) = read_response_head(&mut stream);
        assert_eq!(status, 200, "{head}");
        assert_eq!(header_value(&head, "content-type").as_deref(), Some("text/event-stream"));
        assert_eq!(header_value(&head, "cache-control").as_deref(), Some("no-store"));
        Events { reader: BufReader::new(stream) }
    }

    /// The next snapshot; panics at EOF.
    fn next(&mut self) -> Value {
        self.try_next().expect("the event stream ended")
    }

    /// The next snapshot, or `None` at EOF.
    fn try_next(&mut self) -> Option<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading the event stream: {e}"),
            }
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(serde_json::from_str(data.trim_end()).expect("snapshot JSON"));
            }
        }
    }

    /// Snapshots until one satisfies `ok` (bounded).
    fn until(&mut self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = self.next();
            if ok(&snap) {
                return snap;
            }
            assert!(Instant::now() < deadline, "no snapshot with {what}; last: {snap}");
        }
    }
}

#[test]
fn events_stream_live_snapshots_built_from_the_metrics() {
    let server = Server::start("");
    let mut events = Events::open(&server, "?interval_ms=100");
    let first = events.next();
    assert_eq!(first["connections"]["total"], 0);
    assert_eq!(first["shards"], 2);
    assert_eq!(first["connections"]["per_shard"].as_array().map(Vec::len), Some(2));
    assert_eq!(first["ready"], true);
    assert_eq!(first["interval_ms"], 100);
    assert_eq!(first["handshakes"]["ok_per_s"], Value::Null, "no rate before a second scrape");
    assert_eq!(first["cluster"], json!({ "enabled": false }), "a single node");
    assert_eq!(first["store"]["backend"], "memory");
    assert!(first["node"].as_str().is_some_and(|n| !n.is_empty()));

    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    let snap = events.until("2 connections", |s| s["connections"]["total"] == 2);
    assert_eq!(snap["handshakes"]["ok_total"], 2);
    for i in 0..5 {
        send_acked(&mut alice, "c1", &format!("m{i}"), &json!({ "n": i }));
    }
    let snap = events.until("5 deliveries", |s| s["messages"]["delivered_total"] == 5);
    assert_eq!(snap["messages"]["in_total"], 5);
    assert!(snap["fanout"]["lifetime"]["count"].as_u64() >= Some(5));
    assert!(snap["fanout"]["lifetime"]["p99_us"].as_f64().is_some(), "{snap}");
    // The snapshots before this one had fewer deliveries: this one has a rate and a window.
    assert!(snap["messages"]["delivered_per_s"].as_f64() > Some(0.0), "{snap}");
    assert!(snap["fanout"]["window"]["count"].as_u64() >= Some(1), "{snap}");
    for _ in 0..5 {
        read_op(&mut bob, "msg");
    }
    drop(alice);
    events.until("1 connection", |s| s["connections"]["total"] == 1);
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_event_stream_ends_when_its_client_goes_away() {
    let server = Server::start("");
    let mut watcher = Events::open(&server, "?interval_ms=100");
    watcher.until("one stream", |s| s["streams"] == 1);
    let fds = open_fds(server.pid());

    let mut other = Events::open(&server, "?interval_ms=100");
    other.next();
    watcher.until("two streams", |s| s["streams"] == 2);
    drop(other);
    watcher.until("the closed stream gone", |s| s["streams"] == 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(server.pid()) > fds {
        assert!(Instant::now() < deadline, "the closed stream's socket is still open");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The admin listener answers as before while a stream is open.
    assert_eq!(server.admin_get("/healthz").status, 200);
    assert_eq!(server.admin_get("/").status, 200);
}

#[test]
fn a_drain_is_not_held_up_by_an_open_event_stream() {
    let server = Server::start("");
    let mut events = Events::open(&server, "");
    events.next();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(10)).expect("ringpush did not exit");
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while events.try_next().is_some() {
        assert!(Instant::now() < deadline, "the stream did not end with the server");
    }
}

#[test]
fn event_streams_are_capped() {
    let server = Server::start("");
    // Each stream counts once its first snapshot is out.
    let mut open: Vec<Events> = (0..32).map(|_| Events::open(&server, "?interval_ms=60000")).collect();
    for e in &mut open {
        e.next();
    }
    let mut extra = raw_connect(server.admin_addr());
    extra.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
    let (status, head) = read_response_head(&mut extra);
    assert_eq!(status, 503, "{head}");
    assert_eq!(header_value(&head, "retry-after").as_deref(), Some("10"));
    // One ends: a place frees up.
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut s = raw_connect(server.admin_addr());
        s.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
        if read_response_head(&mut s).0 == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no stream place freed after one closed");
    }
}
