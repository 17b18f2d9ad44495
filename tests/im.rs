//! Wire tests of the instant-messaging layer against PROTOCOL.md: `send` and its `ack`,
//! fan-out to every other connection of every member, idempotency, `sync` and history,
//! errors and the rate limit, slow consumers (`gap`, 4002) and the admin API around
//! conversations, pushes and presence. Each test starts its own `ringpush serve` with two
//! shards, so conversations, users and connections are spread over both.
//!
//! A connection is only known to take part in a conversation's live traffic once a `sync`
//! of it has been answered (PROTOCOL.md: clients `sync` after `hello`), so every client
//! here syncs its conversations before traffic starts (`connect_synced`).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// What every server here starts from (over the harness's base): clients that are busy
/// elsewhere for a moment are not dropped as idle, and sends are not rate limited unless a
/// test says so.
const IM: &str = "shards = 2\n[heartbeat]\nidle_timeout_ms = 10000\n[limits]\nsend_rate_per_sec = 10000\n";

fn start(extra: &str) -> Server {
    Server::start(&merge_toml(&[IM, extra]))
}

/// Reads the next frame and asserts it is exactly `expected`.
fn expect_frame(ws: &mut Ws, who: &str, expected: &Value) {
    let got = read_json(ws);
    assert_eq!(&got, expected, "{who}");
}

/// Asserts `frame` is `{"op":"error","code":code,...}` with `cid` (or without one).
fn assert_error(frame: &Value, code: &str, cid: Option<&str>, what: &str) {
    assert_eq!(frame["op"], "error", "{what}: {frame}");
    assert_eq!(frame["code"], code, "{what}: {frame}");
    assert!(frame["message"].is_string(), "{what}: no message: {frame}");
    match cid {
        Some(cid) => assert_eq!(frame["cid"], cid, "{what}: {frame}"),
        None => assert!(frame.get("cid").is_none_or(Value::is_null), "{what}: unexpected cid: {frame}"),
    }
}

// ---------------------------------------------------------------------------------------
// send, ack, msg
// ---------------------------------------------------------------------------------------

#[test]
fn send_is_acked_to_the_sender_and_delivered_to_every_other_connection() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "tablet", &["c1"]);

    let body = json!({"text": "héllo, bob ✓", "list": [1, 2.5, null, true], "nested": {"k": "v"}});
    let before = unix_ms();
    send_msg(&mut laptop, "c1", "a1b2", &body);
    let ack = read_op(&mut laptop, "ack");
    let after = unix_ms();
    let ts = ack["ts"].as_u64().unwrap_or_else(|| panic!("ack without ts: {ack}"));
    assert!(
        before.saturating_sub(1000) <= ts && ts <= after + 1000,
        "ts {ts} not within [{before}, {after}]"
    );
    assert_eq!(ack, json!({"op": "ack", "conv": "c1", "cid": "a1b2", "seq": 1, "ts": ts}));

    let msg = json!({
        "op": "msg", "conv": "c1", "seq": 1, "from": "alice", "dev": "laptop", "cid": "a1b2",
        "ts": ts, "body": body,
    });
    expect_frame(&mut phone, "alice's other device", &msg);
    expect_frame(&mut bob, "bob", &msg);

    // The sending connection gets no msg for its own send: the next frame it sees is bob's
    // answer (same conversation, so ordered after seq 1 on every connection).
    let ack2 = send_acked(&mut bob, "c1", "b1", &json!("hi alice"));
    assert_eq!(ack2["seq"], 2, "{ack2}");
    let reply = json!({
        "op": "msg", "conv": "c1", "seq": 2, "from": "bob", "dev": "tablet", "cid": "b1",
        "ts": ack2["ts"], "body": "hi alice",
    });
    expect_frame(&mut laptop, "the sending laptop", &reply);
    expect_frame(&mut phone, "alice's phone", &reply);
    assert_eq!(server.conversation("c1")["last_seq"], 2);
}

#[test]
fn concurrent_senders_get_one_gapless_order_seen_identically_everywhere() {
    const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
    const PER_SENDER: u64 = 50;
    const N: u64 = PER_SENDER * USERS.len() as u64;
    let server = start("");
    server.set_members("group", &USERS);

    // Device "a" of every user sends, device "b" only receives; all eight read everything.
    // Every connection is in place before the first send.
    let mut clients = Vec::new();
    for user in USERS {
        for device in ["a", "b"] {
            clients.push((user, device, connect_synced(&server, user, device, &["group"]).0));
        }
    }
    let barrier = Arc::new(Barrier::new(USERS.len()));
    let mut threads = Vec::new();
    for (user, device, mut ws) in clients {
        let barrier = barrier.clone();
        let thread = std::thread::spawn(move || {
            if device == "a" {
                barrier.wait();
                for i in 0..PER_SENDER {
                    let body = json!({"user": user, "i": i});
                    send_msg(&mut ws, "group", &format!("{user}-{i}"), &body);
                }
            }
            let (mut acks, mut msgs) = (Vec::new(), Vec::new());
            while acks.len() + msgs.len() < N as usize {
                let frame = read_json(&mut ws);
                match frame["op"].as_str() {
                    Some("ack") => acks.push(frame),
                    Some("msg") => msgs.push(frame),
                    _ => panic!("{user}/{device}: unexpected {frame}"),
                }
            }
            (acks, msgs)
        });
        threads.push((user, device, thread));
    }
    let results: Vec<(&str, &str, Vec<Value>, Vec<Value>)> = threads
        .into_iter()
        .map(|(user, device, t)| {
            let (acks, msgs) = t.join().unwrap_or_else(|_| panic!("reader of {user}/{device} failed"));
            (user, device, acks, msgs)
        })
        .collect();

    // The reference: what u0's receiving device saw, which must be 1..=N.
    let reference: BTreeMap<u64, Value> = results
        .iter()
        .find(|r| r.0 == "u0" && r.1 == "b")
        .map(|r| r.3.iter().map(|m| (m["seq"].as_u64().unwrap_or(0), m.clone())).collect())
        .unwrap_or_default();
    for (user, device, acks, msgs) in &results {
        let who = format!("{user}/{device}");
        let msg_seqs = seqs(msgs);
        assert!(
            msg_seqs.windows(2).all(|w| w[0] < w[1]),
            "{who}: msgs not strictly increasing: {msg_seqs:?}"
        );
        for m in msgs {
            assert_eq!(Some(m), reference.get(&m["seq"].as_u64().unwrap_or(0)), "{who}: differs from u0/b");
            assert!(!(m["from"] == *user && m["dev"] == *device), "{who} got its own message back: {m}");
        }
        if *device == "b" {
            assert_eq!(msg_seqs, (1..=N).collect::<Vec<_>>(), "{who}");
            assert!(acks.is_empty(), "{who}: acks for sends it never made: {acks:?}");
            continue;
        }
        // A sender: its acks come in the order of its sends, with seqs increasing, and
        // acks plus msgs are every seq exactly once.
        let cids: Vec<&str> = acks.iter().map(|a| a["cid"].as_str().unwrap_or("")).collect();
        let sent: Vec<String> = (0..PER_SENDER).map(|i| format!("{user}-{i}")).collect();
        assert_eq!(cids, sent, "{who}: acks");
        let ack_seqs = seqs(acks);
        assert!(ack_seqs.windows(2).all(|w| w[0] < w[1]), "{who}: ack seqs not increasing: {ack_seqs:?}");
        let mut all: Vec<u64> = ack_seqs.iter().chain(&msg_seqs).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (1..=N).collect::<Vec<_>>(), "{who}: acks + msgs");
        for ack in acks.iter() {
            let m = &reference[&ack["seq"].as_u64().unwrap_or(0)];
            assert_eq!(
                (&m["cid"], &m["from"], &m["dev"], &m["ts"]),
                (&ack["cid"], &json!(user), &json!("a"), &ack["ts"])
            );
        }
    }
    assert_eq!(server.conversation("group")["last_seq"], N);
}

