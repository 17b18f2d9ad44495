//! Webhooks (PROTOCOL.md, "Webhooks: offline members and presence") against a real HTTP
//! receiver started by the test: it answers 500s, hangs past the timeout, then recovers,
//! and checks the signature of every request. One node (events in memory) and three nodes
//! on a real redis-server (a node killed with events pending: another node sends them).

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{free_port, Redis};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "whsecret-for-tests";

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Say nothing for this long (past the server's `timeout_ms`), then 200.
    Hang(Duration),
}

/// One request as the receiver saw it.
#[derive(Debug)]
struct Seen {
    body: String,
    answered: u16,
    /// The signature header checked out against the body and the secret.
    signed: bool,
}

/// A real HTTP/1.1 receiver on 127.0.0.1:0 (keep-alive, Content-Length bodies).
struct Receiver {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
    /// Answers to give, in order; then `otherwise`.
    script: Arc<Mutex<(VecDeque<Answer>, Answer)>>,
}

impl Receiver {
    fn start(script: &[Answer], otherwise: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let (tx, seen) = mpsc::channel();
        let script = Arc::new(Mutex::new((script.iter().copied().collect::<VecDeque<_>>(), otherwise)));
        let answers = script.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (tx, answers) = (tx.clone(), answers.clone());
                std::thread::spawn(move || serve(stream, &tx, &answers));
            }
        });
        Receiver { addr, seen, script }
    }

    fn url(&self) -> String {
        format!("http://{}/ringpush/events", self.addr)
    }

    /// From now on every request gets `answer`.
    fn answer_all(&self, answer: Answer) {
        let mut script = self.script.lock().expect("script");
        script.0.clear();
        script.1 = answer;
    }

    /// The next request, within `wait`.
    fn next(&self, wait: Duration) -> Option<Seen> {
        self.seen.recv_timeout(wait).ok()
    }
}

fn serve(stream: TcpStream, tx: &mpsc::Sender<Seen>, answers: &Mutex<(VecDeque<Answer>, Answer)>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut signature) = (0usize, String::new());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "x-ringpush-signature" => signature = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8(body).expect("utf-8 body");
        let answer = {
            let mut script = answers.lock().expect("script");
            let otherwise = script.1;
            script.0.pop_front().unwrap_or(otherwise)
        };
        // A hung request answers 200 too late: the server has counted it failed (0 here).
        let (status, answered) = match answer {
            Answer::Status(status) => (status, status),
            Answer::Hang(d) => {
                std::thread::sleep(d);
                (200, 0)
            }
        };
        let signed = verify(&signature, &body);
        let _ = tx.send(Seen { body, answered, signed });
        let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// `t=<secs>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`, with `t` within a minute.
fn verify(header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = Some(value.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let now = unix_ms() / 1000;
    if now.abs_diff(t) > 60 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(format!("{t}.{body}").as_bytes());
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    expected == v1
}

/// Every request seen until `done` holds for the delivered events (in delivery order);
/// asserts each request was signed, and that an id is only seen again as the retry of a
/// request that was not answered 2xx.
struct Log {
    requests: Vec<Seen>,
    delivered: Vec<Value>,
}

impl Log {
    fn new() -> Log {
        Log { requests: Vec::new(), delivered: Vec::new() }
    }

    fn until(&mut self, receiver: &Receiver, wait: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + wait;
        while !done(&self.delivered) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(seen) = receiver.next(left) else {
                panic!("{what}: not delivered within {wait:?}; delivered {:#?}", self.delivered)
            };
            assert!(seen.signed, "a request without a valid signature: {seen:?}");
            let batch: Value = serde_json::from_str(&seen.body).expect("JSON body");
            assert!(batch["ts"].is_u64(), "{batch}");
            let events = batch["events"].as_array().expect("events").clone();
            if (200..300).contains(&seen.answered) {
                for event in &events {
                    let id = &event["id"];
                    assert!(
                        !self.delivered.iter().any(|e| &e["id"] == id),
                        "{id} delivered twice (only retries of a failed request may repeat it)"
                    );
                }
                self.delivered.extend(events);
            }
            self.requests.push(seen);
        }
    }

    fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.delivered.iter().filter(|e| e["type"] == kind).collect()
    }
}

