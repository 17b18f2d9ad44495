//! The delivery promises of PROTOCOL.md ("Ordering and delivery promises", "Slow
//! consumers") with clients unlike the project's own: clients that never `sync`, send the
//! moment they have their `hello`, vanish without a close, reconnect with the same device
//! id, or never read. Each test is the black-box regression test of one bug of issue 16,
//! seen failing on 09b12f1 before its fix.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::redis::free_port;
use common::*;
use serde_json::{json, Value};

/// Production heartbeats: the first ping comes 12.5 to 25 s after connecting, so nothing
/// a test sees here can be a side effect of a heartbeat.
const PRODUCTION_HEARTBEATS: &str = "[heartbeat]\nping_interval_ms = 25000\nidle_timeout_ms = 60000\n";

/// The next JSON text frame of a raw connection (pings skipped).
fn raw_json(stream: &mut TcpStream) -> Value {
    let frame = read_frame_skip_pings(stream);
    assert_eq!(frame.opcode, OP_TEXT, "not a text frame: {frame:?}");
    serde_json::from_slice(&frame.payload).expect("server text is JSON")
}

/// A raw `/ws` connection as `user`/`device` with a receive buffer of `rcvbuf` bytes;
/// returns it once its `hello` has been read.
fn raw_client(server: &Server, user: &str, device: &str, rcvbuf: usize) -> TcpStream {
    let mut stream = connect_small_rcvbuf(server.client_addr(), rcvbuf);
    let token = server.token(user, device, 3600);
    stream.write_all(upgrade_request(&format!("/ws?token={token}"), &[]).as_bytes()).expect("upgrade");
    assert_eq!(read_response_head(&mut stream).0, 101);
    let hello = raw_json(&mut stream);
    assert_eq!(hello["op"], "hello", "{hello}");
    stream
}

#[test]
fn a_message_sent_right_after_hello_reaches_a_client_that_never_syncs() {
    // Bug 1: the hello went out before the connection was in its conversations' fan-out,
    // and live messages held for a first sync waited for the first heartbeat (12.5-25 s).
    // Every round uses fresh users and a fresh conversation, as a first contact does.
    let server = Server::start(&merge_toml(&["shards = 2", PRODUCTION_HEARTBEATS]));
    for round in 0..12 {
        let (a, b, conv) = (format!("a{round}"), format!("b{round}"), format!("c{round}"));
        server.set_members(&conv, &[&a, &b]);
        let (mut sender, _) = connect_client(&server, &a, "A");
        let mut reader = raw_client(&server, &b, "B", 1 << 20);
        // Two sends the moment the reader has its hello; it never syncs.
        let hello_read = Instant::now();
        for (i, cid) in ["k1", "k2"].into_iter().enumerate() {
            let ack = send_acked(&mut sender, &conv, cid, &json!(i + 1));
            assert_eq!(ack["seq"], i as u64 + 1, "{ack}");
        }
        for seq in [1, 2] {
            // Bounded by the harness's 5 s read timeout: the grace is 1 s.
            let frame = raw_json(&mut reader);
            assert_eq!(
                (frame["op"].as_str(), frame["conv"].as_str(), frame["seq"].as_u64()),
                (Some("msg"), Some(conv.as_str()), Some(seq)),
                "round {round}: expected msg {seq}, got {frame} ({:?} after hello)",
                hello_read.elapsed()
            );
        }
    }
}