/// Messages the server has for one connection at the same moment go out in one socket
/// write (the shard's flusher), not one write each: what makes deliveries cheap at load.
#[test]
fn messages_that_arrive_together_leave_in_few_writes() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    let writes_before = server.metric("ringpush_socket_writes_total");
    let frames_before = server.metric("ringpush_frames_out_total");

    // 100 sends in one TCP write: 100 acks for alice, 100 msgs for bob.
    const N: u64 = 100;
    for i in 1..=N {
        let send = json!({"op": "send", "conv": "c1", "cid": format!("m{i}"), "body": i});
        alice.write(tungstenite::Message::text(send.to_string())).expect("queue a send");
    }
    alice.flush().expect("write the sends");
    let acks: Vec<Value> = (0..N).map(|_| read_op(&mut alice, "ack")).collect();
    assert_eq!(seqs(&acks), (1..=N).collect::<Vec<_>>());
    let msgs: Vec<Value> = (0..N).map(|_| read_op(&mut bob, "msg")).collect();
    assert_eq!(seqs(&msgs), (1..=N).collect::<Vec<_>>());

    let frames = server.metric("ringpush_frames_out_total") - frames_before;
    let writes = server.metric("ringpush_socket_writes_total") - writes_before;
    assert_eq!(frames, 2 * N, "frames queued for the two clients");
    assert!(writes * 4 <= frames, "{frames} frames took {writes} writes");
}

// ---------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------

