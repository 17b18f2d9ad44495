//! Read marks and signals on one node (PROTOCOL.md: `read` and `signal` in both
//! directions, `synced.read`, `GET /api/v1/users/{user}/unread`, `POST
//! /api/v1/conversations/{conv}/read`). Two shards, so users, conversations and
//! connections are spread over both; two devices of one user and a third user.
//! The cluster side is in tests/cluster.rs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const BASE: &str = "shards = 2\n[heartbeat]\nidle_timeout_ms = 10000\n[limits]\nsend_rate_per_sec = 10000\n";

fn start(extra: &str) -> Server {
    Server::start(&merge_toml(&[BASE, extra]))
}

/// Sends a marker message from `ws` into `conv` and reads each of `others` until it
/// arrives, returning what came before it: proves what a connection did *not* get.
fn frames_before_marker(ws: &mut Ws, conv: &str, cid: &str, others: &mut [&mut Ws]) -> Vec<Vec<Value>> {
    let ack = send_acked(ws, conv, cid, &json!("marker"));
    let seq = ack["seq"].as_u64().expect("seq");
    others
        .iter_mut()
        .map(|other| {
            let mut frames = read_until(other, |f| f["op"] == "msg" && f["seq"] == seq);
            frames.pop();
            frames
        })
        .collect()
}

#[test]
fn a_read_mark_moves_on_every_other_device_of_the_user_and_only_up() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "tablet", &["c1"]);
    for i in 0..3 {
        send_acked(&mut bob, "c1", &format!("b{i}"), &json!(i));
        read_op(&mut laptop, "msg");
        read_op(&mut phone, "msg");
    }

    send_json(&mut laptop, &json!({"op": "read", "conv": "c1", "seq": 2, "cid": "r1"}));
    assert_eq!(read_json(&mut phone), json!({"op": "read", "conv": "c1", "seq": 2, "dev": "laptop"}));
    // Backwards: nothing moves, nobody is told. Past the last seq: clamped to it.
    send_json(&mut laptop, &json!({"op": "read", "conv": "c1", "seq": 1}));
    send_json(&mut laptop, &json!({"op": "read", "conv": "c1", "seq": 99}));
    assert_eq!(read_json(&mut phone), json!({"op": "read", "conv": "c1", "seq": 3, "dev": "laptop"}));

    // The reading device and the other user got no read frame.
    let before = frames_before_marker(&mut bob, "c1", "m1", &mut [&mut laptop, &mut phone]);
    assert_eq!(before, vec![Vec::<Value>::new(), Vec::new()], "laptop, phone");

    // `synced.read` carries the mark; a new device of the user learns it there.
    let (mut watch, _) = connect_client(&server, "alice", "watch");
    let result = sync(&mut watch, "c1", 0, None);
    assert_eq!(result.synced["read"], 3, "{}", result.synced);
    assert_eq!(result.seqs(), vec![1, 2, 3, 4]);
    let bob_synced = sync(&mut bob, "c1", 4, None).synced;
    assert_eq!(bob_synced, json!({"op": "synced", "conv": "c1", "last": 4, "read": 0, "complete": true}));

    // The unread API: alice read up to 3 of 4, bob nothing.
    let unread = server.api_expect("GET", "/api/v1/users/alice/unread", None, 200);
    assert_eq!(
        unread,
        json!({"user": "alice", "convs": [{"conv": "c1", "last_seq": 4, "read": 3, "unread": 1}]})
    );
    let unread = server.api_expect("GET", "/api/v1/users/bob/unread", None, 200);
    assert_eq!(unread["convs"][0]["unread"], 4, "{unread}");

    // A read through the API is a read of the user: every device told, with `dev` null.
    let answer =
        server.api_expect("POST", "/api/v1/conversations/c1/read", Some(r#"{"user":"bob","seq":4}"#), 200);
    assert_eq!(answer, json!({"conv": "c1", "user": "bob", "read": 4}));
    assert_eq!(read_json(&mut bob), json!({"op": "read", "conv": "c1", "seq": 4, "dev": null}));
    let unread = server.api_expect("GET", "/api/v1/users/bob/unread", None, 200);
    assert_eq!(unread, json!({"user": "bob", "convs": []}));
    assert!(server.metric("ringpush_read_marks_total") >= 3);
}

#[test]
fn reads_and_signals_of_non_members_are_refused_and_go_nowhere() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut bob, _) = connect_synced(&server, "bob", "tablet", &["c1"]);
    let (mut eve, _) = connect_client(&server, "eve", "laptop");
    send_json(&mut eve, &json!({"op": "read", "conv": "c1", "seq": 1, "cid": "r"}));
    let error = read_op(&mut eve, "error");
    assert_eq!((error["code"].as_str(), error["cid"].as_str()), (Some("not_member"), Some("r")), "{error}");
    send_json(&mut eve, &json!({"op": "signal", "conv": "c1", "cid": "s", "body": {"typing": true}}));
    let error = read_op(&mut eve, "error");
    assert_eq!((error["code"].as_str(), error["cid"].as_str()), (Some("not_member"), Some("s")), "{error}");
    send_json(&mut eve, &json!({"op": "read", "conv": "c1", "cid": "r2"}));
    assert_eq!(read_op(&mut eve, "error")["code"], "bad_request");
    let response = server.api("POST", "/api/v1/conversations/c1/read", Some(r#"{"user":"eve","seq":1}"#));
    assert_eq!(response.status, 404, "{response:?}");
    // Bob heard nothing of it: the next frame he gets is alice's message.
    server.post_message("c1", "alice", &json!("after"));
    assert_eq!(read_op(&mut bob, "msg")["body"], "after");
}

#[test]
fn a_signal_reaches_every_other_connection_of_every_member_once_and_is_never_stored() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "tablet", &["c1"]);

    send_json(&mut laptop, &json!({"op": "signal", "conv": "c1", "body": {"typing": true}}));
    let expected =
        json!({"op": "signal", "conv": "c1", "from": "alice", "dev": "laptop", "body": {"typing": true}});
    assert_eq!(read_json(&mut phone), expected);
    assert_eq!(read_json(&mut bob), expected);
    let before = frames_before_marker(&mut bob, "c1", "m1", &mut [&mut laptop, &mut phone]);
    assert_eq!(before, vec![Vec::<Value>::new(), Vec::new()], "the sender got its own signal, or twice");
    // No seq was taken and nothing is replayed.
    let result = sync(&mut phone, "c1", 0, None);
    assert_eq!(result.seqs(), vec![1]);
    assert!(result.other.is_empty(), "{:?}", result.other);
}