#[test]
fn a_new_connection_hears_nothing_of_seqs_sent_before_it() {
    // Bug 2: a device that vanished and came back (same device id) was told of seqs sent
    // while it was away (a `gap`) before it asked for anything. PROTOCOL.md: a new
    // connection gets nothing about earlier seqs unless it asks with `sync`.
    let server = Server::start(&merge_toml(&["shards = 2", PRODUCTION_HEARTBEATS]));
    for round in 0..6 {
        let conv = format!("c{round}");
        server.set_members(&conv, &["u1", "u2"]);
        let (mut sender, _) = connect_client(&server, "u1", "A");
        let mut phone = raw_client(&server, "u2", "B", 1 << 20);
        let first = send_acked(&mut sender, &conv, &format!("{conv}-1"), &json!(1))["seq"].as_u64();
        let got = raw_json(&mut phone);
        assert_eq!((got["op"].as_str(), got["seq"].as_u64()), (Some("msg"), first), "{got}");
        // Gone without a word (no close frame), then ten more while it is away.
        drop(phone);
        let mut last = 0;
        for i in 2..=11 {
            last = send_acked(&mut sender, &conv, &format!("{conv}-{i}"), &json!(i))["seq"]
                .as_u64()
                .unwrap_or(0);
        }
        let mut phone = raw_client(&server, "u2", "B", 1 << 20);
        // The first thing the new connection hears of the conversation is the next seq.
        let next = send_acked(&mut sender, &conv, &format!("{conv}-next"), &json!("next"));
        assert_eq!(next["seq"].as_u64(), Some(last + 1));
        let got = raw_json(&mut phone);
        assert_eq!(
            (got["op"].as_str(), got["seq"].as_u64()),
            (Some("msg"), Some(last + 1)),
            "round {round}: the new connection heard of an earlier seq first: {got}"
        );
    }
}