fn hook_toml(receiver: &Receiver, delay_ms: u64) -> String {
    format!(
        "[webhook]\nurl = \"{}\"\nsecret = \"{SECRET}\"\noffline_delay_ms = {delay_ms}\ntimeout_ms = 400\nmax_batch = 5\n",
        receiver.url()
    )
}

const BASE: &str = "shards = 2\n[heartbeat]\nidle_timeout_ms = 10000\n[limits]\nsend_rate_per_sec = 10000\n";

#[test]
fn offline_members_and_presence_reach_a_receiver_that_fails_then_recovers() {
    // Two 500s and a hang past the timeout before the receiver works.
    let fails = [Answer::Status(500), Answer::Status(503), Answer::Hang(Duration::from_millis(900))];
    let receiver = Receiver::start(&fails, Answer::Status(200));
    let server = Server::start(&merge_toml(&[BASE, &hook_toml(&receiver, 400)]));
    server.set_members("c1", &["alice", "bob", "carol"]);
    let mut log = Log::new();

    // alice comes online: one user.online.
    let (mut alice, _) = connect_synced(&server, "alice", "laptop", &["c1"]);
    log.until(&receiver, Duration::from_secs(20), "alice online", |d| {
        d.iter().any(|e| e["type"] == "user.online")
    });
    let online = log.of_type("user.online");
    assert_eq!((online.len(), online[0]["user"].as_str()), (1, Some("alice")), "{online:?}");
    assert_eq!(log.requests.iter().filter(|r| r.answered != 200).count(), 3, "the failures were retried");

    // Three messages within the delay: one event each for bob (offline) and carol, unless
    // carol reads them on another device within the delay. alice sent them: nothing.
    for i in 1..=3 {
        send_acked(&mut alice, "c1", &format!("m{i}"), &json!({"text": format!("hi {i}")}));
    }
    let read =
        server.api_expect("POST", "/api/v1/conversations/c1/read", Some(r#"{"user":"carol","seq":3}"#), 200);
    assert_eq!(read["read"], 3);
    log.until(&receiver, Duration::from_secs(10), "bob's message.offline", |d| {
        d.iter().any(|e| e["type"] == "message.offline")
    });

    // alice drops and comes back within the delay: no user.offline. Then she goes: one.
    drop(alice);
    let (alice, _) = connect_client(&server, "alice", "phone");
    drop(alice);
    log.until(&receiver, Duration::from_secs(10), "alice offline", |d| {
        d.iter().any(|e| e["type"] == "user.offline")
    });

    // Everything submitted before alice's user.offline has arrived (the sender keeps order).
    let offline = log.of_type("message.offline");
    assert_eq!(offline.len(), 1, "one event per (user, conversation) per window: {offline:#?}");
    let event = offline[0];
    let ts = event["last"]["ts"].as_u64().expect("ts");
    assert_eq!(
        *event,
        json!({
            "type": "message.offline", "id": "c1:bob:3", "user": "bob", "conv": "c1",
            "from_seq": 1, "last_seq": 3, "count": 3,
            "last": {"from": "alice", "seq": 3, "ts": ts, "body": {"text": "hi 3"}},
        })
    );
    let users: Vec<(&str, &str)> = log
        .delivered
        .iter()
        .filter(|e| e["type"] != "message.offline")
        .map(|e| (e["type"].as_str().unwrap_or(""), e["user"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(users, vec![("user.online", "alice"), ("user.offline", "alice")]);
    for e in log.of_type("user.offline").iter().chain(&log.of_type("user.online")) {
        assert!(e["id"].as_str().is_some_and(|id| id.starts_with("alice:")) && e["ts"].is_u64(), "{e}");
    }

    // The sender counts a batch delivered once it has read the receiver's answer.
    server.wait_metric("ringpush_webhook_delivered_total", Duration::from_secs(5), |n| n == 3);
    let metrics = server.metrics();
    assert!(metric_value(&metrics, "ringpush_webhook_retried_total") >= 3);
    assert!(metrics.contains("ringpush_webhook_events_total{type=\"message.offline\"} 1"), "{metrics}");
}

#[test]
fn a_member_online_or_a_message_already_read_causes_no_offline_event() {
    let receiver = Receiver::start(&[], Answer::Status(200));
    let server = Server::start(&merge_toml(&[BASE, &hook_toml(&receiver, 300)]));
    server.set_members("c1", &["alice", "bob", "dave"]);
    let mut log = Log::new();
    let (_bob, _) = connect_synced(&server, "bob", "phone", &["c1"]);
    log.until(&receiver, Duration::from_secs(10), "bob online", |d| !d.is_empty());
    // bob is online; dave is offline but reads the message within the delay.
    let seq = server.post_message("c1", "alice", &json!("one"));
    let read = format!(r#"{{"user":"dave","seq":{seq}}}"#);
    server.api_expect("POST", "/api/v1/conversations/c1/read", Some(&read), 200);
    server.wait_metric("ringpush_webhook_windows_total", Duration::from_secs(10), |n| n >= 1);
    // The window of c1 is decided. A sentinel after it: a message dave has not read.
    server.set_members("c2", &["alice", "dave"]);
    server.post_message("c2", "alice", &json!("two"));
    log.until(&receiver, Duration::from_secs(10), "the sentinel", |d| d.iter().any(|e| e["conv"] == "c2"));
    let offline = log.of_type("message.offline");
    assert_eq!(offline.len(), 1, "only the sentinel: {offline:#?}");
    assert_eq!((offline[0]["user"].as_str(), offline[0]["id"].as_str()), (Some("dave"), Some("c2:dave:1")));
}

// ---------------------------------------------------------------------------------------
// Three nodes on Redis
// ---------------------------------------------------------------------------------------

fn start_node(name: &str, redis: &Redis, extra: &str) -> Server {
    let publish = free_port();
    let node = format!(
        "node_id = \"{name}\"\nshards = 1\n[redis]\nurl = \"{url}\"\n[cluster]\npub_listen = \"tcp://127.0.0.1:{publish}\"\nadvertise = \"tcp://127.0.0.1:{publish}\"\n",
        url = redis.url(),
    );
    Server::start(&merge_toml(&[&node, extra]))
}

#[test]
fn events_pending_on_a_killed_node_are_sent_by_another_node() {
    let receiver = Receiver::start(&[], Answer::Status(500));
    let redis = Redis::start();
    let hooks = hook_toml(&receiver, 200);
    let nodes: Vec<Server> = (1..=3).map(|i| start_node(&format!("n{i}"), &redis, &hooks)).collect();
    for node in &nodes {
        node.wait_metric("ringpush_cluster_peers", Duration::from_secs(10), |n| n == 2);
    }
    // Ten conversations with an offline member each, posted on n1: ten events, which n1
    // cannot deliver (the receiver answers 500).
    let convs: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for conv in &convs {
        nodes[0].set_members(conv, &["poster", "sleeper"]);
        nodes[0].post_message(conv, "poster", &json!({"conv": conv}));
    }
    let pending = |redis: &Redis| -> usize {
        let keys = redis.cli(&["--scan", "--pattern", "rp:{ctl}:wh:{n1}:*"]);
        keys.lines()
            .filter(|k| !k.is_empty())
            .map(|k| redis.cli(&["HLEN", k]).trim().parse::<usize>().unwrap_or(0))
            .sum()
    };
    // Wait until n1 has tried (and failed) to deliver all ten, and they are kept in Redis.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pending(&redis) < 10 {
        assert!(Instant::now() < deadline, "n1's events not pending in Redis: {}", pending(&redis));
        receiver.next(Duration::from_millis(200));
    }
    nodes[0].kill();
    receiver.answer_all(Answer::Status(200));
    let mut log = Log::new();
    log.until(&receiver, Duration::from_secs(30), "n1's events from another node", |d| {
        convs.iter().all(|c| d.iter().any(|e| e["conv"] == c.as_str()))
    });
    let ids: BTreeMap<String, usize> = log.delivered.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["id"].as_str().unwrap_or("").to_owned()).or_default() += 1;
        m
    });
    for conv in &convs {
        assert_eq!(ids.get(&format!("{conv}:sleeper:1")), Some(&1), "{ids:?}");
    }
    let taken = nodes[1].metric("ringpush_webhook_delivered_total")
        + nodes[2].metric("ringpush_webhook_delivered_total");
    assert!(taken >= 10, "delivered by the survivors: {taken}");
    assert_eq!(pending(&redis), 0, "n1's hash is gone once taken over");
}