#[test]
fn signals_are_limited_in_size_and_rate() {
    let server = start("[limits]\nmax_signal_bytes = 64\nsignal_rate_per_sec = 2\n");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "tablet", &["c1"]);
    let big = "x".repeat(80);
    send_json(&mut alice, &json!({"op": "signal", "conv": "c1", "cid": "big", "body": big}));
    let error = read_op(&mut alice, "error");
    assert_eq!(
        (error["code"].as_str(), error["cid"].as_str()),
        (Some("bad_request"), Some("big")),
        "{error}"
    );
    // Bursts of twice the rate pass: of 10 at once, 4 pass (plus what refills meanwhile).
    for i in 0..10 {
        send_json(&mut alice, &json!({"op": "signal", "conv": "c1", "cid": format!("s{i}"), "body": i}));
    }
    let answers = send_acked_skipping_errors(&mut alice, "c1", "m");
    let refused = answers.iter().filter(|f| f["op"] == "error" && f["code"] == "rate_limited").count();
    let seq = answers.last().and_then(|ack| ack["seq"].as_u64()).expect("ack seq");
    let got = read_until(&mut bob, |f| f["op"] == "msg" && f["seq"] == seq);
    let passed: Vec<u64> = got[..got.len() - 1]
        .iter()
        .map(|f| {
            assert_eq!(f["op"], "signal", "{f}");
            f["body"].as_u64().expect("body")
        })
        .collect();
    assert!((4..=6).contains(&passed.len()), "passed {passed:?}");
    assert_eq!(passed.len() + refused, 10, "passed {passed:?}, refused {refused}");
    assert_eq!(passed, (0..passed.len() as u64).collect::<Vec<_>>(), "in order, the first ones");
}

#[test]
fn a_slow_consumer_misses_signals_but_is_not_closed_and_still_gets_every_message() {
    let server = start("[limits]\noutbound_queue_bytes = 4096\nsignal_rate_per_sec = 100000\n");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut bob, _) = connect_client_small_rcvbuf(&server, "bob", "phone", 4096);
    let synced = sync(&mut bob, "c1", 0, None);
    assert!(synced.msgs.is_empty());
    // Bob does not read: signals pile up past his budget and are dropped.
    let body = json!({"typing": true, "pad": "y".repeat(900)});
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while server.metric("ringpush_signals_dropped_total") == 0 {
        assert!(Instant::now() < deadline, "no signal dropped after {sent}");
        for _ in 0..50 {
            send_json(&mut alice, &json!({"op": "signal", "conv": "c1", "body": body}));
            sent += 1;
        }
    }
    let answers = send_acked_skipping_errors(&mut alice, "c1", "after");
    let seq = answers.last().expect("ack")["seq"].as_u64().expect("seq");
    // Bob reads now: some signals, then the message; never a close or a gap.
    let frames = read_until(&mut bob, |f| f["op"] == "msg" && f["seq"] == seq);
    for frame in &frames[..frames.len() - 1] {
        assert_eq!(frame["op"], "signal", "{frame}");
    }
    assert!(frames.len() - 1 < sent, "every signal arrived although some were dropped");
    assert_eq!(server.metric("ringpush_slow_consumer_closes_total"), 0);
    assert_eq!(server.metric("ringpush_slow_consumer_gaps_total"), 0);
}

/// Sends into `conv` and reads until its ack; returns every frame read, the ack last.
fn send_acked_skipping_errors(ws: &mut Ws, conv: &str, cid: &str) -> Vec<Value> {
    send_msg(ws, conv, cid, &json!(cid));
    read_until(ws, |f| f["op"] == "ack")
}