#[test]
fn pushes_past_the_outbound_budget_close_the_connection_with_4002() {
    // Bug 3: a client that never reads was sent push after push with no bound; its queue
    // held megabytes and it stayed connected. PROTOCOL.md: a push that does not fit the
    // budget closes the connection with 4002 at once (not after the idle timeout).
    let server = Server::start(&merge_toml(&[
        PRODUCTION_HEARTBEATS,
        "[limits]\noutbound_queue_bytes = 65536\nmax_message_bytes = 65536",
    ]));
    let _stuck = raw_client(&server, "stuck", "phone", 4096);
    let (mut alive, _) = connect_client(&server, "alive", "phone");
    let body = json!({ "users": ["stuck"], "body": { "blob": "p".repeat(30_000) } }).to_string();
    let started = Instant::now();
    let mut sent = 0;
    while server.metric("ringpush_closes_sent_total{code=\"4002\"}") == 0 {
        assert!(
            sent < 300,
            "still connected after {sent} pushes of 30 KB in {:?}; metrics:\n{}",
            started.elapsed(),
            server.metrics()
        );
        server.api_expect("POST", "/api/v1/push", Some(&body), 202);
        sent += 1;
    }
    server.wait_presence("stuck", Duration::from_secs(5), |d| d.is_empty());
    assert_eq!(server.metric("ringpush_slow_consumer_closes_total"), 1);
    // Nobody else is harmed.
    server.api_expect("POST", "/api/v1/push", Some(r#"{"users":["alive"],"body":"still here"}"#), 202);
    assert_eq!(read_op(&mut alive, "push")["body"], "still here");
}

#[test]
fn a_sync_after_a_gap_replays_what_fits_instead_of_another_gap() {
    // Bug 4: a slow reader got a gap, synced from its start with `limit: 2`, and was
    // answered with the same gap again instead of two msgs and `synced`. PROTOCOL.md: a
    // replay is paced by the outbound budget, never thinned.
    let server = Server::start(&merge_toml(&[
        "shards = 2",
        PRODUCTION_HEARTBEATS,
        "[limits]\noutbound_queue_bytes = 65536\nsend_rate_per_sec = 100000",
    ]));
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_client_small_rcvbuf(&server, "bob", "phone", 4096);
    assert_eq!(sync(&mut bob, "c1", 0, None).synced["complete"], true);
    let text = "s".repeat(16_000);
    let total = 600;
    for i in 1..=total {
        send_msg(&mut alice, "c1", &format!("m{i}"), &json!({ "i": i, "text": text }));
        if i % 50 == 0 {
            for _ in 0..50 {
                read_op(&mut alice, "ack");
            }
        }
    }
    assert!(server.metric("ringpush_slow_consumer_gaps_total") > 0, "bob's backlog was never thinned");
    // Bob reads: msgs in order, then the gap.
    let mut next = 1;
    let gap = loop {
        let frame = read_json(&mut bob);
        match frame["op"].as_str() {
            Some("msg") => {
                assert_eq!(frame["seq"], next, "{frame}");
                next += 1;
            }
            Some("gap") => break frame,
            _ => panic!("unexpected {frame}"),
        }
    };
    assert_eq!((gap["conv"].as_str(), gap["from"].as_u64()), (Some("c1"), Some(next)), "{gap}");
    assert!(gap["to"].as_u64() >= Some(next), "{gap}");
    send_json(&mut bob, &json!({"op": "sync", "conv": "c1", "after": next - 1, "limit": 2}));
    let answer: Vec<Value> = (0..4).map(|_| read_json(&mut bob)).collect();
    assert_eq!(
        answer.iter().map(|f| (f["op"].as_str().unwrap_or("?"), f["seq"].as_u64())).collect::<Vec<_>>(),
        vec![("msg", Some(next)), ("msg", Some(next + 1)), ("synced", None), ("gap", None)],
        "{answer:?}"
    );
    assert_eq!(
        answer[2],
        json!({"op": "synced", "conv": "c1", "last": next + 1, "read": 0, "complete": true})
    );
    assert_eq!(answer[3], json!({"op": "gap", "conv": "c1", "from": next + 2, "to": total}));
}

#[test]
fn a_replay_larger_than_the_budget_is_paced_not_thinned() {
    // Bug 4, the general case: a sync whose replay is larger than the outbound budget was
    // cut into a `gap` at the budget, so catching up after a gap could only end in another
    // gap. PROTOCOL.md: a replay's msgs go out as the client drains them, never thinned.
    let server = Server::start(&merge_toml(&[
        "shards = 2",
        PRODUCTION_HEARTBEATS,
        "[limits]\noutbound_queue_bytes = 65536\nsend_rate_per_sec = 100000",
    ]));
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    // 16 MB of history: more than the kernel's socket buffers hold (4 MB at most).
    let text = "r".repeat(16_000);
    for i in 1..=1000 {
        send_msg(&mut alice, "c1", &format!("m{i}"), &json!({ "i": i, "text": text }));
        if i % 100 == 0 {
            for _ in 0..100 {
                read_op(&mut alice, "ack");
            }
        }
    }
    // Twice: from a fast reader, and from one whose socket takes 4 KiB at a time.
    for rcvbuf in [1 << 20, 4096] {
        let (mut bob, _) = connect_client_small_rcvbuf(&server, "bob", &format!("phone-{rcvbuf}"), rcvbuf);
        let result = sync(&mut bob, "c1", 0, None);
        assert!(result.other.is_empty(), "rcvbuf {rcvbuf}: frames besides the replay: {:?}", result.other);
        assert_eq!(result.seqs(), (1..=1000).collect::<Vec<_>>(), "rcvbuf {rcvbuf}");
        assert_eq!(
            result.synced,
            json!({"op": "synced", "conv": "c1", "last": 1000, "read": 0, "complete": true})
        );
    }
    assert_eq!(server.metric("ringpush_slow_consumer_gaps_total"), 0);
}

#[test]
fn a_node_killed_and_started_again_at_once_comes_up() {
    // Bug 5: a node killed with SIGKILL and started again at once (a supervisor's
    // `Restart=`) failed to bind its admin port: the dead process's io_uring releases its
    // listening sockets a few milliseconds after the process is reaped.
    let (client, admin) = (free_port(), free_port());
    let config = format!("listen = \"127.0.0.1:{client}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n");
    let mut server = Server::start(&config);
    for round in 0..5 {
        // A connection in flight, as a live node has.
        let (_ws, _) = connect_client(&server, "u1", "phone");
        server.kill();
        server = Server::start(&config);
        assert_eq!(server.client_addr().port(), client, "round {round}");
        assert_eq!(server.admin_addr().port(), admin, "round {round}");
    }
}