#[test]
fn a_repeated_cid_is_acked_with_its_first_seq_and_not_delivered_again() {
    let server = start("[limits]\ndedupe_window_ms = 300");
    server.set_members("c1", &["alice", "bob", "carol"]);
    server.set_members("c2", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1", "c2"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1", "c2"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1", "c2"]);
    let (mut carol, _) = connect_synced(&server, "carol", "phone", &["c1"]);

    let first = send_acked(&mut laptop, "c1", "m1", &json!("first"));
    assert_eq!(first["seq"], 1);
    assert_eq!(read_op(&mut bob, "msg")["seq"], 1);
    assert_eq!(read_op(&mut phone, "msg")["seq"], 1);
    assert_eq!(read_op(&mut carol, "msg")["seq"], 1);

    // The same (user, conv, cid) again, from the same connection and from another device
    // of the same user, even with another body: the first seq, nothing delivered.
    let again = send_acked(&mut laptop, "c1", "m1", &json!("first, resent"));
    assert_eq!(again["seq"], 1, "{again}");
    let other_device = send_acked(&mut phone, "c1", "m1", &json!("first, from the phone"));
    assert_eq!(other_device["seq"], 1, "{other_device}");
    server.wait_metric("ringpush_messages_deduplicated_total", Duration::from_secs(2), |v| v == 2);

    // Another user with the same cid is another message; it is the next thing everyone
    // gets (one conversation, one order), which shows nothing was delivered for the repeats.
    let carols = send_acked(&mut carol, "c1", "m1", &json!("carol's m1"));
    assert_eq!(carols["seq"], 2, "{carols}");
    for (who, ws) in [("bob", &mut bob), ("laptop", &mut laptop), ("phone", &mut phone)] {
        let m = read_op(ws, "msg");
        assert_eq!(
            (m["seq"].as_u64(), m["from"].as_str(), m["body"].as_str()),
            (Some(2), Some("carol"), Some("carol's m1")),
            "{who}"
        );
    }
    // The same cid in another conversation is another message too.
    let in_c2 = send_acked(&mut laptop, "c2", "m1", &json!("m1 in c2"));
    assert_eq!((in_c2["conv"].as_str(), in_c2["seq"].as_u64()), (Some("c2"), Some(1)), "{in_c2}");
    assert_eq!(read_op(&mut bob, "msg")["conv"], "c2");
    assert_eq!(read_op(&mut phone, "msg")["conv"], "c2");

    // Once dedupe_window_ms has passed since the first send, m1 is new again. The server's
    // own clock decides: repeat until an ack carries a new seq, and check by the acks' ts
    // that this happened no earlier than the window and not much later.
    let first_ts = first["ts"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut repeats = 2;
    let fresh = loop {
        let ack = send_acked(&mut laptop, "c1", "m1", &json!("m1 after the window"));
        if ack["seq"] != 1 {
            break ack;
        }
        repeats += 1;
        assert!(Instant::now() < deadline, "m1 still a repeat 3 s after it was first sent");
    };
    assert_eq!(fresh["seq"], 3, "{fresh}");
    let fresh_ts = fresh["ts"].as_u64().unwrap_or(0);
    assert!(
        fresh_ts >= first_ts + 300,
        "m1 was new again {} ms after it was first sent (window 300 ms)",
        fresh_ts - first_ts
    );
    assert!(fresh_ts < first_ts + 1300, "m1 was a repeat for {} ms (window 300 ms)", fresh_ts - first_ts);
    assert_eq!(server.metric("ringpush_messages_deduplicated_total"), repeats);
    // Every repeat was answered without a delivery: bob's next msg in c1 is seq 3.
    let m = read_op(&mut bob, "msg");
    assert_eq!(
        (m["conv"].as_str(), m["seq"].as_u64(), m["cid"].as_str()),
        (Some("c1"), Some(3), Some("m1")),
        "{m}"
    );
    assert_eq!(server.conversation("c1")["last_seq"], 3);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn non_members_get_not_member_for_send_and_sync_and_nothing_is_delivered() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    let (mut mallory, _) = connect_client(&server, "mallory", "phone");

    send_msg(&mut mallory, "c1", "evil-1", &json!("let me in"));
    assert_error(&read_json(&mut mallory), "not_member", Some("evil-1"), "send into c1");
    // A conversation nobody created is no different.
    send_msg(&mut mallory, "nowhere", "evil-2", &json!("hello?"));
    assert_error(&read_json(&mut mallory), "not_member", Some("evil-2"), "send into an unknown conversation");

    send_json(&mut mallory, &json!({"op": "sync", "conv": "c1", "after": 0}));
    assert_error(&read_json(&mut mallory), "not_member", None, "sync c1");
    // Nothing was sequenced or delivered: the members' next message is seq 1.
    let ack = send_acked(&mut alice, "c1", "a1", &json!("members only"));
    assert_eq!(ack["seq"], 1, "{ack}");
    let m = read_op(&mut bob, "msg");
    assert_eq!((m["seq"].as_u64(), m["from"].as_str()), (Some(1), Some("alice")), "{m}");
    assert_eq!(server.conversation("c1")["last_seq"], 1);
    // The refused client is still served.
    send_json(&mut mallory, &json!({"op": "nope", "cid": "still-here"}));
    assert_error(&read_json(&mut mallory), "unknown_op", Some("still-here"), "after the refusals");

    // PROTOCOL.md: an error carries the request's cid "when the request had one".
    send_json(&mut mallory, &json!({"op": "sync", "conv": "c1", "after": 0, "cid": "evil-3"}));
    assert_error(&read_json(&mut mallory), "not_member", Some("evil-3"), "sync c1 with a cid");
    assert_eq!(server.metric("ringpush_requests_refused_total{code=\"not_member\"}"), 4);
}

#[test]
fn malformed_requests_get_bad_request_or_unknown_op_and_the_connection_stays() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    let cid65 = "x".repeat(65);
    let conv129 = "c".repeat(129);
    // (what, the frame's text, the error code, the cid the error must carry)
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        ("send without conv", r#"{"op":"send","cid":"k1","body":1}"#.into(), "bad_request", Some("k1")),
        (
            "send, bad conv id",
            r#"{"op":"send","conv":"c 1","cid":"k2","body":1}"#.into(),
            "bad_request",
            Some("k2"),
        ),
        (
            "send, empty conv",
            r#"{"op":"send","conv":"","cid":"k3","body":1}"#.into(),
            "bad_request",
            Some("k3"),
        ),
        (
            "send, 129-char conv",
            format!(r#"{{"op":"send","conv":"{conv129}","cid":"k4","body":1}}"#),
            "bad_request",
            Some("k4"),
        ),
        (
            "send, conv a number",
            r#"{"op":"send","conv":7,"cid":"k5","body":1}"#.into(),
            "bad_request",
            Some("k5"),
        ),
        ("send without cid", r#"{"op":"send","conv":"c1","body":1}"#.into(), "bad_request", None),
        ("send, empty cid", r#"{"op":"send","conv":"c1","cid":"","body":1}"#.into(), "bad_request", None),
        (
            "send, 65-char cid",
            format!(r#"{{"op":"send","conv":"c1","cid":"{cid65}","body":1}}"#),
            "bad_request",
            Some(&cid65),
        ),
        ("send without body", r#"{"op":"send","conv":"c1","cid":"k6"}"#.into(), "bad_request", Some("k6")),
        ("sync without conv", r#"{"op":"sync","cid":"k7","after":0}"#.into(), "bad_request", Some("k7")),
        ("sync, bad conv id", r#"{"op":"sync","conv":"c/1","cid":"k8"}"#.into(), "bad_request", Some("k8")),
        ("sync, negative after", r#"{"op":"sync","conv":"c1","after":-1}"#.into(), "bad_request", None),
        ("a JSON array", r#"["send","c1","k9",1]"#.into(), "bad_request", None),
        (
            "unknown op",
            r#"{"op":"publish","conv":"c1","cid":"k10","body":1}"#.into(),
            "unknown_op",
            Some("k10"),
        ),
        ("no op", r#"{"conv":"c1","cid":"k11","body":1}"#.into(), "bad_request", Some("k11")),
    ];
    // Every case is tried; the mismatches are reported together.
    let mut wrong = Vec::new();
    for (what, text, code, cid) in &cases {
        send_text(&mut alice, text);
        let got = read_json(&mut alice);
        let got_cid = got.get("cid").and_then(Value::as_str);
        if got["op"] != "error" || got["code"] != *code || got_cid != *cid || !got["message"].is_string() {
            wrong.push(format!("{what}: expected {code} with cid {cid:?}, got {got}"));
        }
    }
    // A 64-char cid and a null body are fine, and nothing before them was sequenced.
    let cid64 = "y".repeat(64);
    let ack = send_acked(&mut alice, "c1", &cid64, &Value::Null);
    assert_eq!(ack["seq"], 1, "{ack}");
    let m = read_op(&mut bob, "msg");
    assert_eq!(
        (m["seq"].as_u64(), m["cid"].as_str(), &m["body"]),
        (Some(1), Some(cid64.as_str()), &Value::Null),
        "{m}"
    );
    let bad = cases.iter().filter(|c| c.2 == "bad_request").count() as u64;
    assert_eq!(server.metric("ringpush_requests_refused_total{code=\"bad_request\"}"), bad);
    assert_eq!(server.metric("ringpush_requests_refused_total{code=\"unknown_op\"}"), 1);
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
}

#[test]
fn sends_over_the_rate_limit_get_rate_limited() {
    let server = start("[limits]\nsend_rate_per_sec = 5");
    server.set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);

    // A burst of 30 written at once: the bucket holds twice the rate (10).
    for i in 0..30 {
        send_msg(&mut laptop, "c1", &format!("b{i}"), &json!(i));
    }
    // Refusals are answered at once, acks after the owner shard sequenced the message:
    // the answers need not come in the order of the sends.
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..30 {
        let frame = read_json(&mut laptop);
        match frame["op"].as_str() {
            Some("ack") => acked.push(frame),
            _ => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                limited.push(frame["cid"].as_str().unwrap_or_else(|| panic!("no cid: {frame}")).to_owned());
            }
        }
    }
    let mut answered: Vec<String> = limited
        .iter()
        .cloned()
        .chain(acked.iter().map(|a| a["cid"].as_str().unwrap_or("").to_owned()))
        .collect();
    answered.sort();
    let mut sent: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    sent.sort();
    assert_eq!(answered, sent, "every send answered once");
    let cids: Vec<String> = acked.iter().map(|a| a["cid"].as_str().unwrap_or("").to_owned()).collect();
    assert!((10..=11).contains(&acked.len()), "{} of a burst of 30 acked at 5/s: {cids:?}", acked.len());
    let first: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    assert_eq!(&cids[..10], &first[..], "the first ten sends of a fresh connection pass");
    assert_eq!(seqs(&acked), (1..=acked.len() as u64).collect::<Vec<_>>());
    assert_eq!(server.metric("ringpush_requests_refused_total{code=\"rate_limited\"}"), limited.len() as u64);
    // Only what was acked was delivered.
    let got = read_until(&mut bob, |m| m["seq"] == acked.len());
    assert_eq!(got.iter().map(|m| m["cid"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>(), cids);

    let on_phone = read_until(&mut phone, |m| m["seq"] == acked.len());
    assert_eq!(seqs(&on_phone), seqs(&acked), "alice's phone");
    // The limit is per connection: alice's phone is not limited.
    let ack = send_acked(&mut phone, "c1", "p1", &json!("from the phone"));
    assert_eq!(ack["seq"], acked.len() as u64 + 1);
    assert_eq!(read_op(&mut laptop, "msg")["seq"], ack["seq"]);
    // And it refills: after the next server ping (every 200 ms, one token at 5/s) a
    // send passes again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match laptop.read() {
            Ok(tungstenite::Message::Ping(_)) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("waiting for a ping: {e}"),
        }
        send_msg(&mut laptop, "c1", "later", &json!("later"));
        let frame = read_json(&mut laptop);
        if frame["op"] == "ack" {
            break;
        }
        assert_error(&frame, "rate_limited", Some("later"), "a send after a pause");
        assert!(Instant::now() < deadline, "the bucket never refilled");
    }
}

// ---------------------------------------------------------------------------------------
// sync and history
// ---------------------------------------------------------------------------------------

#[test]
fn a_client_that_never_syncs_gets_live_messages_in_order_after_the_grace() {
    // A new connection's live messages wait (1 s) for its first sync; a client that never
    // syncs gets them when the wait ends: in order, once each, and then live as usual.
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    let started = Instant::now();
    let mut n = 0;
    // Traffic spread over longer than the grace; the pause paces the load, it waits for
    // nothing.
    while started.elapsed() < Duration::from_millis(1600) {
        n += 1;
        send_acked(&mut alice, "c1", &format!("m{n}"), &json!(n));
        std::thread::sleep(Duration::from_millis(10));
    }
    let frames = read_until(&mut bob, |f| f["seq"] == n);
    assert!(frames.iter().all(|f| f["op"] == "msg"), "{frames:?}");
    let got = seqs(&frames);
    assert!(!got.is_empty());
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "not consecutive: {got:?}");
    assert_eq!(got.last(), Some(&n));
}

#[test]
fn holding_for_the_first_sync_is_bounded_by_the_outbound_budget() {
    // Past `outbound_queue_bytes` of held messages the grace ends at once: the client gets
    // them (in order) long before the 1 s grace would have run out.
    let server = start("[limits]\noutbound_queue_bytes = 4096");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    let hello_read = Instant::now();
    let text = "y".repeat(300);
    for i in 1..=100 {
        send_acked(&mut alice, "c1", &format!("m{i}"), &json!({ "i": i, "text": text }));
    }
    let first = read_json(&mut bob);
    assert!(hello_read.elapsed() < Duration::from_millis(800), "held for the whole grace");
    let mut frames = vec![first];
    frames.extend(read_until(&mut bob, |f| f["seq"] == 100));
    assert!(frames.iter().all(|f| f["op"] == "msg"), "{frames:?}");
    let got = seqs(&frames);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "not consecutive: {got:?}");
    assert_eq!(got.last(), Some(&100));
}

#[test]
fn sync_after_a_reconnect_replays_exactly_the_missed_messages() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    for i in 1..=2 {
        send_acked(&mut alice, "c1", &format!("before-{i}"), &json!({"i": i}));
        assert_eq!(read_op(&mut bob, "msg")["seq"], i);
    }
    bob.close(None).expect("close");
    finish_close(&mut bob, Duration::from_secs(2));

    let mut sent = Vec::new();
    for i in 1..=5 {
        let body = json!({"missed": i});
        let ack = send_acked(&mut alice, "c1", &format!("missed-{i}"), &body);
        sent.push(json!({
            "op": "msg", "conv": "c1", "seq": ack["seq"], "from": "alice", "dev": "phone",
            "cid": format!("missed-{i}"), "ts": ack["ts"], "body": body,
        }));
    }
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    let result = sync(&mut bob, "c1", 2, None);
    assert!(result.other.is_empty(), "{result:?}");
    assert_eq!(result.msgs, sent, "the replay");
    assert_eq!(result.synced, json!({"op": "synced", "conv": "c1", "last": 7, "read": 0, "complete": true}));
    // Live delivery follows.
    let ack = send_acked(&mut alice, "c1", "after", &json!("live again"));
    assert_eq!(ack["seq"], 8);
    assert_eq!(read_op(&mut bob, "msg")["seq"], 8);
    // A sync with nothing new answers synced alone.
    let result = sync(&mut bob, "c1", 8, None);
    assert!(result.msgs.is_empty() && result.other.is_empty(), "{result:?}");
    assert_eq!(result.synced, json!({"op": "synced", "conv": "c1", "last": 8, "read": 0, "complete": true}));
}

/// One round of `sync_racing_live_traffic_yields_every_seq_once_in_order`: alice streams
/// `n` messages; once `start_at` are in, bob connects and, `link_delay` after reading his
/// `hello`, syncs after 0 and reads on. Returns what bob saw, if it is not 1..=n in order.
fn sync_racing_round(n: u64, start_at: u64, link_delay: Duration) -> Result<(), String> {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (progress_tx, progress_rx) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        for i in 1..=n {
            let ack = send_acked(&mut alice, "c1", &format!("m{i}"), &json!({"i": i}));
            assert_eq!(ack["seq"], i, "{ack}");
            let _ = progress_tx.send(i);
        }
    });
    while progress_rx.recv_timeout(IO_TIMEOUT).expect("the sender stalled") < start_at {}
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    // A client's request reaches the server one link latency after the hello left it;
    // there is no event to wait for here, the delay is the client's network.
    std::thread::sleep(link_delay);
    send_json(&mut bob, &json!({"op": "sync", "conv": "c1", "after": 0}));
    let mut got = Vec::new();
    let mut synced = None;
    while got.last() != Some(&n) || synced.is_none() {
        let frame = read_json(&mut bob);
        match frame["op"].as_str() {
            Some("msg") => got.push(frame["seq"].as_u64().unwrap_or(0)),
            Some("synced") => {
                assert!(synced.is_none(), "two synced frames");
                synced = Some((frame, got.len()));
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    sender.join().expect("sender");
    let (synced, at) = synced.ok_or("no synced")?;
    assert_eq!(synced["complete"], true, "{synced}");
    if got != (1..=n).collect::<Vec<_>>() {
        let replay_start = got.iter().position(|&s| s == 1).unwrap_or(0);
        let live = &got[..replay_start];
        return Err(format!(
            "{} live msgs ({:?}..={:?}) before the replay from 1; synced last {} after {at} msgs",
            live.len(),
            live.first(),
            live.last(),
            synced["last"],
        ));
    }
    assert_eq!(synced["last"], at, "synced must follow the replay, which ends at `last`");
    Ok(())
}

#[test]
fn sync_racing_live_traffic_yields_every_seq_once_in_order() {
    // PROTOCOL.md: every connection sees a conversation's msgs in strictly increasing seq;
    // a client syncs after hello. Bob connects while alice streams and syncs right after
    // his hello, from this machine (no latency) and over a 20 ms link.
    let mut failed = Vec::new();
    for link_ms in [0, 20] {
        for start_at in [20, 60, 100, 20, 60, 100] {
            let link_delay = Duration::from_millis(link_ms);
            if let Err(e) = sync_racing_round(200, start_at, link_delay) {
                failed.push(format!("link {link_ms} ms, bob connected after {start_at} msgs: {e}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "msgs out of order or twice on the syncing connection:\n{}",
        failed.join("\n")
    );
}

#[test]
fn sync_reports_history_trimmed_to_max_per_conv() {
    let server = start("[history]\nmax_per_conv = 5");
    server.set_members("c1", &["alice", "bob"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    for i in 1..=12 {
        send_acked(&mut alice, "c1", &format!("m{i}"), &json!(i));
    }
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    // Syncs after `after`: the replay must start at `first` and end at 12.
    let check = |bob: &mut Ws, after: u64, first: u64, complete: bool| {
        let result = sync(bob, "c1", after, None);
        assert!(result.other.is_empty(), "after {after}: {result:?}");
        assert_eq!(result.seqs(), (first..=12).collect::<Vec<_>>(), "after {after}");
        for m in &result.msgs {
            assert_eq!(m["body"], m["seq"], "after {after}: {m}");
        }
        assert_eq!(
            result.synced,
            json!({"op": "synced", "conv": "c1", "last": 12, "read": 0, "complete": complete}),
            "after {after}"
        );
    };
    check(&mut bob, 0, 8, false);
    check(&mut bob, 6, 8, false);
    check(&mut bob, 7, 8, true);
    check(&mut bob, 9, 10, true);
    check(&mut bob, 12, 13, true);

    // `limit` bounds the replay; `synced` then names the last seq replayed.
    send_json(&mut bob, &json!({"op": "sync", "conv": "c1", "after": 7, "limit": 2}));
    assert_eq!(seqs(&[read_op(&mut bob, "msg"), read_op(&mut bob, "msg")]), vec![8, 9]);
    assert_eq!(
        read_json(&mut bob),
        json!({"op": "synced", "conv": "c1", "last": 9, "read": 0, "complete": true})
    );
    // What the limit left out is a gap; live messages of c1 then wait for the client's
    // next sync, whose replay carries them, so nothing arrives twice or out of order.
    assert_eq!(read_json(&mut bob), json!({"op": "gap", "conv": "c1", "from": 10, "to": 12}));
    let seq = server.post_message("c1", "system", &json!(13));
    assert_eq!(seq, 13);
    let result = sync(&mut bob, "c1", 9, None);
    assert!(result.other.is_empty(), "{result:?}");
    assert_eq!(result.seqs(), vec![10, 11, 12, 13]);
    // From here live messages flow again.
    assert_eq!(server.post_message("c1", "system", &json!(14)), 14);
    assert_eq!(read_op(&mut bob, "msg")["seq"], 14);
}

// ---------------------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------------------

#[test]
fn a_slow_reader_gets_a_gap_and_catches_up_with_sync_while_others_get_everything() {
    let server = start("[limits]\noutbound_queue_bytes = 4096\n[history]\nmax_per_conv = 50000");
    server.set_members("c1", &["alice", "bob", "carol"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut carol, _) = connect_synced(&server, "carol", "phone", &["c1"]);
    // Bob's socket takes little, so what he does not read piles up on the server.
    let (mut bob, _) = connect_client_small_rcvbuf(&server, "bob", "phone", 4096);
    assert_eq!(sync(&mut bob, "c1", 0, None).synced["complete"], true);

    let carol_reader = std::thread::spawn(move || read_until(&mut carol, |f| f["body"]["last"] == true));
    // Flood until the server has had to give up on bob's backlog (the kernel's socket
    // buffers take megabytes first), then a little more, then a last message.
    let text = "x".repeat(1000);
    let started = Instant::now();
    let mut n = 0;
    let mut extra_batches = None;
    while extra_batches != Some(0) {
        for _ in 0..50 {
            n += 1;
            send_msg(&mut alice, "c1", &format!("m{n}"), &json!({"n": n, "text": text}));
        }
        for _ in 0..50 {
            read_op(&mut alice, "ack");
        }
        extra_batches = match extra_batches {
            None if server.metric("ringpush_slow_consumer_gaps_total") > 0 => Some(3),
            None => None,
            Some(k) => Some(k - 1),
        };
        assert!(n < 30_000 && started.elapsed() < Duration::from_secs(4), "no gap after {n} messages");
    }
    n += 1;
    send_acked(&mut alice, "c1", "last", &json!({"n": n, "last": true}));

    // Carol read all the while: every message, no gap.
    let carols = carol_reader.join().expect("carol's reader");
    assert!(carols.iter().all(|f| f["op"] == "msg"), "carol got something else than msgs");
    assert_eq!(seqs(&carols), (1..=n).collect::<Vec<_>>(), "carol");

    // Bob reads again: msgs in order up to a gap; after the gap nothing of c1 comes
    // until he syncs (so nothing can arrive twice or out of order).
    let mut live = Vec::new();
    let gap = loop {
        let frame = read_json(&mut bob);
        match frame["op"].as_str() {
            Some("msg") => live.push(frame),
            Some("gap") => break frame,
            _ => panic!("unexpected {frame}"),
        }
    };
    let from = gap["from"].as_u64().expect("gap.from");
    assert_eq!(seqs(&live), (1..from).collect::<Vec<_>>(), "msgs before the gap");
    assert!(gap["to"].as_u64() >= Some(from), "{gap}");
    // The sync PROTOCOL.md prescribes brings the rest.
    let after = from - 1;
    let result = sync(&mut bob, "c1", after, None);
    assert!(result.other.is_empty(), "frames besides the replay: {:?}", result.other);
    assert_eq!(result.synced, json!({"op": "synced", "conv": "c1", "last": n, "read": 0, "complete": true}));
    assert_eq!(result.seqs(), (after + 1..=n).collect::<Vec<_>>(), "the replay after {after}");
    let mut full: Vec<&Value> = live.iter().filter(|m| m["seq"].as_u64() <= Some(after)).collect();
    full.extend(result.msgs.iter());
    let carols: Vec<&Value> = carols.iter().collect();
    assert!(full == carols, "bob's messages after the catch-up differ from carol's");
    assert!(server.metric("ringpush_slow_consumer_gaps_total") > 0);
    assert_eq!(server.metric("ringpush_slow_consumer_closes_total"), 0);
}

#[test]
fn a_client_that_never_reads_is_closed_with_4002_and_others_keep_receiving() {
    let server = start(
        "[limits]\noutbound_queue_bytes = 4096\nsend_rate_per_sec = 1000000\n\
         [heartbeat]\nping_interval_ms = 100\nidle_timeout_ms = 1000",
    );
    server.set_members("c1", &["alice", "bob", "carol"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut carol, _) = connect_synced(&server, "carol", "phone", &["c1"]);
    // Bob upgrades and syncs, then never reads again; he keeps sending pings, so he is
    // alive by PROTOCOL.md's rules and only the 4002 rule applies to him.
    let mut bob = connect_small_rcvbuf(server.client_addr(), 4096);
    let token = server.token("bob", "phone", 3600);
    bob.write_all(upgrade_request(&format!("/ws?token={token}"), &[]).as_bytes()).expect("upgrade");
    assert_eq!(read_response_head(&mut bob).0, 101);
    let hello: Value = serde_json::from_slice(&read_frame_skip_pings(&mut bob).payload).expect("hello");
    assert_eq!(hello["op"], "hello");
    bob.write_all(&client_frame(true, OP_TEXT, br#"{"op":"sync","conv":"c1","after":0}"#)).expect("sync");
    let synced: Value = serde_json::from_slice(&read_frame_skip_pings(&mut bob).payload).expect("synced");
    assert_eq!(synced["op"], "synced", "{synced}");

    let carol_reader = std::thread::spawn(move || read_until(&mut carol, |f| f["body"]["last"] == true));
    let text = "x".repeat(4000);
    let started = Instant::now();
    let mut n = 0;
    let closed = loop {
        for _ in 0..20 {
            n += 1;
            send_msg(&mut alice, "c1", &format!("m{n}"), &json!({"n": n, "text": text}));
        }
        for _ in 0..20 {
            read_op(&mut alice, "ack");
        }
        // A sign of life from bob; once the server has let go of him this may fail.
        let _ = bob.write_all(&client_frame(true, OP_PING, b""));
        let text = server.metrics();
        let closes = metric_value(&text, "ringpush_slow_consumer_closes_total");
        let idle = metric_value(&text, "ringpush_idle_drops_total");
        if closes + idle > 0 {
            break (closes, idle, started.elapsed());
        }
        // A liveness bound, not a measurement: on a loaded machine the cut comes later
        // than the 1 s idle timeout.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bob still connected after {n} messages:\n{text}"
        );
    };
    n += 1;
    send_acked(&mut alice, "c1", "last", &json!({"n": n, "last": true}));
    let carols = carol_reader.join().expect("carol's reader");
    assert_eq!(seqs(&carols), (1..=n).collect::<Vec<_>>(), "carol");
    // Alice is still served.
    let ack = send_acked(&mut alice, "c1", "after", &json!("still here"));
    assert_eq!(ack["seq"], n + 1);

    let (closes, idle, after) = closed;
    assert_eq!(
        (closes, idle),
        (1, 0),
        "bob kept pinging, so he must go as a slow consumer, not as idle ({after:?})"
    );
    assert_eq!(server.metric("ringpush_closes_sent_total{code=\"4002\"}"), 1);
    server.wait_metric("ringpush_connections", Duration::from_secs(3), |v| v == 2);
    server.wait_presence("bob", Duration::from_secs(2), |d| d.is_empty());
    // Bob's socket ends (what the kernel still held comes first; a 4002 close frame may be
    // among it, if it could be written at all).
    let (frames, _) = frames_until_eof(&mut bob, Duration::from_secs(5)).expect("bob's socket");
    if let Some(close) = frames.iter().find(|f| f.opcode == OP_CLOSE) {
        assert_eq!(close.close_code(), 4002);
    }
}

// ---------------------------------------------------------------------------------------
// The admin API
// ---------------------------------------------------------------------------------------

#[test]
fn api_members_put_replaces_post_adds_delete_removes() {
    let server = start("");
    // c1 and c2 have the same owner shard, so their messages to bob share one order.
    let c1 = id_on_shard("conv-a", 0, 2);
    let c2 = id_on_shard("conv-b", 0, 2);
    let members = |conv: &str| server.conversation(conv);
    let path = format!("/api/v1/conversations/{c1}/members");

    let put = server.api_expect("PUT", &path, Some(r#"{"users":["carol","alice","bob"]}"#), 200);
    assert_eq!(put, json!({"conv": c1, "members": 3}));
    assert_eq!(members(&c1), json!({"conv": c1, "members": ["alice", "bob", "carol"], "last_seq": 0}));
    let put = server.api_expect("PUT", &path, Some(r#"{"users":["dave","bob"]}"#), 200);
    assert_eq!(put, json!({"conv": c1, "members": 2}));
    assert_eq!(members(&c1)["members"], json!(["bob", "dave"]));
    let post = server.api_expect("POST", &path, Some(r#"{"users":["alice","bob"]}"#), 200);
    assert_eq!(post, json!({"conv": c1, "members": 3}));
    assert_eq!(members(&c1)["members"], json!(["alice", "bob", "dave"]));
    // An unknown conversation has no members and no messages.
    assert_eq!(members("never-made"), json!({"conv": "never-made", "members": [], "last_seq": 0}));

    server.set_members(&c2, &["bob", "alice"]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &[&c1, &c2]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &[&c1, &c2]);
    let (mut dave, _) = connect_synced(&server, "dave", "phone", &[&c1]);
    send_acked(&mut alice, &c1, "x1", &json!(1));
    assert_eq!(read_op(&mut bob, "msg")["seq"], 1);
    assert_eq!(read_op(&mut dave, "msg")["seq"], 1);
    assert_eq!(members(&c1)["last_seq"], 1);

    let del = server.api_expect("DELETE", &format!("{path}/bob"), None, 200);
    assert_eq!(del, json!({"conv": c1, "members": 2}));
    assert_eq!(members(&c1)["members"], json!(["alice", "dave"]));
    // Removed: bob's next frame is the c2 message sent after the c1 one, not the c1 one.
    send_acked(&mut alice, &c1, "x2", &json!(2));
    assert_eq!(read_op(&mut dave, "msg")["seq"], 2);
    server.post_message(&c2, "system", &json!("marker"));
    assert_eq!(read_op(&mut alice, "msg")["body"], "marker");
    let next = read_op(&mut bob, "msg");
    assert_eq!((next["conv"].as_str(), next["body"].as_str()), (Some(c2.as_str()), Some("marker")), "{next}");
    send_msg(&mut bob, &c1, "y1", &json!("am I still in?"));
    assert_error(&read_json(&mut bob), "not_member", Some("y1"), "send after DELETE");
    send_json(&mut bob, &json!({"op": "sync", "conv": c1, "after": 0}));
    assert_error(&read_json(&mut bob), "not_member", None, "sync after DELETE");
    // Removing who is not a member changes nothing.
    let del = server.api_expect("DELETE", &format!("{path}/bob"), None, 200);
    assert_eq!(del, json!({"conv": c1, "members": 2}));

    // Added back, bob's open connection gets c1 again.
    let post = server.api_expect("POST", &path, Some(r#"{"users":["bob"]}"#), 200);
    assert_eq!(post, json!({"conv": c1, "members": 3}));
    let ack = send_acked(&mut alice, &c1, "x3", &json!(3));
    assert_eq!(read_op(&mut dave, "msg")["seq"], ack["seq"]);
    let m = read_op(&mut bob, "msg");
    assert_eq!((m["conv"].as_str(), m["seq"].as_u64()), (Some(c1.as_str()), ack["seq"].as_u64()), "{m}");

    // PUT that leaves dave out removes him from live delivery too.
    server.api_expect("PUT", &path, Some(r#"{"users":["alice"]}"#), 200);
    send_acked(&mut alice, &c1, "x4", &json!(4));
    send_msg(&mut dave, &c1, "d1", &json!("and me?"));
    assert_error(&read_json(&mut dave), "not_member", Some("d1"), "send after PUT without dave");
}

#[test]
fn api_messages_are_sequenced_and_delivered_with_null_dev_and_cid() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut laptop, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    let (mut phone, _) = connect_synced(&server, "alice", "phone", &["c1"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    send_acked(&mut laptop, "c1", "a1", &json!("first"));
    for ws in [&mut phone, &mut bob] {
        assert_eq!(read_op(ws, "msg")["seq"], 1);
    }
    let body = json!({"kind": "notice", "text": "bob joined"});
    let before = unix_ms();
    let seq = server.post_message("c1", "system", &body);
    assert_eq!(seq, 2);
    // Every connection of every member, the "from" user's included (alice, below).
    let mut ts = None;
    for (who, ws) in [("laptop", &mut laptop), ("phone", &mut phone), ("bob", &mut bob)] {
        let m = read_op(ws, "msg");
        let t = *ts.get_or_insert_with(|| m["ts"].as_u64().unwrap_or(0));
        assert!(t >= before.saturating_sub(1000) && t <= unix_ms() + 1000, "ts {t}");
        let expected = json!({
            "op": "msg", "conv": "c1", "seq": 2, "from": "system", "dev": null, "cid": null,
            "ts": t, "body": body,
        });
        assert_eq!(m, expected, "{who}");
    }
    let seq = server.post_message("c1", "alice", &json!([1, 2, 3]));
    assert_eq!(seq, 3);
    for ws in [&mut laptop, &mut phone, &mut bob] {
        let m = read_op(ws, "msg");
        assert_eq!(
            (m["seq"].as_u64(), m["from"].as_str(), &m["dev"], &m["cid"]),
            (Some(3), Some("alice"), &Value::Null, &Value::Null),
            "{m}"
        );
    }
    // Stored like any other message.
    let result = sync(&mut bob, "c1", 1, None);
    assert_eq!(result.seqs(), vec![2, 3]);
    assert_eq!(result.msgs[0]["body"], body);
    assert_eq!(server.conversation("c1")["last_seq"], 3);
}

#[test]
fn api_push_reaches_only_its_users_and_broadcast_reaches_everyone() {
    let server = start("");
    let (mut bob, _) = connect_client(&server, "bob", "phone");
    let (mut carol, _) = connect_client(&server, "carol", "web");
    // Alice's devices on both shards.
    let mut alice: Vec<Ws> = connect_spread(&server, "alice", "dev", 2, 2).into_iter().map(|c| c.0).collect();

    let push = server.api_expect(
        "POST",
        "/api/v1/push",
        Some(r#"{"users":["alice","carol"],"body":{"badge":3}}"#),
        202,
    );
    assert_eq!(push, json!({"ok": true}));
    let pushed = json!({"op": "push", "body": {"badge": 3}});
    for (i, ws) in alice.iter_mut().enumerate() {
        expect_frame(ws, &format!("alice's device {i}"), &pushed);
    }
    expect_frame(&mut carol, "carol", &pushed);
    let push = server.api_expect("POST", "/api/v1/push", Some(r#"{"users":["nobody"],"body":"x"}"#), 202);
    assert_eq!(push, json!({"ok": true}));

    let b = server.api_expect("POST", "/api/v1/broadcast", Some(r#"{"body":{"maintenance":"soon"}}"#), 202);
    assert_eq!(b, json!({"ok": true}));
    // The broadcast is the next frame everywhere: bob got no push.
    let broadcast = json!({"op": "push", "body": {"maintenance": "soon"}});
    expect_frame(&mut bob, "bob", &broadcast);
    expect_frame(&mut carol, "carol", &broadcast);
    for (i, ws) in alice.iter_mut().enumerate() {
        expect_frame(ws, &format!("alice's device {i}"), &broadcast);
    }
    assert_eq!(server.metric("ringpush_pushes_delivered_total"), 2 * alice.len() as u64 + 3);
}

#[test]
fn api_presence_lists_devices_and_disconnect_closes_them_with_4001() {
    let server = start("");
    server.set_members("c1", &["alice", "bob"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    let before = unix_ms();
    // Alice's devices on both shards.
    let mut alice = connect_spread(&server, "alice", "dev", 2, 2);
    let after = unix_ms();

    let devices = server.wait_presence("alice", Duration::from_secs(2), |d| d.len() == alice.len());
    for (_, hello) in &alice {
        let entry = devices
            .iter()
            .find(|d| d["conn"] == hello["conn"])
            .unwrap_or_else(|| panic!("conn {} not in {devices:?}", hello["conn"]));
        let since = entry["since"].as_u64().unwrap_or(0);
        assert!(since >= before.saturating_sub(1000) && since <= after + 1000, "since {since}: {entry}");
        let expected = json!({
            "device": hello["device"], "conn": hello["conn"], "node": hello["node"],
            "ip": "127.0.0.1", "since": since,
        });
        assert_eq!(entry, &expected);
    }
    assert_eq!(server.presence("nobody"), Vec::<Value>::new());

    let answer = server.api_expect("POST", "/api/v1/users/alice/disconnect", None, 200);
    assert_eq!(answer, json!({"ok": true}));
    for (i, (ws, _)) in alice.iter_mut().enumerate() {
        assert_eq!(code_of(&read_close(ws)), 4001, "alice's device {i}");
        finish_close(ws, Duration::from_secs(2));
    }
    server.wait_presence("alice", Duration::from_secs(2), |d| d.is_empty());
    assert_eq!(server.presence("bob").len(), 1);
    assert_eq!(server.metric("ringpush_closes_sent_total{code=\"4001\"}"), alice.len() as u64);
    // Bob is untouched and the conversation goes on without alice's connections.
    let seq = server.post_message("c1", "system", &json!("after the kick"));
    assert_eq!(read_op(&mut bob, "msg")["seq"], seq);
    // Disconnecting a user without connections is fine.
    assert_eq!(server.api_expect("POST", "/api/v1/users/nobody/disconnect", None, 200), json!({"ok": true}));
}

#[test]
fn api_refuses_bad_calls_with_the_documented_statuses() {
    let server = start("");
    let admin = server.admin_addr();
    let error = |resp: &HttpResponse, status: u16, what: &str| {
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        let body = resp.json();
        assert!(body["error"].is_string() && body["message"].is_string(), "{what}: {body}");
    };
    // 401 without the key, whatever the call.
    for (method, path, body) in [
        ("GET", "/api/v1/conversations/c1", None),
        ("PUT", "/api/v1/conversations/c1/members", Some(r#"{"users":["a"]}"#)),
        ("POST", "/api/v1/conversations/c1/messages", Some(r#"{"from":"a","body":1}"#)),
        ("POST", "/api/v1/broadcast", Some(r#"{"body":1}"#)),
        ("GET", "/api/v1/presence/alice", None),
        ("POST", "/api/v1/users/alice/disconnect", None),
    ] {
        error(&http(admin, method, path, None, body), 401, &format!("{method} {path} without key"));
        error(
            &http(admin, method, path, Some("wrong-key"), body),
            401,
            &format!("{method} {path} wrong key"),
        );
    }
    // 400: bad JSON, missing fields, bad ids.
    let members = "/api/v1/conversations/c1/members";
    for (method, path, body, what) in [
        ("PUT", members, Some("{"), "truncated JSON"),
        ("PUT", members, Some("not json"), "not JSON"),
        ("PUT", members, Some("{}"), "no users"),
        ("PUT", members, Some(r#"{"users":"alice"}"#), "users not a list"),
        ("PUT", members, Some(r#"{"users":["bad user"]}"#), "user id with a space"),
        ("POST", members, Some(r#"{"users":[""]}"#), "empty user id"),
        ("PUT", "/api/v1/conversations/bad!conv/members", Some(r#"{"users":["a"]}"#), "bad conv id"),
        ("GET", "/api/v1/conversations/bad!conv", None, "GET bad conv id"),
        ("DELETE", "/api/v1/conversations/c1/members/bad!user", None, "DELETE bad user id"),
        ("POST", "/api/v1/conversations/c1/messages", Some(r#"{"body":1}"#), "message without from"),
        ("POST", "/api/v1/conversations/c1/messages", Some(r#"{"from":"a"}"#), "message without body"),
        ("POST", "/api/v1/conversations/c1/messages", Some(r#"{"from":"a b","body":1}"#), "message bad from"),
        ("POST", "/api/v1/conversations/c1/messages", Some("[1,2"), "message bad JSON"),
        ("POST", "/api/v1/push", Some(r#"{"body":1}"#), "push without users"),
        ("POST", "/api/v1/push", Some(r#"{"users":["a b"],"body":1}"#), "push bad user id"),
        ("POST", "/api/v1/broadcast", Some("{"), "broadcast bad JSON"),
        ("GET", "/api/v1/presence/bad!user", None, "presence bad user id"),
        ("POST", "/api/v1/users/bad!user/disconnect", None, "disconnect bad user id"),
    ] {
        error(&server.api(method, path, body), 400, what);
    }
    let long_conv = format!("/api/v1/conversations/{}", "c".repeat(129));
    error(&server.api("GET", &long_conv, None), 400, "129-char conv id");
    // Nothing of that was applied.
    assert_eq!(server.conversation("c1"), json!({"conv": "c1", "members": [], "last_seq": 0}));
    // 404 for unknown calls.
    for (method, path) in [
        ("GET", "/api/v1/nope"),
        ("GET", "/api/v1/conversations"),
        ("DELETE", "/api/v1/conversations/c1"),
        ("GET", "/api/v1/conversations/c1/messages"),
        ("POST", "/api/v2/push"),
        ("GET", "/api/v1/users/alice/disconnect"),
    ] {
        error(&server.api(method, path, Some("{}")), 404, &format!("{method} {path}"));
    }
    // 413 for a body over 1 MiB (announced; the server need not read it), while exactly
    // 1 MiB is accepted.
    let head = format!(
        "POST /api/v1/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (1 << 20) + 1
    );
    error(&raw_http(admin, head.as_bytes()), 413, "body of 1 MiB + 1");
    let pad = (1 << 20) - r#"{"users":["nobody"],"body":""}"#.len();
    let exact = format!(r#"{{"users":["nobody"],"body":"{}"}}"#, "p".repeat(pad));
    assert_eq!(exact.len(), 1 << 20);
    let resp = server.api("POST", "/api/v1/push", Some(&exact));
    assert_eq!(resp.status, 202, "a body of exactly 1 MiB: {}", resp.head);
}

#[test]
fn a_member_added_through_the_api_gets_live_messages_without_reconnecting() {
    let server = start("");
    // c1 and c2 on different owner shards.
    let c1 = id_on_shard("conv-a", 0, 2);
    let c2 = id_on_shard("conv-b", 1, 2);
    server.set_members(&c1, &["alice", "bob"]);
    server.set_members(&c2, &["alice"]);
    let (mut bob, _) = connect_synced(&server, "bob", "phone", &[&c1]);
    let (mut alice, _) = connect_synced(&server, "alice", "phone", &[&c1, &c2]);

    let added = server.api_expect(
        "POST",
        &format!("/api/v1/conversations/{c2}/members"),
        Some(r#"{"users":["bob"]}"#),
        200,
    );
    assert_eq!(added, json!({"conv": c2, "members": 2}));
    // Right after the API answered: an API message and a client send both reach bob's
    // open connection, which did nothing since.
    let seq = server.post_message(&c2, "system", &json!("welcome, bob"));
    assert_eq!(read_op(&mut alice, "msg")["seq"], seq);
    let m = read_op(&mut bob, "msg");
    assert_eq!(
        (m["conv"].as_str(), m["seq"].as_u64(), m["body"].as_str()),
        (Some(c2.as_str()), Some(seq), Some("welcome, bob")),
        "{m}"
    );
    let ack = send_acked(&mut alice, &c2, "hi", &json!("hi bob"));
    let m = read_op(&mut bob, "msg");
    assert_eq!(
        (m["conv"].as_str(), m["seq"].as_u64(), m["from"].as_str()),
        (Some(c2.as_str()), ack["seq"].as_u64(), Some("alice")),
        "{m}"
    );
    // Bob can send there too, and alice gets it.
    let ack = send_acked(&mut bob, &c2, "b1", &json!("thanks"));
    assert_eq!(read_op(&mut alice, "msg")["seq"], ack["seq"]);
}
